"""Wall time of the default run (`snakemake --cores all` on config/config.yaml), per rule.

Runs the real workflow in a fresh working directory (nothing built yet, as after a fresh
clone and install), then prints its wall time, the per-rule breakdown from the jobs'
`benchmark:` files (jobs, summed and longest job wall time), and the wall time of a no-op
re-run of the finished directory. With --compare-cold it first runs the same workflow with
warm start off (SAE_AUDIT_WARM=0: every job imports its libraries itself) in a second
fresh directory, and prints the ratio warm / cold measured in this one run.

    python benchmarks/demo_walltime.py                 # about 4 minutes on 2 idle cores
    python benchmarks/demo_walltime.py --compare-cold  # plus the cold run
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, cores: str, env: dict[str, str], *extra: str) -> float:
    """Run the workflow in `workdir`; its wall time in seconds."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(ROOT / "Snakefile"),
        "--configfile", str(ROOT / "config" / "config.yaml"),
        "--directory", str(workdir),
        "--cores", cores, "--quiet", "progress", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake failed in {workdir}:\n{proc.stderr[-4000:]}")
    return seconds


def per_rule(results: Path) -> dict[str, list[float]]:
    """Each rule's job wall times, from results/benchmarks/<rule>/**.tsv."""
    times: dict[str, list[float]] = defaultdict(list)
    bench = results / "benchmarks"
    for tsv in bench.rglob("*.tsv"):
        rule = tsv.relative_to(bench).parts[0].removesuffix(".tsv")
        with tsv.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        times[rule] += [float(row["s"]) for row in rows[-1:]]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", default="all")
    parser.add_argument("--compare-cold", action="store_true")
    parser.add_argument("--keep", help="run in this directory (kept) instead of a temporary one")
    args = parser.parse_args()

    base = Path(args.keep or tempfile.mkdtemp(prefix="demo-"))
    base.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SAE_AUDIT_WARM"}
    walls: dict[str, float] = {}
    if args.compare_cold:
        walls["cold"] = snakemake(base / "cold", args.cores, {**env, "SAE_AUDIT_WARM": "0"})
        print(f"cold run (SAE_AUDIT_WARM=0): {walls['cold']:.1f} s", flush=True)
    walls["warm"] = snakemake(base / "warm", args.cores, env)
    noop = snakemake(base / "warm", args.cores, env)

    times = per_rule(base / "warm" / "results")
    print(f"\nper rule (warm run; {sum(map(len, times.values()))} jobs):")
    print(f"{'rule':32s} {'jobs':>5s} {'sum s':>8s} {'max s':>7s}")
    for rule, ts in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"{rule:32s} {len(ts):5d} {sum(ts):8.1f} {max(ts):7.1f}")
    print(f"{'(all jobs)':32s} {'':5s} {sum(map(sum, times.values())):8.1f}")
    print(
        f"\ndefault run: {walls['warm']:.1f} s wall on --cores {args.cores} ({os.cpu_count()} CPUs)"
    )
    print(f"no-op re-run: {noop:.2f} s")
    if "cold" in walls:
        print(f"warm / cold: {walls['warm'] / walls['cold']:.3f}")
    print(f"outputs: {base}")


if __name__ == "__main__":
    main()
