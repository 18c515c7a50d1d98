"""Chunked perplexity from the encode NLL shards, and the per-model perplexity table.

Torch-free: the table job reads Parquet only. The strided sliding-window
evaluation, which runs a model, is `sliding_perplexity`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from .config import FROM_SCHEMA, ConfigSection, check_perplexity
from .shards import Expected, check_tiling, read_metadata, read_nll_shard


def chunked_perplexity(
    nll_paths: list[Path],
    token_stop: int | None = None,
    variant: str | None = None,
    expect: Expected | None = None,
) -> dict[str, Any]:
    """Token-weighted perplexity over NLL shards: exp(sum nll / count), float64.

    Weighting by token (not averaging per-shard means) keeps the result
    independent of how tokens were split into shards. With ``token_stop``, only
    tokens at positions below it count (a prefix of the token set, as the
    matched-pruning search evaluates). Each shard is checked (`shards.read_nll_shard`):
    readable, finite, of `variant` and of `expect`'s model and config hash when given;
    the shards must not overlap and, with `expect.n_tokens`, must tile the token set.
    """
    if not nll_paths:
        raise ValueError("no NLL shards given")
    expect = expect or Expected()
    paths = [Path(p) for p in nll_paths]
    check_tiling(paths, [read_metadata(p) for p in paths], expect.n_tokens)
    total = 0.0
    count = 0
    for path in nll_paths:
        token, nll = read_nll_shard(path, variant, expect)
        if token_stop is not None:
            nll = nll[token < token_stop]
        total += float(nll.sum())
        count += nll.size
    if count == 0:
        raise ValueError("NLL shards hold no tokens")
    mean = total / count
    return {"n_tokens": count, "mean_nll": mean, "perplexity": math.exp(mean)}


def perplexity_table(
    chunked: dict[str, dict[str, Any]], sliding: dict[str, dict[str, Any]]
) -> pl.DataFrame:
    """One row per variant: chunked (and, where run, sliding-window) perplexity and
    each one's change against FP in percent. `chunked` maps a variant to
    `chunked_perplexity`'s result, `sliding` to a sliding-window result.

    The token counts say what they count: ``n_scored_chunked`` and ``n_scored_sliding``
    are the tokens each evaluation scored (predicted), not the positions of the token set
    (a chunk's first token has no prediction). Columns: tables.schema.yaml, `perplexity`."""
    if "fp" not in chunked:
        raise ValueError("perplexity table needs the fp variant as reference")
    rows = []
    for variant, result in chunked.items():
        row: dict[str, Any] = {
            "variant": variant,
            "n_scored_chunked": result["n_tokens"],
            "ppl_chunked": result["perplexity"],
        }
        if variant in sliding:
            row.update(
                ppl_sliding=sliding[variant]["perplexity"],
                n_scored_sliding=sliding[variant]["n_scored"],
            )
        rows.append(row)
    table = pl.DataFrame(rows)
    for col in ("ppl_chunked", "ppl_sliding"):
        if col in table.columns:
            ref = table.filter(pl.col("variant") == "fp")[col][0]
            table = table.with_columns((100.0 * (pl.col(col) / ref - 1.0)).alias(f"d{col}_pct"))
    return table


@dataclass(frozen=True)
class PerplexityConfig(ConfigSection, section="perplexity"):
    """Config section `perplexity`: whether and how the strided sliding-window pass runs."""

    sliding: bool = FROM_SCHEMA
    window: int = FROM_SCHEMA  # tokens per window, BOS included
    stride: int = FROM_SCHEMA  # tokens between window starts
    bos: bool = FROM_SCHEMA  # prepend BOS to each window when the tokenizer has one

    def _check(self) -> None:
        check_perplexity(self.to_dict(), self.section)
