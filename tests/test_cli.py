"""One name per stage: rule, CLI command, stage function and test file; flags from signatures."""

from __future__ import annotations

import inspect
import re

import pytest

from sae_audit import cli, stages

from .conftest import ROOT

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
    assert seen >= {name.replace("_", "-") for name in stages.STAGES} - {"reference-comparison"}
