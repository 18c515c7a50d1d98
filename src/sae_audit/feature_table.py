"""The report's interactive per-feature table: one row per active feature, searchable,
sortable and filterable, rendered by itables (DataTables) with its JavaScript embedded,
so the page works offline inside the Snakemake report.

Columns: the feature id; its FP statistics (firing rate, mean activation when firing,
peak); per compressed variant its correlation r (``r:VARIANT``) and class
(``class:VARIANT``); the variant where it is most damaged (lowest r among the
non-null variants) with the top FP context of the damaged_contexts table there and the
compressed model's activation on it (empty when the feature is not among that table's
most damaged features: the context search is bounded by ``damaged_contexts.n_features``);
and a Neuronpedia link where the SAE's sae-lens registry entry has a Neuronpedia id.
A text box above each column filters it (e.g. ``destroyed`` in a class column).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from .files import atomic_path
from .overlap import null_variants

NEURONPEDIA_URL = "https://www.neuronpedia.org"
FP_COLUMNS = ("firing_rate", "mean_when_firing", "peak")


def neuronpedia_id(spec: Mapping[str, Any]) -> str | None:
    """The Neuronpedia id of a pretrained SAE (``release`` + ``sae_id`` in the sae-lens
    registry), or None: an SAE from a path or the fixture, a release without one, or a
    sae-lens without the registry."""
    release, sae_id = spec.get("release"), spec.get("sae_id")
    if not release or not sae_id:
        return None
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:  # a sae-lens that moved its registry: no links, not a failure
        return None
    lookup = get_pretrained_saes_directory().get(str(release))
    ids = getattr(lookup, "neuronpedia_id", None) or {}
    found = ids.get(str(sae_id))
    return str(found) if found else None


def feature_table(
    features: pl.DataFrame, contexts: pl.DataFrame | None = None, neuronpedia: str | None = None
) -> pl.DataFrame:
    """One row per active feature (``features.parquet``: one row per variant and
    feature), wide over variants in the given variant order; see the module docstring."""
    active = features.filter(pl.col("active"))
    variants = list(dict.fromkeys(active["variant"].to_list()))
    fp = (
        active.select("feature", *FP_COLUMNS)
        .unique("feature", keep="first", maintain_order=True)
        .sort("feature")
    )
    wide = fp
    for variant in variants:
        rows = active.filter(pl.col("variant") == variant).select(
            "feature",
            pl.col("r").alias(f"r:{variant}"),
            pl.col("class").alias(f"class:{variant}"),
        )
        wide = wide.join(rows, on="feature", how="left")
    damaged = [v for v in variants if v not in null_variants(variants)]
    worst = (
        active.filter(pl.col("variant").is_in(damaged))
        .sort(["feature", "r", "variant"])
        .unique("feature", keep="first", maintain_order=True)
        .select("feature", pl.col("variant").alias("most_damaged_variant"))
    )
    wide = wide.join(worst, on="feature", how="left")
    if contexts is not None and contexts.height:
        top = contexts.filter(
            (pl.col("context_rank") == 1) & (pl.col("where_fires") == "fp")
        ).select(
            "feature",
            pl.col("variant").alias("most_damaged_variant"),
            pl.col("context").alias("top_fp_context"),
            pl.col("fp_value").alias("top_fp_context_fp_value"),
            pl.col("variant_value").alias("top_fp_context_variant_value"),
        )
        wide = wide.join(top, on=["feature", "most_damaged_variant"], how="left")
    if neuronpedia:
        wide = wide.with_columns(
            pl.format(f"{NEURONPEDIA_URL}/{neuronpedia}/{{}}", pl.col("feature")).alias(
                "neuronpedia"
            )
        )
    return wide


def render_html(table: pl.DataFrame, out: str | Path, title: str) -> None:
    """``table`` as a standalone HTML page: an itables DataTable with the library's
    JavaScript embedded (``connected=False``: the report is opened offline), every row
    in the page (no down-sampling), a filter box per column."""
    from itables import options, to_html_datatable
    from itables.javascript import generate_init_offline_itables_html

    shown = table
    if "neuronpedia" in shown.columns:
        shown = shown.with_columns(
            pl.format('<a href="{}" target="_blank">open</a>', pl.col("neuronpedia")).alias(
                "neuronpedia"
            )
        )
    body = to_html_datatable(
        shown,
        caption=title,
        connected=False,
        maxBytes=0,
        maxRows=0,
        maxColumns=0,
        column_filters="header",
        allow_html="neuronpedia" in shown.columns,
        showIndex=False,
        lengthMenu=[25, 100, 1000, -1],
        pageLength=25,
    )
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n<body>\n"
        # connected=False only leaves the table's loader offline: the DataTables bundle
        # itself is the page's to include
        f"{generate_init_offline_itables_html(options.dt_bundle)}\n{body}\n</body></html>\n"
    )
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
