"""`sae-audit <stage>`: the command line every Snakemake rule calls.

Each subcommand parses paths and a JSON slice of the config, then calls one
function of `sae_audit.stages` (or the fixture builders). No logic lives here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

Handler = Callable[[argparse.Namespace], Any]
_COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], object]]] = {}


def command(
    name: str, args: Callable[[argparse.ArgumentParser], object]
) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = (fn, args)
        return fn

    return register


def _params(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params", type=json.loads, default={}, help="JSON slice of the workflow config"
    )


def _expect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expect",
        type=json.loads,
        default=None,
        help="JSON: what the shards must record (model, sae, config_hash, n_tokens)",
    )


def _pairs(values: Sequence[str]) -> dict[str, str]:
    """NAME=PATH arguments as a mapping."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=PATH, got {v!r}")
        out[name] = path
    return out


# ---------------------------------------------------------------- fixture
@command(
    "fixture-corpus", lambda p: (_params(p), p.add_argument("--train"), p.add_argument("--heldout"))
)
def _fixture_corpus(a: argparse.Namespace) -> Any:
    from .fixture import CorpusConfig, build_corpus

    return build_corpus(CorpusConfig(**a.params), a.train, a.heldout)


@command(
    "fixture-tokenizer", lambda p: (_params(p), p.add_argument("--train"), p.add_argument("--out"))
)
def _fixture_tokenizer(a: argparse.Namespace) -> Any:
    from .fixture import TokenizerConfig, train_tokenizer

    train_tokenizer(TokenizerConfig(**a.params), a.train, a.out)
    return {"tokenizer": a.out}


@command(
    "fixture-model",
    lambda p: (
        _params(p),
        p.add_argument("--tokenizer"),
        p.add_argument("--train"),
        p.add_argument("--heldout"),
        p.add_argument("--out"),
    ),
)
def _fixture_model(a: argparse.Namespace) -> Any:
    from .fixture import ModelTrainConfig, train_model

    return train_model(ModelTrainConfig(**a.params), a.tokenizer, a.train, a.heldout, a.out)


@command(
    "fixture-sae",
    lambda p: (
        _params(p),
        p.add_argument("--model"),
        p.add_argument("--train"),
        p.add_argument("--out"),
    ),
)
def _fixture_sae(a: argparse.Namespace) -> Any:
    from .fixture import SAETrainConfig, train_sae

    return train_sae(SAETrainConfig(**a.params), a.model, a.train, a.out)


# ---------------------------------------------------------------- sweep
@command(
    "tokenize",
    lambda p: (
        _params(p),
        p.add_argument("--tokenizer", required=True),
        p.add_argument("--text", nargs="*", default=[]),
        p.add_argument("--out", nargs="+", required=True),
    ),
)
def _tokenize(a: argparse.Namespace) -> Any:
    from .stages import tokenize

    return tokenize(a.tokenizer, a.text, a.params, a.out)


@command(
    "compress",
    lambda p: (
        _params(p),
        p.add_argument("--base", required=True),
        p.add_argument("--variant", required=True),
        p.add_argument(
            "--matched", nargs="*", default=[], help="matched-sparsity result (JSON): zero or one"
        ),
        p.add_argument("--out", required=True),
    ),
)
def _compress(a: argparse.Namespace) -> Any:
    from .stages import compress

    if len(a.matched) > 1:
        raise SystemExit("compress: --matched takes at most one path")
    return str(compress(a.base, a.variant, a.params, a.out, a.matched[0] if a.matched else None))


@command(
    "match-sparsity",
    lambda p: (
        _params(p),
        p.add_argument("--base", required=True),
        p.add_argument("--target", required=True),
        p.add_argument("--target-nll", nargs="+", required=True),
        p.add_argument("--tokens", nargs="+", required=True),
        p.add_argument("--model-name", default=None),
        p.add_argument("--out", required=True),
    ),
)
def _match(a: argparse.Namespace) -> Any:
    from .stages import match_sparsity

    return match_sparsity(
        a.base,
        a.target,
        a.target_nll,
        a.tokens,
        a.params["model"],
        a.params["matched"],
        a.params["encode"],
        a.out,
        model_name=a.model_name,
    )


@command(
    "encode",
    lambda p: (
        _params(p),
        p.add_argument("--checkpoint", required=True),
        p.add_argument("--sae-path", nargs="*", default=[], help="SAE=DIR for SAEs on disk"),
        p.add_argument("--tokens", required=True),
        p.add_argument("--codes-dir", required=True),
        p.add_argument("--nll", required=True),
        p.add_argument("--model-name", required=True),
    ),
)
def _encode(a: argparse.Namespace) -> Any:
    from .stages import encode

    return encode(
        a.checkpoint,
        a.params["saes"],
        _pairs(a.sae_path),
        a.tokens,
        a.codes_dir,
        a.nll,
        a.model_name,
        a.params["model"],
        a.params["encode"],
    )


@command(
    "stats",
    lambda p: (
        _expect(p),
        p.add_argument("--codes", nargs="+", required=True),
        p.add_argument("--out", required=True),
    ),
)
def _stats(a: argparse.Namespace) -> Any:
    from .stages import fp_stats

    return fp_stats(a.codes, a.out, expect=a.expect)


@command(
    "correlate",
    lambda p: (
        _expect(p),
        p.add_argument("--fp", nargs="+", required=True),
        p.add_argument("--variant", nargs="+", required=True),
        p.add_argument("--variant-name", default=None, help="the variant the shards must be of"),
        p.add_argument("--out", required=True),
    ),
)
def _correlate(a: argparse.Namespace) -> Any:
    from .stages import correlate

    return correlate(a.fp, a.variant, a.out, variant=a.variant_name, expect=a.expect)


@command(
    "sliding-perplexity",
    lambda p: (
        _params(p),
        p.add_argument("--checkpoint", required=True),
        p.add_argument("--tokens", nargs="+", required=True),
        p.add_argument("--tokenizer", required=True),
        p.add_argument("--out", required=True),
    ),
)
def _sliding(a: argparse.Namespace) -> Any:
    from .stages import sliding_perplexity

    return sliding_perplexity(a.checkpoint, a.tokens, a.tokenizer, a.params, a.out)


@command(
    "perplexity",
    lambda p: (
        _expect(p),
        p.add_argument("--nll", nargs="+", required=True, help="VARIANT=PATH per NLL shard"),
        p.add_argument("--sliding", nargs="*", default=[], help="VARIANT=PATH per sliding result"),
        p.add_argument("--out", required=True),
    ),
)
def _perplexity(a: argparse.Namespace) -> Any:
    from .stages import perplexity_table

    return perplexity_table(_grouped(a.nll), _pairs(a.sliding), a.out, expect=a.expect)


@command(
    "survival",
    lambda p: (
        _params(p),
        p.add_argument("--fp-stats", required=True),
        p.add_argument("--correlation", nargs="+", required=True, help="VARIANT=PATH"),
        p.add_argument("--perplexity", required=True),
        p.add_argument("--features-out", required=True),
        p.add_argument("--summary-out", required=True),
    ),
)
def _survival(a: argparse.Namespace) -> Any:
    from .stages import survival

    return survival(
        a.fp_stats, _pairs(a.correlation), a.perplexity, a.params, a.features_out, a.summary_out
    )


def _grouped(values: Sequence[str]) -> dict[str, list[str]]:
    """NAME=PATH arguments, several per name, grouped in order."""
    out: dict[str, list[str]] = {}
    for name, path in (v.partition("=")[::2] for v in values):
        out.setdefault(name, []).append(path)
    return out


@command(
    "predict",
    lambda p: (
        _params(p),
        p.add_argument("--features", required=True),
        p.add_argument("--out-dir", required=True),
    ),
)
def _predict(a: argparse.Namespace) -> Any:
    from .stages import predict

    return predict(a.features, a.params, a.out_dir).to_dicts()


@command(
    "overlap",
    lambda p: (
        _params(p),
        p.add_argument("--features", required=True),
        p.add_argument("--out", required=True),
    ),
)
def _overlap(a: argparse.Namespace) -> Any:
    from .stages import overlap_table

    return overlap_table(a.features, a.params["pairs"], a.out).to_dicts()


@command(
    "stability",
    lambda p: (
        _params(p),
        _expect(p),
        p.add_argument("--fp", nargs="+", required=True),
        p.add_argument("--codes", nargs="+", required=True, help="VARIANT=PATH per code shard"),
        p.add_argument("--out", required=True),
    ),
)
def _stability(a: argparse.Namespace) -> Any:
    from .stages import stability

    return stability(a.fp, _grouped(a.codes), a.params, a.out, expect=a.expect).to_dicts()


@command(
    "threshold-grid",
    lambda p: (
        _params(p),
        p.add_argument("--features", required=True),
        p.add_argument("--out", required=True),
    ),
)
def _threshold_grid(a: argparse.Namespace) -> Any:
    from .stages import threshold_grid

    return threshold_grid(a.features, a.params, a.out).height


@command(
    "contexts",
    lambda p: (
        _params(p),
        _expect(p),
        p.add_argument("--features", required=True),
        p.add_argument("--fp", nargs="+", required=True),
        p.add_argument("--codes", nargs="+", required=True, help="VARIANT=PATH per code shard"),
        p.add_argument("--tokens", nargs="+", required=True),
        p.add_argument("--tokenizer", required=True),
        p.add_argument("--out", required=True),
    ),
)
def _contexts(a: argparse.Namespace) -> Any:
    from .stages import contexts

    table = contexts(
        a.features, a.fp, _grouped(a.codes), a.tokens, a.tokenizer, a.params, a.out, expect=a.expect
    )
    return table.height


@command(
    "reference",
    lambda p: (
        p.add_argument("--reference", required=True, help="published results (CSV)"),
        p.add_argument("--tables-dir", required=True),
        p.add_argument("--perplexity", required=True),
        p.add_argument("--out", required=True),
    ),
)
def _reference(a: argparse.Namespace) -> Any:
    from .stages import reference_comparison

    return reference_comparison(a.reference, a.tables_dir, a.perplexity, a.out).height


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
    "plot",
    lambda p: (
        p.add_argument("figure", help="name of a function in sae_audit.plots"),
        p.add_argument("--inputs", nargs="+", required=True),
        p.add_argument("--out", nargs="+", required=True, help="one file, or several forms of it"),
    ),
)
def _plot(a: argparse.Namespace) -> Any:
    from . import plots

    fn = getattr(plots, a.figure, None)
    if fn is None or a.figure.startswith("_"):
        raise SystemExit(f"unknown figure {a.figure!r}")
    for out in a.out:  # one process for every form (e.g. a report table as .html and .csv)
        fn(*a.inputs, out=out)


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-audit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_args) in _COMMANDS.items():
        add_args(sub.add_parser(name))
    args = parser.parse_args(argv)
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
