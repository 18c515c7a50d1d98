"""Stability checks: is the token set large enough, and how much do the thresholds matter?

Nested token budgets (prefixes of the token set) and seeded random half-size
sequence subsets are all accumulated in one streaming pass per variant; the
threshold grid re-classes the finished per-feature table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .config import FROM_SCHEMA, ConfigSection
from .correlate import SufficientSums, TokenFilter, accumulate_selections, pearson_from_sums
from .shards import Expected, code_set_metadata, pair_shards
from .survival import CLASSES, SurvivalConfig, classify, interval


@dataclass(frozen=True)
class StabilityConfig(ConfigSection, section="stability"):
    """Token budgets and seeded subsets over which each feature's r is re-estimated."""

    token_budgets: tuple[float, ...] = FROM_SCHEMA
    subsets: int = FROM_SCHEMA
    seed: int = FROM_SCHEMA


def _selections(
    n_sequences: int, seq_len: int, cfg: StabilityConfig
) -> list[tuple[str, float, int | None, TokenFilter]]:
    """(selection kind, fraction, subset id, token filter) for every budget and subset."""
    out: list[tuple[str, float, int | None, TokenFilter]] = []
    for fraction in sorted(set(cfg.token_budgets)):
        stop = max(1, round(fraction * n_sequences)) * seq_len
        out.append(("budget", fraction, None, lambda t, stop=stop: t < stop))
    rng = np.random.default_rng(cfg.seed)
    for i in range(cfg.subsets):
        chosen = np.zeros(n_sequences, dtype=bool)
        chosen[rng.choice(n_sequences, size=max(1, n_sequences // 2), replace=False)] = True
        out.append(("subset", 0.5, i, lambda t, chosen=chosen: chosen[t // seq_len]))
    return out


def stability_table(
    fp_paths: Sequence[str | Path],
    variant_paths: Mapping[str, Sequence[str | Path]],
    seq_len: int,
    survival: SurvivalConfig,
    cfg: StabilityConfig,
    expect: Expected | None = None,
    check_variants: bool = False,
) -> pl.DataFrame:
    """Class fractions per variant for each token budget and random subset.

    Active features are re-derived inside each selection (FP firing rate on those
    tokens), as a smaller study would have seen them, and so are the intervals on r
    (from the support within the selection): a smaller budget leaves more features
    "insufficient". Shards are verified as `shards.pair_shards` does; with
    `check_variants`, each shard must say it is of the variant it is listed under.
    """
    fp_paths = [Path(p) for p in fp_paths]
    metas = code_set_metadata(fp_paths, "fp" if check_variants else None, expect)
    n_tokens = sum(m.n_tokens for m in metas)
    if n_tokens % seq_len:
        raise ValueError(f"{n_tokens} tokens is not a whole number of {seq_len}-token sequences")
    d_sae = metas[0].d_sae
    specs = _selections(n_tokens // seq_len, seq_len, cfg)
    rows = []
    for variant, paths in variant_paths.items():
        pairs, _ = pair_shards(fp_paths, paths, variant if check_variants else None, expect)
        sums = [SufficientSums(d_sae=d_sae) for _ in specs]
        selections = [(s, spec[3]) for s, spec in zip(sums, specs, strict=True)]
        for fp_path, var_path in pairs:
            accumulate_selections(fp_path, var_path, selections)
        for (kind, fraction, subset, _), acc in zip(specs, sums, strict=True):
            r, _flags = pearson_from_sums(acc)
            active = acc.fire_x / acc.n > survival.active_rate
            # each r's interval from its support within the selection, as survival does
            lo, hi = interval(r[active], acc.n_support[active], survival)
            classes = classify(pl.Series("r", r[active]), survival, lo, hi)
            counts = {c: int((classes == c).sum()) for c in CLASSES}
            n_active = int(active.sum())
            rows.append(
                {
                    "variant": variant,
                    "selection": kind,
                    "fraction": fraction,
                    "subset": subset,
                    "n_tokens": acc.n,
                    "n_active": n_active,
                    # No active feature in a selection: the fractions are undefined (null).
                    **{
                        f"{c}_pct": 100.0 * counts[c] / n_active if n_active else None
                        for c in CLASSES
                    },
                }
            )
    return pl.DataFrame(
        rows,
        schema_overrides={"subset": pl.Int64, **{f"{c}_pct": pl.Float64 for c in CLASSES}},
    )
