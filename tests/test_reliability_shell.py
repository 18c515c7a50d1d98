"""Shell safety of the rules: every path reaches its command as one quoted word.

A results directory, a token text file, a local model and an SAE directory whose
paths hold a space, a `;` and an injection attempt (`; touch INJECTED #`: unquoted,
the shell would run `touch INJECTED` and comment out the rest of the command) run
through the real workflow: the run succeeds, writes only under the results
directory and runs nothing else. A job that fails there leaves its error in its
own log, not in a stray file split off at the space.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, save_tiny_model, snakemake
from .test_families import make_sae
from .test_hub_models import SENTENCES, activations

RULE_FILES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
WEIRD = "; touch INJECTED #"  # unquoted: runs `touch INJECTED`, comments out the rest
RESULTS = f"res dir{WEIRD}"
HOOK = "blocks.1.hook_resid_post"


# ---------------------------------------------------------------- every placeholder quoted
def shell_commands(text: str) -> dict[str, str | None]:
    """rule -> its shell command (the string literals after `shell:`, joined), for every
    rule with a `shell:`, named or defined in a loop (`rule:` with `name:`, indented);
    None where the command is not snakefmt's plain string literals."""
    commands: dict[str, str | None] = {}
    blocks = re.split(r"^[ \t]*rule\b", text, flags=re.M)[1:]
    for i, block in enumerate(blocks):
        name = block.split(":", 1)[0].strip() or f"<unnamed rule {i}>"
        shell = re.search(r"^([ \t]+)shell:\n", block, flags=re.M)
        if shell is None:
            continue
        indent = shell[1] + "    "
        m = re.match(rf"((?:{indent}\"(?:[^\"\\]|\\.)*\"\n?)+)", block[shell.end() :])
        commands[name] = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m[1])) if m else None
    return commands


def n_rules(text: str) -> int:
    return len(re.findall(r"^[ \t]*rule\b[^\n]*:[ \t]*$", text, flags=re.M))


def test_every_shell_placeholder_is_quoted():
    commands = {
        f"{path.name}:{rule}": cmd
        for path in RULE_FILES
        for rule, cmd in shell_commands(path.read_text()).items()
    }
    # every rule of the workflow has a shell command, and every one is read here
    assert len(commands) == sum(n_rules(path.read_text()) for path in RULE_FILES) >= 20
    unparsed = [rule for rule, cmd in commands.items() if cmd is None]
    assert not unparsed, f"shell: of {unparsed} is not a plain string literal; check it by hand"
    placeholders = [
        (rule, p)
        for rule, cmd in commands.items()
        for p in re.findall(r"{[^{}]*}", (cmd or "").replace("{{", "").replace("}}", ""))
    ]
    assert len(placeholders) > 5 * len(commands)
    unquoted = [(rule, p) for rule, p in placeholders if not p.endswith(":q}")]
    assert not unquoted, f"unquoted shell placeholders (add :q): {unquoted}"


def test_the_checker_sees_an_unquoted_placeholder():
    text = (
        'rule x:\n    shell:\n        "a {input:q} "\n        "--out {output} > {log:q}"\n\n\n'
        'rule y:\n    input:\n        "a",\n    run:\n        pass\n\n\n'
        "rule z:\n    shell:\n        'b {output}'\n"
    )
    assert shell_commands(text) == {"x": "a {input:q} --out {output} > {log:q}", "z": None}


# ---------------------------------------------------------------- the real workflow
def listing(root: Path, skip: tuple[Path, ...]) -> set[str]:
    """Every path under root (files and directories), except those under `skip`."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if not any(p == s or s in p.parents for s in skip)
    }


def write_config(tmp: Path, text: str, n_sequences: int = 8, results: str = RESULTS) -> Path:
    """A local tiny GPT-NeoX, an SAE and a text token file, all under weird paths."""
    inputs = tmp / f"in puts{WEIRD}"
    corpus = inputs / f"corpus text{WEIRD}.txt"
    inputs.mkdir()
    corpus.write_text(text)
    model_dir = save_tiny_model("gpt_neox", inputs / "model dir")
    sae = make_sae("standard", 32, 48, HOOK, acts=activations(model_dir, HOOK))
    sae.save_model(inputs / f"sae dir{WEIRD}")
    config = {
        "results": results,
        "models": {
            "tiny": {
                "model": {"source": str(model_dir), "dtype": "float32"},
                "saes": {"res1": {"path": str(inputs / f"sae dir{WEIRD}")}},
                "tokens": {
                    "source": "text",
                    "paths": [str(corpus)],
                    "seq_len": 16,
                    "n_sequences": n_sequences,
                    "n_shards": 1,
                },
                "resources": {"threads": 1, "mem_mb": 1000},
            }
        },
        "compression": {
            "rtn": {"bits": [8]},
            "prune": {"sparsities": [], "matched": {"targets": []}},
        },
        "stability": {"null_run": False, "subsets": 0, "token_budgets": [1.0]},
        "encode": {"batch_size": 8, "device": "cpu"},
        "perplexity": {"sliding": False},
        "predict": {"folds": 2},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def assert_nothing_injected(*roots: Path) -> None:
    for root in roots:
        assert not (root / "INJECTED").exists(), root
        assert not list(root.rglob("INJECTED")), root


@pytest.mark.slow
def test_weird_paths_run_quoted_and_write_only_under_results(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path, "\n\n".join(SENTENCES * 4))
    work = tmp_path / "work"
    work.mkdir()
    results = work / RESULTS
    before = listing(tmp_path, skip=(work / ".snakemake", results))

    tables = [
        f"{RESULTS}/tables/tiny/perplexity.parquet",
        *(
            f"{RESULTS}/tables/tiny/res1/{t}.parquet"
            for t in ("survival", "predict", "overlap", "stability", "threshold_grid")
        ),
    ]
    proc = snakemake(work, config, *tables)
    assert proc.returncode == 0
    for target in tables:
        assert (work / target).is_file(), target
    assert (results / "logs" / "encode" / "tiny" / "rtn-int8" / "shard-000.log").is_file()

    assert listing(tmp_path, skip=(work / ".snakemake", results)) == before
    assert_nothing_injected(tmp_path, ROOT)


def test_failing_job_logs_its_error_under_a_spaced_results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # 64 tokens needed (4 x 16), the text has far fewer: tokenize fails.
    config = write_config(tmp_path, "too short", n_sequences=4, results="res dir")
    work = tmp_path / "work"
    work.mkdir()
    results = work / "res dir"
    before = listing(tmp_path, skip=(work / ".snakemake", results))

    target = "res dir/tokens/tiny"
    proc = snakemake(work, config, target, check=False)
    assert proc.returncode != 0
    log = results / "logs" / "tokenize" / "tiny.log"
    assert log.is_file(), sorted(map(str, results.rglob("*")))
    text = log.read_text()
    assert "lower tokens.n_sequences" in text and "needs 64 tokens" in text, text
    assert str(log.relative_to(work)) in proc.stdout + proc.stderr

    assert not (work / "res").exists()
    assert listing(tmp_path, skip=(work / ".snakemake", results)) == before
    assert_nothing_injected(tmp_path, ROOT)
