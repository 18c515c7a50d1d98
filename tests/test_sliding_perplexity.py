"""Sliding-window perplexity: the strided window on a tiny real GPT-NeoX (random weights),
checked against the chunked perplexity and the transformers documentation's recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from sae_audit.perplexity import chunked_perplexity
from sae_audit.shards import write_nll_shard
from sae_audit.sliding_perplexity import sliding_window_nll

from .test_perplexity import _meta

VOCAB = 50


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def _stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _token_nll(model: GPTNeoXForCausalLM, chunks: torch.Tensor) -> torch.Tensor:
    """NLL of tokens 1.. of each row given its own prefix: [n_chunks, len - 1]."""
    with torch.no_grad():
        logp = torch.log_softmax(model(chunks).logits.float(), dim=-1)
    return -logp[:, :-1].gather(2, chunks[:, 1:, None]).squeeze(2)


def test_stride_equal_window_matches_chunked(model: GPTNeoXForCausalLM, tmp_path: Path) -> None:
    window, n_chunks = 16, 5
    ids = _stream(window * n_chunks)
    nll = _token_nll(model, ids.view(n_chunks, window)).double().numpy()
    paths = []
    for shard, rows in enumerate((slice(0, 2), slice(2, 5))):
        block = nll[rows]
        tokens = (
            np.arange(rows.start, rows.stop)[:, None] * window + np.arange(window - 1)
        ).ravel()
        path = tmp_path / f"nll-{shard}.parquet"
        write_nll_shard(path, tokens, block.ravel(), _meta(rows.start * window, rows.stop * window))
        paths.append(path)
    chunked = chunked_perplexity(paths)

    nll_sum, n_scored = sliding_window_nll(model, ids, window=window, stride=window, batch_size=2)
    assert n_scored == chunked["n_tokens"] == n_chunks * (window - 1)
    assert nll_sum / n_scored == pytest.approx(chunked["mean_nll"], rel=1e-6)


def _hf_recipe(
    model: GPTNeoXForCausalLM, ids: torch.Tensor, window: int, stride: int
) -> tuple[float, int]:
    """The transformers documentation's strided perplexity loop, verbatim in spirit."""
    seq_len = ids.numel()
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + window, seq_len)
        trg_len = end - prev_end
        input_ids = ids[None, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n_valid = int((target_ids[:, 1:] != -100).sum())
        total += float(loss) * n_valid
        count += n_valid
        prev_end = end
        if end == seq_len:
            break
    return total, count


@pytest.mark.parametrize(("window", "stride"), [(16, 5), (16, 1), (12, 12), (10, 7)])
def test_sliding_window_scores_each_token_once(
    model: GPTNeoXForCausalLM, window: int, stride: int
) -> None:
    ids = _stream(103, seed=1)
    nll_sum, n_scored = sliding_window_nll(model, ids, window=window, stride=stride, batch_size=3)
    ref_sum, ref_count = _hf_recipe(model, ids, window, stride)
    assert n_scored == ref_count
    if stride < window:
        assert n_scored == ids.numel() - 1
    assert nll_sum == pytest.approx(ref_sum, rel=1e-5)
    # Batching (with right padding of the short last window) changes nothing.
    one_sum, one_n = sliding_window_nll(model, ids, window=window, stride=stride, batch_size=1)
    assert one_n == n_scored and one_sum == pytest.approx(nll_sum, rel=1e-5)


def test_sliding_window_with_bos(model: GPTNeoXForCausalLM) -> None:
    bos, window = 0, 9
    ids = _stream(40, seed=2)
    # stride == window - 1: non-overlapping chunks of 8 text tokens, each after BOS,
    # every text token scored, the first one from BOS alone.
    nll_sum, n_scored = sliding_window_nll(model, ids, window=window, stride=window - 1, bos_id=bos)
    assert n_scored == ids.numel()
    chunks = torch.cat([torch.full((5, 1), bos), ids.view(5, window - 1)], dim=1)
    ref = _token_nll(model, chunks).double().sum().item()
    assert nll_sum == pytest.approx(ref, rel=1e-6)
    # Overlapping windows still score every token exactly once.
    _, n_overlap = sliding_window_nll(model, ids, window=window, stride=3, bos_id=bos)
    assert n_overlap == ids.numel()


def test_sliding_window_validates_and_restores_mode(model: GPTNeoXForCausalLM) -> None:
    ids = _stream(20)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_nll(model, ids, window=8, stride=9)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_nll(model, ids, window=8, stride=8, bos_id=0)
    model.train()
    try:
        sliding_window_nll(model, ids, window=8, stride=4)
        assert model.training
    finally:
        model.eval()
