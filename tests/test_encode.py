"""Encoding one token shard: per-token NLL and every SAE's codes from one forward pass
(each model family and SAE architecture against a dense encode: test_families.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from sae_audit.encode import EncodeConfig, EncodeTarget, batch_nll, encode_shard_multi, token_nll
from sae_audit.models import load_model
from sae_audit.shards import read_metadata, read_nll_shard, write_token_shard

from .test_families import make_sae


def test_token_nll_is_the_cross_entropy_of_the_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    nll = token_nll(logits, ids)
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none"
    ).view(2, 4)
    torch.testing.assert_close(nll, expected)
    # Low-precision logits are scored in float32.
    assert token_nll(logits.bfloat16(), ids).dtype == torch.float32


def test_one_pass_writes_a_shard_per_sae_and_the_nll(gpt_neox_dir, tmp_path):
    model = load_model(gpt_neox_dir)
    n_seq, seq_len, first = 3, 6, 2
    ids = torch.randint(4, 64, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    tokens = tmp_path / "tokens.parquet"
    write_token_shard(tokens, ids.numpy(), first, {"seq_len": seq_len})
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_mlp_out"}
    widths = {"a": 40, "b": 24}
    targets = [
        EncodeTarget(
            make_sae("standard", 32, widths[name], hook, seed=i),
            hook,
            tmp_path / f"{name}.parquet",
            name,
            config_hash="hash-b" if name == "b" else None,
        )
        for i, (name, hook) in enumerate(hooks.items())
    ]
    meta = {"model": "tiny", "variant": "fp", "config_hash": "hash"}
    info = encode_shard_multi(
        model,
        targets,
        tokens,
        tmp_path / "nll.parquet",
        meta,
        EncodeConfig(batch_size=2, device="cpu"),
        torch.device("cpu"),
    )
    start, n_tokens = first * seq_len, n_seq * seq_len
    assert info["n_tokens"] == n_tokens
    for name, hook in hooks.items():
        shard = read_metadata(tmp_path / f"{name}.parquet")
        assert (shard.model, shard.variant, shard.sae, shard.hook) == ("tiny", "fp", name, hook)
        assert shard.d_sae == widths[name]
        assert (shard.token_start, shard.token_stop) == (start, start + n_tokens)
        assert shard.config_hash == ("hash-b" if name == "b" else "hash")
        assert info["n_codes"][name] == pq.read_metadata(tmp_path / f"{name}.parquet").num_rows
    # Every token but each sequence's first, scored by the same forward pass.
    token, nll = read_nll_shard(tmp_path / "nll.parquet", "fp")
    positions = start + np.arange(n_seq)[:, None] * seq_len + np.arange(1, seq_len)
    np.testing.assert_array_equal(token, positions.ravel())
    with torch.no_grad():
        expected = batch_nll(model, ids).double().numpy().ravel()
    np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-6)
