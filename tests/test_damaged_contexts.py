"""Damaged-feature contexts, on codes written as real shards."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sae_audit.damaged_contexts import (
    ContextConfig,
    damaged_contexts,
    most_damaged,
    render_context,
)

from .conftest import write_dense


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_render_context_marks_token_and_stays_in_sequence():
    ids = np.arange(20) % 26
    # token 12 is in the second 10-token sequence: context starts at 10, not 12 - window.
    text = render_context(ids, 12, seq_len=10, window=5, tokenizer=_CharTokenizer())
    assert text == "kl⟦m⟧nop"


def test_damaged_contexts_picks_most_damaged_and_reads_variant_values(tmp_path):
    n_tokens, d = 60, 4
    x = np.zeros((n_tokens, d), dtype=np.float32)
    x[[5, 17, 33], 2] = [1.0, 3.0, 2.0]  # feature 2's top FP contexts: 17, 33, 5
    x[::3, 0] = 1.0
    y = x.copy()
    y[17, 2] = 0.5
    fp = write_dense(tmp_path, "fp", x, n_shards=2)
    var = write_dense(tmp_path, "v", y, n_shards=2)
    features = pl.DataFrame(
        {
            "variant": ["v"] * d,
            "feature": list(range(d)),
            "active": [True, False, True, True],
            "r": [0.99, 0.0, 0.2, 0.95],
        }
    )
    ids = (np.arange(n_tokens) % 26).reshape(3, 20)
    table = damaged_contexts(
        features,
        fp,
        {"v": var},
        ids,
        _CharTokenizer(),
        ContextConfig(n_features=1, n_contexts=2, window=3),
    )
    assert table["feature"].to_list() == [
        2,
        2,
    ]  # lowest r among active features; inactive 1 skipped
    fp_rows = table.filter(pl.col("where_fires") == "fp")
    assert fp_rows["position"].to_list() == [17, 33]
    assert fp_rows["token_id"].to_list() == [17 % 26, 33 % 26]
    assert fp_rows["fp_value"].to_list() == [3.0, 2.0]
    assert fp_rows["variant_value"].to_list() == [0.5, 2.0]
    assert (
        fp_rows["context"][0] == "opq⟦r⟧st"
    )  # 3 tokens of left context, right side cut at the sequence end
    assert table.filter(pl.col("where_fires") == "variant_only").is_empty()


def test_damaged_contexts_adds_contexts_where_only_the_variant_fires(tmp_path):
    n_tokens, d = 60, 3
    x = np.zeros((n_tokens, d), dtype=np.float32)
    x[[5, 17], 1] = [1.0, 3.0]
    y = x.copy()
    y[[40, 8, 50], 1] = [0.7, 2.5, 0.1]  # fires where FP does not: 8 first, then 40, 50
    y[17, 1] = 9.0  # fires where FP also does: not a variant-only context
    fp = write_dense(tmp_path, "fp", x, n_shards=2)
    var = write_dense(tmp_path, "v", y, n_shards=2)
    features = pl.DataFrame(
        {"variant": ["v"] * d, "feature": [0, 1, 2], "active": [False, True, False],
         "r": [1.0, 0.1, 1.0], "class": ["survived", "destroyed", "survived"]}
    )  # fmt: skip
    table = damaged_contexts(
        features,
        fp,
        {"v": var},
        (np.arange(n_tokens) % 26).reshape(3, 20),
        _CharTokenizer(),
        ContextConfig(n_features=1, n_contexts=2, window=3),
    )
    only = table.filter(pl.col("where_fires") == "variant_only")
    assert only["position"].to_list() == [8, 40]
    assert only["variant_value"].to_list() == pytest.approx([2.5, 0.7])
    assert only["fp_value"].to_list() == [0.0, 0.0]
    assert only["context_rank"].to_list() == [1, 2]
    assert table.null_count().sum_horizontal().item() == 0


def test_most_damaged_passes_over_insufficient_features():
    features = pl.DataFrame(
        {
            "variant": ["v"] * 4,
            "feature": [0, 1, 2, 3],
            "active": [True, True, True, True],
            "r": [0.1, 0.2, 0.3, 0.95],
            "class": ["insufficient", "destroyed", "destroyed", "survived"],
        }
    )
    assert most_damaged(features, 2)["feature"].to_list() == [1, 2]
    # without classes (equal_bits' probe) every active feature is a candidate
    assert most_damaged(features.drop("class"), 2)["feature"].to_list() == [0, 1]


def test_most_damaged_leaves_out_null_variants_and_survived_features():
    features = pl.DataFrame(
        {
            "variant": ["fp-noise", "fp-noise", "rtn-int4", "rtn-int4", "rtn-int8"],
            "feature": [0, 1, 0, 1, 0],
            "active": [True] * 5,
            "r": [0.2, 0.3, 0.4, 0.95, 0.99],
            "class": ["destroyed", "destroyed", "destroyed", "survived", "survived"],
        }
    )
    chosen = most_damaged(features, 5)
    # the null run's damage is the floor, and rtn-int8 damaged nothing: no rows for either
    assert chosen.select("variant", "feature").rows() == [("rtn-int4", 0)]
