"""Result tables as the report shows them: CSV, and a standalone HTML page."""

from __future__ import annotations

import html

import polars as pl
import pytest

from sae_audit.cli import main as cli_main
from sae_audit.report_tables import BITS_HELP, column_help, in_variant_order, report_table


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "contexts.parquet"
    pl.DataFrame(
        {
            "feature": [3, 1, 2],
            "r": [0.123456, None, float("nan")],
            "context": ["a<b>", "x & y", "plain"],
            "trace": [[1, 2], [3], []],
        }
    ).write_parquet(path)
    return path


def test_csv_writes_nested_columns_as_text(table, tmp_path):
    out = tmp_path / "t" / "contexts.csv"
    report_table(table, out)
    back = pl.read_csv(out)
    assert back.columns == ["feature", "r", "context", "trace"]
    assert back["feature"].to_list() == [3, 1, 2]
    assert back["trace"].dtype == pl.String and back["context"].to_list()[0] == "a<b>"


def test_html_escapes_and_marks_missing_values(table, tmp_path):
    out = tmp_path / "contexts.html"
    report_table(table, out)
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<h3>contexts</h3>" in page
    assert "<p>3 rows, 4 columns</p>" in page
    assert "<td>0.1235</td>" in page and "<td>—</td>" in page and "<td>NaN</td>" in page
    assert '<td class="s">a&lt;b&gt;</td>' in page and "x &amp; y" in page
    report_table(table, out, max_rows=2)
    page = out.read_text(encoding="utf-8")
    assert "3 rows, 4 columns; first 2 shown" in page and page.count("<tr>") == 3
    with pytest.raises(ValueError, match=r"writes \.csv or \.html"):
        report_table(table, tmp_path / "contexts.txt")


# weight bits per variant, as config.variant_bits gives them
BITS = {
    "rtn-int8": 8, "rtn-int4": 4, "rtn-int3": 3, "lc-gptq-w4a16": 4, "gguf-q4_0": 4,
    "lc-w8a8-int8": 8, "lc-kv-fp8": None, "prune-matched-rtn-int4": None, "fp-null": None,
}  # fmt: skip
ORDER = [
    "rtn-int8", "lc-w8a8-int8", "rtn-int4", "lc-gptq-w4a16", "gguf-q4_0", "rtn-int3",
    "prune-matched-rtn-int4", "lc-kv-fp8", "fp-null",
]  # fmt: skip


@pytest.fixture
def survival(tmp_path):
    """A per-variant table in config order (RTN, then shipped, then the rest)."""
    path = tmp_path / "survival.parquet"
    names = [
        "rtn-int8", "rtn-int4", "rtn-int3", "lc-gptq-w4a16", "lc-w8a8-int8", "lc-kv-fp8",
        "gguf-q4_0", "prune-matched-rtn-int4", "fp-null",
    ]  # fmt: skip
    pl.DataFrame(
        {"variant": names, "survived_pct": [float(i) for i in range(len(names))]}
    ).write_parquet(path)
    return path


def test_rows_in_variant_order_with_a_bits_column(survival, tmp_path):
    out = tmp_path / "survival.csv"
    report_table(survival, out, variants=BITS)
    back = pl.read_csv(out)
    assert back.columns == ["variant", "bits", "survived_pct"]
    assert back["variant"].to_list() == ORDER
    assert back["bits"].to_list() == [8, 8, 4, 4, 4, 3, None, None, None]
    at = ORDER.index
    assert at("lc-gptq-w4a16") == at("rtn-int4") + 1 and at("lc-gptq-w4a16") < at("rtn-int3")
    page = tmp_path / "survival.html"
    report_table(survival, page, variants=BITS)
    text = page.read_text(encoding="utf-8")
    assert text.index("rtn-int4") < text.index("lc-gptq-w4a16") < text.index("rtn-int3")
    # a documented table's headers carry their description (tables.schema.yaml)
    assert f'<th title="{html.escape(BITS_HELP)}">bits</th>' in text
    help_pct = html.escape(column_help("survival")["survived_pct"])
    assert f'<th title="{help_pct}">survived_pct</th>' in text and "[percent]" in help_pct
    assert column_help("not_a_table") == {}


def test_cli_report_tables_takes_the_variant_bits(survival, tmp_path):
    import json

    csv, page = tmp_path / "s.csv", tmp_path / "s.html"
    argv = ["report-tables", "--input", str(survival), "--out", str(page), str(csv)]
    assert cli_main([*argv, "--variants", json.dumps(BITS)]) == 0
    assert pl.read_csv(csv)["variant"].to_list() == ORDER
    # without the bits only RTN names have them: the shipped formats go after
    assert cli_main(argv) == 0
    back = pl.read_csv(csv)
    assert back["variant"].to_list()[:3] == ["rtn-int8", "rtn-int4", "rtn-int3"]
    assert back.filter(pl.col("variant") == "lc-gptq-w4a16")["bits"].to_list() == [None]


def test_pair_tables_sort_by_both_variants_and_others_stay_as_they_are():
    overlap = pl.DataFrame(
        {
            "variant_a": ["rtn-int4", "rtn-int8", "rtn-int4", "rtn-int8"],
            "variant_b": ["prune-matched-rtn-int4", "lc-w8a8-int8", "lc-gptq-w4a16", "prune-matched-rtn-int4"],
            "n": [1, 2, 3, 4],
        }
    )  # fmt: skip
    ordered = in_variant_order(overlap, BITS)
    assert ordered["n"].to_list() == [2, 4, 3, 1] and "bits" not in ordered.columns
    pairs = pl.DataFrame(
        {
            "rtn_variant": ["rtn-int4", "rtn-int8", "rtn-int4"],
            "shipped_variant": ["gguf-q4_0", "lc-w8a8-int8", "lc-gptq-w4a16"],
            "bits": [4, 8, 4],
            "direction": ["summary", "summary", "summary"],
        }
    )
    assert in_variant_order(pairs, BITS)["shipped_variant"].to_list() == [
        "lc-w8a8-int8", "lc-gptq-w4a16", "gguf-q4_0",
    ]  # fmt: skip
    # several rows per variant keep their order within the variant (a stable sort)
    grid = pl.DataFrame({"variant": ["rtn-int4", "rtn-int8", "rtn-int4"], "t": [0.9, 0.5, 0.8]})
    assert in_variant_order(grid, BITS)["t"].to_list() == [0.5, 0.9, 0.8]
    plain = pl.DataFrame({"metric": ["b", "a"]})
    assert in_variant_order(plain, BITS).equals(plain)
