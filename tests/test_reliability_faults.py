"""Faults, for real: a run killed with SIGKILL and a job that fails on a missing GPU.

Each test drives the real `snakemake` CLI on a tiny saved GPT-NeoX, a tiny sae-lens
SAE and a text corpus (seconds per job, no fixture training).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from .conftest import ROOT, planned_jobs, snakemake
from .test_hub_models import write_config

MODEL, SAE = "gpt_neox", "res"
# The tables of one (model, SAE) basis: every job kind but the figures and report.
TABLES = [f"results/tables/{MODEL}/perplexity.parquet"] + [
    f"results/tables/{MODEL}/{SAE}/{name}.parquet"
    for name in ("survival", "predict", "overlap", "stability", "threshold_grid")
]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    return write_config(root, bases={MODEL: {SAE: ("standard", "blocks.1.hook_resid_post")}})


def snakemake_args(workdir: Path, config: Path) -> list[str]:
    """The arguments of one run, as a user would type them (minus `snakemake`)."""
    return [
        "--snakefile", str(ROOT / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(config),
        "--cores", "2",
        *TABLES,
    ]  # fmt: skip


def tables(workdir: Path) -> dict[str, pl.DataFrame]:
    root = workdir / "results" / "tables"
    return {str(p.relative_to(root)): pl.read_parquet(p) for p in sorted(root.rglob("*.parquet"))}


def sae_audit(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """The installed `sae-audit` console script, in this interpreter's environment."""
    cmd = [sys.executable, "-c", "import sys; from sae_audit.cli import main; sys.exit(main())"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_with_one_command(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 mid-encode; the plain re-run stops on the lock and says so; `sae-audit resume`
    finishes the run, and its tables equal an uninterrupted run's, bit for bit."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    snakemake(whole, tiny_config, *TABLES)

    log = tmp_path / "killed.log"
    with log.open("w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "snakemake", *snakemake_args(killed, tiny_config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches its jobs too
        )
    encode_logs = killed / "results" / "logs" / "encode"
    deadline = time.monotonic() + 600
    while (
        run.poll() is None and time.monotonic() < deadline and not any(encode_logs.rglob("*.log"))
    ):
        time.sleep(0.1)
    assert run.poll() is None, f"the run ended before an encode job started:\n{log.read_text()}"
    assert any(encode_logs.rglob("*.log")), "no encode job started in time"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=60)
    assert list((killed / ".snakemake" / "locks").glob("*.lock")), "SIGKILL left no lock"
    assert list((killed / ".snakemake" / "incomplete").iterdir()), "no job was running"

    # profiles/default (rerun-incomplete), which Snakemake loads by itself, plans the killed
    # job again rather than stopping with IncompleteFilesException (a dry run takes no lock).
    dry = snakemake(killed, tiny_config, "-n", *TABLES)
    assert "workflow specific profile profiles/default" in dry.stderr
    assert planned_jobs(dry).get("encode", 0) >= 1

    # Re-running the same command stops on the stale lock; Snakemake says why, and the
    # Snakefile (read before the lock check) prints the one recovery command.
    again = snakemake(killed, tiny_config, *TABLES, check=False)
    assert again.returncode != 0
    assert "Directory cannot be locked" in again.stderr
    assert "kill signal" in again.stderr and "--unlock" in again.stderr
    assert "sae-audit hint: a killed run" in again.stderr and "sae-audit resume --" in again.stderr

    resumed = sae_audit("resume", "--", *snakemake_args(killed, tiny_config))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    assert planned_jobs(snakemake(killed, tiny_config, "-n", *TABLES)) == {}
    expected, got = tables(whole), tables(killed)
    # Every table, the intermediate ones (per-shard statistics, correlations) too.
    assert set(got) == set(expected) >= {t.removeprefix("results/tables/") for t in TABLES}
    assert all(got[name].equals(expected[name]) for name in expected)


def test_resume_refuses_while_a_process_of_the_run_lives(tmp_path: Path) -> None:
    """A live snakemake (or job) in the workdir means the lock is not stale: keep it."""
    work = tmp_path / "work"
    locks = work / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text("results/x\n")
    # Stands in for a live `snakemake` in that directory: the marker is in its cmdline.
    live = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "snakemake"], cwd=work
    )
    try:
        refused = sae_audit("resume", "--", "--directory", str(work), "--cores", "1")
    finally:
        live.kill()
        live.wait()
    assert refused.returncode == 1
    assert "still alive" in refused.stderr and f"pid {live.pid}" in refused.stderr
    assert (locks / "0.output.lock").exists()


@pytest.mark.slow
def test_a_job_failing_for_want_of_cuda_prints_the_hint(tiny_config: Path, tmp_path: Path) -> None:
    """The trigger is only in the failed job's own log; onerror finds it there."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `encode.device: cuda` would not fail")
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["encode"]["device"] = "cuda"
    config = tmp_path / "cuda.yaml"
    config.write_text(yaml.safe_dump(cfg))
    target = f"results/nll/{MODEL}/fp/shard-000.parquet"
    proc = snakemake(tmp_path / "work", config, target, check=False)
    assert proc.returncode != 0
    job_log = tmp_path / "work" / "results" / "logs" / "encode" / MODEL / "fp" / "shard-000.log"
    assert "CUDA is not available" in job_log.read_text()
    hints = [line for line in proc.stderr.splitlines() if line.startswith("sae-audit hint: ")]
    assert hints == ["sae-audit hint: " + planned_hint("CUDA is not available")], proc.stderr[
        -4000:
    ]


def planned_hint(trigger: str) -> str:
    from sae_audit.hints import HINTS

    return dict(HINTS)[trigger]
