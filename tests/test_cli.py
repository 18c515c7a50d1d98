"""One name per stage: rule, CLI command, stage function and test file; flags from signatures;
the help of every command and option; job logs people read."""

from __future__ import annotations

import inspect
import re

import pytest

from sae_audit import cli, stages

from .conftest import ROOT
from .test_reliability_data import audit  # noqa: F401 - the module-scoped fixture

RULE_FILES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
# Rules that are not a stage of their own: figures and report tables come from the
# figure registry (tests/test_plots.py checks registry, rule and caption agree).
NOT_STAGES = {"report_tables"}


def rules() -> dict[str, str]:
    """Named rule -> the `sae-audit` command its shell runs."""
    found = {}
    for path in RULE_FILES:
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]:
            name = block.split(":", 1)[0].strip()
            command = re.search(r'"sae-audit ([\w-]+)', block)
            found[name] = command[1] if command else ""
    return found


def test_every_rule_is_a_stage_a_command_and_a_test_file():
    # report_tables is no stage of `stages`, but keeps the one name in rule and command
    assert rules()["report_tables"] == "report-tables"
    found = {r: c for r, c in rules().items() if r not in NOT_STAGES}
    assert len(found) >= 19
    for rule, command in found.items():
        assert command == rule.replace("_", "-"), f"rule {rule} runs `sae-audit {command}`"
        assert rule in stages.STAGES, f"no stage function sae_audit.stages.{rule}"
        assert (ROOT / "tests" / f"test_{rule}.py").is_file(), f"no tests/test_{rule}.py"
    # ...and every stage is run by a rule of its name.
    assert set(stages.STAGES) == set(found)


@pytest.mark.parametrize("name", sorted(stages.STAGES))
def test_stage_flags_come_from_its_keyword_only_parameters(name: str):
    fn = stages.STAGES[name]
    params = inspect.signature(fn).parameters.values()
    assert all(p.kind is p.KEYWORD_ONLY for p in params), f"{name}: parameters must be keyword-only"
    parser = cli.argparse.ArgumentParser()
    cli._COMMANDS[name.replace("_", "-")][1](parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {p.name for p in params}
    for p in params:
        action = flags[p.name]
        assert action.option_strings == [f"--{p.name.replace('_', '-')}"]
        assert action.required == (p.default is inspect.Parameter.empty), p.name


def test_pairs_flags_parse_to_mappings():
    parser = cli.argparse.ArgumentParser()
    cli._COMMANDS["stability"][1](parser)
    args = parser.parse_args(
        ["--stability", "{}", "--analysis", "{}", "--seq-len", "8", "--fp", "a", "b",
         "--codes", "x=1", "y=2", "x=3", "--out", "o"]
    )  # fmt: skip
    assert cli._grouped(args.codes) == {"x": ["1", "3"], "y": ["2"]}
    assert args.seq_len == 8 and args.stability == {}
    with pytest.raises(SystemExit):
        cli._pairs(["no-equals-sign"])


def test_every_rule_command_parses_with_the_generated_flags(tmp_path):
    """The shell command of every job a real dry run plans parses with `sae-audit`'s
    parser: no flag a stage lacks, none it needs missing, list/pairs/JSON kinds right."""
    import shlex

    from .conftest import edited_config, snakemake

    def shipped(cfg):  # shipped formats plan the calibration and their compress flags too
        cfg["compression"]["llmcompressor"] = {"w4": {"scheme": "W4A16", "method": "gptq"}}
        cfg["compression"]["gguf"] = {"q8_0": {"type": "Q8_0"}}
        # and a protected variant plans protect, its compress flag and protect_outcome
        cfg["compression"]["protect"] = {
            "w": {"levels": [{"bits": 4}, {"bits": 8}], "budget": {"bits_per_weight": 5.0}}
        }
        # and a model on the planted control plans fixture_reparam
        planted = {"model": {"source": "fixture-reparam"}}
        cfg["models"]["planted"] = {**cfg["models"]["fixture"], **planted}

    proc = snakemake(tmp_path, edited_config(tmp_path, "shipped", shipped), "-n", "-p")
    commands = [
        line.split("Shell command:", 1)[1].strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if "Shell command: sae-audit " in line
    ]
    assert len(commands) > 40
    parser = cli.build_parser()
    seen = set()
    for command in commands:
        words = shlex.split(command.split(" > ")[0])[1:]
        args = parser.parse_args(words)  # SystemExit (a test error) on a bad flag
        seen.add(args.command)
    planned = {name.replace("_", "-") for name in stages.STAGES}
    assert seen >= planned - {"reference-comparison"}


# ---------------------------------------------------------------- help and version
def test_every_command_and_every_option_has_a_one_line_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))
    listed = {a.dest: a.help for a in sub._choices_actions}
    assert set(listed) == set(cli._COMMANDS)
    for name, subparser in sub.choices.items():
        line = listed[name]
        assert line and "\n" not in line and line.endswith("."), (name, line)
        for action in subparser._actions:
            if action.dest != "help":
                assert action.help and action.help.strip(), f"{name} {action.option_strings}"
    # a stage's line is its docstring's first sentence
    assert listed["fp-stats"] == inspect.getdoc(stages.fp_stats).split("\n")[0]


def test_a_config_section_option_takes_its_help_from_the_schema():
    from sae_audit.config import section_schema

    parser = cli.argparse.ArgumentParser()
    cli._COMMANDS["match-sparsity"][1](parser)
    helps = {a.dest: a.help for a in parser._actions}
    description = " ".join(section_schema("compression.prune.matched")["description"].split())
    assert helps["matched"].startswith("JSON: config section compression.prune.matched: ")
    prefix = "JSON: config section compression.prune.matched: "
    assert description.startswith(helps["matched"].removeprefix(prefix).rstrip("."))
    assert helps["model"].startswith("JSON: config section models.<model>.model")
    # the same name is another thing in another stage: the fixture's model section there
    parser = cli.argparse.ArgumentParser()
    cli._COMMANDS["fixture-model"][1](parser)
    assert {a.dest: a.help for a in parser._actions}["model"].startswith(
        "JSON: config section fixture.model"
    )


def test_help_and_version_are_fast_and_import_no_torch():
    """Through the console script's entry point (warm start on): help and the version
    start no server and load no torch; the version is the installed package's."""
    import json
    import subprocess
    import sys
    from importlib.metadata import version

    code = (
        "import contextlib, io, json, sys\n"
        "from sae_audit.warm import main\n"
        "out = {}\n"
        "for args in (['--help'], ['encode', '--help'], ['--version']):\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "        main(args)\n"
        "    out[args[0]] = buf.getvalue()\n"
        "heavy = sorted({'torch', 'transformers', 'sae_lens'} & set(sys.modules))\n"
        "print(json.dumps({'out': out, 'heavy': heavy}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "SAE_AUDIT_WARM": "1"},
        timeout=60,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["heavy"] == []
    assert result["out"]["--version"].strip() == f"sae-audit {version('sae-audit')}"
    listing = result["out"]["--help"]
    for name in cli._COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", listing, re.M), name
    assert "--codes-dir" in result["out"]["encode"]


# ---------------------------------------------------------------- readable job logs
def test_readable_record_aligns_keys_and_keeps_nested_values_on_one_line():
    record = {
        "target": "rtn-int6",
        "target_perplexity": 63.25361226742064,
        "trace": [{"step": 1, "sparsity": 0.475, "perplexity": 65.1}],
        "params": {"tolerance": 0.0005, "max_steps": 14, "n_sequences": None},
        "text_complete": False,
        "layers": list(range(30)),
    }
    lines = cli.readable(record).splitlines()
    assert lines[0] == "target:            rtn-int6"
    assert lines[1] == "target_perplexity: 63.2536"
    # a list of rows is a table below its key
    assert lines[2] == "trace:" and "sparsity" in lines[5] and lines[5].startswith("  ")
    assert "params:            {tolerance: 0.0005, max_steps: 14, n_sequences: null}" in lines
    assert "text_complete:     false" in lines
    layers = next(line for line in lines if line.startswith("layers:"))
    assert layers.endswith(", ... (30 items)]") and "11" in layers and "12," not in layers
    assert cli.readable("results/checkpoints/fixture/rtn-int6") == (
        "results/checkpoints/fixture/rtn-int6"
    )


def test_job_logs_of_real_stages_are_readable(audit, tmp_path, capsys, caplog):  # noqa: F811
    """fp-stats (a record), correlate (a record holding rows), survival (a table) and
    compress (a path), run as their rules run them on a tiny real run's shards."""
    import json

    import polars as pl

    from .test_reliability_data import D_SAE, codes, nll

    def run(*argv) -> str:
        capsys.readouterr()
        assert cli.main([str(a) for a in argv]) == 0
        return capsys.readouterr().out

    caplog.set_level("INFO", logger="sae_audit")
    out = run("fp-stats", "--codes", *codes(audit, "fp"), "--out", tmp_path / "fp_stats.parquet")
    assert out.splitlines() == [f"d_sae:   {D_SAE}", f"n_fired: {out.split()[-1]}"]
    # the log's first line: the command and its inputs
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("sae-audit"))
    assert first.startswith("sae-audit fp-stats: codes=") and "(+1 more)" in first
    assert f"out={tmp_path / 'fp_stats.parquet'}" in first

    out = run("correlate", "--fp", *codes(audit, "fp"), "--variant", *codes(audit, "rtn-int2"),
              "--variant-name", "rtn-int2", "--out", tmp_path / "rtn-int2.parquet")  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == f"n_features: {D_SAE}" and lines[1] == "flags:"
    assert re.search(r"^\s+│ flag\s+┆ count\s+│$", out, re.M), out  # a table, not JSON
    assert not any(line.lstrip().startswith(("{", "[", '"')) for line in lines)

    perplexity = tmp_path / "perplexity.parquet"
    run("perplexity", "--nll", *[f"{v}={p}" for v in ("fp", "rtn-int2") for p in nll(audit, v)],
        "--out", perplexity)  # fmt: skip
    out = run("survival", "--analysis", "{}", "--fp-stats", tmp_path / "fp_stats.parquet",
              "--correlation", f"rtn-int2={tmp_path / 'rtn-int2.parquet'}",
              "--perplexity", perplexity, "--features-out", tmp_path / "features.parquet",
              "--summary-out", tmp_path / "survival.parquet")  # fmt: skip
    summary = pl.read_parquet(tmp_path / "survival.parquet")
    assert out.splitlines()[0] == f"shape: {summary.shape}"
    header = next(line for line in out.splitlines() if "variant" in line)
    # every column, none cut to fit a width
    assert all(f" {c} " in header for c in summary.columns), header
    assert re.search(r"^│ rtn-int2 ", out, re.M)
    # --json: the same result for scripts
    capsys.readouterr()
    argv = [
        "--json",
        "fp-stats",
        "--codes",
        *codes(audit, "fp"),
        "--out",
        tmp_path / "again.parquet",
    ]
    assert cli.main([str(a) for a in argv]) == 0
    assert json.loads(capsys.readouterr().out)["d_sae"] == D_SAE
