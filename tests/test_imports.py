"""Table and plot stages import no torch, so they run in envs/analysis.yaml (which lacks it).

Each check runs in a fresh interpreter: importing a module here would see whatever
the rest of the test session already imported.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
FORBIDDEN = ("torch", "sae_lens")

# What the table and plot rules import (the CLI, the stages' modules, their helpers).
TABLE_MODULES = [
    "sae_audit.fp_stats",
    "sae_audit.correlate",
    "sae_audit.perplexity",
    "sae_audit.survival",
    "sae_audit.predict",
    "sae_audit.overlap",
    "sae_audit.stability",
    "sae_audit.threshold_grid",
    "sae_audit.damaged_contexts",
    "sae_audit.reference_comparison",
    "sae_audit.plots",
    "sae_audit.shards",
    "sae_audit.files",
    "sae_audit.config",
    "sae_audit.tokens",
    "sae_audit.hooknames",
    "sae_audit.variants",
    "sae_audit.stages",
    "sae_audit.cli",
]

# The functions of sae_audit.stages that model-side rules (envs/torch.yaml) call; every
# other function there is a table or plot stage, and what it imports must be torch-free.
MODEL_STAGES = {
    "_forecast_model",  # helpers of the forecast and protect stages
    "_one_sae",
    "forecast",
    "forecast_accuracy",
    "protect",
    "protect_outcome",
    "tokenize",
    "causal",
    "compress",
    "match_sparsity",
    "encode",
    "sliding_perplexity",
    "outliers",
    "fixture_corpus",
    "fixture_tokenizer",
    "fixture_model",
    "fixture_sae",
    "fixture_sae_twin",
    "_fixture_sae",  # what fixture_sae and fixture_sae_twin call
    "fixture_reparam",
}


def loaded_after(code: str) -> list[str]:
    """The FORBIDDEN modules that `code`, run in a fresh interpreter, leaves in sys.modules."""
    check = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", TABLE_MODULES)
def test_table_module_imports_no_torch(module):
    assert loaded_after(f"import {module}") == [], f"importing {module} imports torch/sae-lens"


def stage_imports() -> dict[str, list[str]]:
    """Per table stage of sae_audit.stages, the import statements inside its body."""
    tree = ast.parse((SRC / "sae_audit" / "stages.py").read_text(encoding="utf-8"))
    stages = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name in MODEL_STAGES:
            continue
        lines = []
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom):
                module = "sae_audit." * (inner.level > 0) + (inner.module or "")
                names = ", ".join(a.name for a in inner.names)
                lines.append(f"from {module.rstrip('.')} import {names}")
            elif isinstance(inner, ast.Import):
                lines.append("import " + ", ".join(a.name for a in inner.names))
        if lines:
            stages[node.name] = lines
    return stages


def test_the_stage_list_is_current():
    tree = ast.parse((SRC / "sae_audit" / "stages.py").read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    table = set(stage_imports())
    assert names >= MODEL_STAGES, f"model stages no longer in stages.py: {MODEL_STAGES - names}"
    assert {"fp_stats", "survival", "damaged_contexts"} <= table


@pytest.mark.parametrize("stage", sorted(stage_imports()))
def test_table_stage_imports_no_torch(stage):
    """What a table stage imports when it runs (its lazy imports), short of running it."""
    imports = "\n".join(["import sae_audit.stages", *stage_imports()[stage]])
    assert loaded_after(imports) == [], f"stages.{stage} imports torch/sae-lens:\n{imports}"
