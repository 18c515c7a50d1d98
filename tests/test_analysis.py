"""Known-answer tests of the analysis modules: stats, correlate, survival,
predict, overlap, matched. Codes are written as real shards."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sae_audit.correlate import (
    SufficientSums,
    accumulate_pair,
    correlate_variant,
    pearson_from_sums,
)
from sae_audit.matched import MatchedConfig, bisect_sparsity
from sae_audit.overlap import jaccard, overlap
from sae_audit.predict import (
    PREDICTORS,
    PredictConfig,
    predict_survival,
    register_predictor,
    survival_by_quantile,
)
from sae_audit.shards import CodeShardWriter, ShardMetadata
from sae_audit.stats import fp_feature_stats
from sae_audit.survival import SurvivalConfig, classify, feature_table, summary, threshold_grid


def write_dense(
    root: Path,
    variant: str,
    dense: np.ndarray,
    n_shards: int,
    row_group_size: int = 1 << 20,
    rows_per_write: int = 17,
    d_sae: int | None = None,
) -> list[Path]:
    """Write a dense [n_tokens, d_sae] code matrix as sparse shards split by token."""
    n_tokens, d = dense.shape
    bounds = np.linspace(0, n_tokens, n_shards + 1).astype(int)
    paths = []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        meta = ShardMetadata(
            model="m",
            variant=variant,
            sae="s",
            hook="h",
            d_sae=d_sae or d,
            token_start=int(start),
            token_stop=int(stop),
            config_hash="x",
        )
        path = root / variant / f"shard-{i}.parquet"
        with CodeShardWriter(path, meta, row_group_size=row_group_size) as w:
            for t0 in range(start, stop, rows_per_write):
                block = dense[t0 : min(t0 + rows_per_write, stop)]
                tok, feat = np.nonzero(block)
                w.write(tok + t0, feat.astype(np.int32), block[tok, feat].astype(np.float32))
        paths.append(path)
    return paths


def sparse_random(rng: np.random.Generator, n: int, d: int, density: float) -> np.ndarray:
    x = rng.exponential(1.0, size=(n, d)) * (rng.random((n, d)) < density)
    return x.astype(np.float32).astype(np.float64)


# --------------------------------------------------------------------- stats


def test_fp_stats_match_dense(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = sparse_random(rng, 300, 9, 0.2)
    x[:, 4] = 0.0  # never fires
    x[-5:, :] = 0.0  # trailing tokens where nothing fires still count
    paths = write_dense(tmp_path, "fp", x, n_shards=3)
    stats = fp_feature_stats(paths)
    assert stats.columns == [
        "feature", "firing_count", "firing_rate", "mean_when_firing", "peak", "sum", "sum_sq", "n_tokens"
    ]  # fmt: skip
    count = (x > 0).sum(axis=0)
    np.testing.assert_array_equal(stats["firing_count"].to_numpy(), count)
    np.testing.assert_allclose(stats["firing_rate"].to_numpy(), count / 300, rtol=1e-12)
    np.testing.assert_allclose(stats["peak"].to_numpy(), x.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["sum"].to_numpy(), x.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["sum_sq"].to_numpy(), (x * x).sum(axis=0), rtol=1e-12)
    mean = stats["mean_when_firing"].to_numpy()
    fires = count > 0
    np.testing.assert_allclose(mean[fires], x.sum(axis=0)[fires] / count[fires], rtol=1e-12)
    assert stats["mean_when_firing"][4] is None
    assert stats["peak"][4] == 0.0
    assert (stats["n_tokens"] == 300).all()
    # An explicit token count overrides the metadata total.
    np.testing.assert_allclose(
        fp_feature_stats(paths, n_tokens=600)["firing_rate"].to_numpy(), count / 600
    )


# ----------------------------------------------------------------- correlate


def _pair_data(seed: int = 0, n: int = 600, d: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = sparse_random(rng, n, d, 0.3)
    noise = rng.normal(0.0, 0.5, size=(n, d)) * (rng.random((n, d)) < 0.5)
    y = np.maximum(x + noise, 0.0).astype(np.float32).astype(np.float64)
    y[:, 0] = 0.0  # never fires in the variant
    x[:, 1] = rng.uniform(0.5, 2.0, n).astype(np.float32)  # always fires in both
    y[:, 1] = (x[:, 1] * 0.8 + rng.uniform(0.1, 0.5, n)).astype(np.float32)
    x[:, 2] = rng.uniform(0.5, 2.0, n).astype(np.float32)  # always fires in FP only
    x[:, 3] = 0.0  # never fires in FP
    return x, y


def test_pearson_from_sparse_shards_equals_corrcoef(tmp_path: Path) -> None:
    x, y = _pair_data()
    # Misaligned row groups and read batches exercise the streaming merge.
    fp = write_dense(tmp_path, "fp", x, n_shards=3, row_group_size=37, rows_per_write=11)
    var = write_dense(tmp_path, "rtn-int6", y, n_shards=3, row_group_size=53, rows_per_write=29)
    out = correlate_variant(fp, list(reversed(var)), batch_rows=41)
    assert out.columns == [
        "feature",
        "r",
        "flag",
        "fp_fire_count",
        "variant_fire_count",
        "n_tokens",
    ]
    r = out["r"].to_numpy()
    flag = out["flag"].to_list()
    assert not np.isnan(r).any()
    for f in range(x.shape[1]):
        if f in (0, 3):
            continue
        assert flag[f] is None
        expected = np.corrcoef(x[:, f], y[:, f])[0, 1]
        assert abs(r[f] - expected) < 1e-9, (f, r[f], expected)
    assert r[0] == 0.0 and flag[0] == "variant_silent"
    assert r[3] == 0.0 and flag[3] == "fp_silent"
    np.testing.assert_array_equal(out["fp_fire_count"].to_numpy(), (x > 0).sum(axis=0))
    np.testing.assert_array_equal(out["variant_fire_count"].to_numpy(), (y > 0).sum(axis=0))
    assert out["variant_fire_count"][1] == 600 and out["fp_fire_count"][2] == 600
    assert (out["n_tokens"] == 600).all()


def test_accumulate_pair_sums_equal_dense(tmp_path: Path) -> None:
    x, y = _pair_data(seed=3, n=200)
    (fp,) = write_dense(tmp_path, "fp", x, n_shards=1)
    (var,) = write_dense(tmp_path, "v", y, n_shards=1)
    sums = SufficientSums(d_sae=x.shape[1])
    accumulate_pair(fp, var, sums, batch_rows=7)
    assert sums.n == 200
    np.testing.assert_allclose(sums.sum_xy, (x * y).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sums.sum_x2, (x * x).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sums.sum_y, y.sum(axis=0), rtol=1e-12)


def test_zero_variance_features_are_flagged_not_nan() -> None:
    n = 10
    ramp = np.arange(1, n + 1.0)
    # feature 0: FP constant, variant varies; 1: both constant; 2: variant constant.
    x = np.stack([np.full(n, 2.0), np.full(n, 2.0), ramp], axis=1)
    y = np.stack([ramp, np.full(n, 3.0), np.full(n, 4.0)], axis=1)
    sums = SufficientSums(d_sae=3, n=n)
    sums.sum_x, sums.sum_x2 = x.sum(0), (x * x).sum(0)
    sums.sum_y, sums.sum_y2 = y.sum(0), (y * y).sum(0)
    sums.sum_xy = (x * y).sum(0)
    r, flags = pearson_from_sums(sums)
    assert list(flags) == ["fp_constant", "both_constant", "variant_constant"]
    np.testing.assert_array_equal(r, [0.0, 1.0, 0.0])


def test_correlate_rejects_mismatched_shards(tmp_path: Path) -> None:
    x, y = _pair_data(n=100)
    fp = write_dense(tmp_path, "fp", x, n_shards=2)
    var = write_dense(tmp_path, "v", y, n_shards=3)
    with pytest.raises(ValueError, match="different token ranges"):
        correlate_variant(fp, var)
    wide = write_dense(tmp_path, "w", y, n_shards=2, d_sae=x.shape[1] + 1)
    with pytest.raises(ValueError, match="d_sae"):
        correlate_variant(fp, wide)


# ------------------------------------------------------------------ survival


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


def _table(
    r: list[float], active: list[bool], flag: list[str | None] | None = None
) -> pl.DataFrame:
    n = len(r)
    df = pl.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "firing_rate": [0.1 if a else 0.0 for a in active],
            "r": r,
            "flag": flag or [None] * n,
        },
        schema_overrides={"flag": pl.String},
    )
    return feature_table(df.select("feature", "firing_rate"), df.select("feature", "r", "flag"))


def test_summary_and_threshold_grid() -> None:
    a = _table([0.95, 0.8, 0.3, 0.0, 0.99], [True, True, True, True, False],
               [None, None, None, "variant_silent", None])  # fmt: skip
    b = _table([0.95, 0.92, 0.91, 0.6, 0.1], [True] * 5)
    ppl = pl.DataFrame({"variant": ["a"], "perplexity": [12.5]})
    out = summary({"a": a, "b": b}, ppl)
    rows = {row["variant"]: row for row in out.iter_rows(named=True)}
    assert rows["a"]["n_active"] == 4
    assert rows["a"]["survived_pct"] == pytest.approx(25.0)
    assert rows["a"]["blurred_pct"] == pytest.approx(25.0)
    assert rows["a"]["destroyed_pct"] == pytest.approx(50.0)
    assert rows["a"]["mean_r"] == pytest.approx((0.95 + 0.8 + 0.3 + 0.0) / 4)
    assert rows["a"]["n_variant_silent"] == 1
    assert rows["a"]["perplexity"] == 12.5 and rows["b"]["perplexity"] is None
    assert rows["b"]["survived_pct"] == pytest.approx(60.0)

    grid = threshold_grid({"a": a}, [0.9, 0.7], [0.5, 0.8])
    # (0.7, 0.8) is skipped: destroyed above survived.
    assert grid.height == 3
    row = grid.filter(
        (pl.col("survived_threshold") == 0.7) & (pl.col("destroyed_threshold") == 0.5)
    )
    assert row["survived_pct"][0] == pytest.approx(50.0)
    assert row["destroyed_pct"][0] == pytest.approx(50.0)


# ------------------------------------------------------------------- predict


def _predict_table(rng: np.random.Generator, n: int, survived: np.ndarray | None) -> pl.DataFrame:
    rate = np.exp(rng.uniform(np.log(2e-3), np.log(0.5), n))
    mean = np.exp(rng.normal(0, 0.5, n))
    peak = mean * np.exp(rng.uniform(0.1, 2.0, n))
    if survived is None:
        survived = -np.log(rate) < np.median(-np.log(rate))  # common features survive
    return pl.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "firing_rate": rate,
            "mean_when_firing": mean,
            "peak": peak,
            "active": np.ones(n, dtype=bool),
            "class": np.where(survived, "survived", "destroyed"),
        }
    )


def test_predictor_recovers_planted_rarity_dependence() -> None:
    table = _predict_table(np.random.default_rng(0), 600, None)
    out = predict_survival(table, PredictConfig())
    assert out["reason"] is None
    assert out["auc_mean"] > 0.95
    assert len(out["fold_aucs"]) == 5 and out["auc_sd"] >= 0
    # Survival falls with rarity exactly, so rarity alone ranks perfectly, inverted.
    assert out["marginal_auc"]["rarity"] == pytest.approx(0.0)
    assert out["marginal_auc_best"]["rarity"] == pytest.approx(1.0)
    assert out["coefficients"]["rarity"] < 0
    assert not np.isnan(out["oof_proba"]).any() and out["oof_proba"].shape == (600,)


def test_predictor_on_random_labels_is_chance() -> None:
    rng = np.random.default_rng(1)
    table = _predict_table(rng, 1000, rng.random(1000) < 0.5)
    out = predict_survival(table, PredictConfig(seed=3))
    assert abs(out["auc_mean"] - 0.5) < 0.1


def test_predictor_degenerate_cases_and_config() -> None:
    rng = np.random.default_rng(2)
    all_survive = _predict_table(rng, 50, np.ones(50, dtype=bool))
    out = predict_survival(all_survive)
    assert out["auc_mean"] is None and out["auc_sd"] is None and "one class" in out["reason"]
    few = _predict_table(rng, 50, np.arange(50) < 3)
    out = predict_survival(few)
    assert out["auc_mean"] is None and "fewer than folds" in out["reason"]
    assert out["coefficients"]["rarity"] is not None and math.isfinite(
        out["coefficients"]["rarity"]
    )
    with pytest.raises(ValueError, match="predictors"):
        PredictConfig(predictors=("rarity", "nope"))
    with pytest.raises(ValueError, match="folds"):
        PredictConfig(folds=1)


def test_register_predictor_and_quantiles() -> None:
    @register_predictor("test_identity_rate")
    def _rate(table: pl.DataFrame) -> np.ndarray:
        return table["firing_rate"].to_numpy()

    try:
        assert PredictConfig(predictors=("test_identity_rate",)).predictors == (
            "test_identity_rate",
        )
        table = pl.DataFrame(
            {
                "feature": np.arange(9, dtype=np.int32),
                "firing_rate": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.5],
                "active": [True] * 8 + [False],
                "class": ["destroyed", "destroyed", "survived", "destroyed",
                          "survived", "survived", "survived", "survived", None],
            }
        )  # fmt: skip
        q = survival_by_quantile(table, "test_identity_rate", 4)
        assert q.columns == [
            "predictor",
            "bin",
            "n",
            "predictor_min",
            "predictor_max",
            "survived_frac",
        ]
        assert q["bin"].to_list() == [1, 2, 3, 4]
        assert q["n"].to_list() == [2, 2, 2, 2]
        assert q["survived_frac"].to_list() == [0.0, 0.5, 1.0, 1.0]
        assert q["predictor_max"].to_list() == [0.02, 0.04, 0.06, 0.08]
    finally:
        del PREDICTORS["test_identity_rate"]


# ------------------------------------------------------------------- overlap


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


# ------------------------------------------------------------------- matched


def test_bisection_finds_matching_sparsity() -> None:
    calls: list[float] = []

    def ppl(s: float) -> float:
        calls.append(s)
        return 10.0 * math.exp(3.0 * s)

    target = 10.0 * math.exp(0.9)
    best, trace = bisect_sparsity(ppl, target, lo=0.0, hi=0.9, tolerance=0.01, max_steps=12)
    assert abs(ppl(best) / target - 1) <= 0.01
    assert abs(best - 0.3) < 0.01 / 3 + 1e-12
    assert len(trace) < 12 and len(trace) == len(calls) - 1
    assert [t[0] for t in trace] == list(range(1, len(trace) + 1))
    assert trace[-1][1] == best


def test_bisection_stops_at_max_steps_when_unreachable() -> None:
    def step(s: float) -> float:
        return 10.0 if s < 0.5 else 20.0

    best, trace = bisect_sparsity(step, 14.0, lo=0.0, hi=0.9, tolerance=0.01, max_steps=7)
    assert len(trace) == 7
    # The bracket closes in on the jump at 0.5; 10 is nearer 14 than 20 is.
    sparsities = [s for _, s, _ in trace]
    assert abs(sparsities[-1] - 0.5) < 0.9 / 2**6
    assert step(best) == 10.0 and best in sparsities
    with pytest.raises(ValueError, match="tolerance"):
        MatchedConfig(tolerance=0.0)
    with pytest.raises(ValueError, match="lo and hi"):
        MatchedConfig(lo=0.5, hi=0.4)
    with pytest.raises(ValueError):
        MatchedConfig(target="fp")
