"""Equal bits: which features does a shipped format save that RTN at the same bits destroys,
and which does it lose that RTN keeps?

For each (RTN variant, shipped variant) pair at the same weight bits
(``config.equal_bits_pairs``), over the features active in both:

- ``saved_by_shipped``: destroyed under RTN, survived under the shipped variant;
- ``lost_by_shipped``: survived under RTN, destroyed under the shipped variant

(blurred and "insufficient"-evidence features count in neither). Each direction lists at
most ``damaged_contexts.n_features`` features, the largest change in r first, each with r
and class under both variants, its FP firing rate and its top FP contexts (the machinery
of ``damaged_contexts``: the FP code shards, the token shards and the tokenizer), with
both variants' activations there. One summary row per pair counts the saved and lost features
and gives the Jaccard index of the two destroyed sets (``overlap.jaccard``; null, with a
``reason``, when neither variant destroys anything), both sets taken, as in ``overlap``,
over the features classed under both variants (not "insufficient" under either).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .damaged_contexts import ContextConfig, chosen_contexts
from .overlap import jaccard
from .shards import Expected
from .survival import INSUFFICIENT
from .table_docs import polars_schema
from .variants import parse_variant

SUMMARY = "summary"
SAVED = "saved_by_shipped"
LOST = "lost_by_shipped"
DIRECTIONS = (SAVED, LOST)

# One table, two kinds of rows: a summary row per pair (direction "summary": the counts,
# the Jaccard and its reason; the per-feature columns null), and per saved/lost feature one
# row per top FP context (the summary columns null).
# The columns, their dtypes and meaning: tables.schema.yaml, table `equal_bits`.
SCHEMA: dict[str, Any] = polars_schema("equal_bits")


def shared_active(rtn: pl.DataFrame, shipped: pl.DataFrame) -> pl.DataFrame:
    """Features active in both variants' feature tables: r and class under each, FP firing rate."""
    cols = ["feature", "active", "r", "class"]
    return (
        rtn.select(*cols, "firing_rate")
        .join(shipped.select(cols), on="feature", how="inner", suffix="_shipped", validate="1:1")
        .filter(pl.col("active") & pl.col("active_shipped"))
        .select(
            pl.col("feature").cast(pl.Int32),
            pl.col("firing_rate").cast(pl.Float64),
            pl.col("r").cast(pl.Float64).alias("r_rtn"),
            pl.col("r_shipped").cast(pl.Float64),
            pl.col("class").cast(pl.String).alias("class_rtn"),
            pl.col("class_shipped").cast(pl.String),
        )
        .sort("feature")
    )


def saved_and_lost(joined: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Per direction, every feature that changes class between destroyed and survived,
    the largest change in r first (ties by feature id), with its ``rank`` (1 = largest)."""
    gain = pl.col("r_shipped") - pl.col("r_rtn")
    picks = {
        SAVED: (
            (pl.col("class_rtn") == "destroyed") & (pl.col("class_shipped") == "survived"),
            gain,
        ),
        LOST: (
            (pl.col("class_rtn") == "survived") & (pl.col("class_shipped") == "destroyed"),
            -gain,
        ),
    }
    return {
        direction: joined.filter(where)
        .sort([change, pl.col("feature")], descending=[True, False])
        .with_row_index("rank", offset=1)
        .with_columns(pl.col("rank").cast(pl.Int64), pl.lit(direction).alias("direction"))
        for direction, (where, change) in picks.items()
    }


def pair_summary(joined: pl.DataFrame, found: Mapping[str, pl.DataFrame]) -> dict[str, Any]:
    """Counts of saved and lost features, and the Jaccard of the two destroyed sets (over
    the features classed under both: an "insufficient" feature is in neither set)."""
    classed = joined.filter(
        (pl.col("class_rtn") != INSUFFICIENT) & (pl.col("class_shipped") != INSUFFICIENT)
    )
    destroyed_rtn = set(classed.filter(pl.col("class_rtn") == "destroyed")["feature"].to_list())
    destroyed_shipped = set(
        classed.filter(pl.col("class_shipped") == "destroyed")["feature"].to_list()
    )
    j = jaccard(destroyed_rtn, destroyed_shipped)
    return {
        "direction": SUMMARY,
        "n_active": joined.height,
        "n_destroyed_rtn": len(destroyed_rtn),
        "n_destroyed_shipped": len(destroyed_shipped),
        "n_saved": found[SAVED].height,
        "n_lost": found[LOST].height,
        "jaccard_destroyed": j,
        "reason": None
        if j is not None
        else "jaccard_destroyed undefined: no destroyed features under either variant",
    }


def equal_bits(
    features: Mapping[str, pl.DataFrame],
    pairs: Sequence[Sequence[str]],
    fp_paths: Sequence[str | Path],
    variant_paths: Mapping[str, Sequence[str | Path]],
    token_ids: np.ndarray,
    tokenizer: Any,
    cfg: ContextConfig,
    expect: Expected | None = None,
    check_variants: bool = False,
) -> pl.DataFrame:
    """The equal-bits table (``SCHEMA``) for (RTN variant, shipped variant) ``pairs``, in
    pair order: each pair's summary row, then its saved and its lost features by rank.

    ``features`` is the features table per variant (survival's ``features.parquet``);
    ``variant_paths`` the code shards of every variant in a pair; ``cfg.n_features`` caps
    the features listed per pair and direction (the summary counts all of them). Without
    pairs the table is empty, with its schema. Undefined numbers are null, never NaN.
    """
    direction_order = {d: i for i, d in enumerate(DIRECTIONS)}
    frames = []
    for pair in pairs:
        rtn, shipped = (str(v) for v in pair)
        v = parse_variant(rtn)
        if v.kind != "rtn":
            raise ValueError(
                f"equal_bits pair {[rtn, shipped]}: the first must be RTN, not {rtn!r}"
            )
        missing = [n for n in (rtn, shipped) if n not in features]
        if missing:
            raise ValueError(f"equal_bits pair {[rtn, shipped]}: no features table for {missing}")
        head = {"rtn_variant": rtn, "shipped_variant": shipped, "bits": v.bits}
        joined = shared_active(features[rtn], features[shipped])
        found = saved_and_lost(joined)
        frames.append(pl.DataFrame([{**head, **pair_summary(joined, found)}]))
        chosen = pl.concat([t.head(cfg.n_features) for t in found.values()])
        if chosen.height == 0:
            continue
        contexts = _contexts(
            chosen,
            rtn,
            shipped,
            fp_paths,
            variant_paths,
            token_ids,
            tokenizer,
            cfg,
            expect,
            check_variants,
        )
        frames.append(
            chosen.join(contexts, on="feature", how="inner")
            .sort(
                pl.col("direction").replace_strict(direction_order, return_dtype=pl.Int64),
                "rank",
                "context_rank",
            )
            .with_columns(pl.lit(value).alias(name) for name, value in head.items())
        )
    if not frames:
        return pl.DataFrame(schema=SCHEMA)
    return pl.concat([_conform(f) for f in frames], how="vertical")


def _conform(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with exactly ``SCHEMA``'s columns, in order: the ones it lacks null."""
    return frame.select(
        pl.col(c).cast(t) if c in frame.columns else pl.lit(None, dtype=t).alias(c)
        for c, t in SCHEMA.items()
    )


def _contexts(
    chosen: pl.DataFrame,
    rtn: str,
    shipped: str,
    fp_paths: Sequence[str | Path],
    variant_paths: Mapping[str, Sequence[str | Path]],
    token_ids: np.ndarray,
    tokenizer: Any,
    cfg: ContextConfig,
    expect: Expected | None,
    check_variants: bool,
) -> pl.DataFrame:
    """Top FP contexts of the chosen features with both variants' activations there: one
    ``damaged_contexts`` call over both variants, keeping every chosen feature."""
    probe = pl.concat(
        [
            chosen.select(pl.lit(name).alias("variant"), "feature", pl.col(r).alias("r"))
            for name, r in ((rtn, "r_rtn"), (shipped, "r_shipped"))
        ]
    )
    found = chosen_contexts(
        probe,
        fp_paths,
        {rtn: variant_paths[rtn], shipped: variant_paths[shipped]},
        token_ids,
        tokenizer,
        cfg,
        expect=expect,
        check_variants=check_variants,
    )
    keys = ["feature", "context_rank"]
    at_rtn = found.filter(pl.col("variant") == rtn).select(
        *keys, "position", "context", "fp_value", pl.col("variant_value").alias("rtn_value")
    )
    at_shipped = found.filter(pl.col("variant") == shipped).select(
        *keys, pl.col("variant_value").alias("shipped_value")
    )
    return at_rtn.join(at_shipped, on=keys, how="left", validate="1:1")
