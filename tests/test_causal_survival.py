"""Causal survival beside Pearson survival: the join, the summary and the disagreements
(with contexts read from codes written as real shards)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sae_audit import stages
from sae_audit.causal import empty_table
from sae_audit.causal_survival import (
    ACTS_SAME,
    FIRES_SAME,
    causal_summary,
    disagreements,
    join_pearson,
    with_causal_class,
)
from sae_audit.damaged_contexts import ContextConfig
from sae_audit.files import InputError

from .conftest import write_dense


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


THRESHOLDS = {"survived": 0.9, "destroyed": 0.5, "kl_ratio_band": 2.0}


def _causal(variant: str, agreement: list[float], fp_silent: tuple[int, ...] = ()) -> pl.DataFrame:
    """Causal rows of features 0..n-1 in the `causal` stage's schema: the given agreement,
    both KL ratios 1, and the features of `fp_silent` never firing in FP."""
    n = len(agreement)
    rows = {
        name: [None] * n if dtype == pl.String else [1.0] * n
        for name, dtype in empty_table().schema.items()
    }
    flags = ["fp_silent" if f in fp_silent else None for f in range(n)]
    rows.update(feature=list(range(n)), variant=[variant] * n, causal_agreement=agreement,
                ablation_flag=flags, fp_fire_count=[3] * n, variant_fire_count=[3] * n)  # fmt: skip
    return pl.DataFrame(rows, schema=empty_table().schema)


def _features(variant: str, classes: list[str], r: list[float]) -> pl.DataFrame:
    n = len(classes)
    return pl.DataFrame(
        {
            "variant": [variant] * n,
            "feature": list(range(n)),
            "r": r,
            "class": classes,
            "active": [True] * n,
        },
        schema_overrides={"feature": pl.Int32},
    )


def test_dissociations_go_both_ways_and_insufficient_goes_neither():
    causal = _causal("v", [0.1, 0.95, 0.97, 0.0, 0.7], fp_silent=(3,))
    features = _features("v", ["survived", "destroyed", "survived", "survived", "insufficient"],
                         [0.95, 0.2, 0.99, 0.98, 0.8])  # fmt: skip
    joined = join_pearson(causal, features, THRESHOLDS)
    assert joined["causal_class"].to_list() == [
        "destroyed", "survived", "survived", "insufficient", "blurred"
    ]  # fmt: skip
    assert joined["dissociation"].to_list() == [FIRES_SAME, ACTS_SAME, None, None, None]
    assert joined["pearson_class"].to_list() == features["class"].to_list()
    summary = causal_summary(joined).row(0, named=True)
    assert summary["n_features"] == 5
    assert summary[f"n_{FIRES_SAME}"] == 1 and summary[f"n_{ACTS_SAME}"] == 1
    assert summary["causal_survived_pct"] == pytest.approx(40.0)
    assert summary["pearson_survived_pct"] == pytest.approx(60.0)
    # Classed under both: features 0, 1, 2; only feature 2 has the same class.
    assert summary["n_both_classed"] == 3
    assert summary["same_class_pct"] == pytest.approx(100 / 3)
    assert summary["median_causal_agreement"] == pytest.approx(0.7)


def test_a_causal_row_without_a_pearson_r_is_refused():
    causal = _causal("v", [1.0] * 3)
    with pytest.raises(InputError, match="no Pearson r"):
        join_pearson(causal, _features("v", ["survived"] * 2, [1.0] * 2), THRESHOLDS)


def test_disagreements_carry_their_top_fp_contexts(tmp_path):
    n_tokens, d = 60, 3
    x = np.zeros((n_tokens, d), dtype=np.float32)
    x[[5, 17, 33], 0] = [1.0, 3.0, 2.0]  # feature 0's top FP contexts: 17, 33
    x[::4, 1] = 1.0
    y = x.copy()
    y[17, 0] = 2.5
    fp = write_dense(tmp_path, "fp", x, n_shards=2)
    var = write_dense(tmp_path, "v", y, n_shards=2)
    joined = join_pearson(
        _causal("v", [0.1, 0.99, 0.98]),
        _features("v", ["survived", "survived", "survived"], [0.97, 1.0, 1.0]),
        THRESHOLDS,
    )
    ids = (np.arange(n_tokens) % 26).reshape(3, 20)
    table = disagreements(
        joined, fp, {"v": var}, ids, _CharTokenizer(),
        ContextConfig(n_features=5, n_contexts=2, window=3),
    )  # fmt: skip
    assert table["feature"].to_list() == [0, 0]
    assert table["dissociation"].to_list() == [FIRES_SAME] * 2
    assert table["position"].to_list() == [17, 33]
    assert table["fp_value"].to_list() == [3.0, 2.0]
    assert table["variant_value"].to_list() == [2.5, 2.0]
    assert table["context"][0] == "opq⟦r⟧st"
    # Nothing dissociated: an empty table with the same columns.
    agreeing = joined.with_columns(pl.lit(None, dtype=pl.String).alias("dissociation"))
    empty = disagreements(agreeing, fp, {"v": var}, ids, _CharTokenizer(), ContextConfig(5, 2, 3))
    assert empty.is_empty() and empty.columns == table.columns


def test_the_stage_writes_three_tables(tmp_path, monkeypatch):
    n_tokens, d = 40, 2
    x = np.zeros((n_tokens, d), dtype=np.float32)
    x[[3, 9], 0] = [1.0, 2.0]
    x[::5, 1] = 1.0
    fp = write_dense(tmp_path, "fp", x, n_shards=1)
    var = write_dense(tmp_path, "v", x, n_shards=1)
    causal_path = tmp_path / "causal-v.parquet"
    _causal("v", [0.6, 1.0]).write_parquet(causal_path)
    features_path = tmp_path / "features.parquet"
    _features("v", ["survived", "survived"], [1.0, 1.0]).write_parquet(features_path)
    tokens = tmp_path / "tokens.parquet"
    from sae_audit.shards import write_token_shard

    write_token_shard(tokens, (np.arange(n_tokens) % 26).reshape(2, 20), 0, {"seq_len": 20})
    monkeypatch.setattr("sae_audit.tokens.load_tokenizer", lambda *_a, **_k: _CharTokenizer())
    summary = stages.causal_survival(
        damaged_contexts={"n_features": 3, "n_contexts": 1, "window": 2}, thresholds=THRESHOLDS,
        causal={"v": str(causal_path)}, features=features_path, fp=[str(p) for p in fp],
        codes={"v": [str(p) for p in var]}, tokens=[str(tokens)], tokenizer="chars",
        out=tmp_path / "causal.parquet", summary_out=tmp_path / "causal_survival.parquet",
        disagreements_out=tmp_path / "causal_disagreements.parquet",
    )  # fmt: skip
    assert summary["n_fires_same_acts_differently"].to_list() == [1]
    table = pl.read_parquet(tmp_path / "causal.parquet")
    assert table["causal_class"].to_list() == ["blurred", "survived"]
    found = pl.read_parquet(tmp_path / "causal_disagreements.parquet")
    assert found["feature"].to_list() == [0] and found["position"].to_list() == [9]
    assert (tmp_path / "causal_survival.csv").is_file()
    assert (tmp_path / "causal_disagreements.csv").is_file()


def test_the_thresholds_re_class_without_new_measurements():
    """The class follows the thresholds given here: what the workflow relies on to re-class
    without re-running the causal forward passes."""
    causal = _causal("v", [0.6, 0.85, 0.95]).with_columns(
        pl.Series("steering_kl_ratio", [1.0, 1.0, 3.0])
    )
    strict = with_causal_class(causal, survived=0.9, destroyed=0.5, kl_ratio_band=2.0)
    assert strict["causal_class"].to_list() == ["blurred", "blurred", "blurred"]
    loose = with_causal_class(causal, survived=0.8, destroyed=0.7, kl_ratio_band=4.0)
    assert loose["causal_class"].to_list() == ["destroyed", "survived", "survived"]
    silent = causal.with_columns(pl.Series("ablation_flag", [None, "variant_silent", None]))
    assert with_causal_class(silent, survived=0.8, destroyed=0.5, kl_ratio_band=4.0)[
        "causal_class"
    ].to_list() == ["blurred", "destroyed", "survived"]
