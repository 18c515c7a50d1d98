"""The evaluation token set: contiguous fixed-length sequences written as Parquet shards."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .shards import read_token_shard, write_token_shard


@dataclass(frozen=True)
class TokenSetConfig:
    seq_len: int = 128
    n_sequences: int = 512
    n_shards: int = 4
    add_special_tokens: bool = False
    bos: bool = False  # prepend BOS to every sequence (seq_len includes it)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"tokens.seq_len must be >= 2, got {self.seq_len}")
        if self.n_sequences < 1 or self.n_shards < 1:
            raise ValueError("tokens.n_sequences and tokens.n_shards must be >= 1")
        if self.n_shards > self.n_sequences:
            raise ValueError(
                f"tokens.n_shards ({self.n_shards}) exceeds tokens.n_sequences ({self.n_sequences}): "
                "every shard needs at least one sequence"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenSetConfig:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


def read_documents(paths: list[str | Path]) -> list[str]:
    """Documents from text files: blank-line separated paragraphs, empty ones dropped."""
    docs: list[str] = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        docs.extend(p.strip() for p in text.split("\n\n") if p.strip())
    return docs


def shard_bounds(n_sequences: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) sequence ranges, as equal as possible."""
    edges = np.linspace(0, n_sequences, n_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def build_token_set(
    documents: list[str], tokenizer: Any, cfg: TokenSetConfig, out_paths: list[str | Path]
) -> dict[str, Any]:
    """Tokenize documents joined by blank lines into one stream, cut contiguous chunks, shard them."""
    if len(out_paths) != cfg.n_shards:
        raise ValueError(f"expected {cfg.n_shards} output paths, got {len(out_paths)}")
    ids = tokenizer("\n\n".join(documents), add_special_tokens=cfg.add_special_tokens)["input_ids"]
    bos = tokenizer.bos_token_id if cfg.bos else None
    if cfg.bos and bos is None:
        raise ValueError("tokens.bos is true but the tokenizer has no BOS token")
    body = cfg.seq_len - (1 if bos is not None else 0)
    available = len(ids) // body
    if available < cfg.n_sequences:
        raise ValueError(
            f"tokens.n_sequences={cfg.n_sequences} x seq_len={cfg.seq_len} needs "
            f"{cfg.n_sequences * body} tokens but the text has {len(ids)}: lower tokens.n_sequences"
        )
    chunks = np.asarray(ids[: cfg.n_sequences * body], dtype=np.int64).reshape(
        cfg.n_sequences, body
    )
    if bos is not None:
        chunks = np.concatenate(
            [np.full((cfg.n_sequences, 1), bos, dtype=np.int64), chunks], axis=1
        )
    meta = {"seq_len": cfg.seq_len, "n_sequences": cfg.n_sequences, "bos": bos}
    for (start, stop), path in zip(
        shard_bounds(cfg.n_sequences, cfg.n_shards), out_paths, strict=True
    ):
        write_token_shard(path, chunks[start:stop], start, meta)
    return {"n_tokens": int(chunks.size), "n_text_tokens": len(ids), **meta}


def load_token_ids(paths: list[str | Path]) -> np.ndarray:
    """All sequences of the given shards, in order, as [n_seq, seq_len]."""
    return np.concatenate([read_token_shard(p)[1] for p in paths], axis=0)
