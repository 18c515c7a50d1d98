"""Equal bits: the features a shipped format saves that RTN destroys, and back, on codes
written as real shards (correlations and classes from the real fp_stats / correlate /
survival code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sae_audit import cli
from sae_audit.correlate import correlate_variant
from sae_audit.damaged_contexts import MARK_CLOSE, MARK_OPEN, ContextConfig
from sae_audit.equal_bits import LOST, SAVED, SCHEMA, SUMMARY, equal_bits
from sae_audit.fp_stats import fp_feature_stats
from sae_audit.shards import write_token_shard
from sae_audit.survival import SurvivalConfig, survival_tables

from .conftest import tiny_tokenizer, write_dense

RTN, SHIPPED = "rtn-int4", "lc-gptq-w4a16"
N_SEQ, SEQ_LEN, D = 8, 25, 8
# planted features
A = 0  # destroyed under RTN, identical under the shipped variant: saved
B = 1  # identical under RTN, destroyed under the shipped variant: lost
C = 2  # destroyed under both: in both destroyed sets, neither saved nor lost
D_BLURRED = 3  # blurred under RTN, identical under the shipped variant: not "saved"
G = 4  # destroyed under RTN but inactive (fires once in FP): left out
E = 5  # destroyed under RTN, identical under shipped: saved, smaller change in r than A
ANALYSIS = SurvivalConfig(active_rate=0.02, survived=0.9, destroyed=0.5)


def _codes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = N_SEQ * SEQ_LEN
    x = rng.exponential(1.0, size=(n, D)) * (rng.random((n, D)) < 0.4)
    x[:, G] = 0.0
    x[7, G] = 2.0  # firing rate 1/200 < active_rate
    x = x.astype(np.float32)
    rtn, shipped = x.copy(), x.copy()
    rtn[:, A] = 0.0  # never fires: r = 0, destroyed
    rtn[:, C] = np.roll(x[:, C], 50)
    rtn[:, E] = 0.3 * x[:, E] + 0.7 * np.roll(x[:, E], 31)  # r about 0.4
    rtn[:, G] = np.roll(x[:, G], 11)
    rtn[:, D_BLURRED] = 0.6 * x[:, D_BLURRED] + 0.4 * np.roll(x[:, D_BLURRED], 17)
    shipped[:, B] = np.roll(x[:, B], 50)
    shipped[:, C] = np.roll(x[:, C], 23)
    return {"fp": x, RTN: rtn, SHIPPED: shipped}


@pytest.fixture
def run(tmp_path: Path) -> dict:
    """Code shards of fp, RTN and shipped, their features tables, tokens and a tokenizer."""
    shards = {v: write_dense(tmp_path / "codes", v, c, n_shards=2) for v, c in _codes().items()}
    stats = fp_feature_stats(shards["fp"])
    correlations = {v: correlate_variant(shards["fp"], shards[v]) for v in (RTN, SHIPPED)}
    long, _ = survival_tables(stats, correlations, None, ANALYSIS)
    features = {str(k[0]): t for k, t in long.group_by("variant", maintain_order=True)}
    ids = (np.arange(N_SEQ * SEQ_LEN) % 40 + 5).reshape(N_SEQ, SEQ_LEN)
    tokens = [tmp_path / "tokens" / f"shard-{i:03d}.parquet" for i in range(2)]
    for i, path in enumerate(tokens):
        half = N_SEQ // 2
        write_token_shard(path, ids[i * half : (i + 1) * half], i * half, {"seq_len": SEQ_LEN})
    tokenizer = tiny_tokenizer(64)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    long.write_parquet(tmp_path / "features.parquet")
    return {
        "shards": shards,
        "features": features,
        "features_path": tmp_path / "features.parquet",
        "ids": ids,
        "tokens": tokens,
        "tokenizer": tokenizer,
        "tokenizer_dir": tmp_path / "tokenizer",
    }


def _class(features: dict, variant: str, feature: int) -> str | None:
    return features[variant].filter(pl.col("feature") == feature)["class"][0]


def test_the_planted_classes_are_what_the_test_assumes(run):
    f = run["features"]
    assert [_class(f, RTN, i) for i in (A, B, C, D_BLURRED, E)] == [
        "destroyed", "survived", "destroyed", "blurred", "destroyed",
    ]  # fmt: skip
    assert [_class(f, SHIPPED, i) for i in (A, B, C, D_BLURRED, E)] == [
        "survived", "destroyed", "destroyed", "survived", "survived",
    ]  # fmt: skip
    assert not f[RTN].filter(pl.col("feature") == G)["active"][0]


def test_equal_bits_finds_the_planted_saved_and_lost_features(run):
    cfg = ContextConfig(n_features=8, n_contexts=3, window=4)
    table = equal_bits(
        run["features"], [[RTN, SHIPPED]], run["shards"]["fp"],
        {v: run["shards"][v] for v in (RTN, SHIPPED)}, run["ids"], run["tokenizer"], cfg,
        check_variants=True,
    )  # fmt: skip
    assert dict(table.schema) == SCHEMA
    assert table.columns == list(SCHEMA)
    assert table["direction"][0] == SUMMARY  # the pair's summary first
    summary = table.filter(pl.col("direction") == SUMMARY).to_dicts()
    assert len(summary) == 1
    (s,) = summary
    assert (s["rtn_variant"], s["shipped_variant"], s["bits"]) == (RTN, SHIPPED, 4)
    assert s["n_active"] == D - 1  # G is inactive
    assert (s["n_saved"], s["n_lost"]) == (2, 1)
    assert (s["n_destroyed_rtn"], s["n_destroyed_shipped"]) == (3, 2)  # {A, C, E}, {B, C}
    assert s["jaccard_destroyed"] == pytest.approx(1 / 4)  # {C} of {A, B, C, E}
    assert s["reason"] is None and s["feature"] is None

    saved = table.filter(pl.col("direction") == SAVED)
    lost = table.filter(pl.col("direction") == LOST)
    assert set(saved["feature"]) == {A, E} and set(lost["feature"]) == {B}
    # A never fires under RTN (r = 0): the largest rescue, ranked first
    assert saved.filter(pl.col("rank") == 1)["feature"].unique().to_list() == [A]
    first = saved.filter(pl.col("feature") == A).row(0, named=True)
    assert (first["class_rtn"], first["class_shipped"]) == ("destroyed", "survived")
    assert first["r_rtn"] == 0.0 and first["r_shipped"] == pytest.approx(1.0)
    fp = _codes()["fp"]
    assert first["firing_rate"] == pytest.approx((fp[:, A] > 0).mean())
    # top FP contexts: the feature's three largest FP activations, both variants' values
    top = np.sort(fp[:, A])[::-1][:3]
    rows = saved.filter(pl.col("feature") == A).sort("context_rank")
    assert rows["context_rank"].to_list() == [1, 2, 3]
    assert rows["fp_value"].to_numpy() == pytest.approx(top)
    assert rows["shipped_value"].to_numpy() == pytest.approx(top)  # identical there
    assert rows["rtn_value"].to_list() == [0.0, 0.0, 0.0]  # silent under RTN
    assert all(MARK_OPEN in c and MARK_CLOSE in c for c in rows["context"])
    lost_row = lost.row(0, named=True)
    assert (lost_row["class_rtn"], lost_row["class_shipped"]) == ("survived", "destroyed")
    assert lost_row["rtn_value"] == pytest.approx(lost_row["fp_value"])
    # the summary columns are null on feature rows, and nothing is NaN anywhere
    assert saved["n_saved"].null_count() == saved.height
    floats = [c for c, t in SCHEMA.items() if t in (pl.Float32, pl.Float64)]
    assert not table.select(pl.any_horizontal(pl.col(floats).is_nan())).to_series().any()


def test_n_features_caps_each_direction_but_not_the_counts(run):
    cfg = ContextConfig(n_features=1, n_contexts=2, window=4)
    table = equal_bits(
        run["features"], [[RTN, SHIPPED]], run["shards"]["fp"],
        {v: run["shards"][v] for v in (RTN, SHIPPED)}, run["ids"], run["tokenizer"], cfg,
    )  # fmt: skip
    saved = table.filter(pl.col("direction") == SAVED)
    assert saved["feature"].unique().to_list() == [A] and saved.height == 2
    s = table.filter(pl.col("direction") == SUMMARY).row(0, named=True)
    assert (s["n_saved"], s["n_lost"]) == (2, 1)
    none = equal_bits(
        run["features"], [[RTN, SHIPPED]], run["shards"]["fp"],
        {v: run["shards"][v] for v in (RTN, SHIPPED)}, run["ids"], run["tokenizer"],
        ContextConfig(n_features=0, n_contexts=2, window=4),
    )  # fmt: skip
    assert none["direction"].to_list() == [SUMMARY]


def test_no_destroyed_feature_gives_a_null_jaccard_with_a_reason(run):
    same = {v: run["features"][RTN].filter(pl.col("feature") == B) for v in (RTN, "gguf-q4_0")}
    table = equal_bits(
        same, [[RTN, "gguf-q4_0"]], run["shards"]["fp"], {}, run["ids"], run["tokenizer"],
        ContextConfig(n_features=3, n_contexts=2, window=4),
    )  # fmt: skip
    (s,) = table.to_dicts()
    assert s["jaccard_destroyed"] is None and "no destroyed features" in s["reason"]
    assert (s["n_saved"], s["n_lost"], s["n_active"]) == (0, 0, 1)


def test_bad_pairs_are_refused(run):
    args = (run["shards"]["fp"], {}, run["ids"], run["tokenizer"], ContextConfig())
    with pytest.raises(ValueError, match="first must be RTN"):
        equal_bits(run["features"], [[SHIPPED, RTN]], *args)
    with pytest.raises(ValueError, match="no features table"):
        equal_bits(run["features"], [[RTN, "gguf-q4_0"]], *args)


def _cli(run, out: Path, pairs: list) -> None:
    codes = [f"{v}={p}" for v in (RTN, SHIPPED) for p in run["shards"][v]]
    argv = [
        "equal-bits", "--damaged-contexts", json.dumps({"n_features": 2, "n_contexts": 2}),
        "--pairs", json.dumps(pairs), "--features", run["features_path"],
        "--fp", *run["shards"]["fp"], "--codes", *codes, "--tokens", *run["tokens"],
        "--tokenizer", run["tokenizer_dir"], "--out", out,
    ]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0


def test_stage_writes_the_table_and_an_empty_one_without_pairs(run, tmp_path):
    out = tmp_path / "tables" / "equal_bits.parquet"
    _cli(run, out, [[RTN, SHIPPED]])
    table = pl.read_parquet(out)
    assert set(table.filter(pl.col("direction") == SAVED)["feature"]) == {A, E}
    assert set(table.filter(pl.col("direction") == LOST)["feature"]) == {B}
    # contexts decoded by the real tokenizer, the activating token marked
    assert table.filter(pl.col("context").is_not_null())["context"].str.contains(MARK_OPEN).all()
    empty = tmp_path / "tables" / "empty.parquet"
    _cli(run, empty, [])
    written = pl.read_parquet(empty)
    assert written.height == 0 and dict(written.schema) == SCHEMA
