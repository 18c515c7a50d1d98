"""Shared fixtures: tiny real transformers models and sae-lens SAEs, built and saved locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def tiny_gpt_neox(vocab_size: int = 64, hidden: int = 32, layers: int = 3, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
    )
    return GPTNeoXForCausalLM(cfg).eval()


def save_standard_sae(path: Path, d_in: int, d_sae: int, hook_name: str, seed: int = 0) -> Path:
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    cfg = StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook_name
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0 / d_in**0.5)
        sae.b_enc.fill_(-0.05)
        sae.W_dec.copy_(sae.W_enc.t())
    sae.save_model(path)
    return path


@pytest.fixture
def gpt_neox_dir(tmp_path: Path) -> Path:
    model = tiny_gpt_neox()
    out = tmp_path / "model"
    model.save_pretrained(out)
    return out
