"""Materialized checkpoints, family tables and hook mapping on real tiny transformers models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_audit.checkpoints import TENSORS, load_checkpoint, write_checkpoint
from sae_audit.models import ActivationCapture, load_model, resolve_hook, target_weights
from sae_audit.prune import prune_magnitude
from sae_audit.quantize import RTNSpec, fake_quantize
from sae_audit.variants import parse_variant, prune_name, rtn_name


def test_variant_names_round_trip():
    assert parse_variant(rtn_name(6)).bits == 6
    v = parse_variant(rtn_name(4, 128, symmetric=False))
    assert (v.bits, v.group_size, v.symmetric) == (4, 128, False)
    assert parse_variant(prune_name(0.175)).sparsity == 0.175
    assert parse_variant("prune-matched-rtn-int6").target == "rtn-int6"
    assert parse_variant("fp").kind == "fp"
    for bad in ("rtn-int1", "prune-1.5", "int6", "prune-matched-fp"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_rtn_checkpoint_stores_codes_and_loads_dequantized(gpt_neox_dir, tmp_path):
    ckpt = write_checkpoint(gpt_neox_dir, "rtn-int4", tmp_path / "rtn-int4")
    payload = load_file(ckpt / TENSORS)
    fp = load_model(gpt_neox_dir)
    names = [n for n, _ in target_weights(fp)]
    assert len(names) == 3 * 4
    # Integer codes and scales only: no float copy of any weight.
    for name in names:
        assert payload[f"{name}.codes"].dtype == torch.int8
        assert f"{name}.weight" not in payload
    model = load_checkpoint(ckpt)
    fp_state, q_state = fp.state_dict(), model.state_dict()
    for key in fp_state:
        if key in names:
            assert torch.allclose(q_state[key], fake_quantize(fp_state[key], RTNSpec(bits=4)))
            assert not torch.equal(q_state[key], fp_state[key])
        else:  # embeddings, unembedding, norms, biases stay FP
            assert torch.equal(q_state[key], fp_state[key]), key
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["method"]["bits"] == 4 and manifest["variant"] == "rtn-int4"


def test_group_wise_checkpoint_with_ragged_groups(gpt_neox_dir, tmp_path):
    # hidden 32 with group 24 leaves a ragged last group of 8 columns.
    ckpt = write_checkpoint(gpt_neox_dir, "rtn-int3-g24", tmp_path / "g")
    model, fp = load_checkpoint(ckpt), load_model(gpt_neox_dir)
    for (name, p), (_, p_fp) in zip(target_weights(model), target_weights(fp), strict=True):
        assert torch.allclose(p, fake_quantize(p_fp, RTNSpec(bits=3, group_size=24))), name


def test_prune_checkpoint_round_trip(gpt_neox_dir, tmp_path):
    ckpt = write_checkpoint(gpt_neox_dir, "prune-0.3", tmp_path / "p")
    model, fp = load_checkpoint(ckpt), load_model(gpt_neox_dir)
    for (name, p), (_, p_fp) in zip(target_weights(model), target_weights(fp), strict=True):
        assert torch.equal(p, prune_magnitude(p_fp, 0.3)), name
        assert (p == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    out, out_fp = model.get_output_embeddings(), fp.get_output_embeddings()
    assert torch.equal(out.weight, out_fp.weight)


def test_fp_checkpoint_is_the_base_model(gpt_neox_dir, tmp_path):
    model = load_checkpoint(write_checkpoint(gpt_neox_dir, "fp", tmp_path / "fp"))
    fp = load_model(gpt_neox_dir)
    for key, value in fp.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_checkpoint_in_bfloat16_casts_after_float32_math(gpt_neox_dir, tmp_path):
    ckpt = write_checkpoint(gpt_neox_dir, "rtn-int5", tmp_path / "q")
    model = load_checkpoint(ckpt, dtype="bfloat16")
    fp = load_model(gpt_neox_dir)
    name, param = next(iter(target_weights(model)))
    expected = fake_quantize(fp.get_parameter(name), RTNSpec(bits=5)).to(torch.bfloat16)
    assert param.dtype == torch.bfloat16 and torch.equal(param, expected)


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
