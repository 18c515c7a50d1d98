"""tables.schema.yaml, the one place every output table's columns are documented: it is
well-formed and follows the naming conventions, the modules that fix a schema in code read
it, the rendered pages list every column, and a finished run writes exactly these columns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import yaml

from sae_audit import cli, table_docs
from sae_audit.table_docs import TableDocsError

from .conftest import ROOT

RULE_FILES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
# the names a share's column carries (anything else that is a share is in percent: _pct)
FRACTION_NAME = re.compile(r"(rate|fraction|frac|sparsity)")
# the range of a value of each bounded unit (float rounding allowed at the edges)
RANGES = {
    "percent": (0.0, 100.0),
    "fraction": (0.0, 1.0),
    "probability": (0.0, 1.0),
    "correlation": (-1.0, 1.0),
}


def _rules_text() -> str:
    return "\n".join(p.read_text() for p in RULE_FILES)


# ---------------------------------------------------------------- the YAML itself
def test_schema_is_well_formed_and_shipped_with_the_package():
    docs = table_docs.tables()
    assert len(docs) >= 19
    units = table_docs.units()
    rules = set(re.findall(r"^rule (\w+):", _rules_text(), flags=re.M))
    for name, t in docs.items():
        assert t.path.startswith(("tables/", "features/")) and t.path.endswith(".parquet"), name
        assert t.rule in rules, f"{name}: no rule {t.rule}"
        assert t.description.endswith(".") and len(t.description) < 160, name
        for also in t.also:
            assert Path(also).with_suffix(".parquet").as_posix() == t.path, also
        for c in t.columns.values():
            assert c.description and "\n" not in c.description, (name, c.name)
            assert c.unit is None or c.unit in units, (name, c.name)
            table_docs.polars_dtype(c.dtype)  # a real polars dtype
    # every unit is used; the file ships as package data, as config.schema.yaml does
    used = {c.unit for t in docs.values() for c in t.columns.values()}
    assert set(units) == used - {None}
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'sae_audit = \[[^\]]*"tables\.schema\.yaml"', pyproject)
    assert table_docs.SCHEMA_PATH.parent == Path(table_docs.__file__).parent


def test_columns_follow_the_naming_conventions():
    """A share in percent ends in _pct (0..100); a change in percent is d<metric>_pct; any
    other share is a fraction whose name says so; n_tokens never means scored tokens."""
    for t in table_docs.tables().values():
        for c in t.columns.values():
            where = f"{t.name}.{c.name}"
            if c.name.endswith("_pct"):
                assert c.unit in ("percent", "percent_change"), where
            if c.unit in ("percent", "percent_change"):
                assert c.name.endswith("_pct"), where
            if c.unit == "percent_change":
                assert c.name.startswith("d"), where
            if c.unit == "fraction":
                assert FRACTION_NAME.search(c.name), where
            if FRACTION_NAME.search(c.name) and c.dtype.startswith("Float"):
                assert c.unit == "fraction", where
            if c.name == "n_tokens":
                assert "scored" not in c.description, where
    perplexity = table_docs.table("perplexity").columns
    assert {"n_scored_chunked", "n_scored_sliding"} <= set(perplexity)
    assert "n_tokens" not in perplexity and "n_tokens_sliding" not in perplexity


def test_same_as_copies_the_column_and_keeps_its_overrides():
    docs = table_docs.tables()
    assert docs["features"].columns["firing_rate"] == docs["fp_stats"].columns["firing_rate"]
    # survival carries the perplexity table's columns, conditions included
    sliding = docs["survival"].columns["n_scored_sliding"]
    assert sliding.description == docs["perplexity"].columns["n_scored_sliding"].description
    assert sliding.when == "perplexity.sliding is on" and not sliding.required
    # stability's n_tokens: the same fact, described within the selection
    stability = docs["stability"].columns["n_tokens"]
    assert stability.dtype == "Int64" and "selection" in stability.description


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("units"), "exactly the keys"),
        (lambda d: d["tables"]["t"].pop("rule"), "missing keys"),
        (lambda d: d["tables"]["t"].update(colour="red"), "unknown keys"),
        (lambda d: d["tables"]["t"]["columns"]["a"].update(unit="furlong"), "unknown unit"),
        (lambda d: d["tables"]["t"]["columns"]["a"].update(dtype="Int65"), "unknown dtype"),
        (lambda d: d["tables"]["t"]["columns"]["a"].pop("description"), "missing description"),
        (lambda d: d["tables"]["t"]["columns"].update(b={"same_as": "t.zz"}), "names no column"),
        (lambda d: d["tables"]["t"]["columns"].update(b={"same_as": "t.b"}), "cycle"),
        (lambda d: d["tables"]["t"].update(description="two\nlines"), "one line"),
    ],
)
def test_a_malformed_schema_is_refused(tmp_path, edit, message):
    good = {
        "units": {"fraction": "a share, 0..1"},
        "tables": {
            "t": {
                "path": "tables/{model}/t.parquet",
                "rule": "t",
                "description": "A table.",
                "columns": {"a": {"dtype": "Float64", "unit": "fraction", "description": "a"}},
            }
        },
    }
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(good))
    assert set(table_docs.tables(path)["t"].columns) == {"a"}
    edit(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(good))
    with pytest.raises(TableDocsError, match=message):
        table_docs.tables(bad)


def test_workflow_writes_the_documented_paths_and_nothing_undocumented():
    """Every parquet output under tables/ and features/ a rule names is documented, and
    every documented table is an output of its rule."""
    text = _rules_text()
    written = set()
    for m in re.finditer(r'f"\{R\}/((?:tables|features)/[^"]+?\.parquet)"', text):
        path = m[1].replace("{{", "{").replace("}}", "}")
        if set(re.findall(r"\{(\w+)\}", path)) <= {"model", "sae", "variant"}:
            written.add(path)
    documented = {t.path for t in table_docs.tables().values()}
    assert written - documented == set(), "tables written but not documented"
    assert documented - written == set(), "tables documented but written by no rule"
    for t in table_docs.tables().values():
        assert table_docs.table_for(t.path.format(model="m", sae="s", variant="v")) == t


def test_modules_read_their_schema_from_the_documentation():
    """Tables whose schema is fixed in code agree with (or are read from) the YAML."""
    from sae_audit import damaged_contexts, equal_bits, fixture_training, outliers, predict

    assert table_docs.polars_schema("outliers") == outliers.SCHEMA
    assert table_docs.descriptions("outliers") == outliers.COLUMNS
    assert table_docs.polars_schema("damaged_contexts") == damaged_contexts.OUTPUT_SCHEMA
    assert table_docs.polars_schema("equal_bits") == equal_bits.SCHEMA
    assert table_docs.problems("fixture_training", fixture_training.SCHEMA) == []
    quantiles = predict._QUANTILE_SCHEMA
    assert table_docs.problems("survival_by_quantile", quantiles) == []
    try:
        from sae_audit import sae_quality
    except ImportError:  # being written alongside; the finished run checks its table
        return
    assert table_docs.problems("sae_quality", sae_quality.SCHEMA) == []


def test_problems_name_undocumented_missing_and_mistyped_columns():
    schema = dict(table_docs.polars_schema("predict_oof"))
    assert table_docs.problems("predict_oof", schema) == []
    schema["extra"] = pl.Int64
    schema["proba"] = pl.Float32
    del schema["label"]
    found = table_docs.problems("predict_oof", schema)
    assert len(found) == 3
    assert any("undocumented column 'extra'" in p for p in found)
    assert any("'label' missing" in p for p in found)
    assert any("proba: dtype Float32" in p for p in found)
    # a column documented with a condition may be absent
    chunked_only = {"variant": pl.String, "n_scored_chunked": pl.Int64, "ppl_chunked": pl.Float64}
    assert table_docs.problems("perplexity", {**chunked_only, "dppl_chunked_pct": pl.Float64}) == []


# ---------------------------------------------------------------- rendering
def _sections(text: str, heading: str) -> dict[str, str]:
    """Each table's section of a rendered page, by its name."""
    names = list(table_docs.tables())
    out = {}
    for i, name in enumerate(names):
        start = text.index(heading.format(name=name))
        end = text.index(heading.format(name=names[i + 1])) if i + 1 < len(names) else None
        out[name] = text[start:end]
    return out


@pytest.mark.parametrize(
    ("fmt", "heading", "cell"),
    [
        ("md", "## {name}\n", "| `{col}` | {dtype} |"),
        ("rst", "{name}\n---", "   * - ``{col}``\n     - {dtype}\n"),
        ("html", '<h2 id="{name}">', "<tr><td><code>{col}</code></td><td>{dtype}</td>"),
    ],
)
def test_renderer_lists_every_column_of_every_table(fmt, heading, cell):
    text = table_docs.render(fmt)
    if fmt == "rst":
        text = text.replace("\\_", "_")  # escaped underscores, as plain text
    sections = _sections(text, heading)
    for name, t in table_docs.tables().items():
        assert t.path in sections[name], (fmt, name)
        assert f"rule `{t.rule}`" in sections[name] or fmt != "md", name
        for c in t.columns.values():
            assert cell.format(col=c.name, dtype=c.dtype) in sections[name], (fmt, name, c.name)
    for unit in table_docs.units():
        assert unit in text


def test_rst_page_renders_without_docutils_warnings():
    from docutils.core import publish_parts

    body = publish_parts(
        table_docs.render("rst"),
        writer="html",
        settings_overrides={"report_level": 2, "halt_level": 2},
    )["body"]
    assert "sink_score" in body and "|activation|" in body


def test_cli_writes_the_page_in_the_format_of_its_suffix(tmp_path, capsys):
    for suffix in (".md", ".rst", ".html"):
        out = tmp_path / "docs" / f"columns{suffix}"
        assert cli.main(["--json", "table-docs", "--out", str(out)]) == 0
        assert out.read_text() == table_docs.render(suffix[1:])
        record = json.loads(capsys.readouterr().out)
        assert record["tables"] == len(table_docs.tables()) and record["out"] == str(out)
    with pytest.raises(ValueError, match="must end in one of"):
        table_docs.write_docs(tmp_path / "columns.txt")


def test_report_links_the_columns_page():
    """The report tables' caption points to the page, the page has its caption, and
    the README points to the YAML."""
    report = ROOT / "workflow" / "report"
    assert "`columns.html`_" in (report / "tables.rst").read_text()
    assert "tables.schema.yaml" in (report / "columns.rst").read_text()
    plots_smk = (ROOT / "workflow" / "rules" / "plots.smk").read_text()
    assert 'caption="../report/columns.rst"' in plots_smk
    assert "src/sae_audit/tables.schema.yaml" in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- a finished run
def _in_range(frame: pl.DataFrame, column: str, bounds: tuple[float, float]) -> list[float]:
    """The values of a column outside its unit's range (nulls and NaN skipped)."""
    lo, hi = bounds
    values = frame.get_column(column).cast(pl.Float64).drop_nulls().drop_nans()
    return values.filter((values < lo - 1e-6) | (values > hi + 1e-6)).to_list()


@pytest.mark.slow
def test_finished_run_writes_exactly_the_documented_columns(finished_run: Path):
    """Every table the run writes under tables/ and features/ is documented and has exactly
    its documented columns and dtypes (a conditional column may be absent); bounded units
    hold their range; the CSV forms have the same columns; the columns page is written.
    A documented table the run did not write (a config without it) is no failure."""
    results = finished_run / "results"
    failures, seen = [], set()
    for path in sorted(
        [*(results / "tables").rglob("*.parquet"), *(results / "features").rglob("*.parquet")]
    ):
        rel = path.relative_to(results).as_posix()
        t = table_docs.table_for(rel)
        if t is None:
            failures.append(f"{rel}: not documented in tables.schema.yaml")
            continue
        seen.add(t.name)
        frame = pl.read_parquet(path)
        failures += [f"{rel}: {p}" for p in table_docs.problems(t.name, frame.schema)]
        for c in t.columns.values():
            if c.name not in frame.columns or c.unit not in RANGES:
                continue
            if outside := _in_range(frame, c.name, RANGES[c.unit]):
                failures.append(f"{rel}: {c.name} ({c.unit}) outside its range: {outside[:5]}")
        for also in t.also:
            csv = path.with_suffix(Path(also).suffix)
            if not csv.is_file():
                failures.append(f"{rel}: its {also} form is missing")
            elif pl.read_csv(csv, n_rows=1).columns != frame.columns:
                failures.append(f"{csv.relative_to(results)}: columns differ from the parquet")
    assert not failures, "\n".join(failures)
    # the tables every run writes were all seen
    assert seen >= {
        "fp_stats", "correlation", "features", "survival", "perplexity", "predict",
        "predict_coefficients", "predict_oof", "survival_by_quantile", "overlap",
        "stability", "threshold_grid", "damaged_contexts", "equal_bits", "outliers",
    }  # fmt: skip
    page = (results / "report" / "columns.html").read_text()
    assert page == table_docs.render("html")
