"""llm-compressor variants: made by its own oneshot, loaded by transformers, forward as deployed.

Tiny GPT-NeoX and Llama models saved locally; every recipe runs the real llm-compressor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sae_audit.checkpoints import load_checkpoint, load_run_model, read_manifest, write_checkpoint
from sae_audit.models import blocks_of, target_weights
from sae_audit.quantize import RTNSpec, fake_quantize
from sae_audit.shipped import KV_SCALES, MODEL_DIR, attention_modules, supports_ct_kv
from tests.conftest import save_tiny_model

VOCAB = 64


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shipped")
    return {
        family: save_tiny_model(family, root / family, vocab_size=VOCAB, hidden=64, layers=2)
        for family in ("gpt_neox", "llama")
    }


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    return np.random.default_rng(0).integers(4, VOCAB, size=(16, 32))


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).integers(4, VOCAB, size=(4, 24)))


def make(base: Path, key: str, entry: dict, calibration: np.ndarray, root: Path) -> Path:
    return write_checkpoint(base, f"lc-{key}", root / key, entry=entry, calibration=calibration)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def block_names(model) -> set[str]:
    return {name for name, _ in target_weights(model)}


def assert_only_blocks_changed(fp, q) -> None:
    """Block matrices differ from FP; embeddings, norms, biases and the head are FP exactly."""
    blocks = block_names(fp)
    q_params = dict(q.named_parameters())
    for name, p in fp.named_parameters():
        if name in blocks:
            assert not torch.equal(p, q_params[name]), name
        else:
            assert torch.equal(p, q_params[name]), name


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_gptq_w4a16_is_a_compressed_tensors_checkpoint_on_a_4_bit_grid(
    family, bases, calibration, inputs, tmp_path
):
    entry = {"scheme": "W4A16", "method": "gptq", "group_size": 32}
    ckpt = make(bases[family], "gptq", entry, calibration, tmp_path)
    config = (ckpt / MODEL_DIR / "config.json").read_text()
    assert (
        '"quant_method": "compressed-tensors"' in config and '"format": "pack-quantized"' in config
    )
    assert read_manifest(ckpt)["method"]["modifiers"] == ["GPTQModifier"]
    fp = load_run_model(bases[family], "float32")
    q = load_checkpoint(ckpt, "float32")
    assert_only_blocks_changed(fp, q)
    for name, p in target_weights(q):
        groups = p.detach().reshape(p.shape[0], -1, 32)
        # at most 16 levels per group (symmetric int4 on compressed-tensors' full grid)
        levels = max(len(torch.unique(g)) for g in groups.reshape(-1, 32))
        assert levels <= 16, name
    assert not torch.equal(logits(fp, inputs), logits(q, inputs))


def test_llmcompressor_rtn_equals_our_full_range_rtn(bases, calibration, tmp_path):
    # Independent reference: llm-compressor's round-to-nearest (QuantizationModifier, min-max
    # observer) and ours with the same arguments give the same weights, bit for bit.
    entry = {"scheme": "W4A16", "method": "rtn", "group_size": 32}
    q = load_checkpoint(make(bases["gpt_neox"], "rtn", entry, calibration, tmp_path), "float32")
    fp = load_run_model(bases["gpt_neox"], "float32")
    fp_weights = dict(target_weights(fp))
    spec = RTNSpec(bits=4, group_size=32, full_range=True)
    for name, p in target_weights(q):
        assert torch.equal(p.detach(), fake_quantize(fp_weights[name].detach(), spec)), name
    narrow = RTNSpec(bits=4, group_size=32)
    assert any(
        not torch.equal(p.detach(), fake_quantize(fp_weights[n].detach(), narrow))
        for n, p in target_weights(q)
    )


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
@pytest.mark.parametrize(
    ("scheme", "method"), [("W8A8", "smoothquant+gptq"), ("FP8_DYNAMIC", "rtn")]
)
def test_activation_schemes_quantize_activations_in_the_forward(
    scheme, method, family, bases, calibration, inputs, tmp_path
):
    from compressed_tensors.quantization import disable_quantization, enable_quantization

    if scheme.startswith("FP8") and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn dtype")
    entry = {"scheme": scheme, "method": method}
    q = load_checkpoint(make(bases[family], "act", entry, calibration, tmp_path), "float32")
    live = logits(q, inputs)
    q.apply(disable_quantization)
    weights_only = logits(q, inputs)
    q.apply(enable_quantization)
    assert torch.equal(logits(q, inputs), live)
    # the deployed forward quantizes each targeted Linear's input: turning that off changes it
    assert (live - weights_only).abs().max() > 1e-4
    fp = load_run_model(bases[family], "float32")
    if method.startswith("smoothquant"):
        # SmoothQuant folds scales into the norms: those change, the head does not
        norm_fp, norm_q = (blocks_of(m)[0].input_layernorm.weight for m in (fp, q))
        assert not torch.equal(norm_fp, norm_q)
        head_fp, head_q = (m.get_output_embeddings().weight for m in (fp, q))
        assert torch.equal(head_fp, head_q)
    else:
        assert_only_blocks_changed(fp, q)
    for name, p in target_weights(q):
        # int8 / fp8 per output channel: at most 256 distinct values per row
        assert max(len(torch.unique(row)) for row in p.detach()) <= 256, name


def test_kv_cache_on_gpt_neox_uses_the_workflows_attention(bases, calibration, inputs, tmp_path):
    fp = load_run_model(bases["gpt_neox"], "float32")
    assert not supports_ct_kv(fp)  # compressed-tensors would silently do nothing here
    ckpt = make(bases["gpt_neox"], "kv", {"kv_cache": "fp8"}, calibration, tmp_path)
    method = read_manifest(ckpt)["method"]
    assert method["kv_cache"] == {"scheme": "fp8", "by": "sae-audit", "scales": KV_SCALES}
    assert not (ckpt / MODEL_DIR).exists()  # weights untouched: nothing for llm-compressor
    q = load_checkpoint(ckpt, "float32")
    for p, r in zip(fp.parameters(), q.parameters(), strict=True):
        assert torch.equal(p, r)
    assert not torch.equal(logits(fp, inputs), logits(q, inputs))
    # removing the quantizers restores the FP forward exactly
    for m in attention_modules(q):
        del m.sae_audit_kv
    assert torch.equal(logits(fp, inputs), logits(q, inputs))


def test_kv_cache_on_llama_is_llm_compressors_and_ours_matches_it(
    bases, calibration, inputs, tmp_path
):
    from safetensors.torch import save_file

    from sae_audit.shipped import apply_kv_scales

    fp = load_run_model(bases["llama"], "float32")
    assert supports_ct_kv(fp)
    ckpt = make(bases["llama"], "kv", {"kv_cache": "fp8"}, calibration, tmp_path)
    method = read_manifest(ckpt)["method"]
    assert method["kv_cache"] == {"scheme": "fp8", "by": "llm-compressor"}
    config = (ckpt / MODEL_DIR / "config.json").read_text()
    assert '"kv_cache_scheme"' in config and '"kv_cache_scheme": null' not in config
    q = load_checkpoint(ckpt, "float32")
    theirs = logits(q, inputs)
    assert not torch.equal(theirs, logits(fp, inputs))
    # Independent check of our KV path: the FP model with llm-compressor's fitted scales,
    # quantized by our attention function, computes what compressed-tensors' hook computes.
    scales = {}
    for i, m in enumerate(attention_modules(q)):
        scales[f"layers.{i}.k_scale"] = m.k_scale.detach().reshape(1).clone()
        scales[f"layers.{i}.v_scale"] = m.v_scale.detach().reshape(1).clone()
    save_file(scales, tmp_path / "scales.safetensors")
    ours = logits(apply_kv_scales(fp, "fp8", scales), inputs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_awq_runs_on_cpu_and_quantizes_the_blocks(family, bases, calibration, inputs, tmp_path):
    entry = {"scheme": "W4A16_ASYM", "method": "awq", "group_size": 32}
    ckpt = make(bases[family], "awq", entry, calibration, tmp_path)
    assert read_manifest(ckpt)["method"]["modifiers"] == ["AWQModifier", "QuantizationModifier"]
    q = load_checkpoint(ckpt, "float32")
    fp = load_run_model(bases[family], "float32")
    for name, p in target_weights(q):
        assert not torch.equal(p, dict(fp.named_parameters())[name])
        levels = max(len(torch.unique(g)) for g in p.detach().reshape(-1, 32))
        assert levels <= 16, name
    assert torch.equal(fp.get_output_embeddings().weight, q.get_output_embeddings().weight)
    assert not torch.equal(logits(fp, inputs), logits(q, inputs))


def test_bf16_run_dtype_loads_the_checkpoint_in_bf16(bases, calibration, inputs, tmp_path):
    entry = {"scheme": "W8A8", "method": "rtn"}
    q = load_checkpoint(make(bases["llama"], "bf16", entry, calibration, tmp_path), "bfloat16")
    assert next(q.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(logits(q, inputs).float()).all()
