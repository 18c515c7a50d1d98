"""Perplexity: chunked over NLL shards (the sliding window: test_sliding_perplexity.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sae_audit import table_docs
from sae_audit.perplexity import chunked_perplexity, perplexity_table
from sae_audit.shards import ShardMetadata, write_nll_shard


def _meta(start: int, stop: int) -> ShardMetadata:
    return ShardMetadata("m", "fp", "s", "h", 1, start, stop, "x")


def test_chunked_perplexity_is_token_weighted(tmp_path: Path) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_nll_shard(a, np.arange(3), np.array([1.0, 2.0, 3.0]), _meta(0, 4))
    write_nll_shard(b, np.arange(4, 5), np.array([6.0]), _meta(4, 6))
    out = chunked_perplexity([a, b])
    # Token-weighted: (1+2+3+6)/4 = 3, not the mean of shard means (2+6)/2 = 4.
    assert out["n_tokens"] == 4
    assert out["mean_nll"] == pytest.approx(3.0)
    assert out["perplexity"] == pytest.approx(math.exp(3.0))
    # A token prefix (what the matched-pruning search evaluates): tokens 0..1 only.
    prefix = chunked_perplexity([a, b], token_stop=2)
    assert prefix["n_tokens"] == 2 and prefix["mean_nll"] == pytest.approx(1.5)


def test_perplexity_table_counts_scored_tokens_and_matches_its_documentation() -> None:
    # 2 sequences of 8 tokens: the chunked pass scores 7 per sequence, the sliding one 15
    chunked = {
        "fp": {"n_tokens": 14, "mean_nll": 1.0, "perplexity": 2.0},
        "rtn-int4": {"n_tokens": 14, "mean_nll": 1.5, "perplexity": 3.0},
    }
    sliding = {
        "fp": {"variant": "fp", "n_scored": 15, "perplexity": 4.0},
        "rtn-int4": {"variant": "rtn-int4", "n_scored": 15, "perplexity": 5.0},
    }
    table = perplexity_table(chunked, sliding)
    assert table["n_scored_chunked"].to_list() == [14, 14]
    assert table["n_scored_sliding"].to_list() == [15, 15]
    assert table["dppl_chunked_pct"].to_list() == pytest.approx([0.0, 50.0])
    assert table["dppl_sliding_pct"].to_list() == pytest.approx([0.0, 25.0])
    assert table_docs.problems("perplexity", table.schema) == []
    # without the sliding pass its columns are absent, which the documentation allows
    assert table_docs.problems("perplexity", perplexity_table(chunked, {}).schema) == []
