"""Variants made with llm-compressor: its own `oneshot` and modifiers, saved as compressed-tensors.

How each scheme's forward runs in encode (the model the SAE reads):
- weight-only (W4A16, W8A16, GPTQ/AWQ/RTN-fitted): transformers loads the compressed-tensors
  checkpoint and decompresses the weights; the forward is the FP forward on those weights.
- W8A8 / FP8 / FP8_DYNAMIC: compressed-tensors' own forward wrappers quantize each targeted
  Linear's input activations live (fake-quant: quantize, dequantize, matmul in the run dtype).
- KV cache: post-rotary keys and values are fake-quantized with static per-layer scales
  fitted on the calibration set. Families compressed-tensors recognizes (Llama and the other
  k_proj/v_proj families) get llm-compressor's QuantizationModifier(kv_cache_scheme=...) and
  compressed-tensors' own cache hook; the others (GPT-NeoX: fused query_key_value, a
  `layer_past` argument) silently get nothing from it, so for them the workflow calibrates the
  same per-tensor scales itself and applies compressed-tensors' `fake_quantize` in an
  attention function registered with transformers' AttentionInterface.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from . import progress
from .models import Family, family_of, load_model

log = logging.getLogger(__name__)

MODEL_DIR = "model"  # the compressed-tensors checkpoint inside a variant's checkpoint directory
KV_SCALES = "kv_scales.safetensors"  # the workflow's own KV-cache scales (unrecognized families)

# SmoothQuant / AWQ mappings for families llm-compressor's registries lack. GPT-NeoX runs
# attention and MLP in parallel from the same residual, each behind its own LayerNorm,
# so each norm's weight can absorb the smoothing of exactly one Linear's input.
SMOOTH_MAPPINGS: dict[str, list[tuple[list[str], str]]] = {
    "gpt_neox": [
        (["re:.*query_key_value$"], "re:.*input_layernorm$"),
        (["re:.*dense_h_to_4h$"], "re:.*post_attention_layernorm$"),
    ],
}

KV_ARGS: dict[str, dict[str, Any]] = {
    "fp8": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True},
    "int8": {"num_bits": 8, "type": "int", "strategy": "tensor", "symmetric": True},
}


def target_patterns(family: Family) -> list[str]:
    """llm-compressor targets: exactly the block matrices our RTN quantizes (never the head)."""
    blocks = re.escape(family.blocks)
    return [rf"re:^{blocks}\.\d+\.{re.escape(path)}$" for path in family.matrices]


def quantization_scheme(entry: Mapping[str, Any], targets: list[str]) -> Any:
    """The preset scheme, with the entry's group size when it overrides the preset's."""
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

    scheme = preset_name_to_scheme(entry["scheme"], targets)
    group_size = entry.get("group_size")
    if group_size is not None and scheme.weights is not None:
        scheme.weights.group_size = group_size
        scheme.weights.strategy = QuantizationStrategy.GROUP
    return scheme


def kv_cache_args(kind: str) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**KV_ARGS[kind], dynamic=False)


def supports_ct_kv(model: nn.Module) -> bool:
    """Whether compressed-tensors' KV-cache hook recognizes this model's attention modules."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module

    return any(is_cached_attention_module(m) for m in model.modules())


def build_recipe(entry: Mapping[str, Any], model: nn.Module, ct_kv: bool) -> list[Any]:
    """llm-compressor modifiers for one config entry (compression.llmcompressor.<key>)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    family = family_of(model)
    model_type: str = cast(Any, model).config.model_type
    targets = target_patterns(family)
    method = entry.get("method", "rtn")
    kwargs: dict[str, Any] = {}
    if entry.get("scheme"):
        kwargs["config_groups"] = {"group_0": quantization_scheme(entry, targets)}
    if entry.get("kv_cache") and ct_kv:
        kwargs["kv_cache_scheme"] = kv_cache_args(entry["kv_cache"])
    mappings = SMOOTH_MAPPINGS.get(model_type)  # None: llm-compressor's own registry
    recipe: list[Any] = []
    if method.startswith("smoothquant"):
        recipe.append(
            SmoothQuantModifier(
                smoothing_strength=entry.get("smoothing_strength", 0.8),
                mappings=[[list(b), s] for b, s in mappings] if mappings else None,
            )
        )
    if method == "awq":
        # AWQ searches per-channel scales, then a plain QuantizationModifier quantizes
        recipe.append(
            AWQModifier(
                mappings=[AWQMapping(smooth_layer=s, balance_layers=list(b)) for b, s in mappings]
                if mappings
                else None
            )
        )
        recipe.append(QuantizationModifier(**kwargs))
    elif method.endswith("gptq"):
        recipe.append(GPTQModifier(**kwargs))
    elif kwargs:
        recipe.append(QuantizationModifier(**kwargs))
    return recipe


@contextlib.contextmanager
def cpu_safe_awq() -> Iterator[None]:
    """AWQ pins its cached activations for faster host-to-device copies, which raises
    "Cannot access accelerator device" on a machine with none; pinning changes no value,
    so without an accelerator it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def calibration_dataset(ids: np.ndarray) -> Any:
    """The calibration token set as the `datasets.Dataset` oneshot consumes (no padding)."""
    from datasets import Dataset

    rows = ids.astype(np.int64).tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def run_oneshot(
    model: nn.Module, tokenizer: Any, recipe: list[Any], ids: np.ndarray, device: torch.device
) -> None:
    """llm-compressor's oneshot on `model` in place, on the calibration token ids."""
    from llmcompressor.entrypoints.oneshot import oneshot

    # oneshot draws its own bars, one per calibration pass and layer: this names the whole.
    log.info(
        "llm-compressor oneshot: %s on %d calibration sequences of %d tokens",
        ", ".join(type(m).__name__ for m in recipe), len(ids), ids.shape[1],
    )  # fmt: skip
    with cpu_safe_awq():
        oneshot(
            model=cast(Any, model),
            processor=tokenizer,
            dataset=calibration_dataset(ids),
            recipe=recipe,
            num_calibration_samples=len(ids),
            max_seq_length=int(ids.shape[1]),
            pipeline="sequential",
        )
    del device  # oneshot places modules itself (its own device map onto the accelerator)


# ---------------------------------------------------------------- the workflow's KV cache
class KVQuant:
    """Static per-tensor fake quantization of one attention module's keys and values.

    `scales` None: calibration mode, recording the absolute maxima instead.
    """

    def __init__(self, kind: str, scales: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.args = kv_cache_args(kind)
        self.scales = scales
        self.absmax = [torch.zeros(()), torch.zeros(())]

    def __call__(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        if self.scales is None:
            for i, x in enumerate((key, value)):
                m = x.detach().abs().amax().float().cpu()
                self.absmax[i] = torch.maximum(self.absmax[i], m)
            return key, value
        out = []
        for x, scale in zip((key, value), self.scales, strict=True):
            scale = scale.to(device=x.device, dtype=x.dtype)
            zero = torch.zeros_like(scale, dtype=torch.int8)
            out.append(fake_quantize(x, scale, zero, self.args))
        return out[0], out[1]

    def fitted_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """compressed-tensors' own qparams for the recorded range (what its observer yields)."""
        from compressed_tensors.quantization.utils import calculate_qparams

        scales = []
        for m in self.absmax:
            scale, _ = calculate_qparams(-m.reshape(1), m.reshape(1), self.args)
            scales.append(scale.reshape(1).float())
        return scales[0], scales[1]


KV_ATTRIBUTE = "sae_audit_kv"


def _base_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    # eager lives in each model's modeling file, not in the registry
    return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[attr-defined]


def install_kv_attention(model: nn.Module) -> str:
    """Route the model's attention through an AttentionInterface function that applies each
    attention module's KVQuant (if any) to the post-rotary keys and values, then runs the
    implementation the model had (sdpa or eager). Returns the registered name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    config: Any = cast(Any, model).config
    base: str = config._attn_implementation or "eager"
    if base.startswith("sae_audit_kv"):
        return base
    name = f"sae_audit_kv_{base}"

    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        kv = getattr(module, KV_ATTRIBUTE, None)
        if kv is not None:
            key, value = kv(key, value)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)  # type: ignore[operator]
    return name


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every block, in block order."""
    from .models import blocks_of

    path = family_of(model).attn_out
    return [block.get_submodule(path) for block in blocks_of(model)]


def calibrate_kv(
    model: nn.Module, kind: str, ids: np.ndarray, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Per-layer static K and V scales from the calibration tokens (`layers.<i>.k_scale` ...)."""
    install_kv_attention(model)
    modules = attention_modules(model)
    for m in modules:
        setattr(m, KV_ATTRIBUTE, KVQuant(kind))
    with torch.no_grad():
        batches = range(0, len(ids), batch_size)
        for start in progress.bar(batches, desc=f"calibrate kv-{kind}", unit="batch"):
            batch = torch.from_numpy(ids[start : start + batch_size].astype(np.int64))
            model(batch.to(device), use_cache=False)
    scales: dict[str, torch.Tensor] = {}
    for i, m in enumerate(modules):
        k, v = getattr(m, KV_ATTRIBUTE).fitted_scales()
        scales[f"layers.{i}.k_scale"], scales[f"layers.{i}.v_scale"] = k, v
        delattr(m, KV_ATTRIBUTE)
    return scales


def apply_kv_scales(model: nn.Module, kind: str, scales: Mapping[str, torch.Tensor]) -> nn.Module:
    """Fake-quantize every layer's KV cache with fitted scales (see calibrate_kv)."""
    install_kv_attention(model)
    for i, m in enumerate(attention_modules(model)):
        pair = (scales[f"layers.{i}.k_scale"], scales[f"layers.{i}.v_scale"])
        setattr(m, KV_ATTRIBUTE, KVQuant(kind, pair))
    return model


# ---------------------------------------------------------------- checkpoints
def make_llmcompressor_variant(
    model: nn.Module,
    base: str,
    entry: Mapping[str, Any],
    ids: np.ndarray,
    tmp: Path,
    revision: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Run the entry's recipe on `model` (the float32 base, changed in place) and save
    what it made into `tmp`; `base` names it, for its tokenizer.

    Writes `tmp/model/` (compressed-tensors, when any llm-compressor modifier ran) and
    `tmp/kv_scales.safetensors` (when the family needs the workflow's KV cache). Returns
    the manifest's method record.
    """
    from safetensors.torch import save_file

    from .tokens import load_tokenizer

    ct_kv = supports_ct_kv(model)
    recipe = build_recipe(entry, model, ct_kv)
    method: dict[str, Any] = {"kind": "llmcompressor", "entry": dict(entry)}
    device = torch.device("cpu")
    if recipe:
        tokenizer = load_tokenizer(base, revision=revision)
        run_oneshot(model, tokenizer, recipe, ids, device)
        model.save_pretrained(tmp / MODEL_DIR, save_compressed=True)  # type: ignore[operator]
        method["modifiers"] = [type(m).__name__ for m in recipe]
        method["model_dir"] = MODEL_DIR
    kv = entry.get("kv_cache")
    if kv:
        method["kv_cache"] = {"scheme": kv, "by": "llm-compressor" if ct_kv else "sae-audit"}
        if not ct_kv:
            model = model.eval()
            scales = calibrate_kv(model, kv, ids, batch_size, device)
            save_file({k: v.contiguous() for k, v in scales.items()}, tmp / KV_SCALES)
            method["kv_cache"]["scales"] = KV_SCALES
    return method


def load_compressed_tensors(
    source: str | Path,
    dtype: str,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A compressed-tensors checkpoint as transformers loads it, weights decompressed on load.

    Activation and KV-cache quantization stay live (compressed-tensors' forward wrappers),
    so the forward is the deployed one in fake-quant arithmetic.
    """
    from transformers import CompressedTensorsConfig

    with warnings.catch_warnings():
        # transformers warns that a passed quantization_config only overrides its loading
        # attributes (dequantize): that is the one thing it is passed for
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        return load_model(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device=device,
            # weights decompressed once on load, not on every forward; the activation and
            # KV quantizers stay attached to the modules
            quantization_config=CompressedTensorsConfig(dequantize=True),
        )
