"""envs/*.yaml (for --software-deployment-method conda) list the project's own dependencies.

envs/torch.yaml (model-side rules) lists all of pyproject's dependencies; envs/analysis.yaml
(table and plot rules) lists them less the model-only ones, so that it truly lacks torch.
tests/test_imports.py checks that the table stages import nothing of what it leaves out.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Dependencies only the model-side rules need (envs/torch.yaml): the analysis env omits them.
MODEL_ONLY = {
    "torch",
    "sae-lens",
    "snakemake",
    "llmcompressor",
    "compressed-tensors",
    "gguf",
    "datasets",
}
# Which pyproject dependencies each env lists: all, or all less MODEL_ONLY.
ENVS = {"torch.yaml": set(), "analysis.yaml": MODEL_ONLY}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pip(env: Path) -> tuple[dict, list[str]]:
    spec = yaml.safe_load(env.read_text())
    return spec, next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)


def test_every_env_is_checked():
    assert sorted(p.name for p in (ROOT / "envs").glob("*.yaml")) == sorted(ENVS)


def test_model_only_dependencies_are_pyproject_dependencies():
    assert {_name(r) for r in _project()["dependencies"]} >= MODEL_ONLY


@pytest.mark.parametrize("env", sorted(ENVS))
def test_env_lists_the_pyproject_dependencies(env):
    project = _project()
    omitted = ENVS[env]
    wanted = {_name(r): r for r in project["dependencies"] if _name(r) not in omitted}
    spec, pip = _pip(ROOT / "envs" / env)
    listed = {_name(r): r for r in pip if not r.startswith("-")}
    assert listed == wanted  # same packages, same version bounds
    assert any(r.startswith("--no-deps -e") for r in pip), (
        "the env must install this package itself"
    )
    python = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python=", "") >= project["requires-python"].lstrip(">=")


def test_analysis_env_lacks_torch():
    _, pip = _pip(ROOT / "envs" / "analysis.yaml")
    assert not {_name(r) for r in pip if not r.startswith("-")} & MODEL_ONLY


# Rules that load a model, an SAE or a checkpoint (torch); every other rule with an env
# is a table or plot rule and runs in envs/analysis.yaml.
MODEL_RULES = {
    "tokenize",
    "tokenize_calibration",
    "compress",
    "match_sparsity",
    "encode",
    "sliding_perplexity",
    "fixture_reparam",
    "fixture_sae_twin",
    "outliers",
}


def _rule_envs() -> dict[str, str]:
    envs = {}
    for smk in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        for block in re.split(r"^(?=(?:rule|checkpoint) )", smk.read_text(), flags=re.M):
            rule = re.match(r"(?:rule|checkpoint) (\w+):", block)
            env = re.search(r"^\s+conda:\s*\n\s+\"[./]*envs/([\w.]+)\"", block, flags=re.M)
            if rule and env:
                envs[rule[1]] = env[1]
    return envs


def test_model_rules_use_the_torch_env_and_table_rules_the_analysis_env():
    envs = _rule_envs()
    assert set(envs) >= MODEL_RULES, f"model-side rules without an env: {MODEL_RULES - set(envs)}"
    wrong = {
        rule: env
        for rule, env in envs.items()
        if env
        != ("torch.yaml" if rule in MODEL_RULES or rule.startswith("fixture_") else "analysis.yaml")
    }
    assert not wrong, (
        f"rules in the wrong env (model-side: torch.yaml, tables: analysis.yaml): {wrong}"
    )
