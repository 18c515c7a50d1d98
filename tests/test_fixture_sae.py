"""The embedded fixture's SAE: a sae-lens SAE trained on one layer of the fixture model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sae_audit.fixture.model import train_model
from sae_audit.fixture.sae import SAETrainConfig, hook_name, train_sae

from .test_fixture_model import TINY_MODEL

# corpus, tokenizer_dir and model_dir are session fixtures (tests/conftest.py).

TINY_SAE = SAETrainConfig(
    layer=0,
    d_sae=64,
    max_steps=80,
    n_activation_tokens=4096,
    n_eval_tokens=1024,
    batch_size=512,
)


def test_tiny_sae_saves_in_sae_lens_format(
    model_dir: Path, corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    from sae_lens import SAE

    metrics = train_sae(TINY_SAE, model_dir, corpus[0], tmp_path / "sae", model_name="tiny")
    assert (tmp_path / "sae" / "cfg.json").exists()
    assert (tmp_path / "sae" / "sae_weights.safetensors").exists()
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == hook_name(0) == "blocks.0.hook_resid_post"
    assert sae.cfg.metadata.model_name == "tiny"
    assert sae.cfg.metadata.context_size == TINY_MODEL.context
    assert sae.cfg.normalize_activations == "none"
    saved = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] > 0
    assert math.isfinite(saved["explained_variance"]) and saved["explained_variance"] > 0
    assert 0 <= saved["l0"] <= 64 and 0 <= saved["n_dead_features"] <= 64


def test_fixture_sae_is_a_function_of_config_and_seed(
    model_dir: Path, corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """Two builds of the same SAE config are the same SAE, bit for bit (no wall clock)."""
    from safetensors.torch import load_file

    runs = [train_sae(TINY_SAE, model_dir, corpus[0], tmp_path / f"sae{i}") for i in range(2)]
    first, second = (load_file(tmp_path / f"sae{i}" / "sae_weights.safetensors") for i in range(2))
    assert first.keys() == second.keys() >= {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert runs[0]["steps"] == runs[1]["steps"] == TINY_SAE.max_steps
    assert runs[0]["explained_variance"] == runs[1]["explained_variance"]


def test_training_past_the_wall_clock_cap_fails_naming_the_key(
    model_dir: Path, corpus: tuple[Path, Path, dict], tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Out of time is an error that names the key and the fix, never a shorter training."""
    cap = 1e-9  # already spent before the first step
    with pytest.raises(
        TimeoutError, match=r"fixture\.model\.train_seconds.*fixture\.model\.max_steps"
    ):
        train_model(
            replace(TINY_MODEL, train_seconds=cap), tokenizer_dir, corpus[0], corpus[1], tmp_path
        )
    with pytest.raises(TimeoutError, match=r"raise fixture\.sae\.train_seconds or lower"):
        train_sae(replace(TINY_SAE, train_seconds=cap), model_dir, corpus[0], tmp_path / "sae")
    assert not (tmp_path / "sae" / "sae_weights.safetensors").exists()


def test_sae_rejects_final_layer(
    model_dir: Path, corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    cfg = SAETrainConfig(layer=1, d_sae=64, train_seconds=1.0)
    with pytest.raises(ValueError, match="layer"):
        train_sae(cfg, model_dir, corpus[0], tmp_path / "sae")


def test_folded_scale_reproduces_scaled_training() -> None:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=32))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, scale = torch.randn(64, 16) * 7.0, 0.3
    feats_scaled = sae.encode(x * scale)
    recon_scaled = sae.decode(feats_scaled) / scale
    sae.fold_activation_norm_scaling_factor(scale)
    torch.testing.assert_close(sae.encode(x), feats_scaled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recon_scaled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: SAETrainConfig(layer=-1), "layer"),
        (lambda: SAETrainConfig(d_sae=0), "d_sae"),
        (lambda: SAETrainConfig(l1_coefficient=-1.0), "l1_coefficient"),
        (lambda: SAETrainConfig(batch_size=0), "batch_size"),
        (lambda: SAETrainConfig(train_seconds=0.0), "train_seconds"),
    ],
)
def test_config_validation_names_the_field(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()
