"""Compressed artifacts made elsewhere: what format they are, and whether they fit the base model.

Torch-free (the config check at start-up uses it): a compressed-tensors directory is
read through its config.json, a GGUF file through its header (the gguf package
memory-maps the file and reads no tensor data for this).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .files import InputError

COMPRESSED_TENSORS = "compressed-tensors"
GGUF = "gguf"

# GGUF `general.architecture` -> transformers model_type, for the families we map back.
GGUF_ARCH_TO_MODEL_TYPE = {"gptneox": "gpt_neox", "llama": "llama"}
MODEL_TYPE_TO_GGUF_ARCH = {v: k for k, v in GGUF_ARCH_TO_MODEL_TYPE.items()}


@dataclass(frozen=True)
class ModelShape:
    """What must agree between a base model and a compressed artifact of it (None: unknown)."""

    model_type: str | None
    hidden_size: int | None
    num_hidden_layers: int | None
    vocab_size: int | None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelShape:
        text = config.get("text_config") or config  # multimodal wrappers keep the LM inside
        return cls(
            model_type=text.get("model_type") or config.get("model_type"),
            hidden_size=text.get("hidden_size") or text.get("n_embd"),
            num_hidden_layers=text.get("num_hidden_layers") or text.get("n_layer"),
            vocab_size=text.get("vocab_size"),
        )

    def mismatches(self, base: ModelShape) -> list[str]:
        """'key artifact != base' for every key both know and that differs."""
        out = []
        for field in fields(self):
            mine, theirs = getattr(self, field.name), getattr(base, field.name)
            if mine is not None and theirs is not None and mine != theirs:
                out.append(f"{field.name} {mine!r} != base model's {theirs!r}")
        return out


def resolve_format(source: str | Path, format: str = "auto") -> str:
    """'compressed-tensors' or 'gguf' for an artifact path; InputError if neither fits."""
    path = Path(source)
    if format == "auto":
        if path.is_file() and path.suffix.lower() == ".gguf":
            return GGUF
        if path.is_dir():
            return COMPRESSED_TENSORS
        if path.is_file() and _is_gguf(path):
            return GGUF
        raise InputError(
            f"{source}: not a .gguf file or a model directory; set format "
            f"({COMPRESSED_TENSORS} or {GGUF}) or fix the path"
        )
    return format


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def artifact_shape(source: str | Path, format: str) -> ModelShape:
    """The shape an artifact declares: config.json of a directory, header of a GGUF file."""
    path = Path(source)
    if format == GGUF:
        return gguf_shape(path)
    config = path / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise InputError(
            f"{config}: cannot read the artifact's config.json ({e}); a compressed-tensors "
            "model directory is what save_pretrained writes"
        ) from e
    if "quantization_config" not in data and "compression_config" not in data:
        raise InputError(
            f"{config}: no quantization_config: not a compressed-tensors checkpoint "
            "(save it with save_pretrained(..., save_compressed=True))"
        )
    return ModelShape.from_hf_config(data)


def gguf_shape(path: str | Path) -> ModelShape:
    """Architecture, width, depth and vocabulary from a GGUF header."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the gguf package raises plain ValueError/struct errors
        raise InputError(f"{path}: not a readable GGUF file ({e})") from e
    arch = field_value(reader, "general.architecture")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    # GGUF shapes list the fastest dimension first: token_embd is [n_embd, n_vocab]
    vocab = int(embd.shape[-1]) if embd is not None else None
    return ModelShape(
        model_type=GGUF_ARCH_TO_MODEL_TYPE.get(str(arch), f"gguf:{arch}"),
        hidden_size=_int(field_value(reader, f"{arch}.embedding_length")),
        num_hidden_layers=_int(field_value(reader, f"{arch}.block_count")),
        vocab_size=vocab,
    )


def field_value(reader: Any, key: str) -> Any:
    """A scalar or string metadata value of a GGUFReader, or None when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def check_matches(
    artifact: ModelShape, base: ModelShape, artifact_what: str, base_what: str
) -> None:
    """InputError naming both when the artifact was not made from (a model shaped like) the base."""
    problems = artifact.mismatches(base)
    if problems:
        raise InputError(
            f"{artifact_what} does not match the base model {base_what}: "
            + "; ".join(problems)
            + " (an external artifact must compress the configured base model)"
        )
