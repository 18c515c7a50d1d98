"""What was lost: the top-activating FP contexts of the most damaged features, and what
appeared: the contexts where only the compressed model fires them.

Each row is one context of one feature under one variant: ``where_fires`` is "fp" for the
feature's top FP contexts (with the variant's activation there) and "variant_only" for
the variant's top contexts at positions where FP does not fire it (``fp_value`` 0).
``position`` is the context's index in the evaluation token set (sequence * seq_len +
offset), ``token_id`` the token there."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .config import FROM_SCHEMA, ConfigSection
from .files import InputError, rerun_hint
from .overlap import null_variants
from .shards import Expected, pair_shards
from .survival import CLASSES, INSUFFICIENT
from .table_docs import polars_schema

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"


@dataclass(frozen=True)
class ContextConfig(ConfigSection, section="damaged_contexts"):
    """How many damaged features, contexts per feature and context tokens are shown."""

    n_features: int = FROM_SCHEMA
    n_contexts: int = FROM_SCHEMA
    window: int = FROM_SCHEMA


def most_damaged(features: pl.DataFrame, n: int) -> pl.DataFrame:
    """Per variant, the n active features with the lowest r (ties by feature id). With a
    ``class`` column, only damaged features count: "survived" ones are not damaged, and
    "insufficient" ones are passed over (their interval on r straddles a class threshold,
    so their damage is not established); a variant with no damaged feature has no rows.
    The null variants (fp-null, fp-noise) are left out: their damage is the floor."""
    damaged = (
        (~pl.col("class").is_in([INSUFFICIENT, CLASSES[0]])).fill_null(True)
        if "class" in features.columns
        else pl.lit(True)
    )
    nulls = null_variants([str(v) for v in features["variant"].unique(maintain_order=True)])
    return (
        features.filter(pl.col("active") & damaged & ~pl.col("variant").is_in(nulls))
        .sort(["variant", "r", "feature"])
        .group_by("variant", maintain_order=True)
        .head(n)
        .with_columns(pl.int_range(1, pl.len() + 1).over("variant").alias("damage_rank"))
        .select("variant", "feature", "damage_rank", "r")
    )


def render_context(ids: np.ndarray, token: int, seq_len: int, window: int, tokenizer: Any) -> str:
    """Decoded text of the window ending at `token` (same sequence), the token marked."""
    start = max((token // seq_len) * seq_len, token - window)
    stop = min((token // seq_len + 1) * seq_len, token + 4)
    before = tokenizer.decode(ids[start:token].tolist())
    here = tokenizer.decode([int(ids[token])])
    after = tokenizer.decode(ids[token + 1 : stop].tolist())
    return f"{before}{MARK_OPEN}{here}{MARK_CLOSE}{after}".replace("\n", "⏎")


def damaged_contexts(
    features: pl.DataFrame,
    fp_paths: Sequence[str | Path],
    variant_paths: Mapping[str, Sequence[str | Path]],
    token_ids: np.ndarray,
    tokenizer: Any,
    cfg: ContextConfig,
    expect: Expected | None = None,
    check_variants: bool = False,
) -> pl.DataFrame:
    """For each variant's most damaged features: top FP contexts and the variant's value there.

    Reads only the rows of the chosen features (Parquet predicate pushdown), so cost is
    bounded by those features' firing counts, not the whole code set. Every shard is
    verified first (manifest, provenance), as `shards.pair_shards` does.
    """
    for name, paths in variant_paths.items():
        pair_shards(fp_paths, paths, name if check_variants else None, expect)
    chosen = most_damaged(features, cfg.n_features)
    if chosen.is_empty():
        return pl.DataFrame(schema=OUTPUT_SCHEMA)
    seq_len = token_ids.shape[1]
    flat = token_ids.reshape(-1)
    wanted = chosen["feature"].unique().cast(pl.Int32)
    top = (
        pl.scan_parquet([str(p) for p in fp_paths])
        .filter(pl.col("feature").is_in(wanted.implode()))
        .sort(["feature", "value", "token"], descending=[False, True, False])
        .group_by("feature", maintain_order=True)
        .head(cfg.n_contexts)
        .with_columns(pl.int_range(1, pl.len() + 1).over("feature").alias("context_rank"))
        .rename({"value": "fp_value"})
        .collect()
    )
    _check_finite(top, "fp_value", fp_paths)
    frames = []
    for variant, rows in chosen.group_by("variant", maintain_order=True):
        name = str(variant[0])
        picked = rows.join(top, on="feature", how="inner")
        there = (
            pl.scan_parquet([str(p) for p in variant_paths[name]])
            .filter(pl.col("feature").is_in(picked["feature"].unique().implode()))
            .filter(pl.col("token").is_in(picked["token"].unique().implode()))
            .rename({"value": "variant_value"})
            .collect()
        )
        _check_finite(there, "variant_value", variant_paths[name])
        picked = picked.join(there, on=["token", "feature"], how="left").with_columns(
            pl.col("variant_value").fill_null(0.0), pl.lit("fp").alias("where_fires")
        )
        frames.append(picked)
        frames.append(_variant_only(rows, fp_paths, variant_paths[name], cfg.n_contexts))
    out = pl.concat(frames, how="diagonal_relaxed").with_columns(
        pl.col("token")
        .map_elements(
            lambda t: render_context(flat, int(t), seq_len, cfg.window, tokenizer),
            return_dtype=pl.String,
        )
        .alias("context"),
        pl.col("token")
        .map_elements(lambda t: int(flat[int(t)]), return_dtype=pl.Int64)
        .alias("token_id"),
    )
    return (
        out.rename({"token": "position"})
        .select(list(OUTPUT_SCHEMA))
        .cast(OUTPUT_SCHEMA)  # type: ignore[arg-type]
        .sort(["variant", "damage_rank", "where_fires", "context_rank"])
    )


# The columns and their dtypes: tables.schema.yaml, table `damaged_contexts`.
OUTPUT_SCHEMA = polars_schema("damaged_contexts")


def chosen_contexts(
    chosen: pl.DataFrame,
    fp_paths: Sequence[str | Path],
    variant_paths: Mapping[str, Sequence[str | Path]],
    token_ids: np.ndarray,
    tokenizer: Any,
    cfg: ContextConfig,
    expect: Expected | None = None,
    check_variants: bool = False,
) -> pl.DataFrame:
    """The top FP contexts of exactly the `chosen` (variant, feature, r) rows, whatever
    their class, with each variant's activation there: the ``where_fires`` = fp rows of
    `damaged_contexts` run on them alone. Null variants get none (most_damaged)."""
    probe = chosen.select("variant", "feature", pl.lit(True).alias("active"), "r")
    if probe.is_empty():
        return pl.DataFrame(schema=OUTPUT_SCHEMA)
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
        check_variants=check_variants,
    )
    return found.filter(pl.col("where_fires") == "fp")


def _variant_only(
    rows: pl.DataFrame,
    fp_paths: Sequence[str | Path],
    paths: Sequence[str | Path],
    n_contexts: int,
) -> pl.DataFrame:
    """The variant's top contexts of `rows`' features at positions where FP does not fire
    them (what the compressed model made up), read for those features only."""
    wanted = rows["feature"].unique().cast(pl.Int32).implode()
    fp_fires = (
        pl.scan_parquet([str(p) for p in fp_paths])
        .filter(pl.col("feature").is_in(wanted))
        .select("token", "feature")
    )
    only = (
        pl.scan_parquet([str(p) for p in paths])
        .filter(pl.col("feature").is_in(wanted) & (pl.col("value") != 0))
        .join(fp_fires, on=["token", "feature"], how="anti")
        .sort(["feature", "value", "token"], descending=[False, True, False])
        .group_by("feature", maintain_order=True)
        .head(n_contexts)
        .with_columns(pl.int_range(1, pl.len() + 1).over("feature").alias("context_rank"))
        .rename({"value": "variant_value"})
        .collect()
    )
    _check_finite(only, "variant_value", paths)
    return rows.join(only, on="feature", how="inner").with_columns(
        pl.lit(0.0, dtype=pl.Float32).alias("fp_value"), pl.lit("variant_only").alias("where_fires")
    )


def _check_finite(rows: pl.DataFrame, column: str, paths: Sequence[str | Path]) -> None:
    bad = rows.filter(~pl.col(column).is_finite())
    if bad.height:
        raise InputError(
            f"non-finite activation {bad[column][0]} (feature {bad['feature'][0]}, token "
            f"{bad['token'][0]}) in one of {[str(p) for p in paths]}; {rerun_hint('encode')}"
        )
