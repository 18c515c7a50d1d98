"""Per-feature firing statistics of the full-precision (FP) model's SAE codes.

Streams sparse code shards batch by batch; every accumulator has length d_sae,
so memory never grows with the number of tokens.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl

from sae_audit.shards import ShardMetadata, iter_code_batches, read_metadata

STATS_COLUMNS = (
    "feature",
    "firing_count",
    "firing_rate",
    "mean_when_firing",
    "peak",
    "sum",
    "sum_sq",
    "n_tokens",
)


def shard_metadata(paths: list[Path]) -> list[ShardMetadata]:
    """Read and cross-check metadata of a set of shards of one (model, variant).

    All shards must agree on d_sae and their token ranges must not overlap, so
    summing the ranges gives the number of tokens they cover.
    """
    if not paths:
        raise ValueError("no shards given")
    metas = [read_metadata(p) for p in paths]
    d_sae = {m.d_sae for m in metas}
    if len(d_sae) != 1:
        raise ValueError(f"shards disagree on d_sae: {sorted(d_sae)}")
    ordered = sorted(zip(metas, paths, strict=True), key=lambda mp: mp[0].token_start)
    for (prev, prev_path), (cur, cur_path) in itertools.pairwise(ordered):
        if cur.token_start < prev.token_stop:
            raise ValueError(
                f"token ranges overlap: {prev_path} [{prev.token_start}, {prev.token_stop}) "
                f"and {cur_path} [{cur.token_start}, {cur.token_stop})"
            )
    for m, p in ordered:
        if m.token_stop <= m.token_start:
            raise ValueError(
                f"{p}: empty or inverted token range [{m.token_start}, {m.token_stop})"
            )
    return metas


def fp_feature_stats(shard_paths: list[Path], n_tokens: int | None = None) -> pl.DataFrame:
    """Firing statistics of every feature (0..d_sae-1) over the given FP code shards.

    A feature fires on a token when its activation is > 0. ``firing_rate`` is
    firing_count / n_tokens, where n_tokens defaults to the summed metadata token
    ranges (a token on which nothing fires is still a token). ``mean_when_firing``
    is null for a feature that never fires; ``peak`` is then 0.0. ``sum`` and
    ``sum_sq`` run over all stored (nonzero) values, i.e. over all tokens.
    """
    paths = [Path(p) for p in shard_paths]
    metas = shard_metadata(paths)
    d_sae = metas[0].d_sae
    total = sum(m.n_tokens for m in metas)
    if n_tokens is not None:
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        total = n_tokens

    count = np.zeros(d_sae, dtype=np.int64)
    fire_sum = np.zeros(d_sae, dtype=np.float64)
    peak = np.zeros(d_sae, dtype=np.float64)
    total_sum = np.zeros(d_sae, dtype=np.float64)
    total_sq = np.zeros(d_sae, dtype=np.float64)
    for path, meta in zip(paths, metas, strict=True):
        for batch in iter_code_batches(path):
            feature = batch.column("feature").to_numpy()
            value = batch.column("value").to_numpy().astype(np.float64)
            token = batch.column("token").to_numpy()
            _check_batch(path, meta, token, feature)
            total_sum += np.bincount(feature, weights=value, minlength=d_sae)
            total_sq += np.bincount(feature, weights=value * value, minlength=d_sae)
            pos = value > 0
            count += np.bincount(feature[pos], minlength=d_sae)
            fire_sum += np.bincount(feature[pos], weights=value[pos], minlength=d_sae)
            np.maximum.at(peak, feature[pos], value[pos])

    with np.errstate(invalid="ignore", divide="ignore"):
        mean_when_firing = np.where(count > 0, fire_sum / np.maximum(count, 1), np.nan)
    return pl.DataFrame(
        {
            "feature": np.arange(d_sae, dtype=np.int32),
            "firing_count": count,
            "firing_rate": count / float(total),
            "mean_when_firing": mean_when_firing,
            "peak": peak,
            "sum": total_sum,
            "sum_sq": total_sq,
            "n_tokens": np.full(d_sae, total, dtype=np.int64),
        }
    ).with_columns(pl.col("mean_when_firing").fill_nan(None))


def _check_batch(path: Path, meta: ShardMetadata, token: np.ndarray, feature: np.ndarray) -> None:
    """Reject rows outside the shard's declared token range or feature space."""
    if token.size == 0:
        return
    if token.min() < meta.token_start or token.max() >= meta.token_stop:
        raise ValueError(
            f"{path}: tokens outside the declared range [{meta.token_start}, {meta.token_stop})"
        )
    if feature.min() < 0 or feature.max() >= meta.d_sae:
        raise ValueError(f"{path}: feature index outside [0, d_sae={meta.d_sae})")
