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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .damaged_contexts import ContextConfig, chosen_contexts
from .files import InputError
from .shards import Expected
from .survival import CLASSES, INSUFFICIENT
from .table_docs import polars_schema

FIRES_SAME = "fires_same_acts_differently"
ACTS_SAME = "acts_same_fires_differently"
_SURVIVED = CLASSES[0]
_DAMAGED = [c for c in CLASSES if c not in (_SURVIVED, INSUFFICIENT)]


def causal_classes(
    agreement: np.ndarray,
    ablation_flag: np.ndarray,
    steering_flag: np.ndarray,
    ablation_kl_ratio: np.ndarray,
    steering_kl_ratio: np.ndarray,
    *,
    survived: float,
    destroyed: float,
    kl_ratio_band: float,
) -> np.ndarray:
    """The causal class of each feature from its measured agreement (sae_audit.causal):

    - insufficient: it never fires in FP on the measured sequences (ablation_flag
      fp_silent), or steering has no effect in FP (steering_flag fp_no_effect);
    - destroyed: it never fires in the variant (variant_silent), or agreement < destroyed;
    - survived: agreement > survived and both KL ratios within [1/band, band];
    - blurred: the rest.

    Kept out of the forward-pass job, so the thresholds (causal.survived, destroyed,
    kl_ratio_band) re-class the measured features without a forward pass.
    """
    agreement = np.asarray(agreement, dtype=np.float64)
    ablation_flag = np.asarray(ablation_flag, dtype=object)
    steering_flag = np.asarray(steering_flag, dtype=object)
    band = float(kl_ratio_band)

    def in_band(ratio: np.ndarray) -> np.ndarray:
        ratio = np.asarray(ratio, dtype=np.float64)
        return (ratio >= 1.0 / band) & (ratio <= band)

    insufficient = (ablation_flag == "fp_silent") | (steering_flag == "fp_no_effect")
    lost = ~insufficient & ((ablation_flag == "variant_silent") | (agreement < destroyed))
    kept = (
        ~insufficient
        & ~lost
        & (agreement > survived)
        & in_band(ablation_kl_ratio)
        & in_band(steering_kl_ratio)
    )
    return np.where(
        insufficient,
        INSUFFICIENT,
        np.where(lost, "destroyed", np.where(kept, _SURVIVED, "blurred")),
    )


def with_causal_class(
    causal: pl.DataFrame, *, survived: float, destroyed: float, kl_ratio_band: float
) -> pl.DataFrame:
    """The causal rows (the `causal` stage's table) with ``causal_class`` (causal_classes)."""
    classes = causal_classes(
        causal["causal_agreement"].to_numpy(),
        causal["ablation_flag"].to_numpy(),
        causal["steering_flag"].to_numpy(),
        causal["ablation_kl_ratio"].to_numpy(),
        causal["steering_kl_ratio"].to_numpy(),
        survived=survived,
        destroyed=destroyed,
        kl_ratio_band=kl_ratio_band,
    )
    return causal.with_columns(pl.Series("causal_class", classes.tolist(), dtype=pl.String))


def join_pearson(
    causal: pl.DataFrame, features: pl.DataFrame, thresholds: Mapping[str, float]
) -> pl.DataFrame:
    """The causal rows with their causal class at `thresholds` (causal.survived,
    destroyed, kl_ratio_band), each feature's Pearson r and class under the same variant,
    and which way the two disagree (``dissociation``, null where they agree)."""
    causal = with_causal_class(
        causal,
        survived=thresholds["survived"],
        destroyed=thresholds["destroyed"],
        kl_ratio_band=thresholds["kl_ratio_band"],
    )
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
    schema = polars_schema("causal_disagreements")  # tables.schema.yaml
    if rows.is_empty():
        return pl.DataFrame(schema=schema)
    found = chosen_contexts(
        rows.select("variant", "feature", "r"), fp_paths, variant_paths, token_ids, tokenizer,
        cfg, expect=expect, check_variants=True,
    )  # fmt: skip
    contexts = found.select(
        "variant", "feature", "context_rank", pl.col("position").cast(pl.Int64), "context",
        pl.col("fp_value").cast(pl.Float64), pl.col("variant_value").cast(pl.Float64),
    )  # fmt: skip
    found = rows.join(contexts, on=["variant", "feature"], how="left").sort(
        ["variant", "dissociation", "causal_agreement", "feature", "context_rank"],
        nulls_last=True,
    )
    return found.select(list(schema)).cast(schema)  # type: ignore[arg-type]
