"""Result tables as the Snakemake report shows them: an HTML page (the report renders
only images, PDF and HTML inline) and a CSV to download.

``sae-audit report-tables --input T.parquet --out T.html T.csv [--variants JSON]`` calls
``report_table`` once per form; the workflow's rule ``report_tables``
(workflow/rules/plots.smk) runs it for every table in ``REPORT_TABLES``
(workflow/rules/common.smk), with the weight bits per variant (``config.variant_bits``).

Rows come in the figures' variant order (``figures.variant_order``: most bits first, each
shipped format right after the RTN variant of its bits, then the variants without bits),
and a table with one variant per row gains a ``bits`` column beside ``variant``. Each
header of a documented table carries its column's description (``tables.schema.yaml``,
`table_docs`) as a tooltip.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path

import polars as pl

from .figures import VariantBits, variant_bits, variant_order

# Columns naming the two variants of a pair-wise table (overlap, equal_bits).
PAIR_COLUMNS = (("variant_a", "variant_b"), ("rtn_variant", "shipped_variant"))


def in_variant_order(table: pl.DataFrame, variants: VariantBits | None = None) -> pl.DataFrame:
    """Rows sorted (stably) by variant in display order; with a ``variant`` column, a
    ``bits`` column after it (null for FP and variants without weight bits). Pair-wise
    tables sort by their two variants. Any other table is returned as it is."""
    columns = next(
        (pair for pair in (("variant",), *PAIR_COLUMNS) if set(pair) <= set(table.columns)), None
    )
    if columns is None or table.height == 0:
        return table
    names = [str(v) for c in columns for v in table[c].unique().drop_nulls()]
    rank = {n: i for i, n in enumerate(variant_order(names, variants))}
    keys = [
        pl.col(c).cast(pl.String).replace_strict(rank, default=len(rank), return_dtype=pl.Int64)
        for c in columns
    ]
    table = table.sort(keys, maintain_order=True)
    if columns != ("variant",) or "bits" in table.columns:
        return table
    bits = [variant_bits(str(v), variants) if v is not None else None for v in table["variant"]]
    at = table.columns.index("variant") + 1
    return table.insert_column(at, pl.Series("bits", bits, dtype=pl.Int64))


def report_table(
    table_path: str | Path,
    out: str | Path,
    max_rows: int = 5000,
    variants: Mapping[str, int | None] | None = None,
) -> None:
    """A result table as CSV (``out`` ends in .csv) or as a standalone HTML table (.html),
    the form the Snakemake report shows inline; rows in variant order (``variants``: the
    weight bits per variant, ``config.variant_bits``)."""
    table = in_variant_order(pl.read_parquet(table_path), variants)
    # nested columns (lists, structs) have no CSV form: write them as text
    table = table.with_columns(
        pl.col(c).map_elements(str, return_dtype=pl.String)
        for c, dtype in table.schema.items()
        if dtype.is_nested()
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        table.write_csv(out)
        return
    if out.suffix not in (".html", ".htm"):
        raise ValueError(f"report_table writes .csv or .html, got {out}")
    shown = table.head(max_rows)
    note = f"{table.height} rows, {table.width} columns" + (
        f"; first {max_rows} shown" if table.height > max_rows else ""
    )
    about = column_help(Path(table_path).stem)
    head = "".join(
        f'<th title="{html.escape(about[c])}">{html.escape(c)}</th>'
        if c in about
        else f"<th>{html.escape(c)}</th>"
        for c in shown.columns
    )
    hint = (
        "<p>Point at a column's name for what it holds; every column of every table: "
        "the report's page columns.html.</p>"
        if about
        else ""
    )
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in shown.iter_rows())
    name = html.escape(Path(table_path).stem)
    out.write_text(
        f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{name}</title>
<style>
body {{ font-family: system-ui, sans-serif; font-size: 12px; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; position: sticky; top: 0; }}
td.s {{ text-align: left; white-space: pre-wrap; max-width: 60em; }}
tr:nth-child(even) td {{ background: #fafafa; }}
</style></head>
<body><h3>{name}</h3><p>{html.escape(note)}</p>{hint}
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table></body></html>
""",
        encoding="utf-8",
    )


BITS_HELP = "the variant's weight bits (config); empty for FP and variants without a bit-width"


def column_help(table_name: str) -> dict[str, str]:
    """Column -> its one-line description (and unit) from tables.schema.yaml, for the
    header tooltips; the ``bits`` column this module adds included. Empty for a table the
    schema does not document."""
    from .table_docs import tables

    doc = tables().get(table_name)
    if doc is None:
        return {}
    found = {
        c.name: c.description + (f" [{c.unit}]" if c.unit else "") for c in doc.columns.values()
    }
    return {"bits": BITS_HELP, **found}


def _cell(value: object) -> str:
    if value is None:
        return "<td>—</td>"
    if isinstance(value, float):
        return f"<td>{'NaN' if math.isnan(value) else format(value, '.4g')}</td>"
    if isinstance(value, str):
        return f'<td class="s">{html.escape(value)}</td>'
    return f"<td>{html.escape(str(value))}</td>"
