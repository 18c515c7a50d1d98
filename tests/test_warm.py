"""Warm start: `sae-audit` commands forked from a pre-imported server behave as cold ones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sae_audit import warm
from sae_audit.fixture.bundle import digest

SCRIPT = [sys.executable, "-c", "import sys; from sae_audit.warm import main; sys.exit(main())"]
CORPUS = json.dumps({"seed": 0, "max_chars": 30000, "heldout_fraction": 0.2})
TOKENIZER = json.dumps({"vocab_size": 300})
# fixture-model's flags but --model and --out, relative to the directory build_inputs fills
MODEL_INPUTS = ["--tokenizer", "tok", "--train", "train.txt", "--heldout", "held.txt"]
MODEL = {"n_layer": 1, "d_model": 16, "n_head": 2, "d_mlp": 32, "context": 16, "batch_size": 4}


@pytest.fixture(scope="module")
def runtime_dir() -> Iterator[Path]:
    # Short (AF_UNIX paths are limited to ~107 bytes) and private to this module's server.
    path = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def env_for(runtime_dir: Path, mode: str, threads: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in warm.PER_JOB_ENV}
    env |= {
        "SAE_AUDIT_WARM": mode,
        "SAE_AUDIT_WARM_IDLE": "20",
        "SAE_AUDIT_WARM_DEBUG": "1",  # a fallback to cold says why on stderr
        "XDG_RUNTIME_DIR": str(runtime_dir),
        "OMP_NUM_THREADS": str(threads),
    }
    env.pop("SLURM_JOB_ID", None)
    return env


def sae_audit(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SCRIPT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def server_pid(runtime_dir: Path) -> int:
    """The live server's pid, from the "listening" lines of the server logs."""
    pids = [
        int(line.split("[", 1)[1].split("]", 1)[0])
        for log in (runtime_dir / f"sae-audit-warm-{os.getuid()}").glob("*.log")
        for line in log.read_text().splitlines()
        if "listening on" in line
    ]
    (live,) = [pid for pid in pids if psutil.pid_exists(pid)]
    return live


def build_inputs(root: Path, env: dict[str, str]) -> None:
    """A small corpus and tokenizer, relative to `root` (the commands' working directory)."""
    for args in (
        ["fixture-corpus", "--corpus", CORPUS, "--train", "train.txt", "--heldout", "held.txt"],
        ["fixture-tokenizer", "--tokenizer", TOKENIZER, "--train", "train.txt", "--out", "tok"],
    ):
        proc = sae_audit(args, env, root)
        assert proc.returncode == 0, proc.stderr


def test_warm_and_cold_commands_write_the_same_files(runtime_dir: Path, tmp_path: Path) -> None:
    """Relative paths resolve in the caller's directory; stdout, stderr and exit status are
    the caller's; a torch training job forked from the server is bit for bit the cold one."""
    results = {}
    for mode in ("0", "1"):
        root = tmp_path / mode
        root.mkdir()
        env = env_for(runtime_dir, mode, threads=2)
        build_inputs(root, env)
        model = json.dumps({**MODEL, "max_steps": 8})
        proc = sae_audit(
            ["--json", "fixture-model", "--model", model, *MODEL_INPUTS, "--out", "model"],
            env,
            root,
        )
        assert proc.returncode == 0, proc.stderr
        metrics = json.loads(proc.stdout[proc.stdout.index("\n{") :])
        results[mode] = (
            {name: digest(root / name) for name in ("train.txt", "held.txt", "tok", "model")},
            {k: v for k, v in metrics.items() if k != "seconds"},
        )
    assert results["1"] == results["0"]
    # the warm run really went through a server (it is still up, idle)
    assert psutil.pid_exists(server_pid(runtime_dir))


def test_a_failing_command_fails_the_same_way_warm(runtime_dir: Path, tmp_path: Path) -> None:
    outcomes = []
    for mode in ("0", "1"):
        proc = sae_audit(
            ["fp-stats", "--codes", "missing.parquet", "--out", "x.parquet", "--analysis", "{}"],
            env_for(runtime_dir, mode),
            tmp_path,
        )
        outcomes.append((proc.returncode, proc.stderr.strip().splitlines()[-1]))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] != 0
    bad = [sae_audit(["no-such-stage"], env_for(runtime_dir, m), tmp_path) for m in "01"]
    assert bad[0].returncode == bad[1].returncode == 2
    assert bad[0].stderr == bad[1].stderr


@pytest.fixture(scope="module")
def inputs(runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    build_inputs(root, env_for(runtime_dir, "1"))
    return root


def _long_training(root: Path, env: dict[str, str], out: str) -> subprocess.Popen:
    model = json.dumps({**MODEL, "max_steps": 10**6})
    return subprocess.Popen(
        [*SCRIPT, "fixture-model", "--model", model, *MODEL_INPUTS, "--out", out],
        env=env,
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _job_child(runtime_dir: Path, timeout: float = 60) -> psutil.Process:
    server = psutil.Process(server_pid(runtime_dir))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if children := server.children():
            return children[0]
        time.sleep(0.05)
    raise AssertionError("the server forked no job")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signalled_command_takes_its_job_with_it(
    runtime_dir: Path, inputs: Path, sig: signal.Signals
) -> None:
    """SIGTERM is forwarded (and the command exits as killed by it); after SIGKILL of the
    command (kill -9 of a run) the server kills the job: no job outlives its caller."""
    command = _long_training(inputs, env_for(runtime_dir, "1"), out=f"model-{sig.name}")
    try:
        job = _job_child(runtime_dir)
        time.sleep(1.0)  # training, not starting up
        assert job.is_running() and command.poll() is None
        os.kill(command.pid, sig)
        code = command.wait(timeout=30)
        job.wait(timeout=30)
    finally:
        command.kill()
    assert not job.is_running()
    assert code == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)


def test_warm_start_is_off_in_a_slurm_job_or_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("SAE_AUDIT_WARM", "1")
    assert warm.enabled() == (sys.platform == "linux")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert not warm.enabled()
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("SAE_AUDIT_WARM", "0")
    assert not warm.enabled()


def test_the_server_key_ignores_thread_counts_but_not_the_environment() -> None:
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert warm.server_key(base) == warm.server_key({**base, "OMP_NUM_THREADS": "2"})
    assert warm.server_key(base) != warm.server_key({**base, "HF_HUB_OFFLINE": "1"})
