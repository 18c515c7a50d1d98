"""Overlap of two variants' damage: Jaccard of the class sets and rank correlation, by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest
from scipy import stats

from sae_audit import table_docs
from sae_audit.overlap import (
    chance_jaccard,
    jaccard,
    null_variants,
    overlap,
    overlap_p,
    overlap_table,
)


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


def test_chance_jaccard_is_the_exact_expectation_by_brute_force() -> None:
    n, a, b = 7, 3, 4
    fixed = set(range(a))
    # every b-subset of n items equally likely: the exact expectation, by enumeration
    subsets = [set(c) for c in itertools.combinations(range(n), b)]
    exact = sum(len(fixed & s) / len(fixed | s) for s in subsets) / len(subsets)
    assert chance_jaccard(n, a, b) == pytest.approx(exact, rel=1e-12)
    # ... and both sets random gives the same, by simulation on a larger case
    rng = np.random.default_rng(0)
    n, a, b = 200, 30, 50
    sims = []
    for _ in range(4000):
        x, y = set(rng.choice(n, a, replace=False)), set(rng.choice(n, b, replace=False))
        sims.append(len(x & y) / len(x | y))
    assert chance_jaccard(n, a, b) == pytest.approx(np.mean(sims), abs=3 * np.std(sims) / 63)
    # the first-order approximation E|A & B| / (a + b - E|A & B|) is close, not equal
    k = a * b / n
    assert chance_jaccard(n, a, b) == pytest.approx(k / (a + b - k), rel=0.05)
    assert chance_jaccard(10, 0, 0) is None and chance_jaccard(10, 0, 4) == 0.0
    assert chance_jaccard(5, 5, 5) == 1.0  # every set is the whole universe


def test_overlap_p_small_for_identical_sets_and_large_for_independent_ones() -> None:
    n, size = 1000, 50
    assert overlap_p(n, size, size, size) < 1e-50  # planted: the same 50 features
    rng = np.random.default_rng(1)
    ps = []
    for _ in range(300):
        x, y = set(rng.choice(n, size, replace=False)), set(rng.choice(n, size, replace=False))
        ps.append(overlap_p(n, size, size, len(x & y)))
    assert np.median(ps) > 0.3
    assert np.mean(np.array(ps) < 0.05) <= 0.05 + 0.03  # a valid test: few false alarms
    assert overlap_p(n, 0, 0, 0) is None and overlap_p(n, 0, 7, 0) == 1.0


def _damage_table(classes: list[str], damage: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "feature": np.arange(len(classes), dtype=np.int32),
            "active": [True] * len(classes),
            "class": classes,
            "damage": damage,
        }
    )


def test_overlap_baselines_null_spearman_and_insufficient_features() -> None:
    rng = np.random.default_rng(2)
    n = 400
    fragility = rng.exponential(1.0, n)  # what any perturbation tracks
    da = fragility + rng.normal(0, 0.3, n)
    db = fragility + rng.normal(0, 0.3, n)
    null = 0.001 * fragility + rng.normal(0, 0.0005, n)  # negligible, same ranking
    cls_a = ["destroyed" if d > 2.0 else "survived" for d in da]
    cls_b = ["destroyed" if d > 2.0 else "survived" for d in db]
    cls_a[0] = cls_b[1] = "insufficient"  # in no set, and out of the universe
    a, b = _damage_table(cls_a, da), _damage_table(cls_b, db)
    nul = _damage_table(["survived"] * n, null)
    out = overlap(a, b, nul, "fp-null")
    assert out["n"] == n and out["n_classed"] == n - 2
    assert out["null_variant"] == "fp-null"
    # the null ranks features like b does: the pair's Spearman must be read against it
    assert out["spearman_null"] == pytest.approx(stats.spearmanr(db, null).statistic, abs=1e-12)
    assert out["spearman_null"] > 0.5 and out["spearman"] > 0.5
    assert out["spearman_perm_p"] == pytest.approx(1 / 1000)  # no permutation reaches it
    keep = np.ones(n, bool)
    keep[[0, 1]] = False
    sa = {i for i in range(n) if keep[i] and cls_a[i] == "destroyed"}
    sb = {i for i in range(n) if keep[i] and cls_b[i] == "destroyed"}
    assert (out["n_destroyed_a"], out["n_destroyed_b"]) == (len(sa), len(sb))
    assert out["n_destroyed_both"] == len(sa & sb)
    assert out["jaccard_destroyed_chance"] == pytest.approx(chance_jaccard(n - 2, len(sa), len(sb)))
    assert out["jaccard_destroyed"] > 3 * out["jaccard_destroyed_chance"]
    assert out["jaccard_destroyed_p"] < 1e-6
    # no null variant: null with a reason; independent damage: a large permutation p
    alone = overlap(a, _damage_table(cls_b, rng.permutation(db)))
    assert alone["spearman_null"] is None and alone["null_variant"] is None
    assert "spearman_null undefined" in alone["reason"]
    assert alone["spearman_perm_p"] > 0.01


def test_overlap_table_uses_the_null_variant_and_never_nan(tmp_path) -> None:
    rng = np.random.default_rng(3)
    n = 30
    tables = {
        v: _damage_table(["survived"] * (n - 5) + ["destroyed"] * 5, rng.random(n))
        for v in ("rtn-int4", "prune-matched-rtn-int4", "fp-null")
    }
    table = overlap_table(tables, [["rtn-int4", "prune-matched-rtn-int4"], ["rtn-int4", "fp-null"]])
    first, second = table.to_dicts()
    assert first["null_variant"] == "fp-null" and first["spearman_null"] is not None
    assert second["null_variant"] is None  # the pair holds the null itself
    assert first["jaccard_destroyed"] == 1.0 and first["jaccard_destroyed_p"] < 1e-5
    floats = [c for c, t in table.schema.items() if t == pl.Float64]
    assert not table.select(pl.any_horizontal(pl.col(floats).is_nan())).to_series().any()
    table.write_parquet(tmp_path / "o.parquet")
    # its columns are the documented ones (tables.schema.yaml), with no pair too
    assert table_docs.problems("overlap", table.schema) == []
    assert table_docs.problems("overlap", overlap_table(tables, []).schema) == []
    # an identical rerun damages nothing: constant damage, an undefined null Spearman
    tables["fp-null"] = tables["fp-null"].with_columns(pl.lit(0.0).alias("damage"))
    (row,) = overlap_table(tables, [["rtn-int4", "prune-matched-rtn-int4"]]).to_dicts()
    assert row["null_variant"] == "fp-null" and row["spearman_null"] is None
    assert "null variant 'fp-null' damages no feature" in row["reason"]
    # the numeric-noise null, where the variant grammar has it, comes first
    if "fp-noise" in null_variants(["fp-noise"]):
        tables["fp-noise"] = _damage_table(["survived"] * n, rng.random(n))
        (row,) = overlap_table(tables, [["rtn-int4", "prune-matched-rtn-int4"]]).to_dicts()
        assert row["null_variant"] == "fp-noise" and row["spearman_null"] is not None
