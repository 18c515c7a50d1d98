"""`sae-audit <stage>`: the command line every Snakemake rule calls.

Every stage of `sae_audit.stages` is a command of the same name (dashes for
underscores), its flags generated from the stage's keyword-only parameters: a
parameter `codes_dir: str | Path` is `--codes-dir PATH`, `codes: list[...]` takes
several paths, `codes: Mapping[str, list[...]]` takes NAME=PATH pairs (several per
name), a config section or other mapping takes one JSON argument. No logic lives
here; the few commands that are not stages (prefetch, plot, resume) are written out.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

Handler = Callable[[argparse.Namespace], Any]
_COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], object]]] = {}


def command(
    name: str, args: Callable[[argparse.ArgumentParser], object]
) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = (fn, args)
        return fn

    return register


# ---------------------------------------------------------------- stages, from their signatures
def _pairs(values: Sequence[str]) -> dict[str, str]:
    """NAME=PATH arguments as a mapping."""
    return dict(_pairs_list(values))


def _grouped(values: Sequence[str]) -> dict[str, list[str]]:
    """NAME=PATH arguments, several per name, grouped in order."""
    out: dict[str, list[str]] = {}
    for name, path in _pairs_list(values):
        out.setdefault(name, []).append(path)
    return out


def _pairs_list(values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=PATH, got {v!r}")
        pairs.append((name, path))
    return pairs


def _json_bool(text: str) -> bool:
    value = json.loads(text)
    if not isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def _flag(param: inspect.Parameter) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """argparse keywords and a converter for one stage parameter, read off its annotation.

    Annotations are strings (`from __future__ import annotations`): the kinds are few
    and spelled one way in `stages`, and tests/test_cli.py checks every stage parses.
    """
    note = str(param.annotation)
    optional = param.default is not inspect.Parameter.empty
    keywords: dict[str, Any] = {"required": not optional}
    if optional:
        keywords["default"] = None
    if note.startswith("Mapping[str, Paths]"):  # NAME=PATH, several per name
        nargs = "*" if optional else "+"
        return {**keywords, "nargs": nargs, "metavar": "NAME=PATH"}, lambda v: _grouped(v or [])
    if note.startswith("Mapping[str, str]"):  # NAME=PATH
        nargs = "*" if optional else "+"
        return {**keywords, "nargs": nargs, "metavar": "NAME=PATH"}, lambda v: _pairs(v or [])
    if "Mapping" in note or note.startswith("list[list"):  # a config section or other JSON
        return {**keywords, "type": json.loads, "metavar": "JSON"}, lambda v: v
    if note.startswith("Paths"):  # several paths
        return {**keywords, "nargs": "*" if optional else "+", "metavar": "PATH"}, lambda v: v
    if note == "bool":
        return {**keywords, "type": _json_bool, "metavar": "true|false"}, lambda v: v
    if note == "int":
        return {**keywords, "type": int}, lambda v: v
    return keywords, lambda v: v


def _stage_command(name: str, fn: Callable[..., Any]) -> None:
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    flags = {p.name: _flag(p) for p in params}

    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.description = inspect.getdoc(fn)
        for pname, (keywords, _) in flags.items():
            parser.add_argument(f"--{pname.replace('_', '-')}", dest=pname, **keywords)

    def handler(a: argparse.Namespace) -> Any:
        kwargs = {}
        for pname, (_, convert) in flags.items():
            value = getattr(a, pname)
            if value is not None:
                kwargs[pname] = convert(value)
        result = fn(**kwargs)
        # A table is summarized in the log by its shape, not printed whole.
        return (
            {"rows": result.height, "columns": result.width}
            if isinstance(result, pl.DataFrame)
            else result
        )

    _COMMANDS[name.replace("_", "-")] = (handler, add_args)


def _register_stages() -> None:
    from .stages import STAGES

    for name, fn in STAGES.items():
        _stage_command(name, fn)


_register_stages()


@command(
    "prefetch",
    lambda p: (
        p.add_argument("--configfile", required=True),
        p.add_argument("--dry-run", "-n", action="store_true", help="list what would be fetched"),
    ),
)
def _prefetch(a: argparse.Namespace) -> Any:
    from . import config
    from .prefetch import fetch, plan

    cfg = config.load(a.configfile)
    return [item.__dict__ for item in plan(cfg)] if a.dry_run else fetch(cfg)


@command(
    "fixture-bundle",
    lambda p: (
        p.add_argument("--configfile", default="config/config.yaml"),
        p.add_argument(
            "--from",
            dest="fixture_dir",
            help="a fixture directory the workflow built from this config file with "
            "fixture.bundle: false (results/fixture); default: build one now",
        ),
        p.add_argument("--out", help="the bundle directory; default: the package's"),
        p.add_argument(
            "--check",
            action="store_true",
            help="rebuild from scratch and compare with the bundle instead of writing it",
        ),
    ),
)
def _fixture_bundle(a: argparse.Namespace) -> Any:
    # Maintainers: (re)write the bundled fixture, or check that it is what its config builds.
    import tempfile

    from . import config
    from .fixture import bundle

    fixture = config.load(a.configfile)["fixture"]
    out = a.out or bundle.BUNDLE_DIR
    if a.check:
        if differ := bundle.check_rebuild(fixture, out):
            raise SystemExit(f"sae-audit fixture-bundle: rebuilt files differ: {differ}")
        return {"reproduced": str(out)}
    if a.fixture_dir:
        return bundle.write_bundle(a.fixture_dir, fixture, out)
    with tempfile.TemporaryDirectory() as tmp:
        bundle.build(fixture, tmp)
        return bundle.write_bundle(tmp, fixture, out)


@command(
    "plot",
    lambda p: (
        p.add_argument("figure", help="a figure of the registry (sae_audit.figures)"),
        p.add_argument(
            "--analysis",
            type=json.loads,
            default={},
            help="JSON: the config's analysis section, for figures that draw the class thresholds",
        ),
        p.add_argument(
            "--variants",
            type=json.loads,
            default={},
            help="JSON: weight bits per variant (config.variant_bits, null for none): "
            "the order and grouping of the variants drawn",
        ),
        p.add_argument("--inputs", nargs="+", required=True),
        p.add_argument("--out", required=True),
    ),
)
def _plot(a: argparse.Namespace) -> Any:
    from .figures import FigureCallError, get_figure

    try:
        get_figure(a.figure).draw(*a.inputs, out=a.out, params=a.analysis, variants=a.variants)
    except (KeyError, FigureCallError) as e:
        raise SystemExit(f"sae-audit plot: {e.args[0]}") from None


@command(
    "report-tables",
    lambda p: (
        p.add_argument("--input", required=True, help="a result table (parquet)"),
        p.add_argument("--out", nargs="+", required=True, help="its forms: .html and/or .csv"),
        p.add_argument(
            "--variants",
            type=json.loads,
            default={},
            help="JSON: weight bits per variant (config.variant_bits, null for none): "
            "the row order and the bits column",
        ),
    ),
)
def _report_table(a: argparse.Namespace) -> Any:
    from .report_tables import report_table

    for out in a.out:  # one process for every form
        report_table(a.input, out=out, variants=a.variants)


@command(
    "resume",
    lambda p: p.add_argument(
        "snakemake_args",
        nargs=argparse.REMAINDER,
        help="after `--`: the snakemake arguments of the killed run",
    ),
)
def _resume(a: argparse.Namespace) -> Any:
    # After kill -9: refuses while the run lives, else `snakemake --unlock` and a re-run.
    from .hints import resume

    if code := resume(a.snakemake_args):
        raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-audit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args) in _COMMANDS.items():
        add_args(sub.add_parser(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .files import AuditError

    try:
        result = _COMMANDS[args.command][0](args)
    except AuditError as e:
        # A failure the user can act on: one line naming the file and the fix, last in
        # the job's log where Snakemake's error points, instead of a library traceback.
        logging.getLogger("sae_audit").debug("traceback", exc_info=True)
        print(f"sae-audit {args.command}: error: {e}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
