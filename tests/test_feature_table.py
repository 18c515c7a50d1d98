"""The interactive per-feature table: every active feature in the page, filters present."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

from sae_audit.feature_table import feature_table, neuronpedia_id, render_html


def _features() -> pl.DataFrame:
    rows = []
    for variant, r in (("rtn-int4", (0.95, 0.3, 0.7)), ("fp-noise", (1.0, 0.99, 0.999))):
        for feature, rv in enumerate(r):
            rows.append(
                {"variant": variant, "feature": feature, "firing_rate": 0.01 * (feature + 1),
                 "mean_when_firing": 1.0, "peak": 2.0, "r": rv, "active": True,
                 "class": "survived" if rv > 0.9 else ("destroyed" if rv < 0.5 else "blurred")}
            )  # fmt: skip
    # feature 3 is inactive: not in the table
    rows.append({**rows[0], "feature": 3, "active": False})
    return pl.DataFrame(rows)


def _contexts() -> pl.DataFrame:
    return pl.DataFrame(
        {"variant": ["rtn-int4"] * 2, "feature": [1, 1], "damage_rank": [1, 1], "r": [0.3, 0.3],
         "where_fires": ["fp", "variant_only"], "context_rank": [1, 1],
         "context": ["a ⟦b⟧ c", "x ⟦y⟧ z"], "fp_value": [2.0, 0.0], "variant_value": [0.0, 1.0]}
    )  # fmt: skip


def _embedded_rows(page: str) -> list[list[object]]:
    found = re.search(r'"data_json": ("(?:[^"\\]|\\.)*")', page)
    assert found, "no embedded data in the page"
    return json.loads(json.loads(found.group(1)))


def test_one_row_per_active_feature_with_worst_variant_context() -> None:
    table = feature_table(_features(), _contexts())
    assert table["feature"].to_list() == [0, 1, 2]
    assert table["class:rtn-int4"].to_list() == ["survived", "destroyed", "blurred"]
    # the null variant is never the most damaged one, even where its r is lowest
    assert table["most_damaged_variant"].to_list() == ["rtn-int4"] * 3
    assert table["top_fp_context"].to_list() == [None, "a ⟦b⟧ c", None]
    assert "neuronpedia" not in table.columns


def test_html_lists_every_active_feature_and_filters(tmp_path: Path) -> None:
    out = tmp_path / "features.html"
    table = feature_table(_features(), _contexts(), neuronpedia="pythia-70m-deduped/4-res-sm")
    render_html(table, out, "features")
    page = out.read_text(encoding="utf-8")
    rows = _embedded_rows(page)
    assert sorted(int(row[0]) for row in rows) == [0, 1, 2]  # type: ignore[arg-type]
    assert '"column_filters": "header"' in page
    assert "https://www.neuronpedia.org/pythia-70m-deduped/4-res-sm/1" in page
    # offline: the DataTables bundle is in the page, not fetched from a CDN
    assert len(page) > 100_000  # the bundle is several hundred kB


def test_neuronpedia_id_from_the_sae_lens_registry() -> None:
    spec = {"release": "pythia-70m-deduped-res-sm", "sae_id": "blocks.4.hook_resid_post"}
    assert neuronpedia_id(spec) == "pythia-70m-deduped/4-res-sm"
    assert neuronpedia_id({"source": "fixture"}) is None
