"""Plain-language hints for failures a user can fix, and the one-command recovery of a killed run.

`explain` is what the Snakefile's onerror prints: it reads Snakemake's own log and the
logs of the jobs that log names as failed, since a job's error (e.g. "CUDA is not
available") is only in the job's log. `resume` is `sae-audit resume`: after a
`kill -9` (or a power loss) Snakemake leaves its lock and incomplete-output markers
behind, and it refuses to start again until both are dealt with.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The recovery command, as hints and docs spell it.
RESUME = "sae-audit resume -- <the same snakemake arguments>"

# (substring of the Snakemake log or a failed job's log, hint). SLURM prints the first
# when a job asks for resources no node has: for this workflow that is almost always
# the encode GPU.
HINTS: tuple[tuple[str, str], ...] = (
    (
        "Requested node configuration is not available",
        "SLURM rejected a job whose resources no node can provide. If it was an encode or "
        "sliding_perplexity job, the cluster has no (or too few) GPUs for its `gpu` request: run on "
        "CPU with `--set-resources encode:gpu=0 sliding_perplexity:gpu=0` and `encode.device: cpu` "
        "in the config, or point SAE_SLURM_PARTITION at a GPU partition.",
    ),
    (
        "CUDA is not available",
        "`encode.device` names a CUDA device but this node has none: use `encode.device: auto`.",
    ),
    (
        "TimeoutError: fixture ",
        "a fixture training stage outlasted its wall-clock cap: raise "
        "`fixture.<model|sae>.train_seconds` or lower `fixture.<model|sae>.max_steps` "
        "(the job log names which).",
    ),
    # Snakemake raises these before any job runs, so onerror never sees them; they are
    # here for whoever feeds explain() that output (and to keep the wording in one place).
    (
        "Directory cannot be locked",
        "a killed run (kill -9, power loss) left Snakemake's lock behind: if no other "
        f"snakemake runs in this directory, resume with `{RESUME}`.",
    ),
    (
        "seem to be incomplete",
        f"a killed run left incomplete outputs behind: resume with `{RESUME}`.",
    ),
)

# How Snakemake 9 names a failed job's log files in its own log (snakemake/logging.py).
_FAILED_JOB_LOGS = re.compile(r"^\s*log: (.+) \(check log file\(s\) for error details\)\s*$", re.M)
# An error is at the end of a job log: the tail suffices, and a huge log stays cheap.
_TAIL_BYTES = 64_000


def _read(path: str | Path, tail: int | None = None) -> str:
    try:
        with open(path, "rb") as f:
            if tail is not None and f.seek(0, os.SEEK_END) > tail:
                f.seek(-tail, os.SEEK_END)
            else:
                f.seek(0)
            return f.read().decode(errors="replace")
    except OSError:  # missing, a directory, unreadable: nothing to explain from it
        return ""


def failed_job_logs(snakemake_log: str) -> list[Path]:
    """Log files of the jobs a Snakemake log reports as failed (relative to its workdir)."""
    return [
        Path(p) for m in _FAILED_JOB_LOGS.finditer(snakemake_log) for p in m.group(1).split(", ")
    ]


def explain(logs: str | Path | list[str | Path] | None) -> list[str]:
    """Hints whose trigger appears in the Snakemake log(s) (Snakemake 9 passes a list)
    or in the logs of the jobs they report as failed."""
    paths = [logs] if isinstance(logs, str | Path) else list(logs or [])
    text = "".join(_read(p) for p in paths)
    text += "".join(_read(p, _TAIL_BYTES) for p in dict.fromkeys(failed_job_logs(text)))
    return [hint for trigger, hint in HINTS if trigger in text]


# ---------------------------------------------------------------- resume after kill -9
_RUN_MARKERS = ("snakemake", "sae-audit", "sae_audit")


def _ancestors() -> set[int]:
    # This process and its parents: `sae-audit resume` itself (and a shell running it)
    # may share the workdir and the marker words.
    pids, pid = set(), os.getpid()
    while pid > 0 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def live_runs(workdir: str | Path) -> list[str]:
    """Live local processes of a run in `workdir`: snakemake or its `sae-audit` jobs.

    Linux only (reads /proc); processes of other users are invisible to it.
    """
    target, mine, found = Path(workdir).resolve(), _ancestors(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            cwd = Path(os.readlink(proc / "cwd"))
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):  # gone meanwhile, or not ours to read
            continue
        cmdline = " ".join(a for a in argv if a)
        # A zombie is dead: a killed run's processes linger as zombies until reaped.
        if state not in ("Z", "X") and cwd == target and any(m in cmdline for m in _RUN_MARKERS):
            found.append(f"pid {proc.name}: {cmdline}")
    return found


def slurm_jobs(workdir: str | Path) -> list[str]:
    """This user's queued or running SLURM jobs submitted from `workdir` (none without squeue).

    A killed snakemake's SLURM jobs keep running; resuming beside them would submit
    the same jobs again, writing the same outputs twice.
    """
    squeue = shutil.which("squeue")
    if squeue is None:
        return []
    try:
        out = subprocess.run(
            [squeue, "--me", "--noheader", "--format=%i|%j|%Z"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # no controller reachable: nothing we can check
    target = Path(workdir).resolve()
    jobs = []
    for line in out.splitlines():
        job_id, _, rest = line.strip().partition("|")
        name, _, job_dir = rest.rpartition("|")
        if job_dir and Path(job_dir).resolve() == target:
            jobs.append(f"SLURM job {job_id} ({name})")
    return jobs


def stale_lock(workdir: str | Path = ".") -> str | None:
    """The resume hint if `workdir` holds a Snakemake lock but no live local run (else None).

    For the Snakefile's top level (main process only): Snakemake checks its lock
    before onerror could run, so only code run while parsing can add this hint.
    """
    locks = Path(workdir) / ".snakemake" / "locks"
    if not any(locks.glob("*.lock")) or not Path("/proc/self").exists() or live_runs(workdir):
        return None
    return dict(HINTS)["Directory cannot be locked"]


def _workdir(snakemake_args: list[str]) -> Path:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-d", "--directory")
    known, _ = parser.parse_known_args(snakemake_args)
    return Path(known.directory or ".")


def resume(snakemake_args: list[str]) -> int:
    """Recover from a killed run: `snakemake --unlock ARGS`, then `snakemake --rerun-incomplete ARGS`.

    Refuses (returns 1) while a process or SLURM job of a run is still alive in the
    workdir: the lock would then be a live run's, and removing it would let two runs
    write the same files. Returns snakemake's exit status otherwise.
    """
    args = snakemake_args[1:] if snakemake_args[:1] == ["--"] else list(snakemake_args)
    workdir = _workdir(args)
    if Path("/proc/self").exists():
        alive = live_runs(workdir) + slurm_jobs(workdir)
    else:
        print("sae-audit resume: no /proc here, so no check for a live run", file=sys.stderr)
        alive = slurm_jobs(workdir)
    if alive:
        print(
            f"sae-audit resume: a run is still alive in {workdir.resolve()}; wait for it or stop "
            "it (scancel for SLURM jobs), then resume:\n  " + "\n  ".join(alive),
            file=sys.stderr,
        )
        return 1
    snakemake = [sys.executable, "-m", "snakemake"]
    # Flags go first: a `--` among the user's arguments starts Snakemake's targets.
    unlocked = subprocess.run([*snakemake, "--unlock", *args])
    if unlocked.returncode:
        return unlocked.returncode
    return subprocess.run([*snakemake, "--rerun-incomplete", *args]).returncode
