"""Feature classes (survived / blurred / destroyed / insufficient) and per-variant summaries.

A feature is classed by the confidence interval of its r (`correlate.fisher_interval`,
n = its support), not by r alone: survived when the whole interval lies above
``analysis.survived``, destroyed when it lies below ``analysis.destroyed``, blurred when
it lies between them, and "insufficient" (insufficient evidence) when it straddles a
threshold. r and damage = 1 - r stay the point values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import overload

import numpy as np
import polars as pl

from .config import FROM_SCHEMA, ConfigSection, check_survival_thresholds
from .correlate import fisher_interval

INSUFFICIENT = "insufficient"
# The three evidence classes, then "insufficient": every active feature is in exactly one.
CLASSES = ("survived", "blurred", "destroyed", INSUFFICIENT)


@dataclass(frozen=True)
class SurvivalConfig(ConfigSection, section="analysis"):
    """Thresholds: active means FP firing rate > active_rate; classes cut r's interval,
    two-sided at level ``confidence`` (0: the point r, no interval)."""

    active_rate: float = FROM_SCHEMA
    survived: float = FROM_SCHEMA
    destroyed: float = FROM_SCHEMA
    confidence: float = FROM_SCHEMA

    def _check(self) -> None:
        check_survival_thresholds(self.to_dict(), self.section)


@overload
def classify(
    r: pl.Expr,
    cfg: SurvivalConfig = ...,
    lo: pl.Expr | None = ...,
    hi: pl.Expr | None = ...,
) -> pl.Expr: ...
@overload
def classify(
    r: pl.Series,
    cfg: SurvivalConfig = ...,
    lo: pl.Series | None = ...,
    hi: pl.Series | None = ...,
) -> pl.Series: ...
def classify(
    r: pl.Expr | pl.Series,
    cfg: SurvivalConfig = SurvivalConfig(),
    lo: pl.Expr | pl.Series | None = None,
    hi: pl.Expr | pl.Series | None = None,
) -> pl.Expr | pl.Series:
    """Class of each r from its interval [lo, hi] (without one: the point, lo = hi = r).

    survived lo > survived; destroyed hi < destroyed; blurred destroyed <= lo and
    hi <= survived; otherwise "insufficient" (the interval straddles a threshold). With
    the point these are the plain cuts: survived r > survived, blurred destroyed <= r
    <= survived, destroyed r < destroyed. A null or NaN r or bound gives a null class
    (polars orders NaN above every number, so it must not reach the comparisons)."""
    if isinstance(r, pl.Series):
        lo_s, hi_s = (r if b is None else b for b in (lo, hi))
        assert isinstance(lo_s, pl.Series) and isinstance(hi_s, pl.Series)
        return pl.select(
            classify(pl.lit(r), cfg, pl.lit(lo_s), pl.lit(hi_s)).alias(r.name)
        ).to_series()
    lo_e = r if lo is None else lo
    hi_e = r if hi is None else hi
    assert isinstance(lo_e, pl.Expr) and isinstance(hi_e, pl.Expr)
    undefined = pl.any_horizontal(e.is_null() | e.is_nan() for e in (r, lo_e, hi_e))
    return (
        pl.when(undefined)
        .then(pl.lit(None, dtype=pl.String))
        .when(lo_e > cfg.survived)
        .then(pl.lit("survived"))
        .when(hi_e < cfg.destroyed)
        .then(pl.lit("destroyed"))
        .when((lo_e >= cfg.destroyed) & (hi_e <= cfg.survived))
        .then(pl.lit("blurred"))
        .otherwise(pl.lit(INSUFFICIENT))
    )


def interval(
    r: pl.Series | np.ndarray, n_support: pl.Series | np.ndarray, cfg: SurvivalConfig
) -> tuple[pl.Series, pl.Series]:
    """(r_lo, r_hi) at ``cfg.confidence`` (`correlate.fisher_interval`); null where r is."""
    r_np = np.asarray(pl.Series(r).cast(pl.Float64).to_numpy(), dtype=np.float64)
    n_np = np.asarray(pl.Series(n_support).cast(pl.Float64).to_numpy(), dtype=np.float64)
    lo, hi = fisher_interval(r_np, np.nan_to_num(n_np, nan=0.0), cfg.confidence)
    return (
        pl.Series("r_lo", lo).fill_nan(None),
        pl.Series("r_hi", hi).fill_nan(None),
    )


def feature_table(
    fp_stats: pl.DataFrame, correlation: pl.DataFrame, cfg: SurvivalConfig = SurvivalConfig()
) -> pl.DataFrame:
    """Join FP statistics with one variant's correlations; add active, r_lo, r_hi,
    class, damage.

    ``r_lo``/``r_hi`` are r's interval at ``cfg.confidence`` from the correlation's
    ``n_support`` (recomputed here, so the survival config alone decides the classes;
    the correlation table's own bounds are at the confidence its job was given, the
    same key). ``class`` is `classify` of that interval, null for inactive features
    (their r says nothing about survival); ``damage`` = 1 - r for every feature.
    """
    for name, df, cols in (
        ("fp_stats", fp_stats, ("feature", "firing_rate")),
        ("correlation", correlation, ("feature", "r", "n_support")),
    ):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    if fp_stats.height != correlation.height:
        raise ValueError(
            f"fp_stats has {fp_stats.height} features, correlation has {correlation.height}"
        )
    # n_tokens appears on both sides; keep the FP one. The bounds are recomputed.
    # fp_fire_count is the FP firing_count again; sum and sum_sq are fp_stats' internal
    # sums (mean_when_firing and the rate are the readable forms): one name per fact.
    corr = correlation.drop(
        [c for c in correlation.columns if c in fp_stats.columns and c != "feature"]
        + [c for c in ("r_lo", "r_hi", "fp_fire_count") if c in correlation.columns]
    )
    fp_stats = fp_stats.drop([c for c in ("sum", "sum_sq") if c in fp_stats.columns])
    table = fp_stats.join(corr, on="feature", how="inner", validate="1:1")
    if table.height != fp_stats.height:
        raise ValueError("fp_stats and correlation cover different feature ids")
    table = table.sort("feature")
    r_lo, r_hi = interval(table["r"], table["n_support"], cfg)
    at = table.columns.index("r") + 1
    table = table.insert_column(at, r_hi).insert_column(at, r_lo)
    active = pl.col("firing_rate") > cfg.active_rate
    return table.with_columns(
        active.alias("active"),
        pl.when(active)
        .then(classify(pl.col("r"), cfg, pl.col("r_lo"), pl.col("r_hi")))
        .alias("class"),
        (1.0 - pl.col("r")).alias("damage"),
    )


def class_fractions(cls: pl.Expr) -> list[pl.Expr]:
    """Counts and % of active features per class (`CLASSES`, "insufficient" included, so
    the four % sum to 100); with no active feature the % are undefined (null, not NaN)."""
    n = pl.len()
    return [
        n.alias("n_active"),
        *[(cls == c).sum().alias(f"n_{c}") for c in CLASSES],
        *[pl.when(n > 0).then(100.0 * (cls == c).sum() / n).alias(f"{c}_pct") for c in CLASSES],
    ]


def summary(
    tables: dict[str, pl.DataFrame], perplexity: pl.DataFrame | None = None
) -> pl.DataFrame:
    """One row per variant: n_active, class counts and % of active features, mean
    and median r over active features; perplexity columns (a frame with a
    ``variant`` column) left-joined when given. Where the tables carry ``stable``
    (`seed_turnover`), also unstable_pct (% of active features not seed-stable) and
    destroyed_unstable_pct (% of destroyed features not seed-stable; null with none
    destroyed): 'destroyed' read against features not stable even without compression."""
    rows = []
    for variant, table in tables.items():
        active = table.filter(pl.col("active"))
        row = active.select(
            *class_fractions(pl.col("class")),
            pl.col("r").mean().alias("mean_r"),
            pl.col("r").median().alias("median_r"),
            (pl.col("flag") == "variant_silent").sum().alias("n_variant_silent")
            if "flag" in active.columns
            else pl.lit(0, dtype=pl.UInt32).alias("n_variant_silent"),
            *(_turnover_columns() if "stable" in active.columns else []),
        ).with_columns(pl.lit(variant).alias("variant"))
        rows.append(row)
    if not rows:
        raise ValueError("no variant tables given")
    out = pl.concat(rows, how="vertical_relaxed").select("variant", pl.exclude("variant"))
    if perplexity is not None:
        if "variant" not in perplexity.columns:
            raise ValueError("perplexity frame needs a 'variant' column")
        out = out.join(perplexity, on="variant", how="left")
    return out


def _turnover_columns() -> list[pl.Expr]:
    unstable = ~pl.col("stable")
    destroyed = pl.col("class") == "destroyed"
    n_destroyed = destroyed.sum()
    return [
        pl.when(pl.len() > 0).then(100.0 * unstable.sum() / pl.len()).alias("unstable_pct"),
        pl.when(n_destroyed > 0)
        .then(100.0 * (destroyed & unstable).sum() / n_destroyed)
        .alias("destroyed_unstable_pct"),
    ]


def survival_tables(
    fp_stats: pl.DataFrame,
    correlations: dict[str, pl.DataFrame],
    perplexity: pl.DataFrame | None,
    cfg: SurvivalConfig,
    turnover: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per feature and variant: the long features table, per variant: the summary).

    With a seed-turnover table (`seed_turnover.turnover_table`) each feature also carries
    ``stable``, and the summary its read-against shares (`summary`)."""
    if turnover is not None and set(turnover["feature"]) != set(fp_stats["feature"]):
        raise ValueError("seed_turnover and fp_stats cover different feature ids")
    tables = {v: feature_table(fp_stats, corr, cfg) for v, corr in correlations.items()}
    if turnover is not None:
        stable = turnover.select("feature", "stable")
        tables = {v: t.join(stable, on="feature", how="left") for v, t in tables.items()}
    long = pl.concat(
        [t.with_columns(pl.lit(v).alias("variant")) for v, t in tables.items()],
        how="vertical_relaxed",
    )
    return long.select("variant", pl.exclude("variant")), summary(tables, perplexity)


def with_sparsity(summary_table: pl.DataFrame, matched: Mapping[str, float]) -> pl.DataFrame:
    """The summary with a ``sparsity`` column after ``variant``: the fraction of block-matrix
    weights pruned, from the name for ``prune-S`` and from the matched search's result
    (`matched`, variant -> chosen sparsity) for ``prune-matched-*``; null for the rest."""
    from .variants import parse_variant

    values: list[float | None] = []
    for name in summary_table["variant"].to_list():
        if name in matched:
            values.append(float(matched[name]))
            continue
        try:
            variant = parse_variant(str(name))
        except ValueError:
            variant = None
        if variant is not None and variant.kind == "prune-matched":
            raise ValueError(f"no matched-search result given for {name}")
        values.append(variant.sparsity if variant is not None and variant.kind == "prune" else None)
    at = summary_table.columns.index("variant") + 1
    return summary_table.insert_column(at, pl.Series("sparsity", values, dtype=pl.Float64))
