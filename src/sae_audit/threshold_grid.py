"""How much do the class thresholds matter? Class shares over a grid of thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .config import FROM_SCHEMA, ConfigSection, check_threshold_grid
from .survival import SurvivalConfig, class_fractions, classify


@dataclass(frozen=True)
class ThresholdGridConfig(ConfigSection, section="threshold_grid"):
    """Config section `threshold_grid`: the survived and destroyed thresholds to try."""

    survived: tuple[float, ...] = FROM_SCHEMA
    destroyed: tuple[float, ...] = FROM_SCHEMA

    def _check(self) -> None:
        check_threshold_grid(self.to_dict(), self.section)


def threshold_grid(
    feature_tables: dict[str, pl.DataFrame], cfg: ThresholdGridConfig
) -> pl.DataFrame:
    """Class fractions (% of active features) for every (survived, destroyed)
    threshold pair with destroyed <= survived; other pairs are skipped.

    Each feature keeps the interval on r of its features table (``r_lo``, ``r_hi``, at
    ``analysis.confidence``), so "insufficient" is a class here too: a threshold moved
    into a feature's interval makes it insufficient rather than flipping its class."""
    rows = []
    for variant, table in feature_tables.items():
        missing = [c for c in ("active", "r", "r_lo", "r_hi") if c not in table.columns]
        if missing:
            raise ValueError(f"features table of {variant!r} lacks columns {missing}")
        active = table.filter(pl.col("active"))
        for s in cfg.survived:
            for d in cfg.destroyed:
                if d > s:
                    continue
                cut = SurvivalConfig(survived=float(s), destroyed=float(d))
                cls = classify(pl.col("r"), cut, pl.col("r_lo"), pl.col("r_hi"))
                rows.append(
                    active.select(*class_fractions(cls)).with_columns(
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
