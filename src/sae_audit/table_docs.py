"""The columns of every output table: `tables.schema.yaml`, loaded, checked and rendered.

`tables.schema.yaml` (package data, beside this module) is the one place each table
under results/ and each of its columns is documented: dtype, unit, description. This
module loads it (`tables`), resolves `same_as` references, gives the modules that fix a
table's schema in code its dtypes and descriptions (`polars_schema`, `descriptions`),
compares a written table with its documentation (`problems`), and renders the whole of
it as Markdown, reStructuredText or the report's HTML page (`render`, `write_docs`:
`sae-audit table-docs`).

Torch-free and polars-light: polars is imported only where dtypes are needed.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).with_name("tables.schema.yaml")
FORMATS = {".html": "html", ".md": "md", ".rst": "rst"}
_TABLE_KEYS = {"path", "also", "rule", "description", "columns"}
_COLUMN_KEYS = {"dtype", "unit", "description", "when", "same_as"}
# polars dtype names a column may have (List(<one of these>) too)
_DTYPES = {
    "String", "Boolean", "Int8", "Int16", "Int32", "Int64",
    "UInt8", "UInt16", "UInt32", "UInt64", "Float32", "Float64",
}  # fmt: skip


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # polars' name of the dtype: Int64, Float64, String, List(String) ...
    description: str
    unit: str | None = None  # a key of the schema's `units`
    when: str | None = None  # present only under this condition; None: always

    @property
    def required(self) -> bool:
        return self.when is None


@dataclass(frozen=True)
class Table:
    name: str
    path: str  # under results/, with {model}, {sae}, {variant}
    rule: str
    description: str
    columns: dict[str, Column]
    also: tuple[str, ...] = ()

    def matches(self, relpath: str) -> bool:
        """Whether a path under results/ (forward slashes) is this table's parquet file."""
        pattern = re.escape(self.path)
        for wildcard in ("model", "sae", "variant"):
            pattern = pattern.replace(re.escape(f"{{{wildcard}}}"), "[^/]+")
        return re.fullmatch(pattern, relpath) is not None


class TableDocsError(ValueError):
    """tables.schema.yaml is malformed: a missing or unknown key, a bad reference."""


# ---------------------------------------------------------------- loading
@functools.cache
def _load(path: Path) -> tuple[dict[str, str], dict[str, Table]]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or set(raw) != {"units", "tables"}:
        raise TableDocsError(f"{path}: expected exactly the keys units and tables")
    units = raw["units"]
    if not isinstance(units, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in units.items()
    ):
        raise TableDocsError(f"{path}: units must map a name to a one-line meaning")
    raw_tables = raw["tables"]
    if not isinstance(raw_tables, dict) or not raw_tables:
        raise TableDocsError(f"{path}: tables must be a non-empty mapping")
    for name, spec in raw_tables.items():
        where = f"{path}: table {name}"
        if not isinstance(spec, dict):
            raise TableDocsError(f"{where}: expected a mapping")
        if unknown := set(spec) - _TABLE_KEYS:
            raise TableDocsError(f"{where}: unknown keys {sorted(unknown)}")
        if missing := _TABLE_KEYS - {"also"} - set(spec):
            raise TableDocsError(f"{where}: missing keys {sorted(missing)}")
        if not isinstance(spec["columns"], dict) or not spec["columns"]:
            raise TableDocsError(f"{where}: columns must be a non-empty mapping")
    tables = {
        name: Table(
            name=name,
            path=_text(spec["path"], f"{path}: table {name}: path"),
            rule=_text(spec["rule"], f"{path}: table {name}: rule"),
            description=_text(spec["description"], f"{path}: table {name}: description"),
            columns={
                col: _column(raw_tables, name, col, units, path, ()) for col in spec["columns"]
            },
            also=tuple(spec.get("also") or ()),
        )
        for name, spec in raw_tables.items()
    }
    return units, tables


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\n" in value.strip():
        raise TableDocsError(f"{where}: expected one line of text, got {value!r}")
    return value.strip()


def _column(
    raw: Mapping[str, Any],
    table: str,
    name: str,
    units: Mapping[str, str],
    path: Path,
    seen: tuple[str, ...],
) -> Column:
    """A column with its `same_as` reference resolved (cycles refused)."""
    where = f"{path}: {table}.{name}"
    if f"{table}.{name}" in seen:
        raise TableDocsError(f"{where}: same_as cycle {' -> '.join(seen)}")
    spec = raw[table]["columns"][name]
    if not isinstance(spec, dict):
        raise TableDocsError(f"{where}: expected a mapping")
    if unknown := set(spec) - _COLUMN_KEYS:
        raise TableDocsError(f"{where}: unknown keys {sorted(unknown)}")
    base: dict[str, Any] = {}
    if "same_as" in spec:
        ref_table, _, ref_col = str(spec["same_as"]).partition(".")
        if ref_col not in raw.get(ref_table, {}).get("columns", {}):
            raise TableDocsError(f"{where}: same_as {spec['same_as']!r} names no column")
        ref = _column(raw, ref_table, ref_col, units, path, (*seen, f"{table}.{name}"))
        base = {"dtype": ref.dtype, "unit": ref.unit, "description": ref.description}
        base["when"] = ref.when
    merged = {**base, **{k: v for k, v in spec.items() if k != "same_as"}}
    for key in ("dtype", "description"):
        if key not in merged:
            raise TableDocsError(f"{where}: missing {key} (and no same_as)")
    dtype = str(merged["dtype"])
    inner = dtype[len("List(") : -1] if dtype.startswith("List(") and dtype.endswith(")") else dtype
    if inner not in _DTYPES:
        raise TableDocsError(f"{where}: unknown dtype {dtype!r}")
    unit = merged.get("unit")
    if unit is not None and unit not in units:
        raise TableDocsError(f"{where}: unknown unit {unit!r}; units: {sorted(units)}")
    when = merged.get("when")
    return Column(
        name=name,
        dtype=dtype,
        description=_text(merged["description"], f"{where}: description"),
        unit=unit,
        when=None if when is None else _text(when, f"{where}: when"),
    )


def tables(path: str | Path = SCHEMA_PATH) -> dict[str, Table]:
    """Every documented table by name, its columns resolved; TableDocsError if malformed."""
    return dict(_load(Path(path))[1])


def units(path: str | Path = SCHEMA_PATH) -> dict[str, str]:
    """The units a column may name, with their meaning."""
    return dict(_load(Path(path))[0])


def table(name: str) -> Table:
    try:
        return tables()[name]
    except KeyError:
        raise KeyError(f"no documented table {name!r}; documented: {sorted(tables())}") from None


def table_for(relpath: str | Path) -> Table | None:
    """The documented table a parquet file under results/ is (path relative to results/)."""
    rel = Path(relpath).as_posix()
    found = [t for t in tables().values() if t.matches(rel)]
    return found[0] if found else None


def descriptions(name: str) -> dict[str, str]:
    """Column -> description of a documented table, in its documented order."""
    return {c.name: c.description for c in table(name).columns.values()}


def polars_dtype(name: str) -> Any:
    """The polars dtype of a documented dtype name (``List(String)`` included)."""
    import polars as pl

    if name.startswith("List(") and name.endswith(")"):
        return pl.List(polars_dtype(name[len("List(") : -1]))
    return getattr(pl, name)


def polars_schema(name: str) -> dict[str, Any]:
    """Column -> polars dtype of a documented table, every column, in documented order."""
    return {c.name: polars_dtype(c.dtype) for c in table(name).columns.values()}


def problems(name: str, schema: Mapping[str, Any]) -> list[str]:
    """How a written table's schema (column -> polars dtype) differs from its documentation:
    undocumented columns, documented columns missing (a column with a `when` may be), and
    dtypes that differ. Empty when it agrees."""
    documented = table(name).columns
    out = [f"{name}: undocumented column {c!r}" for c in schema if c not in documented]
    out += [
        f"{name}: documented column {c.name!r} missing"
        for c in documented.values()
        if c.required and c.name not in schema
    ]
    out += [
        f"{name}.{c}: dtype {dtype} but documented {documented[c].dtype}"
        for c, dtype in schema.items()
        if c in documented and str(dtype) != documented[c].dtype
    ]
    return out


# ---------------------------------------------------------------- rendering
INTRO = (
    "Every table the workflow writes under results/, column by column (source: "
    "sae_audit/tables.schema.yaml). Paths are under results/; {model}, {sae} and {variant} "
    "are a model, one of its SAEs and a variant. A column marked 'only when' is there "
    "only under that condition. Conventions: a share in percent ends in _pct and is "
    "0..100; any other share is a fraction 0..1 and its name says so (rate, fraction, "
    "frac, sparsity)."
)


def _unit_text(column: Column, all_units: Mapping[str, str]) -> str:
    return f"{column.unit} ({all_units[column.unit]})" if column.unit else ""


def _about(column: Column) -> str:
    return column.description + (f" (only when {column.when})" if column.when else "")


def render(fmt: str, path: str | Path = SCHEMA_PATH) -> str:
    """The whole documentation as one document: ``md``, ``rst`` or ``html``."""
    docs, all_units = tables(path), units(path)
    if fmt not in FORMATS.values():
        raise ValueError(f"format must be one of {sorted(FORMATS.values())}, got {fmt!r}")
    return {"md": _markdown, "rst": _rst, "html": _html}[fmt](docs, all_units)


def _markdown(docs: Mapping[str, Table], all_units: Mapping[str, str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["# Output tables", "", INTRO, ""]
    for t in docs.values():
        forms = ", ".join(f"`{p}`" for p in (t.path, *t.also))
        lines += [f"## {t.name}", "", f"{forms} (rule `{t.rule}`): {t.description}", ""]
        lines += ["| column | dtype | unit | description |", "|---|---|---|---|"]
        lines += [
            f"| `{c.name}` | {c.dtype} | {cell(c.unit or '')} | {cell(_about(c))} |"
            for c in t.columns.values()
        ]
        lines.append("")
    lines += ["## Units", ""] + [f"- **{k}**: {v}" for k, v in all_units.items()] + [""]
    return "\n".join(lines)


def _rst_text(text: str) -> str:
    """Plain text in reStructuredText: markup characters escaped (``|x|`` is no substitution)."""
    return re.sub(r"([\\`*|_])", r"\\\1", text)


def _rst(docs: Mapping[str, Table], all_units: Mapping[str, str]) -> str:
    def title(text: str, mark: str) -> list[str]:
        return [text, mark * len(text), ""]

    lines = [*title("Output tables", "="), _rst_text(INTRO), ""]
    for t in docs.values():
        forms = ", ".join(f"``{p}``" for p in (t.path, *t.also))
        about = _rst_text(t.description)
        lines += [*title(_rst_text(t.name), "-"), f"{forms} (rule ``{t.rule}``): {about}", ""]
        lines += [".. list-table::", "   :header-rows: 1", ""]
        lines += [
            "   * - column",
            "     - dtype",
            "     - unit",
            "     - description",
        ]
        for c in t.columns.values():
            lines += [
                f"   * - ``{c.name}``",
                f"     - {c.dtype}",
                f"     - {c.unit or ''}",
                f"     - {_rst_text(_about(c))}",
            ]
        lines.append("")
    lines += title("Units", "-")
    lines += [f"- **{k}**: {_rst_text(v)}" for k, v in all_units.items()] + [""]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:70em}"
    "table{border-collapse:collapse;margin-bottom:1.5em}"
    "th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
    "th{background:#f3f3f3}code{white-space:nowrap}nav a{margin-right:.6em}"
)


def _html(docs: Mapping[str, Table], all_units: Mapping[str, str]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>Output tables: columns</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Output tables: columns</h1>",
        f"<p>{e(INTRO)}</p>",
        "<nav>" + "".join(f'<a href="#{e(n)}">{e(n)}</a>' for n in docs) + "</nav>",
    ]
    for t in docs.values():
        forms = ", ".join(f"<code>{e(p)}</code>" for p in (t.path, *t.also))
        parts += [
            f'<h2 id="{e(t.name)}">{e(t.name)}</h2>',
            f"<p>{forms} (rule <code>{e(t.rule)}</code>): {e(t.description)}</p>",
            "<table><tr><th>column</th><th>dtype</th><th>unit</th><th>description</th></tr>",
        ]
        parts += [
            f"<tr><td><code>{e(c.name)}</code></td><td>{e(c.dtype)}</td>"
            f'<td title="{e(_unit_text(c, all_units))}">{e(c.unit or "")}</td>'
            f"<td>{e(_about(c))}</td></tr>"
            for c in t.columns.values()
        ]
        parts.append("</table>")
    parts += ["<h2>Units</h2>", "<ul>"]
    parts += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in all_units.items()]
    parts += ["</ul>", "</body></html>", ""]
    return "\n".join(parts)


def write_docs(out: str | Path) -> dict[str, Any]:
    """Render the documentation in the format of `out`'s suffix (.html, .md, .rst) and write it."""
    out = Path(out)
    fmt = FORMATS.get(out.suffix)
    if fmt is None:
        raise ValueError(f"{out}: the page must end in one of {sorted(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(fmt), encoding="utf-8")
    docs = tables()
    return {
        "out": str(out),
        "tables": len(docs),
        "columns": sum(len(t.columns) for t in docs.values()),
    }
