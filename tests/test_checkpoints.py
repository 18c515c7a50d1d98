"""Materialized checkpoints on a real tiny GPT-NeoX: what is stored, and what loads back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_audit.checkpoints import TENSORS, load_checkpoint, write_checkpoint
from sae_audit.models import load_model, target_weights
from sae_audit.prune import prune_magnitude
from sae_audit.quantize import RTNSpec, fake_quantize


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


@pytest.mark.parametrize(("run", "noise"), [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_noise_null_runs_the_fp_weights_in_the_other_dtype(gpt_neox_dir, tmp_path, run, noise):
    from sae_audit import stages
    from sae_audit.files import InputError

    ckpt = stages.compress(
        model={"source": str(gpt_neox_dir), "dtype": run}, base=str(gpt_neox_dir),
        variant="fp-noise", out=tmp_path / "fp-noise",
    )  # fmt: skip
    manifest = json.loads((tmp_path / "fp-noise" / "manifest.json").read_text())
    assert manifest["method"] == {"kind": "noise", "run_dtype": run, "dtype": noise}
    assert load_file(f"{ckpt}/{TENSORS}") == {}  # nothing stored: the FP weights themselves
    model = load_checkpoint(ckpt, dtype=run)
    fp = load_model(gpt_neox_dir)
    for key, value in fp.state_dict().items():
        assert model.state_dict()[key].dtype == getattr(torch, noise), key
        assert torch.equal(model.state_dict()[key], value.to(getattr(torch, noise))), key
    # a job in another run dtype would silently run the noise null in its own dtype: refused
    other = "float16" if run == "float32" else "float32"
    with pytest.raises(InputError, match=f"made for run dtype '{run}'.*runs in '{other}'"):
        load_checkpoint(ckpt, dtype=other)
