"""Result tables as the report shows them: CSV, and a standalone HTML page."""

from __future__ import annotations

import polars as pl
import pytest

from sae_audit.report_tables import report_table


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
