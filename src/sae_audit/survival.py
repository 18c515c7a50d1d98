"""Feature classes (survived / blurred / destroyed) and per-variant summaries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import polars as pl

CLASSES = ("survived", "blurred", "destroyed")


@dataclass(frozen=True)
class SurvivalConfig:
    """Thresholds: active means FP firing rate > active_rate; classes cut r."""

    active_rate: float = 0.001
    survived: float = 0.9
    destroyed: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.active_rate < 1.0:
            raise ValueError(f"active_rate must be in [0, 1), got {self.active_rate}")
        if not 0.0 <= self.survived <= 1.0:
            raise ValueError(f"survived must be in [0, 1], got {self.survived}")
        if not 0.0 <= self.destroyed <= self.survived:
            raise ValueError(
                f"destroyed must be in [0, survived={self.survived}], got {self.destroyed}"
            )


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


def _class_fractions(cls: pl.Expr) -> list[pl.Expr]:
    n = pl.len()
    return [
        n.alias("n_active"),
        *[(cls == c).sum().alias(f"n_{c}") for c in CLASSES],
        *[(100.0 * (cls == c).sum() / n).alias(f"{c}_pct") for c in CLASSES],
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
            *_class_fractions(pl.col("class")),
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


def threshold_grid(
    feature_tables: dict[str, pl.DataFrame],
    survived_grid: Sequence[float],
    destroyed_grid: Sequence[float],
) -> pl.DataFrame:
    """Class fractions (% of active features) for every (survived, destroyed)
    threshold pair with destroyed <= survived; other pairs are skipped."""
    rows = []
    for variant, table in feature_tables.items():
        active = table.filter(pl.col("active"))
        for s in survived_grid:
            for d in destroyed_grid:
                if d > s:
                    continue
                cfg = SurvivalConfig(survived=float(s), destroyed=float(d))
                rows.append(
                    active.select(*_class_fractions(classify(pl.col("r"), cfg))).with_columns(
                        pl.lit(variant).alias("variant"),
                        pl.lit(float(s)).alias("survived_threshold"),
                        pl.lit(float(d)).alias("destroyed_threshold"),
                    )
                )
    if not rows:
        raise ValueError(
            "threshold grid is empty (no variant, or no pair with destroyed <= survived)"
        )
    return pl.concat(rows, how="vertical_relaxed").select(
        "variant",
        "survived_threshold",
        "destroyed_threshold",
        pl.exclude("variant", "survived_threshold", "destroyed_threshold"),
    )
