"""envs/*.yaml (for --software-deployment-method conda) list the project's own dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_lists_the_pyproject_dependencies(env):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"]}
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r): r for r in pip if not r.startswith("-")}
    assert listed == wanted  # same packages, same version bounds
    assert any(r.startswith("--no-deps -e") for r in pip), (
        "the env must install this package itself"
    )
    python = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python=", "") >= project["requires-python"].lstrip(">=")
