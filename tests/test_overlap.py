"""Overlap of two variants' damage: Jaccard of the class sets and rank correlation, by hand."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from sae_audit.overlap import jaccard, overlap


def test_overlap_jaccard_and_spearman_by_hand() -> None:
    def table(classes: list[str], damage: list[float]) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "feature": np.arange(7, dtype=np.int32),
                "active": [True] * 6 + [False],
                "class": [*classes, None],
                "damage": damage,
            }
        )

    a = table(["survived", "blurred", "destroyed", "destroyed", "survived", "blurred"],
              [0.0, 0.3, 0.8, 0.9, 0.05, 0.4, 5.0])  # fmt: skip
    b = table(["survived", "destroyed", "destroyed", "blurred", "survived", "survived"],
              [0.01, 0.7, 0.95, 0.35, 0.02, 0.08, -4.0])  # fmt: skip
    out = overlap(a, b)
    assert out["n"] == 6
    # non-surviving: a {1,2,3,5}, b {1,2,3} -> 3/4; blurred: {1,5} vs {3} -> 0;
    # destroyed: {2,3} vs {1,2} -> 1/3.
    assert out["jaccard_nonsurviving"] == pytest.approx(3 / 4)
    assert out["jaccard_blurred"] == 0.0
    assert out["jaccard_destroyed"] == pytest.approx(1 / 3)
    # ranks a [1,3,5,6,2,4], b [1,5,6,4,2,3]: d = [0,-2,-1,2,0,1], sum d^2 = 10,
    # rho = 1 - 6*10 / (6*35) = 5/7.
    assert out["spearman"] == pytest.approx(5 / 7)
    da = np.array([0.0, 0.3, 0.8, 0.9, 0.05, 0.4])
    db = np.array([0.01, 0.7, 0.95, 0.35, 0.02, 0.08])
    da_c, db_c = da - da.mean(), db - db.mean()
    assert out["pearson"] == pytest.approx((da_c @ db_c) / math.sqrt((da_c @ da_c) * (db_c @ db_c)))
    # Two empty sets: undefined (None), never 1.0 (that would read as perfect agreement).
    assert jaccard(set(), set()) is None
    assert jaccard({1}, set()) == 0.0
    assert jaccard({1, 2}, {2, 3, 4}) == pytest.approx(1 / 4)
