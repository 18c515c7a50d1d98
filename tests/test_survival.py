"""Survival classes: the thresholds, and planted correlations landing in their class."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sae_audit.correlate import correlate_variant
from sae_audit.fp_stats import fp_feature_stats
from sae_audit.survival import SurvivalConfig, classify, feature_table

from .conftest import sparse_random, write_dense


def test_classify_boundaries() -> None:
    r = pl.Series("r", [0.95, 0.9, 0.7, 0.5, 0.4999, -0.3, float("nan"), None])
    assert classify(r).to_list() == [
        "survived", "blurred", "blurred", "blurred", "destroyed", "destroyed", None, None
    ]  # fmt: skip
    cfg = SurvivalConfig(survived=0.6, destroyed=0.6)
    assert classify(r, cfg).to_list()[:5] == [
        "survived",
        "survived",
        "survived",
        "destroyed",
        "destroyed",
    ]
    with pytest.raises(ValueError, match="destroyed"):
        SurvivalConfig(survived=0.5, destroyed=0.6)
    with pytest.raises(ValueError, match="survived"):
        SurvivalConfig(survived=1.5)


def test_planted_correlations_land_in_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n, d = 20000, 6
    x = sparse_random(rng, n, d, 0.3)
    x[:, 5] = 0.0
    x[rng.choice(n, 3, replace=False), 5] = 1.0  # fires on 3/20000 tokens: inactive
    y = x.copy()
    for f, target in ((0, 0.97), (1, 0.7), (2, 0.2)):
        sd = x[:, f].std()
        y[:, f] = x[:, f] + rng.normal(0, sd * math.sqrt(1 / target**2 - 1), n)
    y[:, 3] = 0.0  # silent in the variant
    fp = write_dense(tmp_path, "fp", x, n_shards=2, rows_per_write=4000)
    var = write_dense(tmp_path, "v", y, n_shards=2, rows_per_write=4000)
    table = feature_table(fp_feature_stats(fp), correlate_variant(fp, var))
    assert table["active"].to_list() == [True, True, True, True, True, False]
    assert table["class"].to_list() == [
        "survived",
        "blurred",
        "destroyed",
        "destroyed",
        "survived",
        None,
    ]
    r = table["r"].to_numpy()
    np.testing.assert_allclose(r[:3], [0.97, 0.7, 0.2], atol=0.02)
    np.testing.assert_allclose(table["damage"].to_numpy(), 1 - r)
    assert r[4] == pytest.approx(1.0)
