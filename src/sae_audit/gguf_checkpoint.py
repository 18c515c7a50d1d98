"""GGUF files of our base models: write them as llama.cpp's converter would, read them back.

A GGUF-quantized model is what llama.cpp users actually run, so the audit measures SAE
features on it. transformers cannot load a GPT-NeoX GGUF at all (and loads Llama ones
only through its own dequantizer), so this module does both directions itself with the
`gguf` package from llama.cpp:

- `write_gguf` stores a float32 HF model under llama.cpp's tensor names and hparams
  keys, applying the tensor reorders llama.cpp's `convert_hf_to_gguf.py` applies (so a
  file we write has the layout of one the converter writes), and quantizes exactly the
  block matrices `sae_audit.models.target_weights` names; embeddings, norms, biases and
  the output head stay F32, as in our own RTN variants.
- `read_gguf_state` dequantizes every tensor (Q8_0 and Q4_0 with our own decoders,
  every other type through `gguf.quants.dequantize`), undoes the reorders, and returns
  an HF state_dict, after checking the file was made from a model shaped like ours.

Families: gpt_neox (GGUF arch "gptneox"), llama and mistral (arch "llama"; the
converter registers MistralForCausalLM as a Llama model), qwen2 (arch "qwen2").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from .artifacts import field_value
from .files import InputError, atomic_path
from .models import target_weights

QT = gguf.GGMLQuantizationType

# model_type -> the llama.cpp architecture its converter writes.
_ARCH_OF: dict[str, gguf.MODEL_ARCH] = {
    "gpt_neox": gguf.MODEL_ARCH.GPTNEOX,
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}

# Types whose encoder the gguf package implements (checked against gguf.quants at import:
# K-quants and i-quants are dequantize-only there), with the general.file_type llama.cpp
# records for a file that is "mostly" that type.
_FILE_TYPE: dict[str, gguf.LlamaFileType] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}

WRITABLE_TYPES: tuple[str, ...] = tuple(_FILE_TYPE)
"""Quant types `write_gguf` can write (for the block matrices; everything else is F32)."""

_Q8_0_BLOCK, _Q8_0_BYTES = gguf.GGML_QUANT_SIZES[QT.Q8_0]  # 32 values, f16 d + 32 int8
_Q4_0_BLOCK, _Q4_0_BYTES = gguf.GGML_QUANT_SIZES[QT.Q4_0]  # 32 values, f16 d + 16 bytes


def _supported_text() -> str:
    return ", ".join(f"{mt} (GGUF arch {gguf.MODEL_ARCH_NAMES[a]!r})" for mt, a in _ARCH_OF.items())


def _model_type(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCH_OF:
        raise ValueError(
            f"no GGUF mapping for model_type {model_type!r}: supported families are "
            f"{_supported_text()}"
        )
    return str(model_type)


def _arch_name(model_type: str) -> str:
    return gguf.MODEL_ARCH_NAMES[_ARCH_OF[model_type]]


def _qtype(quant_type: str) -> QT:
    if quant_type not in _FILE_TYPE:
        raise ValueError(
            f"cannot write GGUF quant type {quant_type!r}: writable types are "
            f"{list(WRITABLE_TYPES)} (the gguf package only dequantizes K-quants and i-quants)"
        )
    return QT[quant_type]


# ---------------------------------------------------------------- hparams


def _cfg(model: nn.Module) -> Any:
    return getattr(model, "config")  # noqa: B009 - nn.Module's typing hides HF's config


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope_theta / partial_rotary_factor in `rope_parameters`."""
    params = getattr(config, "rope_parameters", None)
    return dict(params) if isinstance(params, dict) else {}


def _rope_theta(config: Any) -> float:
    for value in (
        _rope_parameters(config).get("rope_theta"),
        getattr(config, "rope_theta", None),
        getattr(config, "rotary_emb_base", None),  # GPT-NeoX in transformers 4
    ):
        if value is not None:
            return float(value)
    return 10000.0


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _n_kv_heads(config: Any) -> int:
    n_kv = getattr(config, "num_key_value_heads", None)
    return int(n_kv) if n_kv else int(config.num_attention_heads)


def _write_hparams(writer: gguf.GGUFWriter, model: nn.Module, model_type: str) -> None:
    """The keys llama.cpp's converter writes for this architecture (set_gguf_parameters).

    Beyond the converter: rope.freq_base for gptneox too (llama.cpp reads it for every
    arch; without it a non-default theta is lost), vocab_size for every arch and
    tokenizer.ggml.model "none" (our file carries no tokenizer; llama.cpp's loader
    requires the key and treats "none" as a vocab-less model sized by vocab_size).
    """
    config = _cfg(model)
    name = Path(str(getattr(config, "name_or_path", "") or model_type)).name or model_type
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_freq_base(_rope_theta(config))
    if model_type == "gpt_neox":
        pct = getattr(config, "rotary_pct", None)
        if pct is None:
            pct = _rope_parameters(config).get("partial_rotary_factor", 1.0)
        head_dim = config.hidden_size // config.num_attention_heads
        writer.add_rope_dimension_count(int(float(pct) * head_dim))
        writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
        writer.add_layer_norm_eps(float(config.layer_norm_eps))
    else:  # llama-like: LlamaModel / Qwen2Model in the converter
        writer.add_head_count_kv(_n_kv_heads(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_dimension_count(_head_dim(config))
        if getattr(config, "head_dim", None):
            writer.add_key_length(int(config.head_dim))
            writer.add_value_length(int(config.head_dim))
    writer.add_tokenizer_model("none")


# ---------------------------------------------------------------- tensor reorders
# Each is a pure row permutation, so it commutes with per-row block quantization: the
# blocks of a GGUF row are exactly the blocks of one HF row.


def _neox_qkv_to_gguf(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF interleaves per head [q_h; k_h; v_h]; llama.cpp wants [all q; all k; all v]."""
    rest = x.shape[1:]
    head_dim = x.shape[0] // (3 * n_head)
    return x.reshape(n_head, 3, head_dim, *rest).swapaxes(0, 1).reshape(x.shape)


def _neox_qkv_from_gguf(x: np.ndarray, n_head: int) -> np.ndarray:
    rest = x.shape[1:]
    head_dim = x.shape[0] // (3 * n_head)
    return x.reshape(3, n_head, head_dim, *rest).swapaxes(0, 1).reshape(x.shape)


def _rope_to_gguf(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates halves (rotate_half); llama.cpp's llama rope rotates adjacent pairs.

    Within each head, row i of the first half and row i of the second half become rows
    2i and 2i+1 (the converter's LlamaModel.permute).
    """
    rest = x.shape[1:]
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, 2, half, *rest).swapaxes(1, 2).reshape(x.shape)


def _rope_from_gguf(x: np.ndarray, n_head: int) -> np.ndarray:
    rest = x.shape[1:]
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(x.shape)


_Reorder = Callable[[np.ndarray], np.ndarray]


def _reorders(model: nn.Module, model_type: str) -> dict[str, tuple[_Reorder, _Reorder]]:
    """HF-name suffix -> (to GGUF, back to HF) for the tensors the converter reorders."""
    config = _cfg(model)
    n_head = int(config.num_attention_heads)
    if model_type == "gpt_neox":
        pair = (
            lambda x: _neox_qkv_to_gguf(x, n_head),
            lambda x: _neox_qkv_from_gguf(x, n_head),
        )
        return {
            "attention.query_key_value.weight": pair,
            "attention.query_key_value.bias": pair,
        }
    if model_type in ("llama", "mistral"):
        n_kv = _n_kv_heads(config)
        q = (lambda x: _rope_to_gguf(x, n_head), lambda x: _rope_from_gguf(x, n_head))
        k = (lambda x: _rope_to_gguf(x, n_kv), lambda x: _rope_from_gguf(x, n_kv))
        return {
            "self_attn.q_proj.weight": q,
            "self_attn.q_proj.bias": q,
            "self_attn.k_proj.weight": k,
            "self_attn.k_proj.bias": k,
        }
    return {}  # qwen2: llama.cpp runs it with NeoX-style rope, no reorder


def _reorder_for(
    name: str, reorders: dict[str, tuple[_Reorder, _Reorder]]
) -> tuple[_Reorder, _Reorder] | None:
    return next((pair for suffix, pair in reorders.items() if name.endswith(suffix)), None)


def _tied_names(model: nn.Module) -> tuple[str, str] | None:
    """(embedding, output head) state-dict names when the head shares the embedding's weight."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in is not None else None
    head = get_out() if get_out is not None else None
    if emb is None or head is None or head.weight is not emb.weight:
        return None
    modules = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return f"{modules[id(emb)]}.weight", f"{modules[id(head)]}.weight"


def _name_map(model: nn.Module, model_type: str) -> dict[str, str]:
    """HF state-dict name -> llama.cpp tensor name, from gguf's TensorNameMap."""
    tmap = gguf.get_tensor_name_map(_ARCH_OF[model_type], int(_cfg(model).num_hidden_layers))
    out = {}
    for name in model.state_dict():
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(
                f"{name}: no llama.cpp tensor name for it in arch "
                f"{_arch_name(model_type)!r} (gguf.TensorNameMap has no mapping)"
            )
        out[name] = gguf_name
    return out


# ---------------------------------------------------------------- writing


def write_gguf(
    model: nn.Module,
    quant_type: str,
    path: str | Path,
    *,
    tensor_types: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write `model` (float32 HF causal LM) as a GGUF file whose block matrices are `quant_type`.

    Only the matrices `target_weights(model)` yields are quantized, so a GGUF variant
    differs from FP exactly where our RTN variants do. Their rows (the input dimension)
    must be a multiple of the type's block size: ValueError naming the tensor otherwise,
    raised before anything is written. A tied output head is not written (as the
    converter, which never sees it in a tied checkpoint). Written atomically.
    Returns {arch, quant_type, n_quantized, n_tensors, file_size} for the manifest.

    `tensor_types` ({HF param name: type name}, e.g. from `sae_audit.protect.gguf_types`)
    overrides `quant_type` per block matrix, as llama-quantize's --tensor-type does, so a
    mixed-precision plan can be written; `quant_type` stays the file's general.file_type and
    the info gains `tensor_types`. Only block matrices may be named (ValueError otherwise).
    """
    model_type = _model_type(model)
    qtype = _qtype(quant_type)
    overrides = {name: _qtype(t) for name, t in (tensor_types or {}).items()}
    arch = _arch_name(model_type)
    names = _name_map(model, model_type)
    reorders = _reorders(model, model_type)
    targets = {name for name, _ in target_weights(model)}
    tied = _tied_names(model)
    tied_head = tied[1] if tied else None
    stray = sorted(set(overrides) - targets)
    if stray:
        raise ValueError(
            f"tensor_types names {stray[:5]}, which are not block matrices of this model "
            "(only the matrices target_weights yields are quantized)"
        )

    tensors: list[tuple[str, np.ndarray, QT]] = []
    for name, tensor in model.state_dict().items():
        if name == tied_head:
            continue
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        pair = _reorder_for(name, reorders)
        if pair is not None:
            data = pair[0](data)
        data = np.ascontiguousarray(data, dtype=np.float32)
        if name in targets:
            tensor_qtype = overrides.get(name, qtype)
            block_size = gguf.GGML_QUANT_SIZES[tensor_qtype][0]
            if data.shape[-1] % block_size:
                raise ValueError(
                    f"{name} ({names[name]}): shape {tuple(tensor.shape)} has rows of "
                    f"{data.shape[-1]} values, not a multiple of the {tensor_qtype.name} block "
                    f"size {block_size}; pick another type or a model whose widths fit"
                )
            tensors.append((names[name], data, tensor_qtype))
        else:
            tensors.append((names[name], data, QT.F32))

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            _write_hparams(writer, model, model_type)
            writer.add_file_type(int(_FILE_TYPE[quant_type]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for gguf_name, data, tensor_type in tensors:
                writer.add_tensor(
                    gguf_name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type
                )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    info: dict[str, Any] = {
        "arch": arch,
        "quant_type": quant_type,
        "n_quantized": len(targets),
        "n_tensors": len(tensors),
        "file_size": path.stat().st_size,
    }
    if tensor_types is not None:
        info["tensor_types"] = {name: overrides[name].name for name in sorted(overrides)}
    return info


# ---------------------------------------------------------------- our decoders


def _blocks(
    raw: np.ndarray, shape: Sequence[int], block: int, nbytes: int, what: str
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Split raw block bytes into (quants, f32 scales [n_blocks, 1], shape), checking sizes."""
    if raw.dtype != np.uint8:
        raise ValueError(f"{what}: expected raw uint8 bytes, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if not shape or shape[-1] % block:
        raise ValueError(f"{what}: shape {shape} has rows that are not a multiple of {block}")
    if raw.size != n // block * nbytes:
        raise ValueError(
            f"{what}: {raw.size} bytes do not hold shape {shape} ({n // block} blocks of "
            f"{nbytes} bytes)"
        )
    blocks = np.ascontiguousarray(raw).reshape(-1, nbytes)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    return blocks[:, 2:], d, shape


def dequantize_q8_0(blocks: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Q8_0 bytes -> float32 of `shape`: per 32 values, f16 scale d then 32 int8 q; x = q * d.

    Our own decoder (not gguf's) so the format we audit is the one we understand;
    the tests hold it bit-equal to gguf.quants.dequantize.
    """
    qs, d, shape = _blocks(blocks, shape, _Q8_0_BLOCK, _Q8_0_BYTES, "Q8_0")
    return (qs.view(np.int8).astype(np.float32) * d).reshape(shape)


def dequantize_q4_0(blocks: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Q4_0 bytes -> float32: per 32 values, f16 d then 16 bytes; x = (nibble - 8) * d.

    Byte j holds value j in its low nibble and value j + 16 in its high nibble.
    """
    qs, d, shape = _blocks(blocks, shape, _Q4_0_BLOCK, _Q4_0_BYTES, "Q4_0")
    low = (qs & 0x0F).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    q = np.concatenate([low, high], axis=1).astype(np.float32)
    return (q * d).reshape(shape)


def _dequantize(tensor: Any, path: Path) -> np.ndarray:
    """A GGUFReader tensor as a float32 array in numpy (PyTorch) dimension order."""
    shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))
    ttype = QT(int(tensor.tensor_type))
    raw = np.asarray(tensor.data)
    if ttype == QT.Q8_0:
        out = dequantize_q8_0(raw, shape)
    elif ttype == QT.Q4_0:
        out = dequantize_q4_0(raw, shape)
    else:
        try:
            out = gguf.quants.dequantize(raw, ttype)
        except NotImplementedError as e:
            raise InputError(
                f"{path}: tensor {tensor.name} is {ttype.name}, which the gguf package "
                f"cannot dequantize ({e})"
            ) from e
    return np.array(out, dtype=np.float32, copy=True).reshape(shape)  # off the memmap


# ---------------------------------------------------------------- reading


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError / struct errors alike
        raise InputError(
            f"{path}: cannot be read as GGUF ({type(e).__name__}: {e}); re-make it with "
            "write_gguf or re-download it"
        ) from e


def _check_matches(reader: gguf.GGUFReader, path: Path, model: nn.Module, model_type: str) -> None:
    """InputError listing every hparam on which the file and the base model disagree."""
    config = _cfg(model)
    arch = field_value(reader, "general.architecture")
    want = _arch_name(model_type)
    if arch != want:
        raise InputError(
            f"{path}: architecture {arch!r} != base model's {want!r} (model_type "
            f"{model_type}); this GGUF was not made from the base model"
        )
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    pairs: list[tuple[str, Any, str, Any]] = [
        (
            "embedding_length",
            field_value(reader, f"{arch}.embedding_length"),
            "hidden_size",
            config.hidden_size,
        ),
        (
            "block_count",
            field_value(reader, f"{arch}.block_count"),
            "num_hidden_layers",
            config.num_hidden_layers,
        ),
        (
            "head_count",
            field_value(reader, f"{arch}.attention.head_count"),
            "num_attention_heads",
            config.num_attention_heads,
        ),
        (
            "token_embd rows",
            None if embd is None else int(embd.shape[-1]),
            "vocab_size",
            config.vocab_size,
        ),
    ]
    if model_type != "gpt_neox":
        kv = field_value(reader, f"{arch}.attention.head_count_kv")
        pairs.append(("head_count_kv", kv, "num_key_value_heads", _n_kv_heads(config)))
    problems = [
        f"{key} {mine} != base model's {theirs_key} {theirs}"
        for key, mine, theirs_key, theirs in pairs
        if mine is not None and int(mine) != int(theirs)
    ]
    if embd is None:
        problems.append("no token_embd.weight tensor")
    if problems:
        raise InputError(
            f"{path}: " + "; ".join(problems) + " (this GGUF was not made from the base model)"
        )


# llama.cpp tensors with no HF parameter: rotary tables the converter may add.
_NO_HF_COUNTERPART = {gguf.MODEL_TENSOR.ROPE_FREQS, gguf.MODEL_TENSOR.ATTN_ROT_EMBD}


def read_gguf_state(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Dequantize a GGUF into an HF state_dict for `model` (float32, the model's shapes).

    Checks first that the file was made from a model shaped like `model` (InputError
    naming the file and both values), then undoes the converter's reorders. Tensors
    the file lacks are absent from the result, except a tied output head, which is
    filled from the embedding as llama.cpp does.
    """
    path = Path(path)
    model_type = _model_type(model)
    reader = _open(path)
    _check_matches(reader, path, model, model_type)
    to_hf = {g: h for h, g in _name_map(model, model_type).items()}
    reorders = _reorders(model, model_type)
    model_state = model.state_dict()
    tmap = gguf.get_tensor_name_map(_ARCH_OF[model_type], int(_cfg(model).num_hidden_layers))

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = to_hf.get(tensor.name)
        if name is None:
            if tmap.get_type(tensor.name, try_suffixes=(".weight", ".bias")) in _NO_HF_COUNTERPART:
                continue
            raise InputError(
                f"{path}: tensor {tensor.name} has no counterpart in the base model "
                f"({model_type}); this GGUF was not made from it"
            )
        data = _dequantize(tensor, path)
        pair = _reorder_for(name, reorders)
        if pair is not None:
            data = pair[1](data)
        want = tuple(model_state[name].shape)
        if data.shape != want:
            raise InputError(
                f"{path}: tensor {tensor.name} has shape {data.shape}, base model's {name} "
                f"has {want}; this GGUF was not made from the base model"
            )
        state[name] = torch.from_numpy(np.ascontiguousarray(data))
    tied = _tied_names(model)
    if tied is not None and tied[1] not in state and tied[0] in state:
        state[tied[1]] = state[tied[0]]
    return state


def load_gguf_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy a GGUF's dequantized weights into `model` in place (each param's dtype/device).

    Every parameter must come from the file (InputError naming the file and what is
    missing): a half-loaded model would silently mix FP and quantized weights.
    """
    state = read_gguf_state(path, model)
    params = dict(model.named_parameters())
    missing = [name for name in params if name not in state]
    if missing:
        targets = {name for name, _ in target_weights(model)}
        blocks = [n for n in missing if n in targets]
        raise InputError(
            f"{path}: lacks {len(missing)} of the base model's parameters "
            f"({len(blocks)} of them block matrices): {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(dtype=param.dtype, device=param.device))
    return model


def gguf_info(path: str | Path) -> dict[str, Any]:
    """Architecture, file type and a histogram of tensor types, for logs and manifests."""
    path = Path(path)
    reader = _open(path)
    arch = field_value(reader, "general.architecture")
    file_type = field_value(reader, "general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        file_type_name = None
    types = Counter(QT(int(t.tensor_type)).name for t in reader.tensors)
    return {
        "path": str(path),
        "arch": arch,
        "file_type": file_type,
        "file_type_name": file_type_name,
        "quantization_version": field_value(reader, "general.quantization_version"),
        "block_count": field_value(reader, f"{arch}.block_count"),
        "embedding_length": field_value(reader, f"{arch}.embedding_length"),
        "n_tensors": len(reader.tensors),
        "tensor_types": dict(sorted(types.items())),
        "file_size": path.stat().st_size,
    }
