"""Do two compression variants damage the same features? Each number beside its baseline.

Jaccard of two damaged sets beside the Jaccard expected by chance for sets of those
sizes (`chance_jaccard`) and a one-sided hypergeometric p-value of the overlap
(`overlap_p`); the damage Spearman beside a permutation p-value (`permutation_p`) and
beside the Spearman between the second variant's damage and the null variant's
(``spearman_null``: how much of the agreement any perturbation, even a negligible one,
would show, because damage ranks track how noisy a feature's r is at all; the null is the
numeric-noise variant fp-noise where the run has one, else the rerun fp-null).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from .config import FROM_SCHEMA, ConfigSection
from .survival import INSUFFICIENT
from .table_docs import polars_schema
from .variants import parse_variant

# Permutations of the permutation p-value, and their seed: fixed, so the table is
# reproducible; the smallest p it can give is 1 / (N_PERMUTATIONS + 1).
N_PERMUTATIONS = 999
PERMUTATION_SEED = 0


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


def chance_jaccard(n: int, a: int, b: int) -> float | None:
    """Expected Jaccard of a set of size ``a`` and a uniformly random ``b``-subset of the
    same ``n`` items (the same if both are random): exact, over the hypergeometric
    distribution of K = |A & B| ~ Hypergeom(n, a, b), E[K / (a + b - K)]. None when
    a = b = 0, where the Jaccard is undefined. (E|A & B| = ab / n, and
    E[K] / (a + b - E[K]) is its first-order approximation.)"""
    if not 0 <= a <= n or not 0 <= b <= n:
        raise ValueError(f"set sizes {a}, {b} must be in [0, n={n}]")
    if a + b == 0:
        return None
    k = np.arange(max(0, a + b - n), min(a, b) + 1)
    pmf = stats.hypergeom.pmf(k, n, a, b)
    return float(np.sum(pmf * k / (a + b - k)))


def overlap_p(n: int, a: int, b: int, k: int) -> float | None:
    """One-sided hypergeometric p-value of an intersection of at least ``k`` between sets
    of sizes ``a`` and ``b`` drawn from ``n`` items: P(K >= k). None when a = b = 0."""
    if a + b == 0:
        return None
    return float(min(1.0, max(0.0, stats.hypergeom.sf(k - 1, n, a, b))))


def permutation_p(
    x: np.ndarray, y: np.ndarray, observed: float, n_perm: int = N_PERMUTATIONS
) -> float:
    """One-sided permutation p-value of a Spearman correlation: the share of random
    pairings (y permuted, ``PERMUTATION_SEED``) whose Spearman is at least ``observed``,
    counting the observed pairing: (1 + #{rho_perm >= rho}) / (1 + n_perm)."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    zx = (rx - rx.mean()) / rx.std()
    zy = (ry - ry.mean()) / ry.std()
    rng = np.random.default_rng(PERMUTATION_SEED)
    hits = sum(
        float(zx @ zy[rng.permutation(zy.size)]) / zx.size >= observed - 1e-12
        for _ in range(n_perm)
    )
    return (1 + hits) / (1 + n_perm)


def _damage(table: pl.DataFrame, name: str) -> pl.DataFrame:
    return table.filter(pl.col("active")).select("feature", pl.col("damage").alias(name))


def overlap(
    table_a: pl.DataFrame,
    table_b: pl.DataFrame,
    null_table: pl.DataFrame | None = None,
    null_name: str | None = None,
) -> dict[str, Any]:
    """Overlap of two variants' damage over features active in both tables, with baselines.

    Both tables come from the same FP statistics, so their active sets should
    agree; the intersection is used regardless and both sizes are reported.

    - Spearman and Pearson of the damage scores over those features (``n``), the
      Spearman's permutation p-value (``spearman_perm_p``, `permutation_p`), and
      ``spearman_null``: the Spearman between variant b's damage and the null
      variant's (``null_table``, named ``null_variant``; `null_spearman`) over features
      active in both. A Spearman well above its null says the two compressions share
      more than the ranking any perturbation induces; with no null variant, or an
      undamaged one (an identical rerun: constant damage), it is None.
    - Jaccard of the non-surviving (blurred or destroyed), blurred and destroyed sets,
      over the features *classed* under both variants (``n_classed``: not
      "insufficient" under either, so a feature whose class one variant cannot decide
      counts in no set); beside each, ``n_<set>_both`` = |A & B|, the chance Jaccard
      (`chance_jaccard` with n = n_classed) and the hypergeometric p-value of the
      overlap (`overlap_p`).

    An undefined number (the Jaccard of two empty sets, a correlation with a constant
    side or fewer than two features) is None, and `reason` says which and why.
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
    classed = joined.filter(
        pl.col("class").is_not_null()
        & pl.col("class_b").is_not_null()
        & (pl.col("class") != INSUFFICIENT)
        & (pl.col("class_b") != INSUFFICIENT)
    )

    def members(col: str, classes: tuple[str, ...]) -> set[int]:
        return set(classed.filter(pl.col(col).is_in(classes)).get_column("feature").to_list())

    da, db = joined["damage"].to_numpy(), joined["damage_b"].to_numpy()
    spearman, spearman_p = _correlation(stats.spearmanr, da, db)
    pearson, pearson_p = _correlation(stats.pearsonr, da, db)
    reasons = []
    if spearman is None:
        reasons.append(
            "spearman/pearson undefined: fewer than 2 shared active features or a constant damage"
        )
    spearman_null = None
    if null_table is None:
        reasons.append(
            "spearman_null undefined: no null variant (fp-noise, fp-null) in the run besides "
            "the pair"
        )
    else:
        spearman_null = null_spearman(table_b, null_table)
        if spearman_null is None:
            reasons.append(
                f"spearman_null undefined: the null variant {null_name!r} damages no feature "
                "(constant damage) or shares fewer than 2 active features"
            )
    out: dict[str, Any] = {
        "n": joined.height,
        "n_active_a": int(table_a["active"].sum()),
        "n_active_b": int(table_b["active"].sum()),
        "spearman": spearman,
        "spearman_p": spearman_p,
        "spearman_perm_p": None if spearman is None else permutation_p(da, db, spearman),
        "null_variant": null_name if null_table is not None else None,
        "spearman_null": spearman_null,
        "pearson": pearson,
        "pearson_p": pearson_p,
        "n_classed": classed.height,
    }
    for label, classes in (
        ("nonsurviving", ("blurred", "destroyed")),
        ("blurred", ("blurred",)),
        ("destroyed", ("destroyed",)),
    ):
        a, b = members("class", classes), members("class_b", classes)
        out[f"n_{label}_a"] = len(a)
        out[f"n_{label}_b"] = len(b)
        out[f"n_{label}_both"] = len(a & b)
        out[f"jaccard_{label}"] = jaccard(a, b)
        out[f"jaccard_{label}_chance"] = chance_jaccard(classed.height, len(a), len(b))
        out[f"jaccard_{label}_p"] = overlap_p(classed.height, len(a), len(b), len(a & b))
        if out[f"jaccard_{label}"] is None:
            reasons.append(f"jaccard_{label} undefined: no {label} features under either variant")
    out["reason"] = "; ".join(reasons) or None
    return out


# Kinds of null variant, in order of preference: the numeric-noise null (fp-noise, the FP
# weights through another numeric path) perturbs every feature a little; an identical
# rerun (fp-null) damages nothing, so its damage is constant and its Spearman undefined.
NULL_KINDS = ("noise", "null")


def null_variants(names: list[str]) -> list[str]:
    """The null variants among ``names`` (kinds `NULL_KINDS`), in order of preference."""
    kinds = {}
    for name in names:
        try:
            kind = parse_variant(name).kind
        except ValueError:
            continue
        if kind in NULL_KINDS:
            kinds[name] = NULL_KINDS.index(kind)
    return sorted(kinds, key=lambda n: (kinds[n], names.index(n)))


def null_spearman(table_b: pl.DataFrame, null_table: pl.DataFrame) -> float | None:
    """Spearman between variant b's damage and a null variant's, over features active in
    both; None when undefined (fewer than 2 features, or a constant damage)."""
    with_null = _damage(table_b, "b").join(
        _damage(null_table, "null"), on="feature", how="inner", validate="1:1"
    )
    rho, _ = _correlation(stats.spearmanr, with_null["b"].to_numpy(), with_null["null"].to_numpy())
    return rho


def overlap_table(tables: dict[str, pl.DataFrame], pairs: list[list[str]]) -> pl.DataFrame:
    """One row per variant pair (`overlap` of their feature tables); undefined numbers null.

    The null of ``spearman_null`` is the first of the run's null variants (`null_variants`:
    fp-noise, then fp-null) that is not in the pair and gives a defined Spearman, else the
    first one not in the pair (its Spearman null, with the reason)."""
    nulls = null_variants(list(tables))
    rows = []
    for a, b in pairs:
        # a pair that holds a null variant itself compares with another one only
        candidates = [n for n in nulls if n not in (a, b)]
        defined = [n for n in candidates if null_spearman(tables[b], tables[n]) is not None]
        null = (defined or candidates or [None])[0]
        rows.append(
            {
                "variant_a": a,
                "variant_b": b,
                **overlap(tables[a], tables[b], tables[null] if null else None, null),
            }
        )
    if not rows:  # no pair configured: no rows, but the documented columns
        return pl.DataFrame(schema=polars_schema("overlap"))
    # Undefined numbers are None, never NaN; their columns stay Float64 when all are None.
    return pl.DataFrame(rows, infer_schema_length=None).with_columns(
        pl.col(r"^(jaccard|spearman|pearson).*$").cast(pl.Float64),
        pl.col("null_variant", "reason").cast(pl.String),
    )


@dataclass(frozen=True)
class OverlapConfig(ConfigSection, section="overlap"):
    """Config section `overlap`: the variant pairs compared (config.overlap_pairs resolves
    the empty default, and config.validate checks that each names a configured variant)."""

    pairs: tuple[tuple[str, str], ...] = FROM_SCHEMA
