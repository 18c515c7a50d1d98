"""Jobs find `sae-audit` the way the running Snakemake was installed (sae_audit.launcher)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_audit import launcher

from .conftest import ROOT, TEST_CONFIG

# A PATH with the system's tools (bash, cp) but without this Python's scripts directory:
# what a shell that never activated the venv has.
BARE_PATH = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


def _own_scripts_dir() -> Path:
    return next(d for d in launcher.scripts_dirs() if (d / launcher.COMMAND).is_file())


def test_put_on_path_puts_this_pythons_scripts_first():
    env = {"PATH": BARE_PATH}
    found = launcher.put_on_path(env)
    assert Path(found) == _own_scripts_dir() / launcher.COMMAND
    entries = env["PATH"].split(os.pathsep)
    assert entries[0] == str(_own_scripts_dir())
    assert entries[1:] == BARE_PATH.split(os.pathsep)
    # a second call does not stack copies of it
    launcher.put_on_path(env)
    assert env["PATH"].split(os.pathsep).count(str(_own_scripts_dir())) == 1


def test_put_on_path_fails_with_the_fix_when_nothing_has_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "scripts_dirs", lambda: [tmp_path])
    with pytest.raises(launcher.CommandNotFound, match=r"pip install -e"):
        launcher.put_on_path({"PATH": str(tmp_path)})


def _snakemake(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(TEST_CONFIG),
        "--cores", "1",
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_jobs_run_without_the_venv_on_path(tmp_path):
    """`.venv/bin/snakemake` from a shell that never activated the venv: the job's
    `sae-audit` is still found (here: PATH without this Python's scripts directory)."""
    env = {**os.environ, "PATH": BARE_PATH, "SAE_AUDIT_WARM": "0"}
    proc = _snakemake(tmp_path, env, "--until", "fixture_corpus")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "results" / "fixture" / "corpus" / "heldout.txt").stat().st_size > 0


def test_a_python_without_the_package_stops_with_one_clear_line(tmp_path):
    # A stand-in for a Python where sae_audit is not installed: a package of that name
    # that is not importable shadows the real one.
    shadow = tmp_path / "shadow" / "sae_audit"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'sae_audit'\", name='sae_audit')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    proc = _snakemake(tmp_path / "run", env, "-n")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr  # Snakemake prints a WorkflowError on stdout
    assert "cannot import 'sae_audit'" in out
    assert f"pip install -e {ROOT}" in out
