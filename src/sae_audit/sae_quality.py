"""How well the frozen SAE describes each model's activations on the evaluation tokens.

An SAE that reconstructs little of the activations it reads measures nothing: its codes
change with the model for reasons that are not features. Encode adds the sums this
needs over the positions it encodes and records them in each code shard's footer
(encode.QualitySums); this module adds them over shards and turns them into one row
per variant: explained variance, MSE, L0 and the dead fraction, beside what the SAE's
metadata asked of its input and what was applied (saes.SaeInput).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .files import InputError
from .shards import Expected, code_set_metadata, read_quality

# What encode applied to the SAE's input: every shard of a variant must say the same.
INPUT_COLUMNS = ("hook", "sae_prepend_bos", "tokens_bos", "normalize_activations", "centered")
SCHEMA = {
    "variant": pl.String,
    "n_positions": pl.Int64,
    "explained_variance": pl.Float64,
    "mse": pl.Float64,
    "l0": pl.Float64,
    "dead_fraction": pl.Float64,
    "hook": pl.String,
    "sae_prepend_bos": pl.Boolean,
    "tokens_bos": pl.Boolean,
    "normalize_activations": pl.String,
    "centered": pl.Boolean,
}


def _fired(record: Mapping[str, Any]) -> np.ndarray:
    packed = np.frombuffer(base64.b64decode(record["fired"]), dtype=np.uint8)
    return np.unpackbits(packed, count=int(record["d_sae"])).astype(bool)


def variant_quality(paths: Sequence[str | Path], variant: str, expect: Expected) -> dict[str, Any]:
    """One variant's row: its shards checked (manifest, provenance, tiling) and summed."""
    paths = [Path(p) for p in paths]
    metas = code_set_metadata(paths, variant, expect)
    records = [read_quality(p) for p in paths]
    for path, meta, record in zip(paths, metas, records, strict=True):
        if int(record["n"]) != meta.n_positions:
            raise InputError(
                f"{path}: its quality footer sums {record['n']} positions but the shard covers "
                f"{meta.n_positions}; re-make it with `snakemake --cores all --forcerun encode`"
            )
        for column in INPUT_COLUMNS:
            if record.get(column) != records[0].get(column):
                raise InputError(
                    f"{path}: encoded with {column}={record.get(column)!r} but {paths[0]} with "
                    f"{records[0].get(column)!r}: the shards of {variant!r} were made by "
                    "different runs; re-make them with `snakemake --cores all --forcerun encode`"
                )
    n = sum(int(r["n"]) for r in records)
    squared_error = sum(float(r["squared_error"]) for r in records)
    sum_sq = sum(float(r["sum_sq"]) for r in records)
    total = np.sum([np.asarray(r["sum"], dtype=np.float64) for r in records], axis=0)
    d_in = total.size
    fired = np.logical_or.reduce([_fired(r) for r in records])
    # Variance about the mean activation vector (times n): what "explained" is out of.
    variance = sum_sq - float(total @ total) / n if n else 0.0
    return {
        "variant": variant,
        "n_positions": n,
        "explained_variance": 1.0 - squared_error / variance if variance > 0 else None,
        "mse": squared_error / (n * d_in) if n else None,
        "l0": sum(int(r["n_codes"]) for r in records) / n if n else None,
        "dead_fraction": float(1.0 - fired.mean()),
        **{column: records[0].get(column) for column in INPUT_COLUMNS},
    }


def sae_quality_table(codes: Mapping[str, Sequence[str | Path]], expect: Expected) -> pl.DataFrame:
    """One row per variant (in the order given): the SAE's quality on its activations.

    explained_variance is 1 - (squared reconstruction error) / (squared deviation of the
    activations from their mean vector), both summed over the encoded positions; mse the
    squared error per activation element; l0 the mean number of nonzero codes per
    position; dead_fraction the share of the SAE's features that never fire on these
    positions. Null (never NaN) where undefined: activations with no variance.
    """
    rows = [variant_quality(paths, variant, expect) for variant, paths in codes.items()]
    return pl.DataFrame(rows, schema=SCHEMA)
