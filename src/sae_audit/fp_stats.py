"""Per-feature firing statistics of the full-precision (FP) model's SAE codes.

Streams sparse code shards batch by batch; every accumulator has length d_sae,
so memory never grows with the number of tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sae_audit.shards import Expected, code_set_metadata, iter_code_batches, row_keys


def fp_feature_stats(
    shard_paths: list[Path],
    n_tokens: int | None = None,
    expect: Expected | None = None,
    variant: str | None = None,
) -> pl.DataFrame:
    """Firing statistics of every feature (0..d_sae-1) over the given FP code shards.

    A feature fires on a token when its activation is > 0. ``firing_rate`` is
    firing_count / n_tokens, where n_tokens defaults to the positions the shards count
    (their token ranges less the positions they exclude by design; a token on which
    nothing fires is still a token). ``mean_when_firing``
    is null for a feature that never fires; ``peak`` is then 0.0. ``sum`` and
    ``sum_sq`` run over all stored (nonzero) values, i.e. over all tokens.
    """
    paths = [Path(p) for p in shard_paths]
    metas = code_set_metadata(paths, variant, expect)
    d_sae = metas[0].d_sae
    total = sum(m.n_positions for m in metas)
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
        last_key = -1
        for batch in iter_code_batches(path):
            feature = batch.column("feature").to_numpy()
            value = batch.column("value").to_numpy().astype(np.float64)
            token = batch.column("token").to_numpy()
            keys = row_keys(path, meta, token, feature, after=last_key)
            last_key = int(keys[-1]) if keys.size else last_key
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
