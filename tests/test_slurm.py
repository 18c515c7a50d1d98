"""The workflow submitted to a real single-node SLURM controller (tests/slurm/cluster.sh).

The cluster declares one (stand-in) GPU, so the encode rule's GPU request goes through
SLURM's real scheduling path; the code then runs on CPU because CUDA is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from .conftest import ROOT, SLURM_OPT_IN, snakemake

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SLURM_CONFIG = ROOT / "tests" / "configs" / "slurm.yaml"
STATE_DIR = Path(os.environ.get("SLURM_TEST_DIR", "/tmp/sae-audit-slurm"))

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm_cluster():
    """The cluster the caller started (tests/slurm/cluster.sh start; .ci/run does it):
    the tests never install or start anything themselves (conftest makes them opt-in)."""
    status = subprocess.run(
        ["bash", str(CLUSTER), "status"], capture_output=True, text=True, timeout=60
    )
    if status.returncode != 0:
        raise AssertionError(
            f"{SLURM_OPT_IN}=1 but the SLURM test cluster does not answer; start it with "
            f"`sudo bash tests/slurm/cluster.sh start`:\n{status.stdout}\n{status.stderr}"
        )
    return STATE_DIR


def slurm_snakemake(
    workdir: Path, prefix: str, *args: str, check: bool = True, timeout: float = 900
):
    try:
        return snakemake(
            workdir,
            SLURM_CONFIG,
            "--workflow-profile", str(ROOT / "profiles" / "slurm"),
            "--jobs", "4",
            "--slurm-init-seconds-before-status-checks", "2",
            "--seconds-between-status-checks", "3",
            "--slurm-jobname-prefix", prefix,
            *args,
            check=check,
            timeout=timeout,
            cores=None,
        )  # fmt: skip
    except (AssertionError, subprocess.TimeoutExpired):
        for log in sorted((STATE_DIR / "log").glob("*.log")):
            print(f"--- {log}\n{log.read_text()[-4000:]}")
        for log in sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log")):
            print(f"--- {log}\n{log.read_text()[-2000:]}")
        raise


def test_workflow_through_slurm_matches_local_run(
    slurm_cluster: Path, finished_run: Path, tmp_path: Path
):
    workdir = tmp_path / "slurm_run"
    # Reuse the local run's fixture (its training has a wall-clock budget, so a rebuild
    # would differ): the SLURM run starts at tokenize.
    shutil.copytree(
        finished_run / "results" / "fixture",
        workdir / "results" / "fixture",
        copy_function=shutil.copy2,
    )
    prefix = f"saeaudit_{uuid.uuid4().hex[:8]}"
    targets = [
        f"results/features/fixture/res/{v}/correlation.parquet" for v in ("rtn-int8", "rtn-int2")
    ]
    started = time.monotonic()
    slurm_snakemake(workdir, prefix, *targets)
    print(f"SLURM run: {time.monotonic() - started:.0f} s")
    for target in targets:
        ours = pl.read_parquet(workdir / target).sort("feature")
        local = pl.read_parquet(finished_run / target).sort("feature")
        assert ours.select("feature", "flag", "fp_fire_count", "variant_fire_count").equals(
            local.select("feature", "flag", "fp_fire_count", "variant_fire_count")
        )
        assert (ours["r"] - local["r"]).abs().max() < 1e-6
    # The controller's record: every submitted job finished there, under our job name.
    records = [
        line
        for line in (slurm_cluster / "jobcomp.log").read_text().splitlines()
        if f"Name={prefix}" in line
    ]
    completed = [line for line in records if "JobState=COMPLETED" in line]
    # tokenize + 3 compress (fp, rtn-int8, rtn-int2) + 6 encode; correlate and the other tiny jobs run locally.
    assert len(completed) == 10, records
    # Each encode job asked SLURM for the node's GPU: SLURM exported its device, and the
    # code ran on CPU because this node has no CUDA.
    encode_logs = sorted((workdir / "results/logs/encode").rglob("*.log"))
    assert len(encode_logs) == 6
    for log in encode_logs:
        assert "CUDA_VISIBLE_DEVICES=0 cuda_available=False device=cpu" in log.read_text()
    # A finished run re-run submits nothing.
    again = slurm_snakemake(workdir, prefix, *targets, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_unsatisfiable_gpu_request_fails_fast_with_a_hint(
    slurm_cluster: Path, finished_run: Path, tmp_path: Path
):
    workdir = tmp_path / "gpu_run"
    shutil.copytree(
        finished_run / "results" / "fixture",
        workdir / "results" / "fixture",
        copy_function=shutil.copy2,
    )
    shutil.copytree(
        finished_run / "results" / "tokens",
        workdir / "results" / "tokens",
        copy_function=shutil.copy2,
    )
    shutil.copytree(
        finished_run / "results" / "checkpoints",
        workdir / "results" / "checkpoints",
        copy_function=shutil.copy2,
    )
    started = time.monotonic()
    proc = slurm_snakemake(
        workdir,
        f"saeaudit_{uuid.uuid4().hex[:8]}",
        "results/codes/fixture/fp/shard-000",
        "--set-resources", "encode:gpu=2",
        "--retries", "0",
        check=False,
        timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert elapsed < 180
    assert "Requested node configuration is not available" in out
    assert "sae-audit hint" in out and "GPU" in out
