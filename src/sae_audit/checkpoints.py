"""Materialized compressed checkpoints: write once per variant, load anywhere.

A checkpoint directory holds `manifest.json` (base model, variant, method
parameters) and `compressed.safetensors` with what the method produced for each
compressed block matrix: RTN stores integer codes plus per-(channel, group)
scales (and zero points when asymmetric), never a float copy; pruning stores a
bit-packed keep-mask plus the kept values. Everything else (embeddings,
unembedding, norms, biases) is read from the base model at load time, so it is
full precision by construction and a tied unembedding can never change.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import progress
from .files import InputError, atomic_path, rerun_hint, unreadable
from .models import as_out_in, from_out_in, load_model, target_weights
from .prune import magnitude_mask
from .quantize import QuantizedTensor, RTNSpec, quantize_rtn
from .variants import Variant, parse_variant

MANIFEST = "manifest.json"
TENSORS = "compressed.safetensors"
GGUF_FILE = "model.gguf"


def rtn_spec(variant: Variant) -> RTNSpec:
    assert variant.bits is not None
    return RTNSpec(
        bits=variant.bits,
        symmetric=variant.symmetric,
        group_size=variant.group_size,
        full_range=variant.full_range,
    )


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def _unpack_mask(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).view(shape)


def noise_dtype(run_dtype: str) -> str:
    """The numeric path of the noise null (fp-noise): the other dtype than the run's."""
    return "bfloat16" if run_dtype == "float32" else "float32"


def compress_state(
    model: nn.Module, variant: Variant, sparsity: float | None = None, run_dtype: str = "float32"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The safetensors payload and method record for one variant of a float32 model.

    `run_dtype` is the dtype the audit's forward passes run in (model.dtype); the noise
    null records the other one, which its forward passes use instead.
    """
    payload: dict[str, torch.Tensor] = {}
    method: dict[str, Any] = {"kind": variant.kind}
    names = list(target_weights(model))
    if variant.kind == "noise":
        method.update(run_dtype=run_dtype, dtype=noise_dtype(run_dtype))
    if variant.kind in ("fp", "null", "noise"):
        return payload, method
    if variant.kind == "rtn":
        spec = rtn_spec(variant)
        method.update(asdict(spec))
        for name, param in progress.bar(names, desc=f"quantize {variant.name}", unit="matrix"):
            q = quantize_rtn(as_out_in(param.data, model), spec)
            payload[f"{name}.codes"] = q.codes
            payload[f"{name}.scale"] = q.scale
            if q.zero is not None:
                payload[f"{name}.zero"] = q.zero
        return payload, method
    # pruning (fixed or matched sparsity)
    s = variant.sparsity if variant.kind == "prune" else sparsity
    if s is None:
        raise ValueError(f"variant {variant.name!r} needs a sparsity (from the matched search)")
    method["sparsity"] = float(s)
    for name, param in progress.bar(names, desc=f"prune {variant.name}", unit="matrix"):
        keep = magnitude_mask(param.data, s)
        payload[f"{name}.mask"] = _pack_mask(keep)
        payload[f"{name}.values"] = param.data[keep].to(torch.float32).contiguous()
    return payload, method


def apply_state(
    model: nn.Module, payload: dict[str, torch.Tensor], method: dict[str, Any]
) -> nn.Module:
    """Write decompressed block matrices into `model` in place (float32 math, then run dtype)."""
    kind = method["kind"]
    if kind in ("fp", "null", "noise"):
        return model
    if kind == "protect":
        from .protect import apply_protected

        return apply_protected(model, payload, method)
    for name, param in target_weights(model):
        if kind == "rtn":
            shape = as_out_in(param.data, model).shape
            group_size = method.get("group_size")
            q = QuantizedTensor(
                codes=payload[f"{name}.codes"],
                scale=payload[f"{name}.scale"],
                zero=payload.get(f"{name}.zero"),
                group_size=shape[1] if group_size is None else min(group_size, shape[1]),
            )
            dense = from_out_in(q.dequantize(), model)
        else:
            keep = _unpack_mask(payload[f"{name}.mask"], param.shape)
            dense = torch.zeros(param.shape, dtype=torch.float32)
            dense[keep] = payload[f"{name}.values"]
        with torch.no_grad():
            param.data.copy_(dense.to(device=param.device, dtype=param.dtype))
    return model


def write_checkpoint(
    base: str | Path,
    variant_name: str,
    out_dir: str | Path,
    revision: str | None = None,
    sparsity: float | None = None,
    extra: dict[str, Any] | None = None,
    entry: dict[str, Any] | None = None,
    calibration: np.ndarray | None = None,
    dtype: str = "float32",
    plan: dict[str, Any] | None = None,
) -> Path:
    """Compress the base model (loaded in float32) and write the checkpoint directory atomically.

    Shipped formats take their config `entry` (compression.<section>.<key>); llm-compressor
    variants also the calibration token ids. `dtype` is the run dtype (model.dtype), which
    only the noise null (fp-noise) reads: it records the other dtype to run in. A
    protect- variant takes the plan its protect job chose (`protect.Plan.to_dict()`).
    """
    variant = parse_variant(variant_name)
    out_dir = Path(out_dir)
    model = load_model(base, dtype="float32", revision=revision)
    manifest = {
        **base_record(base, out_dir),
        "revision": revision,
        "variant": variant.name,
        "n_compressed_matrices": sum(1 for _ in target_weights(model)),
        **(extra or {}),
    }
    with atomic_path(out_dir, directory=True) as tmp:
        if variant.shipped:
            if entry is None:
                raise ValueError(f"variant {variant.name!r} needs its config entry")
            method = write_shipped(model, str(base), variant, entry, calibration, tmp, revision)
        elif variant.kind == "protect":
            from .protect import Plan, protected_state

            if plan is None:
                raise ValueError(f"variant {variant.name!r} needs its protect plan")
            payload, method = protected_state(model, Plan.from_dict(plan))
            save_file(payload, tmp / TENSORS)
        else:
            payload, method = compress_state(model, variant, sparsity=sparsity, run_dtype=dtype)
            save_file(payload, tmp / TENSORS)
        manifest["method"] = method
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir


def write_shipped(
    model: nn.Module,
    base: str,
    variant: Variant,
    entry: dict[str, Any],
    calibration: np.ndarray | None,
    tmp: Path,
    revision: str | None,
) -> dict[str, Any]:
    """What a shipped-format variant's checkpoint holds besides its manifest; the method record."""
    if variant.kind == "llmcompressor":
        from .shipped import make_llmcompressor_variant

        if calibration is None:
            raise ValueError(f"variant {variant.name!r} needs calibration tokens")
        return make_llmcompressor_variant(model, base, entry, calibration, tmp, revision=revision)
    if variant.kind == "gguf":
        from .gguf_checkpoint import write_gguf

        info = write_gguf(model, entry["type"], tmp / GGUF_FILE)
        return {"kind": "gguf", "type": entry["type"], "file": GGUF_FILE, "info": info}
    # external: record where the artifact is, after checking it is of this base model
    from .artifacts import ModelShape, artifact_shape, check_matches, resolve_format

    source = Path(entry["source"]).expanduser().resolve()
    fmt = resolve_format(source, entry.get("format", "auto"))
    base_shape = ModelShape.from_hf_config(model.config.to_dict())  # type: ignore[operator]
    check_matches(artifact_shape(source, fmt), base_shape, str(source), base)
    if fmt == "gguf":
        from .gguf_checkpoint import read_gguf_state

        read_gguf_state(source, model)  # every tensor maps onto the base architecture
    stat = source.stat()
    return {
        "kind": "external",
        "format": fmt,
        "source": str(source),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "entry": entry,
    }


def base_record(base: str | Path, checkpoint_dir: Path) -> dict[str, str | None]:
    """How a checkpoint names its base model, so it loads from any working directory.

    A hub id is kept as given. A local directory is stored relative to the checkpoint
    (the results tree can move as a whole) and as an absolute path (the checkpoint can
    be copied alone); `base` keeps what the config said, for people to read.
    """
    local = Path(base).expanduser()
    if not local.is_dir():
        return {"base": str(base), "base_relative": None, "base_absolute": None}
    absolute = local.resolve()
    relative = os.path.relpath(absolute, checkpoint_dir.resolve())
    return {"base": str(base), "base_relative": relative, "base_absolute": str(absolute)}


def resolve_base(manifest: dict[str, Any], checkpoint_dir: str | Path) -> str:
    """The base model to load: the local directory the manifest points at, or the hub id."""
    checkpoint_dir = Path(checkpoint_dir)
    relative, absolute = manifest.get("base_relative"), manifest.get("base_absolute")
    if relative is None and absolute is None:
        return str(manifest["base"])
    candidates = [checkpoint_dir.resolve() / relative] if relative else []
    candidates += [Path(absolute)] if absolute else []
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    raise InputError(
        f"{checkpoint_dir / MANIFEST}: base model directory not found (looked in "
        f"{[str(c) for c in candidates]}); restore it, or {rerun_hint('compress')}"
    )


def read_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint manifest; {rerun_hint('compress')}")
    try:
        manifest = json.loads(path.read_text())
        for key in ("base", "variant", "method"):
            manifest[key]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise unreadable(path, e, "compress") from e
    return manifest


def read_payload(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The compressed tensors, with an error naming the file when they are damaged."""
    path = Path(checkpoint_dir) / TENSORS
    if not path.is_file():
        raise InputError(f"{path}: no such file; {rerun_hint('compress')}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise unreadable(path, e, "compress") from e


def load_checkpoint(
    checkpoint_dir: str | Path,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load the base model in the run dtype and apply the variant's stored compression.

    The noise null (kind "noise") loads the FP weights in the dtype its manifest records,
    the other one than the run's `dtype`; the SAE still reads its activations in its own
    dtype (encode casts them), so only the model's numeric path differs.
    """
    checkpoint_dir = Path(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    method = manifest["method"]
    if method["kind"] in ("llmcompressor", "gguf", "external"):
        return load_shipped(checkpoint_dir, manifest, dtype, device, attn_implementation)
    if method["kind"] == "noise":
        if method.get("run_dtype") != dtype:
            raise InputError(
                f"{checkpoint_dir / MANIFEST}: this noise null was made for run dtype "
                f"{method.get('run_dtype')!r} (it runs in {method.get('dtype')!r}), but this job "
                f"runs in {dtype!r}; {rerun_hint('compress')}"
            )
        dtype = method["dtype"]
    payload = read_payload(checkpoint_dir)
    model = _load_base(manifest, checkpoint_dir, dtype, device, attn_implementation)
    try:
        apply_state(model, payload, manifest["method"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise unreadable(checkpoint_dir / TENSORS, e, "compress") from e
    return model


def _load_base(
    manifest: dict[str, Any],
    checkpoint_dir: Path,
    dtype: str,
    device: str | torch.device,
    attn_implementation: str | None,
) -> nn.Module:
    """The checkpoint's base model in the run dtype, as every forward pass runs it."""
    return load_run_model(
        resolve_base(manifest, checkpoint_dir),
        dtype=dtype,
        revision=manifest.get("revision"),
        attn_implementation=attn_implementation,
        device=device,
    )


def load_shipped(
    checkpoint_dir: Path,
    manifest: dict[str, Any],
    dtype: str,
    device: str | torch.device,
    attn_implementation: str | None,
) -> nn.Module:
    """A shipped-format variant, its forward as deployed (see sae_audit.shipped)."""
    method = manifest["method"]
    kind = method["kind"]
    fmt = method.get("format")
    if (kind == "llmcompressor" and method.get("model_dir")) or fmt == "compressed-tensors":
        from .shipped import load_compressed_tensors

        source = (
            checkpoint_dir / method["model_dir"] if kind == "llmcompressor" else method["source"]
        )
        model = load_compressed_tensors(source, dtype, attn_implementation, device)
    else:
        model = _load_base(manifest, checkpoint_dir, dtype, device, attn_implementation)
    if kind == "gguf" or fmt == "gguf":
        from .gguf_checkpoint import load_gguf_into

        load_gguf_into(
            model, checkpoint_dir / method["file"] if kind == "gguf" else method["source"]
        )
    kv = method.get("kv_cache") or {}
    if kv.get("scales"):
        from .shipped import apply_kv_scales

        path = checkpoint_dir / kv["scales"]
        try:
            scales = load_file(path)
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise unreadable(path, e, "compress") from e
        apply_kv_scales(model, kv["scheme"], scales)
    return model.eval()


def load_run_model(
    base: str | Path,
    dtype: str,
    revision: str | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The base model as every forward pass of the audit runs it: run dtype, eval mode.

    The one loader of encode, sliding-window perplexity and the matched search: loading
    in the run dtype (not casting a float32 model with .to) keeps non-persistent buffers
    such as rotary `inv_freq` as transformers makes them, so equal weights give
    bit-identical logits on every path. Compressed block matrices are written into it
    with `apply_state`, which overwrites every one of them in full.
    """
    model = load_model(
        base,
        dtype=dtype,
        revision=revision,
        attn_implementation=attn_implementation,
        device="cpu",
    )
    return model.to(device).eval()
