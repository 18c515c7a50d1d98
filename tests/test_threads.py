"""A job's torch runs the rule's `threads:` (sae_audit.threads), cold and warm."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sae_audit.threads import torch_threads
from tests.conftest import ROOT, TEST_CONFIG, snakemake


def test_a_snakemake_job_uses_its_threads_and_a_hand_run_command_its_cores():
    assert torch_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert torch_threads({"OMP_NUM_THREADS": "4,2"}) == 4  # one count per nesting level
    assert torch_threads({}) == len(os.sched_getaffinity(0))
    assert torch_threads({"OMP_NUM_THREADS": "0"}) == len(os.sched_getaffinity(0))


def test_a_cold_command_sets_the_threads_when_torch_loads_not_before():
    # transformers looks torch up (is_torch_available) before anything loads it.
    code = (
        "import sys\n"
        "from sae_audit.threads import apply_torch_threads\n"
        "apply_torch_threads()\n"
        "import transformers\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "3", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "3"


@pytest.mark.slow
def test_a_model_job_logs_the_rules_threads_cold_and_warm(tmp_path: Path, monkeypatch):
    """More cores than the rule's threads: the job's torch still runs the rule's count."""
    runtime = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))  # short: AF_UNIX path limit
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("SAE_AUDIT_WARM_IDLE", "5")
    log = tmp_path / "results" / "logs" / "fixture_model.log"
    for mode in ("0", "1"):  # cold, then warm
        monkeypatch.setenv("SAE_AUDIT_WARM", mode)
        snakemake(
            tmp_path,
            TEST_CONFIG,
            "--until",
            "fixture_model",
            "--forcerun",
            "fixture_model",
            "--set-threads",
            "fixture_model=3",
            cores="4",
        )
        reported = re.findall(r"torch threads: (\d+)", log.read_text())
        assert reported and set(reported) == {"3"}, (mode, log.read_text()[-2000:])
    warm_logs = list(runtime.glob("sae-audit-warm-*/*.log"))
    assert any("listening on" in p.read_text() for p in warm_logs), "the warm run ran cold"
