"""Loading sae-lens SAEs from disk: every architecture, and the architecture check."""

from __future__ import annotations

import pytest
import torch

from sae_audit.files import InputError
from sae_audit.saes import load_sae, sae_input

from .test_families import HIDDEN, SAE_CLASSES, make_sae


@pytest.mark.parametrize("arch", list(SAE_CLASSES))
def test_sae_of_each_architecture_loads_from_disk(tmp_path, arch):
    hook = "blocks.1.hook_resid_post"
    made = make_sae(arch, HIDDEN, 64, hook)
    made.save_model(tmp_path / arch)
    sae = load_sae({"path": str(tmp_path / arch)})
    assert type(sae).__name__ == SAE_CLASSES[arch] and type(sae) is type(made)
    assert sae.cfg.architecture() == arch and sae.cfg.d_in == HIDDEN and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == hook
    assert not any(p.requires_grad for p in sae.parameters())
    for name, p in made.state_dict().items():
        assert torch.equal(sae.state_dict()[name], p), name
    # The path argument overrides the spec's; a matching architecture is accepted.
    assert type(load_sae({"architecture": arch}, path=tmp_path / arch)) is type(made)
    wrong = "topk" if arch != "topk" else "jumprelu"
    with pytest.raises(ValueError) as err:
        load_sae({"path": str(tmp_path / arch), "architecture": wrong})
    assert repr(wrong) in str(err.value) and repr(arch) in str(err.value)


def _saved(tmp_path, name: str, **cfg_updates):
    """An SAE saved to disk and loaded back, its cfg edited first (what sae-lens records)."""
    sae = make_sae("standard", HIDDEN, 16, "blocks.1.hook_resid_post")
    for key, value in cfg_updates.items():
        target = (
            sae.cfg.metadata if key in ("prepend_bos", "model_from_pretrained_kwargs") else sae.cfg
        )
        setattr(target, key, value)
    sae.save_model(tmp_path / name)
    return load_sae({"path": str(tmp_path / name)})


def test_center_writing_weights_makes_the_input_mean_zero_per_token(tmp_path):
    sae = _saved(tmp_path, "c", model_from_pretrained_kwargs={"center_writing_weights": True})
    prepared = sae_input(sae, "c", tokens_bos=False)
    assert prepared.center
    acts = torch.randn(5, HIDDEN) + 3.0
    centered = prepared.prepare(acts)
    torch.testing.assert_close(centered.mean(dim=-1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(centered, acts - acts.mean(dim=-1, keepdim=True))
    assert "per-token mean subtracted" in prepared.describe()


@pytest.mark.parametrize("kwargs", [{"center_writing_weights": False}, {}, None])
def test_input_is_used_as_is_unless_centering_is_recorded(tmp_path, kwargs):
    sae = _saved(tmp_path, "n", model_from_pretrained_kwargs=kwargs)
    prepared = sae_input(sae, "n", tokens_bos=False)
    acts = torch.randn(4, HIDDEN) + 3.0
    assert not prepared.center and torch.equal(prepared.prepare(acts), acts)
    assert "used as is" in prepared.describe()


def test_a_bos_mismatch_is_flagged_and_described(tmp_path):
    sae = _saved(tmp_path, "b", prepend_bos=True)
    assert sae_input(sae, "b", tokens_bos=False).bos_mismatch
    assert not sae_input(sae, "b", tokens_bos=True).bos_mismatch
    assert "SAE prepend_bos=true, tokens.bos=false" in sae_input(sae, "b", False).describe()
    record = sae_input(sae, "b", tokens_bos=False).to_dict()
    assert record["sae_prepend_bos"] is True and record["tokens_bos"] is False


@pytest.mark.parametrize("norm", ["expected_average_only_in", "covariance_whitening"])
def test_a_normalization_sae_lens_did_not_fold_is_refused(tmp_path, norm):
    sae = make_sae("standard", HIDDEN, 16, "blocks.1.hook_resid_post")
    sae.cfg.normalize_activations = norm  # as sae-lens leaves it without the statistics
    with pytest.raises(InputError, match=f"'my-sae' has normalize_activations='{norm}'"):
        sae_input(sae, "my-sae", tokens_bos=False)


def test_a_run_time_normalization_is_left_to_sae_lens(tmp_path):
    sae = _saved(tmp_path, "ln", normalize_activations="layer_norm")
    prepared = sae_input(sae, "ln", tokens_bos=False)
    assert prepared.normalize_activations == "layer_norm" and not prepared.center
