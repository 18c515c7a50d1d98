"""Perplexity: chunked over NLL shards (the sliding window: test_sliding_perplexity.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sae_audit.perplexity import chunked_perplexity
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
