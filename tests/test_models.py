"""Loading models, the family table and hook mapping, on real tiny transformers models
(every family at once: test_families.py)."""

from __future__ import annotations

import pytest
import torch

from sae_audit.models import ActivationCapture, family_of, load_model, resolve_hook

from .conftest import TINY_FAMILIES
from .test_families import VOCAB


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_resid_post_hook_matches_hidden_states(gpt_neox_dir, layer):
    model = load_model(gpt_neox_dir)
    ids = torch.randint(0, 64, (2, 10))
    hook = f"blocks.{layer}.hook_resid_post"
    with ActivationCapture(model, [hook, f"blocks.{layer}.hook_resid_pre"]) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert torch.allclose(cap.activations[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    if layer < 2:
        assert torch.allclose(cap.activations[hook], hidden[layer + 1])
    else:
        # HF applies the final norm to the last hidden state; the hook reads the block output before it.
        final_norm = model.gpt_neox.final_layer_norm
        assert torch.allclose(final_norm(cap.activations[hook]), hidden[layer + 1], atol=1e-5)


def test_unknown_hook_and_layer_are_clear_errors(gpt_neox_dir):
    model = load_model(gpt_neox_dir)
    with pytest.raises(ValueError, match="unsupported SAE hook"):
        resolve_hook(model, "blocks.0.hook_q")
    with pytest.raises(ValueError, match="layer 7"):
        resolve_hook(model, "blocks.7.hook_resid_post")


def test_unsupported_model_type_lists_the_families(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        word_embed_proj_dim=16,
        max_position_embeddings=32,
    )
    # Only the config: load_model must fail before it loads any weights.
    cfg.save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError) as err:
        load_model(tmp_path / "opt")
    message = str(err.value)
    assert "'opt'" in message
    for family in TINY_FAMILIES:
        assert repr(family) in message
    with pytest.raises(ValueError, match="supported families"):
        family_of(OPTForCausalLM(cfg))
