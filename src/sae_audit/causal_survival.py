"""Causal survival beside Pearson survival: the join, the per-variant summary, and the
features where the two disagree, with their contexts (torch-free: the tables' side of
issue 14; the interventions themselves are sae_audit.causal).

Two ways the two measures dissociate, per feature and variant:
- ``fires_same_acts_differently``: Pearson survived (the compressed model fires it on the
  same tokens) but causally blurred or destroyed (the rest of the network no longer
  reads it the same way);
- ``acts_same_fires_differently``: Pearson blurred or destroyed, causally survived.
Features of insufficient evidence under either measure dissociate in no direction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .damaged_contexts import ContextConfig, damaged_contexts
from .files import InputError
from .shards import Expected
from .survival import CLASSES, INSUFFICIENT

FIRES_SAME = "fires_same_acts_differently"
ACTS_SAME = "acts_same_fires_differently"
_SURVIVED = CLASSES[0]
_DAMAGED = [c for c in CLASSES if c not in (_SURVIVED, INSUFFICIENT)]


def join_pearson(causal: pl.DataFrame, features: pl.DataFrame) -> pl.DataFrame:
    """The causal rows with each feature's Pearson r and class under the same variant, and
    which way the two disagree (``dissociation``, null where they agree)."""
    pearson = features.select("variant", "feature", "r", pl.col("class").alias("pearson_class"))
    joined = causal.join(pearson, on=["variant", "feature"], how="left")
    missing = joined.filter(pl.col("r").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise InputError(
            f"feature {first['feature']} of {first['variant']!r} has a causal row but no "
            "Pearson r in features.parquet (tables of different runs); re-run with "
            "`snakemake --cores all --forcerun survival causal`"
        )
    causal_class, pearson_class = pl.col("causal_class"), pl.col("pearson_class")
    return joined.with_columns(
        pl.when((pearson_class == _SURVIVED) & causal_class.is_in(_DAMAGED))
        .then(pl.lit(FIRES_SAME))
        .when(pearson_class.is_in(_DAMAGED) & (causal_class == _SURVIVED))
        .then(pl.lit(ACTS_SAME))
        .otherwise(pl.lit(None, dtype=pl.String))
        .alias("dissociation")
    )


def _pct(condition: pl.Expr) -> pl.Expr:
    return pl.when(pl.len() > 0).then(100.0 * condition.sum() / pl.len())


def causal_summary(joined: pl.DataFrame) -> pl.DataFrame:
    """One row per variant (in the order of first appearance): class shares of the measured
    features under both measures, how often they agree, and the two dissociations."""
    both_classed = (pl.col("causal_class") != INSUFFICIENT) & (
        pl.col("pearson_class") != INSUFFICIENT
    )
    agree = pl.col("causal_class") == pl.col("pearson_class")
    return (
        joined.group_by("variant", maintain_order=True)
        .agg(
            pl.len().alias("n_features"),
            *[_pct(pl.col("causal_class") == c).alias(f"causal_{c}_pct") for c in CLASSES],
            *[_pct(pl.col("pearson_class") == c).alias(f"pearson_{c}_pct") for c in CLASSES],
            both_classed.sum().alias("n_both_classed"),
            pl.when(both_classed.sum() > 0)
            .then(100.0 * (agree & both_classed).sum() / both_classed.sum())
            .alias("same_class_pct"),
            (pl.col("dissociation") == FIRES_SAME).sum().alias(f"n_{FIRES_SAME}"),
            (pl.col("dissociation") == ACTS_SAME).sum().alias(f"n_{ACTS_SAME}"),
            pl.col("causal_agreement").median().alias("median_causal_agreement"),
            pl.col("r").median().alias("median_r"),
        )
        .with_columns(pl.col(pl.UInt32).cast(pl.Int64))
    )


def disagreements(
    joined: pl.DataFrame,
    fp_paths: Sequence[str | Path],
    variant_paths: Mapping[str, Sequence[str | Path]],
    token_ids: np.ndarray,
    tokenizer: Any,
    cfg: ContextConfig,
    expect: Expected | None = None,
) -> pl.DataFrame:
    """Every dissociated (feature, variant) with its top FP contexts and the variant's
    activation there (``damaged_contexts``' reading of the shards), the feature's numbers
    under both measures beside them. The null variants' dissociations (run-to-run noise)
    have no contexts: damaged_contexts passes over them."""
    rows = joined.filter(pl.col("dissociation").is_not_null())
    columns = ["variant", "feature", "dissociation", "r", "pearson_class", "causal_agreement",
               "causal_class", "ablation_kl_r", "ablation_logit_cos", "steering_kl_r",
               "steering_logit_cos", "direct_logit_cos"]  # fmt: skip
    rows = rows.select(columns)
    if rows.is_empty():
        return rows.with_columns(
            pl.lit(None, dtype=pl.Int64).alias("context_rank"),
            pl.lit(None, dtype=pl.Int64).alias("position"),
            pl.lit(None, dtype=pl.String).alias("context"),
            pl.lit(None, dtype=pl.Float64).alias("fp_value"),
            pl.lit(None, dtype=pl.Float64).alias("variant_value"),
        ).clear()
    probe = rows.select("variant", "feature", pl.lit(True).alias("active"), "r")
    most = int(probe.group_by("variant").len()["len"].max())  # type: ignore[arg-type]
    wanted = {str(v) for v in probe["variant"].unique()}
    found = damaged_contexts(
        probe,
        fp_paths,
        {v: p for v, p in variant_paths.items() if v in wanted},
        token_ids,
        tokenizer,
        dataclasses.replace(cfg, n_features=most),
        expect=expect,
        check_variants=True,
    ).filter(pl.col("where_fires") == "fp")
    contexts = found.select(
        "variant", "feature", "context_rank", pl.col("position").cast(pl.Int64), "context",
        pl.col("fp_value").cast(pl.Float64), pl.col("variant_value").cast(pl.Float64),
    )  # fmt: skip
    return rows.join(contexts, on=["variant", "feature"], how="left").sort(
        ["variant", "dissociation", "causal_agreement", "feature", "context_rank"],
        nulls_last=True,
    )
