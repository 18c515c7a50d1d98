"""`sae-audit <stage>`: the command line every Snakemake rule calls.

Every stage of `sae_audit.stages` is a command of the same name (dashes for
underscores), its flags generated from the stage's keyword-only parameters: a
parameter `codes_dir: str | Path` is `--codes-dir PATH`, `codes: list[...]` takes
several paths, `codes: Mapping[str, list[...]]` takes NAME=PATH pairs (several per
name), a config section or other mapping takes one JSON argument. No logic lives
here; the few commands that are not stages (prefetch, plot, resume) are written out.

Every command and option has a one-line help: a stage's is its docstring's first
sentence, an option's comes from OPTION_HELP, or from the config schema's description
of the section it takes. A command's result ends its job's log in a form people read
(`readable`), or as JSON with `sae-audit --json <command>`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import numbers
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

Handler = Callable[[argparse.Namespace], Any]
AddArgs = Callable[[argparse.ArgumentParser], object]
# name -> (handler, what adds its arguments, its one-line help in `sae-audit --help`)
_COMMANDS: dict[str, tuple[Handler, AddArgs, str]] = {}
log = logging.getLogger("sae_audit")


def command(name: str, args: AddArgs, help: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = (fn, args, help)
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


def _takes_json(note: str) -> bool:
    """Whether a parameter of this annotation takes one JSON argument: a config section or
    other mapping (but not NAME=PATH pairs), or a list of lists."""
    pairs = note.startswith(("Mapping[str, Paths]", "Mapping[str, str]"))
    return ("Mapping" in note and not pairs) or note.startswith("list[list")


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
    if _takes_json(note):  # a config section or other JSON
        return {**keywords, "type": json.loads, "metavar": "JSON"}, lambda v: v
    if note.startswith("list[str]"):  # several names (e.g. variants), none allowed
        return {**keywords, "nargs": "*", "metavar": "NAME"}, lambda v: list(v or [])
    if note.startswith("Paths"):  # several paths
        return {**keywords, "nargs": "*" if optional else "+", "metavar": "PATH"}, lambda v: v
    if note in ("bool", "bool | None"):
        return {**keywords, "type": _json_bool, "metavar": "true|false"}, lambda v: v
    if note == "int":
        return {**keywords, "type": int}, lambda v: v
    return keywords, lambda v: v


# ---------------------------------------------------------------- help of stage options
# One help per option name, for every stage that takes it; "stage.name" where a stage's
# option of that name is something else. A config section's option takes its help from
# the schema's description of the section instead (`_section_help`).
OPTION_HELP: dict[str, str] = {
    "causal_survival.thresholds": "JSON: causal.survived, causal.destroyed and "
    "causal.kl_ratio_band, the thresholds of the causal classes",
    "causal_survival.causal": "each variant's causal table (`sae-audit causal`), VARIANT=PATH",
    "causal_survival.out": "the per-feature table of both measures to write (parquet)",
    "causal_survival.summary_out": "the per-variant summary to write (parquet, and a .csv beside it)",
    "causal_survival.disagreements_out": "the disagreements with their contexts to write "
    "(parquet, and a .csv beside it)",
    "survival.matched": "NAME=PATH: each matched-pruning variant's search result (`sae-audit match-sparsity`), for the sparsity column",
    "feature_table.contexts": "the damaged_contexts table (`sae-audit damaged-contexts`): top FP contexts",
    "feature_table.sae_spec": "JSON: the SAE's config entry (models.<name>.saes.<sae>); a release and sae_id give a Neuronpedia link",
    "feature_table.title": "the page's title",
    "feature_table.out": "the HTML page to write",
    "table_docs.out": "the page to write: .html (the report's), .md or .rst",
    "compress.plan": "the protect job's directory (`sae-audit protect`), at most one: the plan "
    "a protect- variant is built from",
    "forecast.variants": "JSON: {variant: its config entry or null}: the variants to forecast "
    "(those without a noise model are skipped)",
    "forecast.matched": "each matched-pruning variant's search result, VARIANT=PATH: its sparsity",
    "forecast.tokens": "the evaluation token shards; the forecast runs on the first "
    "forecast.n_sequences sequences",
    "forecast.out": "the per-feature forecast table to write (parquet)",
    "forecast.sources_out": "the per-source (block matrix) forecast table to write (parquet)",
    "forecast_accuracy.forecast": "the forecast table (`sae-audit forecast`)",
    "forecast_accuracy.fit_on": "the variants the combined predictor is fitted on for "
    "transfer (forecast.fit_on); none: no transfer rows",
    "forecast_accuracy.out": "the accuracy table to write (parquet)",
    "protect.entry": "JSON: the protect entry (compression.protect.<key>): levels, budget, "
    "survived_r",
    "protect.tokens": "the evaluation token shards; the forecast runs on the first "
    "forecast.n_sequences sequences",
    "protect.out": "the directory to write: plan.json, protect.json, plan.parquet, "
    "quantization_config.json, recipe.yaml, tensor_types.txt",
    "protect_outcome.plans": "each protect- variant's protect directory, VARIANT=DIR",
    "protect_outcome.checkpoints": "each protect- variant's built checkpoint, VARIANT=DIR",
    "protect_outcome.out": "the predicted-against-achieved table to write (parquet)",
    "gate.configfile": "the workflow's config file: stands for every flag below but "
    "--enforce (results, bases, base models, SAEs, watchlist, thresholds, policy)",
    "gate.results": "the results directory of a finished run",
    "gate.bases": 'JSON: the (model, SAE) bases to certify, [["fixture", "res"], ...]',
    "gate.policy": "the policy file (YAML; see sae_audit/policy.yaml)",
    "gate.base_dirs": "each model's base model, MODEL=DIR, or MODEL=hub:ID for a hub model "
    "(hashed by its id)",
    "gate.sae_dirs": "each SAE, MODEL/SAE=DIR for one on disk or MODEL/SAE=hub:RELEASE/ID for "
    "one loaded by release (hashed by its id)",
    "gate.report": "the report's path the certificates name",
    "gate.causal": "true: causal survival was measured (causal.enabled), its table is read "
    "and checked; default true, or the config's with --configfile",
    "gate.enforce": "true (default): exit 1 when a release candidate violates the policy, "
    "after writing everything; false: only write (the workflow's gate job)",
    "gate.out": "the certificates directory to write (default <results>/certificates)",
    "gate.table_out": "the checks table to write (default <results>/tables/gate.parquet)",
    "base": "the FP base model: a hub id or a local model directory",
    "bos": "true: the token set starts every sequence with BOS (tokens.bos), "
    "dropped before the stream is read",
    "bundle": "true: copy the artifact from the package's bundled fixture when it was "
    "built from this very config (fixture.bundle); false: build it",
    "calibration": "the calibration token set (`sae-audit tokenize-calibration`); "
    "llm-compressor variants only",
    "checkpoint": "a checkpoint directory written by `sae-audit compress`",
    "codes": "code shards per variant, VARIANT=SHARD (several per variant)",
    "codes_dir": "the directory to write one code shard per SAE into (<sae name>.parquet)",
    "correlation": "correlation tables per variant, VARIANT=TABLE (`sae-audit correlate`)",
    "entry": "JSON: the variant's config entry (compression.<llmcompressor|gguf|external>"
    ".<key>); shipped formats only",
    "expect": "JSON: what every input shard must record ({model, sae, config_hash, "
    "n_tokens}); a missing key is not checked",
    "features": "the per-feature class table (features.parquet of `sae-audit survival`)",
    "features_out": "the per-feature class table to write (parquet)",
    "fp": "the FP model's code shards under the same SAE",
    "fp_nll": "the FP model's NLL shards from encode: the perplexity at sparsity 0",
    "fp_stats": "the FP feature statistics (`sae-audit fp-stats`)",
    "heldout": "the fixture's held-out text",
    "matched": "the matched-sparsity search result (`sae-audit match-sparsity`), at most one: "
    "gives a prune-matched variant its sparsity",
    "model": "the fixture model's directory",
    "model_name": "the model's name in the config (models.<name>), recorded in and checked "
    "against the shards",
    "nll": "NLL shards per variant, VARIANT=SHARD (several per variant)",
    "out": "the output file to write (.parquet table or .json record)",
    "out_dir": "the directory to write the predictor tables into",
    "pairs": 'JSON: the variant pairs to compare, [["a", "b"], ...]',
    "perplexity": "the perplexity table (`sae-audit perplexity`)",
    "reference": "the reference study's published results (models.<name>.reference)",
    "sae": "the SAE's directory (sae-lens format)",
    "sae_path": "SAEs that live on disk, NAME=DIRECTORY; the others load by release and id",
    "seed_turnover": "the seed-turnover table (`sae-audit seed-turnover`), at most one: "
    "adds the seed-stability shares",
    "seq_len": "tokens per sequence of the token set",
    "sliding": "sliding-window perplexity per variant, VARIANT=RESULT "
    "(`sae-audit sliding-perplexity`)",
    "summary_out": "the per-variant summary table to write (parquet, and a .csv beside it)",
    "tables_dir": "the directory of this run's survival, predict and overlap tables",
    "target": "the variant whose perplexity the pruned model matches (e.g. rtn-int6)",
    "target_nll": "the target variant's NLL shards from encode",
    "text": "local text files the documents come from (tokens.paths, or the fixture's "
    "held-out text); none for source: hf",
    "tokenizer": "the tokenizer: a hub id or a local directory",
    "tokens": "the evaluation token shards",
    "train": "the fixture's train text",
    "twin": "the twin SAE's directory: the same SAE trained with another seed",
    "variant": "the variant's code shards under the same SAE",
    "variant_name": "the variant's name, checked against its shards",
    "causal.fp_checkpoint": "the FP model's checkpoint directory (`sae-audit compress "
    "--variant fp`): the reference the variant's effects are compared with",
    "causal.checkpoint": "the variant's checkpoint directory (`sae-audit compress`)",
    "causal.sae_path": "the SAE if it lives on disk, NAME=DIRECTORY (NAME the one key of "
    "--saes); else it loads by release and id",
    "causal.tokens": "the evaluation token shards; the first causal.n_sequences sequences "
    "are the ablation contexts and steering prompts",
    "causal.tokenizer": "the tokenizer (a hub id or a local directory) whose special "
    "tokens encode.exclude_special_positions leaves unablated",
    "causal.out": "the per-feature causal survival table to write (parquet)",
    "compress.out": "the checkpoint directory to write",
    "compress.variant": "the variant to make, e.g. rtn-int6, prune-matched-rtn-int6, lc-gptq-w4a16",
    "encode.nll": "the NLL shard to write (per-token negative log-likelihood)",
    "encode.bos": "true: the token set starts every sequence with BOS (tokens.bos), "
    "checked against each SAE's prepend_bos",
    "encode.tokenizer": "the tokenizer (a hub id or a local directory) whose special "
    "tokens encode.exclude_special_positions leaves out",
    "encode.tokens": "the token shard to encode",
    "fixture_corpus.heldout": "the held-out text file to write",
    "fixture_corpus.train": "the train text file to write",
    "fixture_tokenizer.out": "the tokenizer directory to write",
    "fixture_model.out": "the model directory to write",
    "fixture_reparam.out": "the planted control's model directory to write",
    "fixture_sae.out": "the SAE directory to write (sae-lens format)",
    "fixture_sae_twin.out": "the twin SAE directory to write (sae-lens format)",
    "fixture_training.artifacts": "each trained fixture artifact, NAME=DIRECTORY (model, sae, "
    "sae-twin: the names of its bundled copy), holding the metrics.json of its build",
    "fixture_training.out": "the table to write (parquet)",
    "fixture_training.report": "the table's report forms to write: .html and/or .csv",
    "fp_stats.codes": "the FP model's code shards under one SAE",
    "tokenize.out": "the token shard files to write, in order",
    "tokenize_calibration.out": "the calibration token file to write",
    "tokenize_calibration.tokens": "the evaluation token shards it must share no window with",
}
# Where a config section's option is looked up in the schema, by its name; the fixture's
# stages first under `fixture` (its model, tokenizer and SAE are sections of their own).
_SECTION_PLACES = ("{name}", "models.*.{name}", "compression.prune.{name}")


def _section_help(stage: str, param: inspect.Parameter) -> str | None:
    """`JSON: config section <path>: <its description>` for an option taking a config
    section (a JSON mapping named like a schema section), else None."""
    from .config import section_label, section_schema

    if not _takes_json(str(param.annotation)):
        return None
    places = (("fixture.{name}",) if stage.startswith("fixture_") else ()) + _SECTION_PLACES
    for place in places:
        path = place.format(name=param.name)
        try:
            node = section_schema(path)
        except KeyError:
            continue
        about = first_sentence(node.get("description"))
        return f"JSON: config section {section_label(path)}" + (f": {about}" if about else "")
    return None


def option_help(stage: str, param: inspect.Parameter) -> str:
    """The one-line help of a stage's option; "" where none is written (tests/test_cli.py
    fails on it, rather than every command of a run)."""
    return (
        OPTION_HELP.get(f"{stage}.{param.name}")
        or _section_help(stage, param)
        or OPTION_HELP.get(param.name, "")
    )


def first_sentence(text: str | None) -> str:
    """The first sentence (or clause before a semicolon) of a text's first paragraph, on
    one line: a command's line in `sae-audit --help`, a section's option help."""
    first = " ".join((text or "").split("\n\n", 1)[0].split())
    for end in (". ", "; "):
        first = first.split(end, 1)[0]
    return first if not first or first.endswith(".") else first + "."


def _stage_command(name: str, fn: Callable[..., Any]) -> None:
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    flags = {p.name: _flag(p) for p in params}

    def add_args(parser: argparse.ArgumentParser) -> None:
        parser.description = inspect.getdoc(fn)
        for p in params:
            keywords, _ = flags[p.name]
            flag = f"--{p.name.replace('_', '-')}"
            help_line = option_help(name, p).replace("%", "%%")  # argparse formats help with %
            parser.add_argument(flag, dest=p.name, help=help_line, **keywords)

    def handler(a: argparse.Namespace) -> Any:
        kwargs = {}
        for pname, (_, convert) in flags.items():
            value = getattr(a, pname)
            if value is not None:
                kwargs[pname] = convert(value)
        return fn(**kwargs)

    _COMMANDS[name.replace("_", "-")] = (handler, add_args, first_sentence(inspect.getdoc(fn)))


def _register_stages() -> None:
    from .stages import STAGES

    for name, fn in STAGES.items():
        _stage_command(name, fn)


_register_stages()


@command(
    "prefetch",
    lambda p: (
        p.add_argument("--configfile", required=True, help="the workflow config file (YAML)"),
        p.add_argument("--dry-run", "-n", action="store_true", help="list what would be fetched"),
    ),
    help="Download every model and SAE a config reads from the hub into the local cache "
    "(gated models such as Gemma-2 need `hf auth login` or HF_TOKEN first).",
)
def _prefetch(a: argparse.Namespace) -> Any:
    from . import config
    from .prefetch import fetch, plan

    cfg = config.load(a.configfile)
    return [item.__dict__ for item in plan(cfg)] if a.dry_run else fetch(cfg)


@command(
    "fixture-bundle",
    lambda p: (
        p.add_argument(
            "--configfile",
            default="config/config.yaml",
            help="the config whose fixture section the bundle is built from",
        ),
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
    help="Maintainers: (re)write the fixture bundled in the package, or check it.",
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
            help="JSON: the config's analysis section, for figures that draw the class "
            'thresholds (with a "causal" key holding causal.survived/destroyed for '
            "causal_vs_pearson)",
        ),
        p.add_argument(
            "--variants",
            type=json.loads,
            default={},
            help="JSON: weight bits per variant (config.variant_bits, null for none): "
            "the order and grouping of the variants drawn",
        ),
        p.add_argument("--inputs", nargs="+", required=True, help="the tables the figure draws"),
        p.add_argument(
            "--out",
            nargs="+",
            required=True,
            help="the figure's file(s), one per format: .png, .svg, .pdf",
        ),
    ),
    help="Draw one figure of the report from result tables.",
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
    help="A result table as a readable HTML and/or CSV table of the report.",
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
    help="Resume a killed run: unlock the working directory and run snakemake again.",
)
def _resume(a: argparse.Namespace) -> Any:
    # After kill -9: refuses while the run lives, else `snakemake --unlock` and a re-run.
    from .hints import resume

    if code := resume(a.snakemake_args):
        raise SystemExit(code)


DESCRIPTION = """\
Audit whether the sparse-autoencoder features of a language model survive its
compression. Each command is one step of the workflow (`snakemake` runs them, one job
each); `sae-audit <command> --help` lists a command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-audit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sae-audit {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the command's result as JSON (for scripts) instead of readable text",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (_, add_args, help_line) in _COMMANDS.items():
        # The description keeps the docstring's paragraphs as written.
        formatter = argparse.RawDescriptionHelpFormatter
        help_line = help_line.replace("%", "%%")  # argparse formats help with %
        add_args(sub.add_parser(name, help=help_line, formatter_class=formatter))
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sae-audit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return f"{__version__} (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.info("sae-audit %s: %s", args.command, inputs_line(args))  # a job log's first line
    from .files import AuditError
    from .threads import apply_torch_threads

    apply_torch_threads()  # the rule's {threads}, cold or warm (sae_audit.threads)

    try:
        result = _COMMANDS[args.command][0](args)
    except AuditError as e:
        # A failure the user can act on: one line naming the file and the fix, last in
        # the job's log where Snakemake's error points, instead of a library traceback.
        logging.getLogger("sae_audit").debug("traceback", exc_info=True)
        print(f"sae-audit {args.command}: error: {e}", file=sys.stderr)
        return 1
    if result is not None:
        print(as_json(result) if args.json else readable(result))
    return 0


# ---------------------------------------------------------------- what a job log shows
# The first line of a job's log names the command and its inputs; the last lines are the
# command's result, for people: a record as aligned `key: value` lines, a table as a
# table. Config sections (JSON) are left out of the first line: the config file has them.
_NOT_INPUTS = {"command", "verbose", "json"}
LINE_VALUE_CHARS = 80  # one value of the first line, at most
TABLE_CONFIG = {
    "tbl_rows": 20,
    "tbl_cols": 24,
    "tbl_width_chars": 1000,  # no wrapped cells: a log is read with long lines
    "tbl_hide_column_data_types": True,
    "fmt_str_lengths": 40,
}
LIST_ITEMS = 12  # items of a list shown before it is cut short


def inputs_line(args: argparse.Namespace) -> str:
    """`name=value, ...` of the arguments given, JSON ones left out, long ones cut short."""
    parts = []
    for name, value in vars(args).items():
        if name in _NOT_INPUTS or value is None or value == [] or isinstance(value, Mapping):
            continue
        if isinstance(value, list):
            if any(isinstance(v, list | Mapping) for v in value):  # JSON
                continue
            text = str(value[0]) + (f" (+{len(value) - 1} more)" if len(value) > 1 else "")
        else:
            text = compact(value)
        if len(text) > LINE_VALUE_CHARS:
            text = text[: LINE_VALUE_CHARS - 3] + "..."
        parts.append(f"{name}={text}")
    return ", ".join(parts)


def as_json(result: Any) -> str:
    if isinstance(result, pl.DataFrame):
        result = result.to_dicts()
    return json.dumps(result, indent=2, default=str)


def readable(result: Any) -> str:
    """A command's result as people read it (see `_table`, `_record_lines`, `compact`)."""
    table = _table(result)
    if table is not None:
        return _table_text(table)
    if isinstance(result, Mapping):
        return "\n".join(_record_lines(result))
    return compact(result)


def _table(value: Any) -> pl.DataFrame | None:
    """A DataFrame, or a list of row records as one; None for anything else."""
    if isinstance(value, pl.DataFrame):
        return value
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        try:
            return pl.from_dicts([dict(v) for v in value], infer_schema_length=None)
        except (TypeError, ValueError, pl.exceptions.PolarsError):  # rows of mixed kinds
            return None
    return None


def _table_text(table: pl.DataFrame) -> str:
    with pl.Config(**TABLE_CONFIG):
        return str(table)


def _record_lines(record: Mapping[str, Any]) -> list[str]:
    """`key: value` lines, values aligned; a table value below its key, indented."""
    width = max((len(str(k)) for k in record), default=0) + 1
    lines = []
    for key, value in record.items():
        table = _table(value)
        if table is None:
            lines.append(f"{f'{key}:':<{width}} {compact(value)}")
        else:
            lines.append(f"{key}:")
            lines.extend("  " + line for line in _table_text(table).splitlines())
    return lines


def compact(value: Any) -> str:
    """One value on one line: numbers to 6 significant digits, mappings and lists inline,
    long lists cut short with their length."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.6g}"
    if isinstance(value, str | Path):
        return str(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        shown = [compact(v) for v in value[:LIST_ITEMS]]
        if len(value) > LIST_ITEMS:
            shown.append(f"... ({len(value)} items)")
        return "[" + ", ".join(shown) + "]"
    if isinstance(value, pl.DataFrame):
        return f"<table: {value.height} rows, {value.width} columns>"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
