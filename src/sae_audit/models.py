"""Loading causal LMs and finding, per architecture family, what to compress and where to hook.

One small table says, for each family, where the decoder blocks live, which block
matrices are compressed (attention and MLP only: embeddings, unembedding, norms
and biases stay full precision), which of them store weights as Conv1D
[in, out] rather than nn.Linear [out, in], and which modules produce what a
TransformerLens hook name (the names sae-lens SAEs record) reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .config import FROM_SCHEMA, ConfigSection
from .hooknames import HOOK_PATTERN, SUPPORTED

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Family:
    """Where a family keeps its blocks, which block matrices get compressed, where hooks read.

    `attn_out` and `mlp_out` name the module whose output is what that sublayer adds
    to the residual stream, which is what TransformerLens's `hook_attn_out` /
    `hook_mlp_out` record: the attention or MLP module itself, or, in families that
    normalize a sublayer's output before adding it (Gemma-2), that post-norm.
    """

    blocks: str  # dotted path of the ModuleList of decoder blocks
    matrices: tuple[str, ...]  # paths inside a block of the weights to compress
    attn_out: str  # path inside a block of the module whose output is hook_attn_out
    mlp_out: str  # path inside a block of the module whose output is hook_mlp_out
    final_norm: str  # dotted path of the norm HF applies after the last block
    conv1d: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    default_attn_implementation: str | None = None


_LLAMA_LIKE = Family(
    blocks="model.layers",
    matrices=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    attn_out="self_attn",
    mlp_out="mlp",
    final_norm="model.norm",
)

FAMILIES: dict[str, Family] = {
    "gpt_neox": Family(
        blocks="gpt_neox.layers",
        matrices=(
            "attention.query_key_value",
            "attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        ),
        attn_out="attention",
        mlp_out="mlp",
        final_norm="gpt_neox.final_layer_norm",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    # Gemma-2 normalizes each sublayer's output before the residual add
    # (post_attention_layernorm after attention, post_feedforward_layernorm after the
    # MLP; in Llama, post_attention_layernorm is the pre-MLP norm instead), and
    # TransformerLens hooks attn/mlp_out after those norms. Eager attention is its
    # reference path (soft-capped logits; transformers 5 refuses sdpa for it outright).
    "gemma2": replace(
        _LLAMA_LIKE,
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        default_attn_implementation="eager",
    ),
    "gpt2": Family(
        blocks="transformer.h",
        matrices=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        attn_out="attn",
        mlp_out="mlp",
        final_norm="transformer.ln_f",
        conv1d=True,
    ),
}


def family_of(model: Any) -> Family:
    """The FAMILIES entry of anything with a `.config.model_type` (a model, or a namespace)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}: supported families are {sorted(FAMILIES)} "
            "(add one to sae_audit.models.FAMILIES)"
        )
    return FAMILIES[model_type]


def blocks_of(model: nn.Module) -> nn.ModuleList:
    blocks = model.get_submodule(family_of(model).blocks)
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def target_weights(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(state-dict name, parameter) of every block matrix that compression touches."""
    family = family_of(model)
    for i, _ in enumerate(blocks_of(model)):
        for path in family.matrices:
            name = f"{family.blocks}.{i}.{path}.weight"
            yield name, model.get_parameter(name)


def as_out_in(weight: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """View a block matrix as [out, in] (Conv1D stores [in, out])."""
    return weight.t() if family_of(model).conv1d else weight


def from_out_in(weight: torch.Tensor, model: nn.Module) -> torch.Tensor:
    return weight.t().contiguous() if family_of(model).conv1d else weight


# ---------------------------------------------------------------- hook points


@dataclass(frozen=True)
class HookPoint:
    """Where, in HF module terms, a TransformerLens-style hook name reads the residual stream."""

    hook_name: str
    module: str  # dotted module path
    use_input: bool  # read the module's input (resid_pre) instead of its output


def resolve_hook(model: nn.Module, hook_name: str) -> HookPoint:
    """Map `blocks.L.hook_*` to the HF module whose output (or input) it is."""
    m = HOOK_PATTERN.match(hook_name)
    if not m:
        raise ValueError(f"unsupported SAE hook {hook_name!r}: expected {SUPPORTED}")
    family = family_of(model)
    layer, point = int(m["layer"]), m["point"]
    n_layers = len(blocks_of(model))
    if layer >= n_layers:
        raise ValueError(
            f"SAE hook {hook_name!r} names layer {layer}, but the model has {n_layers}"
        )
    block = f"{family.blocks}.{layer}"
    if point == "hook_resid_post":
        return HookPoint(hook_name, block, use_input=False)
    if point == "hook_resid_pre":
        return HookPoint(hook_name, block, use_input=True)
    if point == "hook_mlp_out":
        return HookPoint(hook_name, f"{block}.{family.mlp_out}", use_input=False)
    return HookPoint(hook_name, f"{block}.{family.attn_out}", use_input=False)


class ActivationCapture:
    """Context manager that records the activation at one or more hook points per forward."""

    def __init__(self, model: nn.Module, hook_names: list[str]):
        self.points = [resolve_hook(model, h) for h in hook_names]
        self.model = model
        self.activations: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _record(self, hook_name: str, value: object) -> None:
        tensor = value[0] if isinstance(value, tuple | list) else value
        assert isinstance(tensor, torch.Tensor)
        self.activations[hook_name] = tensor.detach()

    def __enter__(self) -> ActivationCapture:
        for point in self.points:
            module = self.model.get_submodule(point.module)
            name = point.hook_name
            if point.use_input:

                def pre_hook(_m, args, kwargs, name=name):
                    self._record(name, args[0] if args else kwargs["hidden_states"])

                self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:

                def hook(_m, _args, output, name=name):
                    self._record(name, output)

                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def hooked_width(model: nn.Module, hook_name: str) -> int:
    """Width of the activation at a hook point (d_model for every supported point)."""
    resolve_hook(model, hook_name)
    config: Any = model.config
    return int(config.hidden_size)


# ---------------------------------------------------------------- loading
def resolve_device(device: str) -> torch.device:
    """'auto' means the GPU this job was given (CUDA_VISIBLE_DEVICES) when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this node")
    return torch.device(device)


def load_model(
    source: str | Path,
    dtype: str = "float32",
    revision: str | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
    quantization_config: Any = None,
) -> nn.Module:
    """Load a causal LM by HF id or local directory, in eval mode.

    `quantization_config` overrides how a quantized checkpoint loads (e.g. compressed-tensors
    with its weights decompressed on load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = AutoConfig.from_pretrained(str(source), revision=revision)
    family = family_of(SimpleNamespace(config=config))  # fail before loading any weights
    if attn_implementation is None:
        attn_implementation = family.default_attn_implementation
    kwargs: dict[str, Any] = (
        {"attn_implementation": attn_implementation} if attn_implementation else {}
    )
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(
        str(source), revision=revision, dtype=DTYPES[dtype], **kwargs
    )
    # nn.Module.to, not transformers' overload (its typing rejects a device argument)
    return nn.Module.to(model, torch.device(device)).eval()


@dataclass(frozen=True)
class ModelSpec(ConfigSection, section="models.*.model"):
    """Config section `models.<name>.model`: which model, and how it is loaded (load_model)."""

    source: str  # required by the schema: 'fixture', a hub id or a local directory
    revision: str | None = FROM_SCHEMA
    dtype: str = FROM_SCHEMA
    attn_implementation: str | None = FROM_SCHEMA  # None: the family's default
