import os
import subprocess
import sys
from pathlib import Path

from sae_audit.hints import HINTS, explain, failed_job_logs, live_runs, slurm_jobs, stale_lock


def test_hint_for_an_unsatisfiable_slurm_request(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    )
    quiet = tmp_path / "quiet.log"
    quiet.write_text("all good\n")
    assert len(explain([quiet, log])) == 1 and "GPU" in explain(str(log))[0]
    assert (
        explain([quiet]) == [] and explain(None) == [] and explain([tmp_path / "missing.log"]) == []
    )


def test_hint_from_the_log_of_a_failed_job(tmp_path, monkeypatch):
    """The trigger is in the job's log, which Snakemake's log names relative to the workdir."""
    monkeypatch.chdir(tmp_path)
    job_log = tmp_path / "results/logs/encode/m/fp/shard-000.log"
    job_log.parent.mkdir(parents=True)
    job_log.write_text(
        "x" * 200_000 + "\nRuntimeError: device 'cuda' requested but CUDA is not available\n"
    )
    other = tmp_path / "results/logs/other.log"
    other.write_text("fine\n")
    run_log = tmp_path / "run.log"
    run_log.write_text(
        "Error in rule encode:\n    jobid: 3\n"
        "    log: results/logs/other.log, results/logs/encode/m/fp/shard-000.log"
        " (check log file(s) for error details)\n"
    )
    assert failed_job_logs(run_log.read_text()) == [
        Path("results/logs/other.log"),
        Path("results/logs/encode/m/fp/shard-000.log"),
    ]
    assert explain([run_log]) == [dict(HINTS)["CUDA is not available"]]
    # Only the logs of failed jobs count, not every log lying around.
    run_log.write_text("Error in rule encode:\n    jobid: 3\n")
    assert explain([run_log]) == []


def test_stale_lock_hint_only_without_a_live_run(tmp_path):
    assert stale_lock(tmp_path) is None
    (tmp_path / ".snakemake/locks").mkdir(parents=True)
    (tmp_path / ".snakemake/locks/0.input.lock").write_text("a\n")
    assert "sae-audit resume -- " in (stale_lock(tmp_path) or "")
    live = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "snakemake"], cwd=tmp_path
    )
    try:
        assert live_runs(tmp_path) == [
            f"pid {live.pid}: {sys.executable} -c import time; time.sleep(60) snakemake"
        ]
        assert stale_lock(tmp_path) is None
    finally:
        live.kill()
        live.wait()
    assert live_runs(tmp_path) == [] and stale_lock(tmp_path) is not None


def test_slurm_jobs_of_the_workdir_block_a_resume(tmp_path, monkeypatch):
    """A killed snakemake's SLURM jobs run on: squeue lists those submitted from the workdir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(
        f"#!/bin/sh\necho '41|other|/elsewhere'\necho '42|3f1c-encode|{tmp_path}/work'\n"
    )
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "work").mkdir()
    assert slurm_jobs(tmp_path / "work") == ["SLURM job 42 (3f1c-encode)"]
    assert slurm_jobs(tmp_path) == []
