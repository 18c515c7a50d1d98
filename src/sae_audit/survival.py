"""Feature classes (survived / blurred / destroyed) and per-variant summaries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import polars as pl

from .config import FROM_SCHEMA, ConfigSection, check_survival_thresholds

CLASSES = ("survived", "blurred", "destroyed")


@dataclass(frozen=True)
class SurvivalConfig(ConfigSection, section="analysis"):
    """Thresholds: active means FP firing rate > active_rate; classes cut r."""

    active_rate: float = FROM_SCHEMA
    survived: float = FROM_SCHEMA
    destroyed: float = FROM_SCHEMA

    def _check(self) -> None:
        check_survival_thresholds(self.to_dict(), self.section)


@overload
def classify(r: pl.Expr, cfg: SurvivalConfig = ...) -> pl.Expr: ...
@overload
def classify(r: pl.Series, cfg: SurvivalConfig = ...) -> pl.Series: ...
def classify(r: pl.Expr | pl.Series, cfg: SurvivalConfig = SurvivalConfig()) -> pl.Expr | pl.Series:
    """Class of each r: survived r > survived; blurred destroyed <= r <= survived;
    destroyed r < destroyed. Null or NaN r gives a null class (polars orders NaN
    above every number, so it must not reach the comparisons)."""
    if isinstance(r, pl.Series):
        return pl.select(classify(pl.lit(r), cfg).alias(r.name)).to_series()
    return (
        pl.when(r.is_null() | r.is_nan())
        .then(pl.lit(None, dtype=pl.String))
        .when(r > cfg.survived)
        .then(pl.lit("survived"))
        .when(r >= cfg.destroyed)
        .then(pl.lit("blurred"))
        .otherwise(pl.lit("destroyed"))
    )


def feature_table(
    fp_stats: pl.DataFrame, correlation: pl.DataFrame, cfg: SurvivalConfig = SurvivalConfig()
) -> pl.DataFrame:
    """Join FP statistics with one variant's correlations; add active, class, damage.

    ``class`` is null for inactive features (their r says nothing about
    survival); ``damage`` = 1 - r for every feature.
    """
    for name, df, cols in (
        ("fp_stats", fp_stats, ("feature", "firing_rate")),
        ("correlation", correlation, ("feature", "r")),
    ):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    if fp_stats.height != correlation.height:
        raise ValueError(
            f"fp_stats has {fp_stats.height} features, correlation has {correlation.height}"
        )
    # n_tokens appears on both sides; keep the FP one.
    corr = correlation.drop(
        [c for c in correlation.columns if c in fp_stats.columns and c != "feature"]
    )
    table = fp_stats.join(corr, on="feature", how="inner", validate="1:1")
    if table.height != fp_stats.height:
        raise ValueError("fp_stats and correlation cover different feature ids")
    active = pl.col("firing_rate") > cfg.active_rate
    return table.sort("feature").with_columns(
        active.alias("active"),
        pl.when(active).then(classify(pl.col("r"), cfg)).alias("class"),
        (1.0 - pl.col("r")).alias("damage"),
    )


def class_fractions(cls: pl.Expr) -> list[pl.Expr]:
    """Counts and % of active features per class; with no active feature the % are
    undefined (null, not NaN)."""
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
    ``variant`` column) left-joined when given."""
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


def survival_tables(
    fp_stats: pl.DataFrame,
    correlations: dict[str, pl.DataFrame],
    perplexity: pl.DataFrame | None,
    cfg: SurvivalConfig,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per feature and variant: the long features table, per variant: the summary)."""
    tables = {v: feature_table(fp_stats, corr, cfg) for v, corr in correlations.items()}
    long = pl.concat(
        [t.with_columns(pl.lit(v).alias("variant")) for v, t in tables.items()],
        how="vertical_relaxed",
    )
    return long.select("variant", pl.exclude("variant")), summary(tables, perplexity)
