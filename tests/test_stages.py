"""Every table stage, run through the generated CLI on a small real run's shards, no Snakemake.

The shards come from `test_reliability_data.audit` (a tiny GPT-NeoX, a sae-lens
SAE, fp / rtn-int8 / rtn-int2 encoded by the real `compress` and `encode` stages).
Each stage is called as its rule calls it, `sae-audit <stage> --flag ...`, so this
also checks the flags the CLI derives from the stage signatures.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from sae_audit import cli
from sae_audit.shards import encode_hash

from .test_reliability_data import (
    ENCODE_PARAMS,
    MODEL_PARAMS,
    N_SEQ,
    N_SHARDS,
    SEQ_LEN,
    _sae_spec,
    audit,  # noqa: F401 - the module-scoped fixture
    codes,
    nll,
)

# Point classes (confidence 0): each feature of this tiny run fires on ~50 tokens, so at
# 0.95 its interval on r is about +-0.2 wide and no rtn-int2 feature could be classed
# survived, leaving the predictor one class; test_tables_agree_with_each_other re-runs
# survival at 0.95.
ANALYSIS = {"active_rate": 0.001, "survived": 0.9, "destroyed": 0.5, "confidence": 0.0}


def run(*argv: str | Path) -> None:
    assert cli.main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def tables(audit: Path, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("tables")
    expect = json.dumps(
        {
            "model": "tiny",
            "sae": "res",
            "config_hash": encode_hash(MODEL_PARAMS, ENCODE_PARAMS, _sae_spec(audit / "sae")),
            "n_tokens": N_SEQ * SEQ_LEN,
        }
    )
    variants = ("rtn-int8", "rtn-int2")
    run(
        "fp-stats",
        "--expect",
        expect,
        "--codes",
        *codes(audit, "fp"),
        "--out",
        out / "fp_stats.parquet",
    )
    for v in variants:
        run("correlate", "--expect", expect, "--fp", *codes(audit, "fp"), "--variant", *codes(audit, v),
            "--variant-name", v, "--analysis", json.dumps({"confidence": ANALYSIS["confidence"]}),
            "--out", out / f"{v}.parquet")  # fmt: skip
    run("perplexity", "--expect", json.dumps({"model": "tiny"}),
        "--nll", *[f"{v}={p}" for v in ("fp", *variants) for p in nll(audit, v)],
        "--out", out / "perplexity.parquet")  # fmt: skip
    run("survival", "--analysis", json.dumps(ANALYSIS), "--fp-stats", out / "fp_stats.parquet",
        "--correlation", *[f"{v}={out / f'{v}.parquet'}" for v in variants],
        "--perplexity", out / "perplexity.parquet", "--features-out", out / "features.parquet",
        "--summary-out", out / "survival.parquet")  # fmt: skip
    run("predict", "--predict", json.dumps({"predictors": ["rarity", "log_mean"], "folds": 2, "seed": 0}),
        "--features", out / "features.parquet", "--out-dir", out)  # fmt: skip
    run("overlap", "--pairs", json.dumps([list(variants)]), "--features", out / "features.parquet",
        "--out", out / "overlap.parquet")  # fmt: skip
    run("stability", "--stability", json.dumps({"token_budgets": [0.5, 1.0], "subsets": 2, "seed": 0}),
        "--analysis", json.dumps(ANALYSIS), "--seq-len", SEQ_LEN, "--expect", expect,
        "--fp", *codes(audit, "fp"), "--codes", *[f"{v}={p}" for v in variants for p in codes(audit, v)],
        "--out", out / "stability.parquet")  # fmt: skip
    run("threshold-grid", "--threshold-grid", json.dumps({"survived": [0.9, 0.8], "destroyed": [0.5]}),
        "--features", out / "features.parquet", "--out", out / "threshold_grid.parquet")  # fmt: skip
    run("damaged-contexts", "--damaged-contexts", json.dumps({"n_features": 2, "n_contexts": 2, "window": 4}),
        "--expect", expect, "--features", out / "features.parquet", "--fp", *codes(audit, "fp"),
        "--codes", *[f"{v}={p}" for v in variants for p in codes(audit, v)],
        "--tokens", *[audit / f"tokens/shard-{i:03d}.parquet" for i in range(N_SHARDS)],
        "--tokenizer", audit / "model", "--out", out / "damaged_contexts.parquet")  # fmt: skip
    (out / "reference.csv").write_text("variant,survived_pct,perplexity\nrtn-int8,99.0,60.0\n")
    run("reference-comparison", "--reference", out / "reference.csv", "--tables-dir", out,
        "--perplexity", out / "perplexity.parquet", "--out", out / "reference_comparison.parquet")  # fmt: skip
    return out


TABLES = ("fp_stats", "rtn-int8", "rtn-int2", "perplexity", "features", "survival", "predict",
          "predict_coefficients", "predict_oof", "survival_by_quantile", "overlap", "stability",
          "threshold_grid", "damaged_contexts", "reference_comparison")  # fmt: skip


@pytest.mark.parametrize("name", TABLES)
def test_every_table_is_written_and_no_column_is_empty(tables: Path, name: str):
    table = pl.read_parquet(tables / f"{name}.parquet")
    assert table.height > 0
    # write_parquet already refuses NaN; what it lets through is null, which must mean
    # "undefined here", never a whole column the stage failed to fill.
    empty = [c for c in table.columns if table[c].null_count() == table.height]
    allowed = {"reason", "flag", "subset"}  # null = "nothing to explain" / "not a subset"
    allowed |= {"null_variant", "spearman_null"}  # this run has no null variant
    allowed |= {"sparsity"}  # this run has no pruning variant
    assert not set(empty) - allowed, f"{name}: columns all null: {empty}"


def test_tables_agree_with_each_other(tables: Path, tmp_path: Path):
    stats = pl.read_parquet(tables / "fp_stats.parquet")
    survival = {r["variant"]: r for r in pl.read_parquet(tables / "survival.parquet").to_dicts()}
    assert set(survival) == {"rtn-int8", "rtn-int2"}
    n_active = int((stats["firing_rate"] > ANALYSIS["active_rate"]).sum())
    for row in survival.values():
        assert row["n_active"] == n_active
        pct = ("survived_pct", "blurred_pct", "destroyed_pct", "insufficient_pct")
        assert sum(row[c] for c in pct) == pytest.approx(100)
    # Fewer bits damage at least as much, on average, on the same features.
    assert survival["rtn-int2"]["mean_r"] <= survival["rtn-int8"]["mean_r"]
    ppl = pl.read_parquet(tables / "perplexity.parquet")
    assert ppl.filter(pl.col("variant") == "fp")["dppl_chunked_pct"][0] == 0.0
    full = pl.read_parquet(tables / "stability.parquet").filter(
        (pl.col("selection") == "budget") & (pl.col("fraction") == 1.0)
    )
    # The full budget reproduces the survival table from the shards, intervals included.
    for row in full.to_dicts():
        for c in ("survived_pct", "insufficient_pct"):
            assert row[c] == pytest.approx(survival[row["variant"]][c])
    # The correlation tables' intervals (the correlate job's confidence, as in ANALYSIS)
    # are the features table's.
    features = pl.read_parquet(tables / "features.parquet")
    for v in ("rtn-int8", "rtn-int2"):
        corr = pl.read_parquet(tables / f"{v}.parquet")
        mine = features.filter(pl.col("variant") == v).sort("feature")
        assert corr.select("r_lo", "r_hi", "n_support").equals(
            mine.select("r_lo", "r_hi", "n_support")
        )
        assert (corr["n_support"] >= corr["fp_fire_count"]).all()
    # At 0.95 the same correlations leave rtn-int2's features of ~50 tokens undecided.
    from sae_audit import stages

    at95 = stages.survival(
        analysis={**ANALYSIS, "confidence": 0.95},
        fp_stats=tables / "fp_stats.parquet",
        correlation={v: str(tables / f"{v}.parquet") for v in ("rtn-int8", "rtn-int2")},
        perplexity=tables / "perplexity.parquet",
        features_out=tmp_path / "features.parquet",
        summary_out=tmp_path / "survival.parquet",
    )
    row = at95.filter(pl.col("variant") == "rtn-int2").row(0, named=True)
    assert row["insufficient_pct"] > 0
    assert row["survived_pct"] <= survival["rtn-int2"]["survived_pct"]
    assert sum(row[c] for c in pct) == pytest.approx(100)
    wide = pl.read_parquet(tmp_path / "features.parquet")
    assert (wide["r_lo"] <= wide["r"]).all() and (wide["r"] <= wide["r_hi"]).all()
    ref = pl.read_parquet(tables / "reference_comparison.parquet")
    run_pct = ref.filter(pl.col("metric") == "survived_pct")["run"][0]
    assert run_pct == pytest.approx(survival["rtn-int8"]["survived_pct"])


def test_no_active_feature_gives_null_shares_not_a_crash(tables: Path, tmp_path: Path):
    """A legal config under which no feature is active: shares are undefined (null)."""
    from sae_audit import stages

    variants = ("rtn-int8", "rtn-int2")
    summary = stages.survival(
        analysis={**ANALYSIS, "active_rate": 0.99},
        fp_stats=tables / "fp_stats.parquet",
        correlation={v: str(tables / f"{v}.parquet") for v in variants},
        perplexity=tables / "perplexity.parquet",
        features_out=tmp_path / "features.parquet",
        summary_out=tmp_path / "survival.parquet",
    )
    assert summary["n_active"].to_list() == [0, 0]
    assert summary["survived_pct"].null_count() == 2
    grid = stages.threshold_grid(
        threshold_grid={"survived": [0.9], "destroyed": [0.5]},
        features=tmp_path / "features.parquet",
        out=tmp_path / "grid.parquet",
    )
    assert grid["survived_pct"].null_count() == grid.height == 2
    predicted = stages.predict(
        predict={"folds": 2}, features=tmp_path / "features.parquet", out_dir=tmp_path
    )
    assert predicted["auc_mean"].null_count() == 2
    assert all("no active features" in r for r in predicted["reason"])
    assert pl.read_parquet(tmp_path / "survival_by_quantile.parquet").height == 0


def test_causal_stage_through_the_cli(audit: Path, tables: Path, tmp_path: Path):  # noqa: F811
    """`sae-audit causal` on the real fp / rtn-int8 / rtn-int2 checkpoints: the FP model
    against itself agrees exactly; a variant gives one finite row per selected feature."""
    from sae_audit.causal import COLUMNS
    from sae_audit.causal_survival import with_causal_class

    causal = {"n_features": 4, "n_sequences": 4, "batch_size": 2, "features_per_forward": 3}
    common = ["--model", json.dumps(MODEL_PARAMS), "--saes", json.dumps({"res": _sae_spec(audit / "sae")}),
              "--encode", json.dumps(ENCODE_PARAMS), "--causal", json.dumps(causal),
              "--analysis", json.dumps(ANALYSIS), "--fp-checkpoint", audit / "checkpoints/fp",
              "--tokens", *[audit / f"tokens/shard-{i:03d}.parquet" for i in range(N_SHARDS)],
              "--fp-stats", tables / "fp_stats.parquet"]  # fmt: skip
    for variant in ("fp", "rtn-int2"):
        run("causal", *common, "--checkpoint", audit / f"checkpoints/{variant}",
            "--out", tmp_path / f"{variant}.parquet")  # fmt: skip
    same = pl.read_parquet(tmp_path / "fp.parquet")
    assert same.columns == list(COLUMNS) and same.height == 4
    assert same["variant"].unique().to_list() == ["fp"]
    assert same["causal_agreement"].to_list() == [1.0] * 4
    classes = {"survived": 0.9, "destroyed": 0.5, "kl_ratio_band": 2.0}
    assert with_causal_class(same, **classes)["causal_class"].to_list() == ["survived"] * 4
    damaged = pl.read_parquet(tmp_path / "rtn-int2.parquet")
    assert damaged["feature"].to_list() == same["feature"].to_list()
    assert damaged["variant"].unique().to_list() == ["rtn-int2"]
    assert set(with_causal_class(damaged, **classes)["causal_class"]) <= {
        "survived", "blurred", "destroyed", "insufficient"
    }  # fmt: skip
    stats = pl.read_parquet(tables / "fp_stats.parquet")
    top = stats.sort(["firing_count", "feature"], descending=[True, False]).head(4)
    assert same["feature"].to_list() == top["feature"].to_list()
    # without special tokens in the shards, leaving them unablated changes nothing
    excluding = [
        *common,
        "--encode",
        json.dumps({**ENCODE_PARAMS, "exclude_special_positions": True}),
    ]
    run("causal", *excluding, "--tokenizer", audit / "model", "--checkpoint", audit / "checkpoints/fp",
        "--out", tmp_path / "excluding.parquet")  # fmt: skip
    assert pl.read_parquet(tmp_path / "excluding.parquet").equals(same)
    run("causal", *common, "--causal", json.dumps({**causal, "enabled": False}),
        "--checkpoint", audit / "checkpoints/rtn-int2", "--out", tmp_path / "off.parquet")  # fmt: skip
    assert pl.read_parquet(tmp_path / "off.parquet").columns == list(COLUMNS)
