"""Sparse SAE code shards (COO Parquet) and per-token NLL shards.

Schema (DESIGN.md): columns token (int64, global position in the token set),
feature (int32), value (float32); nonzero activations only; sorted by
(token, feature). Key-value metadata records provenance so a shard says what
it is without its path.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import encode_hash as encode_hash  # re-exported: shards record it
from .files import InputError, atomic_path, rerun_hint, sha256_file, unreadable, write_json

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
# How well the SAE reconstructs the activations it encoded into the shard: sums that add
# over shards (sae_audit.sae_quality), written into the footer when the shard is closed.
QUALITY_KEY = b"sae_audit_quality"
# Every directory of code shards carries a content manifest: Snakemake tracks a
# directory() output by its own timestamp only, so a shard changed or truncated inside
# it would otherwise be read as if encode had written it.
DIR_MANIFEST = "manifest.json"


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
    # Positions of [token_start, token_stop) that carry no codes by design
    # (encode.exclude_special_positions): no statistic counts them.
    excluded: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        """Token positions the shard's range spans (its place in the token set)."""
        return self.token_stop - self.token_start

    @property
    def n_positions(self) -> int:
        """Positions the statistics count: the range less the excluded positions."""
        return self.n_tokens - len(self.excluded)

    def to_json(self) -> bytes:
        data = {**asdict(self), "n_tokens": self.n_tokens, "excluded": list(self.excluded)}
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ShardMetadata:
        data = json.loads(raw)
        data.pop("n_tokens", None)
        data["excluded"] = tuple(int(t) for t in data.get("excluded", ()))
        return cls(**data)


def _with_metadata(schema: pa.Schema, meta: Mapping[bytes, bytes]) -> pa.Schema:
    return schema.with_metadata({**(schema.metadata or {}), **meta})


class CodeShardWriter:
    """Streams sparse code batches into one Parquet shard.

    Batches must arrive in token order; within a batch rows may come in any order and
    are sorted here when they are not already in (token, feature) order, so the file
    is sorted as the schema promises. Writes to a temporary name and renames on close,
    so a killed job leaves no half shard.
    """

    def __init__(self, path: str | Path, metadata: ShardMetadata, row_group_size: int = 1 << 20):
        self.path = Path(path)
        self._schema = _with_metadata(CODE_SCHEMA, {METADATA_KEY: metadata.to_json()})
        self._row_group_size = row_group_size
        self._last_token = -1
        self.n_rows = 0
        # The shard streams into a temporary that close() renames; an error while
        # writing (disk full) removes it and names the shard.
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        try:
            self._writer = pq.ParquetWriter(self._tmp, self._schema, compression="zstd")
        except BaseException as e:
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise

    def write(self, token: np.ndarray, feature: np.ndarray, value: np.ndarray) -> None:
        if token.size == 0:
            return
        # Encode hands rows over in order already (a row-major nonzero): one pass checks
        # that, and only a batch out of order pays for the sort.
        token_next, token_prev = token[1:], token[:-1]
        if (token_next < token_prev).any() or (
            (token_next == token_prev) & (feature[1:] < feature[:-1])
        ).any():
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
        try:
            self._writer.write_table(table, row_group_size=self._row_group_size)
        except OSError as e:
            self.abort(e)  # raises OutputError naming the shard
            raise
        self.n_rows += table.num_rows

    def set_quality(self, quality: Mapping[str, Any]) -> None:
        """Record the SAE's reconstruction sums over this shard (a JSON object) in its footer."""
        self._writer.add_key_value_metadata({QUALITY_KEY: json.dumps(dict(quality)).encode()})

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as e:
            self.abort(e)
        self._atomic.__exit__(None, None, None)
        add_to_dir_manifest(self.path)

    def abort(self, error: BaseException | None = None) -> None:
        """Remove the partial shard; with an OSError, re-raise it as an error naming the shard."""
        with contextlib.suppress(OSError):  # the error that got us here is the one to report
            self._writer.close()
        err = error or RuntimeError("aborted")
        self._atomic.__exit__(type(err), err, err.__traceback__)

    def __enter__(self) -> CodeShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._atomic.__exit__(exc_type, exc, tb)


# ---------------------------------------------------------------- directory manifests
def add_to_dir_manifest(path: str | Path) -> None:
    """Record a finished shard's size and checksum in its directory's manifest."""
    path = Path(path)
    manifest_path = path.parent / DIR_MANIFEST
    entries = _read_dir_manifest(manifest_path) if manifest_path.is_file() else {}
    entries[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_json(manifest_path, {"files": entries})


def _read_dir_manifest(manifest_path: Path) -> dict[str, dict[str, Any]]:
    try:
        return dict(json.loads(manifest_path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise unreadable(manifest_path, e, "encode") from e


def verify_shard(path: str | Path) -> None:
    """Check a code shard against its directory's manifest: present, same size, same checksum.

    Fails loudly on a shard deleted, truncated, replaced or edited after encode wrote it,
    which Snakemake cannot see inside a directory() output.
    """
    path = Path(path)
    manifest_path = path.parent / DIR_MANIFEST
    if not manifest_path.is_file():
        raise InputError(
            f"{path}: its directory has no {DIR_MANIFEST} (not written by a finished encode "
            f"job); {rerun_hint('encode')}"
        )
    entry = _read_dir_manifest(manifest_path).get(path.name)
    if entry is None:
        raise InputError(f"{path}: not listed in {manifest_path}; {rerun_hint('encode')}")
    if not path.is_file():
        raise InputError(
            f"{path}: listed in {manifest_path} but missing (deleted after encode wrote it); "
            f"re-make it with `snakemake --cores all --forcerun encode`"
        )
    stat = path.stat()
    if stat.st_size != entry["bytes"]:
        raise InputError(
            f"{path}: {stat.st_size} bytes but encode wrote {entry['bytes']} (truncated or "
            f"replaced); {rerun_hint('encode')}"
        )
    if _checksum(str(path), stat.st_size, stat.st_mtime_ns) != entry["sha256"]:
        raise InputError(
            f"{path}: content differs from what encode wrote (checksum mismatch); "
            f"{rerun_hint('encode')}"
        )


@lru_cache(maxsize=4096)
def _checksum(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too, so a file changed within one process is hashed again;
    # readers that pass over the FP shards once per variant hash them once.
    return sha256_file(path)


# ---------------------------------------------------------------- reading
def _footer_value(path: Path, key: bytes, missing: str) -> bytes:
    """The value of `key` in a shard's Parquet key-value metadata; `missing` says why a
    shard would lack it. Errors name the shard and the rule that re-makes it."""
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise unreadable(path, e, "encode") from e
    if key not in meta:
        raise InputError(
            f"{path}: {missing} (no '{key.decode()}' metadata); {rerun_hint('encode')}"
        )
    return meta[key]


def read_metadata(path: str | Path) -> ShardMetadata:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such shard; {rerun_hint('encode')}")
    raw = _footer_value(path, METADATA_KEY, "not a sae-audit shard")
    try:
        return ShardMetadata.from_json(raw)
    except (ValueError, TypeError) as e:
        raise unreadable(path, e, "encode") from e


def read_quality(path: str | Path) -> dict[str, Any]:
    """The reconstruction sums encode recorded in a code shard's footer (set_quality)."""
    path = Path(path)
    raw = _footer_value(path, QUALITY_KEY, "no SAE-quality sums (written by an older sae-audit)")
    try:
        return dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise unreadable(path, e, "encode") from e


def iter_code_batches(path: str | Path, batch_rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """Yield record batches of a code shard without loading it whole.

    A value that is NaN or infinite is refused: it would turn every statistic of its
    feature into NaN, or a plausible-looking wrong number.
    """
    try:
        with pq.ParquetFile(path) as pf:
            batches = (
                batch
                # A reader per run of row groups, not one for the file: pyarrow's reader
                # holds on to memory as it goes (its pool peak grows with the shard).
                for row_groups in _row_group_runs(pf.metadata, batch_rows)
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=row_groups)
            )
            for batch in batches:
                value = batch.column("value").to_numpy()
                if not np.isfinite(value).all():
                    i = int(np.flatnonzero(~np.isfinite(value))[0])
                    raise InputError(
                        f"{path}: non-finite activation {value[i]} at token "
                        f"{batch.column('token')[i].as_py()}, feature "
                        f"{batch.column('feature')[i].as_py()}; {rerun_hint('encode')}"
                    )
                yield batch
    except (OSError, pa.ArrowException) as e:
        raise unreadable(path, e, "encode") from e


def _row_group_runs(metadata: pq.FileMetaData, max_rows: int) -> Iterator[list[int]]:
    """Consecutive row groups in runs of at most `max_rows` rows (a longer group alone)."""
    run: list[int] = []
    rows = 0
    for i in range(metadata.num_row_groups):
        n = metadata.row_group(i).num_rows
        if run and rows + n > max_rows:
            yield run
            run, rows = [], 0
        run.append(i)
        rows += n
    if run:
        yield run


def row_keys(
    path: str | Path, meta: ShardMetadata, token: np.ndarray, feature: np.ndarray, after: int = -1
) -> np.ndarray:
    """(token, feature) of a run of rows as one sortable int64 key, checked.

    Rows must lie in the shard's token range and feature space, and be strictly sorted
    by (token, feature) after the key `after` (the previous run's last): a duplicated
    row would be counted twice by every sum, and the merge join needs the order.
    """
    if token.size == 0:
        return token.astype(np.int64)
    if token.min() < meta.token_start or token.max() >= meta.token_stop:
        raise InputError(
            f"{path}: tokens outside the declared range [{meta.token_start}, {meta.token_stop}); "
            f"{rerun_hint('encode')}"
        )
    if feature.min() < 0 or feature.max() >= meta.d_sae:
        raise InputError(
            f"{path}: feature index outside [0, d_sae={meta.d_sae}); {rerun_hint('encode')}"
        )
    if meta.excluded and np.isin(token, meta.excluded).any():
        raise InputError(
            f"{path}: rows at positions the shard says it excludes; {rerun_hint('encode')}"
        )
    keys = token.astype(np.int64, copy=False) * meta.d_sae
    keys += feature  # casts in the add: no int64 copy of the features
    if keys[0] <= after or not bool(np.all(keys[1:] > keys[:-1])):
        raise InputError(
            f"{path}: rows not strictly sorted by (token, feature) (duplicated or unsorted "
            f"rows); {rerun_hint('encode')}"
        )
    return keys


# ---------------------------------------------------------------- provenance
@dataclass(frozen=True)
class Expected:
    """What the rule asked for: the reader checks every shard's metadata against it.

    `n_tokens` is the size of the token set; a set of shards must cover [0, n_tokens).
    A field left None is not checked (unit tests, tools reading shards by hand).
    """

    model: str | None = None
    sae: str | None = None
    config_hash: str | None = None
    n_tokens: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Expected:
        return cls(**dict(data or {}))


def check_provenance(
    path: Path, meta: ShardMetadata, variant: str | None, expect: Expected
) -> None:
    wanted = {"variant": variant, "model": expect.model, "sae": expect.sae,
              "config_hash": expect.config_hash}  # fmt: skip
    for key, value in wanted.items():
        found = getattr(meta, key)
        if value is not None and found != value:
            raise InputError(
                f"{path}: shard metadata says {key}={found!r} but this job reads {key}={value!r} "
                f"(a shard copied or left over from another run or config); "
                f"{rerun_hint('encode')}"
            )


def code_set_metadata(
    paths: Sequence[str | Path], variant: str | None = None, expect: Expected | None = None
) -> list[ShardMetadata]:
    """Verify and cross-check the shards of one (model, variant, SAE); return their metadata.

    Each shard must match its directory manifest and the expectation; all must agree on
    d_sae and hook, their token ranges must not overlap and, when `expect.n_tokens` is
    set, must tile [0, n_tokens) exactly.
    """
    expect = expect or Expected()
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no shards given")
    metas = []
    for p in paths:
        verify_shard(p)
        meta = read_metadata(p)
        check_provenance(p, meta, variant, expect)
        metas.append(meta)
    for attr in ("d_sae", "hook"):
        values = {getattr(m, attr) for m in metas}
        if len(values) != 1:
            raise InputError(f"shards disagree on {attr}: {sorted(map(str, values))} in {paths}")
    check_tiling(paths, metas, expect.n_tokens)
    return metas


def check_tiling(
    paths: Sequence[Path], metas: Sequence[ShardMetadata], n_tokens: int | None
) -> None:
    """Shards' token ranges must not overlap (a shard listed twice would count twice) and,
    with `n_tokens`, must tile the token set [0, n_tokens) exactly."""
    ordered = sorted(zip(metas, paths, strict=True), key=lambda mp: mp[0].token_start)
    for m, p in ordered:
        if m.token_stop <= m.token_start:
            raise InputError(
                f"{p}: empty or inverted token range [{m.token_start}, {m.token_stop})"
            )
    for (prev, prev_path), (cur, cur_path) in itertools.pairwise(ordered):
        if cur.token_start < prev.token_stop:
            raise InputError(
                f"token ranges overlap: {prev_path} [{prev.token_start}, {prev.token_stop}) "
                f"and {cur_path} [{cur.token_start}, {cur.token_stop})"
            )
    if n_tokens is not None:
        covered = sum(m.n_tokens for m in metas)
        first = ordered[0][0].token_start
        if first != 0 or covered != n_tokens or ordered[-1][0].token_stop != covered:
            raise InputError(
                f"shards {[str(p) for p in paths]} cover {covered} tokens from {first}, but "
                f"the token set has {n_tokens} from 0 (a shard is missing or from another "
                f"token set); {rerun_hint('encode')}"
            )


def pair_shards(
    fp_paths: Sequence[str | Path],
    variant_paths: Sequence[str | Path],
    variant: str | None,
    expect: Expected | None = None,
) -> tuple[list[tuple[Path, Path]], ShardMetadata]:
    """Pair FP and variant shards by token range, both sets verified (see code_set_metadata).

    With `variant` given, the shards must say they are of `fp` and of that variant.
    Returns the pairs in token order and one FP shard's metadata (d_sae, hook).
    """
    fp_metas = code_set_metadata(fp_paths, "fp" if variant else None, expect)
    var_metas = code_set_metadata(variant_paths, variant, expect)
    variant = variant or "variant"
    fp_by_range = {
        (m.token_start, m.token_stop): Path(p) for m, p in zip(fp_metas, fp_paths, strict=True)
    }
    var_by_range = {(m.token_start, m.token_stop): Path(p) for m, p in zip(var_metas, variant_paths, strict=True)}  # fmt: skip
    if set(fp_by_range) != set(var_by_range):
        only_fp = sorted(set(fp_by_range) - set(var_by_range))
        only_var = sorted(set(var_by_range) - set(fp_by_range))
        raise InputError(
            f"FP and {variant} shards cover different token ranges: only in FP {only_fp}, "
            f"only in {variant} {only_var}"
        )
    for attr in ("d_sae", "hook", "model", "sae"):
        if getattr(fp_metas[0], attr) != getattr(var_metas[0], attr):
            raise InputError(
                f"{attr} differs: {fp_paths[0]} has {getattr(fp_metas[0], attr)!r}, "
                f"{variant_paths[0]} has {getattr(var_metas[0], attr)!r}"
            )
    pairs = [(fp_by_range[r], var_by_range[r]) for r in sorted(fp_by_range)]
    return pairs, fp_metas[0]


def write_nll_shard(
    path: str | Path, token: np.ndarray, nll: np.ndarray, metadata: ShardMetadata
) -> None:
    """Per-token NLL: `token` is the global position of the token being predicted.

    The first token of every sequence has no context, so it is absent.
    """
    path = Path(path)
    schema = _with_metadata(NLL_SCHEMA, {METADATA_KEY: metadata.to_json()})
    table = pa.Table.from_arrays(
        [pa.array(token.astype(np.int64)), pa.array(nll.astype(np.float64))], schema=schema
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_token_shard(
    path: str | Path, sequences: np.ndarray, first_sequence: int, meta: Mapping[str, Any]
) -> None:
    """A token shard: fixed-length sequences (rows) with their global sequence index."""
    path = Path(path)
    schema = _with_metadata(
        TOKEN_SCHEMA, {METADATA_KEY: json.dumps(dict(meta), sort_keys=True).encode()}
    )
    seq_idx = np.arange(first_sequence, first_sequence + len(sequences), dtype=np.int64)
    ids = pa.array([row.astype(np.int32) for row in sequences], type=pa.list_(pa.int32()))
    table = pa.Table.from_arrays([pa.array(seq_idx), ids], schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_nll_shard(
    path: str | Path, variant: str | None = None, expect: Expected | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(token positions, float64 NLL) of an NLL shard, checked: provenance and finite values."""
    path = Path(path)
    meta = read_metadata(path)
    expect = expect or Expected()
    # An NLL shard has no SAE: model, variant and encode's config hash (model, encode).
    check_provenance(
        path, meta, variant, Expected(model=expect.model, config_hash=expect.config_hash)
    )
    try:
        table = pq.read_table(path, columns=["token", "nll"])
    except (OSError, pa.ArrowException) as e:
        raise unreadable(path, e, "encode") from e
    token = table.column("token").to_numpy()
    nll = table.column("nll").to_numpy().astype(np.float64)
    if not np.isfinite(nll).all():
        i = int(np.flatnonzero(~np.isfinite(nll))[0])
        raise InputError(
            f"{path}: non-finite NLL {nll[i]} at token {token[i]}; {rerun_hint('encode')}"
        )
    return token, nll


def read_token_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return (sequence indices, int64 [n_seq, seq_len] token ids, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such token shard; {rerun_hint('tokenize')}")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise unreadable(path, e, "tokenize") from e
    meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    seq = table.column("sequence").to_numpy()
    ids = np.asarray(
        table.column("input_ids").combine_chunks().flatten().to_numpy(), dtype=np.int64
    )
    n = len(seq)
    return seq, ids.reshape(n, -1) if n else ids.reshape(0, 0), meta
