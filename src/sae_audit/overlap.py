"""Do two compression variants damage the same features?"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from .config import FROM_SCHEMA, ConfigSection


def jaccard(a: set[int], b: set[int]) -> float | None:
    """|a & b| / |a | b|; None for two empty sets, where it is undefined.

    Two variants that damage nothing do not "damage the same features": reporting 1.0
    there would read as perfect agreement, so the table holds null and a reason.
    """
    union = a | b
    return None if not union else len(a & b) / len(union)


def _correlation(fn: Any, x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    """scipy correlation and p-value; None (not NaN, not an exception) when undefined."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fn(x, y)
    stat, pvalue = float(res.statistic), float(res.pvalue)
    if not (np.isfinite(stat) and np.isfinite(pvalue)):
        return None, None
    return stat, pvalue


def overlap(table_a: pl.DataFrame, table_b: pl.DataFrame) -> dict[str, Any]:
    """Overlap of two variants' damage over features active in both tables.

    Both tables come from the same FP statistics, so their active sets should
    agree; the intersection is used regardless and both sizes are reported.
    Jaccard of the non-surviving (blurred or destroyed), blurred and destroyed
    sets, and Spearman and Pearson of the damage scores. An undefined number (the
    Jaccard of two empty sets, a correlation with a constant side or fewer than two
    features) is None, and `reason` says which and why.
    """
    cols = ["feature", "active", "class", "damage"]
    for name, t in (("table_a", table_a), ("table_b", table_b)):
        missing = [c for c in cols if c not in t.columns]
        if missing:
            raise ValueError(f"{name} lacks columns {missing}")
    joined = (
        table_a.select(cols)
        .join(table_b.select(cols), on="feature", how="inner", suffix="_b", validate="1:1")
        .filter(pl.col("active") & pl.col("active_b"))
        .sort("feature")
    )

    def members(col: str, classes: tuple[str, ...]) -> set[int]:
        return set(joined.filter(pl.col(col).is_in(classes)).get_column("feature").to_list())

    spearman, spearman_p = _correlation(
        stats.spearmanr, joined["damage"].to_numpy(), joined["damage_b"].to_numpy()
    )
    pearson, pearson_p = _correlation(
        stats.pearsonr, joined["damage"].to_numpy(), joined["damage_b"].to_numpy()
    )
    reasons = []
    if spearman is None:
        reasons.append(
            "spearman/pearson undefined: fewer than 2 shared active features or a constant damage"
        )
    out: dict[str, Any] = {
        "n": joined.height,
        "n_active_a": int(table_a["active"].sum()),
        "n_active_b": int(table_b["active"].sum()),
        "spearman": spearman,
        "spearman_p": spearman_p,
        "pearson": pearson,
        "pearson_p": pearson_p,
    }
    for label, classes in (
        ("nonsurviving", ("blurred", "destroyed")),
        ("blurred", ("blurred",)),
        ("destroyed", ("destroyed",)),
    ):
        a, b = members("class", classes), members("class_b", classes)
        out[f"n_{label}_a"] = len(a)
        out[f"n_{label}_b"] = len(b)
        out[f"jaccard_{label}"] = jaccard(a, b)
        if out[f"jaccard_{label}"] is None:
            reasons.append(f"jaccard_{label} undefined: no {label} features under either variant")
    out["reason"] = "; ".join(reasons) or None
    return out


def overlap_table(tables: dict[str, pl.DataFrame], pairs: list[list[str]]) -> pl.DataFrame:
    """One row per variant pair (`overlap` of their feature tables); undefined numbers null."""
    rows = [{"variant_a": a, "variant_b": b, **overlap(tables[a], tables[b])} for a, b in pairs]
    if not rows:
        return pl.DataFrame(rows)
    # Undefined numbers are None, never NaN; their columns stay Float64 when all are None.
    return pl.DataFrame(rows, infer_schema_length=None).with_columns(
        pl.col(r"^(jaccard|spearman|pearson).*$").cast(pl.Float64),
        pl.col("reason").cast(pl.String),
    )


@dataclass(frozen=True)
class OverlapConfig(ConfigSection, section="overlap"):
    """Config section `overlap`: the variant pairs compared (config.overlap_pairs resolves
    the empty default, and config.validate checks that each names a configured variant)."""

    pairs: tuple[tuple[str, str], ...] = FROM_SCHEMA
