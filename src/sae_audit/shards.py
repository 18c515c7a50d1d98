"""Sparse SAE code shards (COO Parquet) and per-token NLL shards.

Schema (DESIGN.md): columns token (int64, global position in the token set),
feature (int32), value (float32); nonzero activations only; sorted by
(token, feature). Key-value metadata records provenance so a shard says what
it is without its path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODE_SCHEMA = pa.schema(
    [
        pa.field("token", pa.int64(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),
    ]
)
NLL_SCHEMA = pa.schema(
    [
        pa.field("token", pa.int64(), nullable=False),
        pa.field("nll", pa.float64(), nullable=False),
    ]
)
TOKEN_SCHEMA = pa.schema(
    [
        pa.field("sequence", pa.int64(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    ]
)
METADATA_KEY = b"sae_audit"


@dataclass(frozen=True)
class ShardMetadata:
    """Provenance of one shard: which model, variant, SAE and tokens made it."""

    model: str
    variant: str
    sae: str
    hook: str
    d_sae: int
    token_start: int
    token_stop: int
    config_hash: str

    @property
    def n_tokens(self) -> int:
        return self.token_stop - self.token_start

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "n_tokens": self.n_tokens}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ShardMetadata:
        data = json.loads(raw)
        data.pop("n_tokens", None)
        return cls(**data)


def _with_metadata(schema: pa.Schema, meta: Mapping[bytes, bytes]) -> pa.Schema:
    return schema.with_metadata({**(schema.metadata or {}), **meta})


class CodeShardWriter:
    """Streams sparse code batches into one Parquet shard.

    Batches must arrive in token order; within a batch rows are sorted here, so
    the file is sorted by (token, feature) as the schema promises. Writes to a
    temporary name and renames on close, so a killed job leaves no half shard.
    """

    def __init__(self, path: str | Path, metadata: ShardMetadata, row_group_size: int = 1 << 20):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._schema = _with_metadata(CODE_SCHEMA, {METADATA_KEY: metadata.to_json()})
        self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")
        self._row_group_size = row_group_size
        self._last_token = -1
        self.n_rows = 0

    def write(self, token: np.ndarray, feature: np.ndarray, value: np.ndarray) -> None:
        if token.size == 0:
            return
        order = np.lexsort((feature, token))
        token, feature, value = token[order], feature[order], value[order]
        if token[0] <= self._last_token:
            raise ValueError("code batches must arrive in increasing token order")
        self._last_token = int(token[-1])
        table = pa.Table.from_arrays(
            [
                pa.array(token.astype(np.int64, copy=False)),
                pa.array(feature.astype(np.int32, copy=False)),
                pa.array(value.astype(np.float32, copy=False)),
            ],
            schema=self._schema,
        )
        self._writer.write_table(table, row_group_size=self._row_group_size)
        self.n_rows += table.num_rows

    def close(self) -> None:
        self._writer.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> CodeShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_metadata(path: str | Path) -> ShardMetadata:
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: not a sae-audit shard (no '{METADATA_KEY.decode()}' metadata)")
    return ShardMetadata.from_json(meta[METADATA_KEY])


def iter_code_batches(path: str | Path, batch_rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """Yield record batches of a code shard without loading it whole."""
    with pq.ParquetFile(path) as pf:
        yield from pf.iter_batches(batch_size=batch_rows)


def write_nll_shard(
    path: str | Path, token: np.ndarray, nll: np.ndarray, metadata: ShardMetadata
) -> None:
    """Per-token NLL: `token` is the global position of the token being predicted.

    The first token of every sequence has no context, so it is absent.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = _with_metadata(NLL_SCHEMA, {METADATA_KEY: metadata.to_json()})
    table = pa.Table.from_arrays(
        [pa.array(token.astype(np.int64)), pa.array(nll.astype(np.float64))], schema=schema
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def write_token_shard(
    path: str | Path, sequences: np.ndarray, first_sequence: int, meta: Mapping[str, Any]
) -> None:
    """A token shard: fixed-length sequences (rows) with their global sequence index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = _with_metadata(
        TOKEN_SCHEMA, {METADATA_KEY: json.dumps(dict(meta), sort_keys=True).encode()}
    )
    seq_idx = np.arange(first_sequence, first_sequence + len(sequences), dtype=np.int64)
    ids = pa.array([row.astype(np.int32) for row in sequences], type=pa.list_(pa.int32()))
    table = pa.Table.from_arrays([pa.array(seq_idx), ids], schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def read_token_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (sequence indices, int64 [n_seq, seq_len] token ids, metadata)."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    seq = table.column("sequence").to_numpy()
    ids = np.asarray(
        table.column("input_ids").combine_chunks().flatten().to_numpy(), dtype=np.int64
    )
    n = len(seq)
    return seq, ids.reshape(n, -1) if n else ids.reshape(0, 0), meta
