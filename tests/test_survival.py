"""Survival classes: the thresholds, and planted correlations landing in their class."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sae_audit.correlate import correlate_variant
from sae_audit.fp_stats import fp_feature_stats
from sae_audit.survival import CLASSES, SurvivalConfig, classify, feature_table, summary

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
    fp_stats = fp_feature_stats(fp)
    table = feature_table(fp_stats, correlate_variant(fp, var))
    # one name per fact: the FP count once, no internal sums
    assert not {"sum", "sum_sq", "fp_fire_count"} & set(table.columns)
    assert table["firing_count"].to_list() == fp_stats["firing_count"].to_list()
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


def _pattern_table(tmp_path: Path, repeats: int) -> pl.DataFrame:
    """One feature firing on 3 tokens of every 600 with r = 0.95, the pattern ``repeats``
    times: the same r, and a support of 3 * repeats tokens."""
    x, y = np.zeros((600, 1)), np.zeros((600, 1))
    x[[10, 200, 400], 0] = [1.0, 2.0, 3.0]
    y[[10, 200, 400], 0] = [1.8, 1.2, 3.0]
    x, y = np.tile(x, (repeats, 1)), np.tile(y, (repeats, 1))
    root = tmp_path / f"x{repeats}"
    fp = write_dense(root, "fp", x, n_shards=2, rows_per_write=50_000)
    var = write_dense(root, "v", y, n_shards=2, rows_per_write=50_000)
    corr = correlate_variant(fp, var)
    table = feature_table(fp_feature_stats(fp), corr, SurvivalConfig())
    # the features table's interval (survival's confidence) is the correlation table's
    assert table.select("r_lo", "r_hi").equals(corr.select("r_lo", "r_hi"))
    return table


def test_a_feature_on_3_tokens_is_insufficient_and_on_3000_survived(tmp_path: Path) -> None:
    few, many = _pattern_table(tmp_path, 1), _pattern_table(tmp_path, 1000)
    for t in (few, many):
        assert t["active"][0] and t["r"][0] == pytest.approx(0.9536, abs=1e-3)
        assert t["r_lo"][0] <= t["r"][0] <= t["r_hi"][0]
    assert few["n_support"][0] == 3 and many["n_support"][0] == 3000
    assert few["class"][0] == "insufficient"
    assert (few["r_lo"][0], few["r_hi"][0]) == (-1.0, 1.0)
    assert many["class"][0] == "survived" and many["r_lo"][0] > 0.9
    # without an interval (confidence 0) the 3-token feature is classed by r alone
    point = feature_table(
        few.select("feature", "firing_rate"),
        few.select("feature", "r", "n_support"),
        SurvivalConfig(confidence=0.0),
    )
    assert point["class"][0] == "survived" and point["r_lo"][0] == point["r"][0]
    assert many["damage"][0] == pytest.approx(1 - many["r"][0])  # r and damage: the point


def test_classify_by_interval_and_summary_sums_to_100() -> None:
    r = pl.Series("r", [0.95, 0.95, 0.7, 0.7, 0.3, 0.3, 0.88])
    lo = pl.Series([0.92, 0.85, 0.55, 0.45, 0.1, 0.1, 0.8])
    hi = pl.Series([0.97, 0.99, 0.85, 0.8, 0.45, 0.55, 0.95])
    assert classify(r, SurvivalConfig(), lo, hi).to_list() == [
        "survived", "insufficient", "blurred", "insufficient", "destroyed", "insufficient",
        "insufficient",
    ]  # fmt: skip
    n = r.len()
    corr = pl.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "r": r,
            "n_support": [5000, 20, 3000, 15, 2000, 50, 4],
        }
    )
    stats = pl.DataFrame({"feature": np.arange(n, dtype=np.int32), "firing_rate": [0.1] * n})
    table = feature_table(stats, corr)
    # same r, less support: the interval crosses a threshold and the class is withheld
    assert table["class"].to_list() == [
        "survived", "insufficient", "blurred", "insufficient", "destroyed", "insufficient",
        "insufficient",
    ]  # fmt: skip
    row = summary({"v": table}).row(0, named=True)
    counts = (row["n_survived"], row["n_blurred"], row["n_destroyed"], row["n_insufficient"])
    assert counts == (1, 1, 1, 4)
    assert sum(row[f"{c}_pct"] for c in CLASSES) == pytest.approx(100.0)
    assert row["insufficient_pct"] == pytest.approx(400 / 7)


def test_summary_sparsity_from_names_and_matched_results() -> None:
    from sae_audit.survival import with_sparsity

    table = pl.DataFrame({"variant": ["rtn-int4", "prune-0.175", "prune-matched-rtn-int4"]})
    out = with_sparsity(table, {"prune-matched-rtn-int4": 0.0902})
    assert out.columns == ["variant", "sparsity"]
    assert out["sparsity"].to_list() == [None, 0.175, 0.0902]
    with pytest.raises(ValueError, match="prune-matched-rtn-int4"):
        with_sparsity(table, {})
