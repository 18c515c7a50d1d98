"""Correlate vs reading the same shards: time `correlate_variant` beside a plain read.

Writes a synthetic FP code set and a variant of it with the project's own shard writer
(`CodeShardWriter`, real metadata and manifests, so `correlate_variant` verifies and
accepts them). The variant is a perturbed copy of FP: some rows dropped, the rest
rescaled by a little noise, and some rows added where FP is silent. Default scale is the
reference study's Pythia code set: 199,680 tokens x 32,768 features, ~12.1M nonzeros a
side, 6 shards per side written 4096 tokens (8 sequences of 512) at a time, as encode does.

In this one run it times, best of --repeats each (the two taking turns), wall and CPU:
  read       every FP and variant shard read fully through `iter_code_batches` (the read
             correlate does: pyarrow batches of --batch-rows, columns to numpy)
  correlate  `correlate_variant` on the same shards
and prints both, the ratio correlate / read, and the median of each round's own ratio. Shard
checksums are cached per process after a first (untimed) correlate call, so the times are
of the streaming pass, not of hashing the shards. CPU seconds count all of the process's
threads (pyarrow decodes on several); on a busy machine they vary less than wall seconds.

Peak memory: `correlate_variant` runs in a fresh child process on a single-shard pair at
half and at the full token count (--no-memory skips it); the child prints its peak RSS,
how far the call raised it above the RSS it had before, and pyarrow's pool peak. Flat in
the token count means these do not grow with the tokens once a shard holds more rows than
one read batch (--batch-rows): below that, the batch itself grows with the shard.

    python benchmarks/correlate_vs_read.py                   # reference scale
    python benchmarks/correlate_vs_read.py --tokens 20000    # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sae_audit.shards import CodeShardWriter, ShardMetadata, iter_code_batches

REFERENCE_TOKENS = 199_680
REFERENCE_FEATURES = 32_768
REFERENCE_NONZEROS = 12.1e6  # per side
DROP_FRACTION = 0.10  # FP rows the variant loses
ADD_FRACTION = 0.10  # rows the variant gains where FP is silent, per FP row


class Timing(NamedTuple):
    wall: float
    cpu: float  # all threads of this process


def _meta(variant: str, d_sae: int, start: int, stop: int) -> ShardMetadata:
    return ShardMetadata(
        model="bench", variant=variant, sae="bench-sae", hook="blocks.4.hook_resid_post",
        d_sae=d_sae, token_start=start, token_stop=stop, config_hash="bench",
    )  # fmt: skip


def _block(
    rng: np.random.Generator, n_tokens: int, cdf: np.ndarray, density: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One write's worth of codes: sorted unique (token, feature) keys relative to the block
    start, FP and variant alike; returns (fp_key, fp_value, var_key, var_value)."""
    d_sae = cdf.size
    # Skewed feature popularity, as real SAEs have. Draws that repeat a (token, feature)
    # collapse into one row: ~1% fewer nonzeros than `density` asks for.
    n_draw = rng.binomial(n_tokens * d_sae, density)
    token = rng.integers(0, n_tokens, n_draw)
    feature = np.searchsorted(cdf, rng.random(n_draw), side="right").clip(max=d_sae - 1)
    fp_key = np.unique(token * d_sae + feature)
    fp_value = np.maximum(rng.exponential(1.0, fp_key.size), 1e-3).astype(np.float32)
    kept = rng.random(fp_key.size) >= DROP_FRACTION
    n_add = int(ADD_FRACTION * fp_key.size)
    add_token = rng.integers(0, n_tokens, n_add)
    add_feature = np.searchsorted(cdf, rng.random(n_add), side="right").clip(max=d_sae - 1)
    # Kept rows come first, so np.unique's first occurrence keeps FP's perturbed value
    # when an added key lands on a kept one.
    keys = np.concatenate([fp_key[kept], add_token * d_sae + add_feature])
    noise = np.exp(rng.normal(0.0, 0.1, kept.sum()))
    values = np.concatenate(
        [fp_value[kept] * noise, np.maximum(rng.exponential(1.0, n_add), 1e-3)]
    ).astype(np.float32)
    var_key, first = np.unique(keys, return_index=True)
    return fp_key, fp_value, var_key, values[first]


def generate(
    root: Path, n_tokens: int, d_sae: int, density: float, n_shards: int, write_tokens: int,
    seed: int,
) -> tuple[list[Path], list[Path], tuple[int, int]]:  # fmt: skip
    """Write FP and variant shard sets under root; returns their paths and row counts."""
    rng = np.random.default_rng(seed)
    weight = np.exp(rng.normal(0.0, 1.5, d_sae))
    cdf = np.cumsum(rng.permutation(weight))
    cdf /= cdf[-1]
    bounds = np.linspace(0, n_tokens, n_shards + 1).astype(np.int64)
    paths: dict[str, list[Path]] = {"fp": [], "rtn-int6": []}
    rows = {"fp": 0, "rtn-int6": 0}
    for i, (start, stop) in enumerate(itertools.pairwise(bounds.tolist())):
        writers = {
            v: CodeShardWriter(root / v / f"shard-{i:03d}.parquet", _meta(v, d_sae, start, stop))
            for v in paths
        }
        for lo in range(start, stop, write_tokens):
            hi = min(lo + write_tokens, stop)
            fp_key, fp_value, var_key, var_value = _block(rng, hi - lo, cdf, density)
            for v, key, value in (("fp", fp_key, fp_value), ("rtn-int6", var_key, var_value)):
                token, feature = np.divmod(key, d_sae)
                writers[v].write(token + lo, feature.astype(np.int32), value)
                rows[v] += key.size
        for v, writer in writers.items():
            writer.close()
            paths[v].append(writer.path)
    return paths["fp"], paths["rtn-int6"], (rows["fp"], rows["rtn-int6"])


def cached_generate(
    root: Path, n_tokens: int, d_sae: int, density: float, n_shards: int, write_tokens: int,
    seed: int,
) -> tuple[list[Path], list[Path], tuple[int, int]]:  # fmt: skip
    """`generate`, reusing what an earlier run left under root for the same parameters."""
    params = dict(n_tokens=n_tokens, d_sae=d_sae, density=density, n_shards=n_shards,
                  write_tokens=write_tokens, seed=seed)  # fmt: skip
    stamp = root / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text())["params"] == params:
        saved = json.loads(stamp.read_text())
        return (
            [Path(p) for p in saved["fp"]],
            [Path(p) for p in saved["variant"]],
            tuple(saved["rows"]),
        )
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    fp, var, rows = generate(root, n_tokens, d_sae, density, n_shards, write_tokens, seed)
    saved = {"params": params, "fp": [str(p) for p in fp], "variant": [str(p) for p in var],
             "rows": list(rows)}  # fmt: skip
    stamp.write_text(json.dumps(saved))
    return fp, var, rows


def read_all(paths: list[Path], batch_rows: int) -> int:
    """Read every shard fully as correlate does: batches, each column as a numpy array."""
    n = 0
    for path in paths:
        for batch in iter_code_batches(path, batch_rows):
            token = batch.column("token").to_numpy()
            batch.column("feature").to_numpy()
            batch.column("value").to_numpy()
            n += token.size
    return n


def interleaved(repeats: int, runs: dict[str, Callable[[], object]]) -> dict[str, list[Timing]]:
    """Wall and CPU seconds of every run of each, the runs taking turns round after round so
    that each sees the same machine (a shared machine's load drifts between rounds)."""
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(Timing(time.perf_counter() - wall, time.process_time() - cpu))
    return times


def _rss_kib(key: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _peak_child(fp: list[str], var: list[str], batch_rows: int, out: mp.Queue) -> None:
    import pyarrow as pa

    from sae_audit.correlate import correlate_variant

    # Reset the peak to the current RSS, so the imports' transient peak is not counted.
    Path("/proc/self/clear_refs").write_text("5")
    before_kib = _rss_kib("VmRSS")
    correlate_variant([Path(p) for p in fp], [Path(p) for p in var], batch_rows)
    out.put((_rss_kib("VmHWM"), before_kib, pa.default_memory_pool().max_memory()))


def peak_memory(fp: list[Path], var: list[Path], batch_rows: int) -> tuple[float, float, float]:
    """(peak RSS MiB, its rise over the RSS before the call MiB, pyarrow pool peak MiB) of
    one `correlate_variant` call in a fresh process (Linux: reads /proc/self/status)."""
    ctx = mp.get_context("spawn")  # fresh: no RSS inherited from this process's runs
    queue = ctx.Queue()
    child = ctx.Process(
        target=_peak_child, args=([str(p) for p in fp], [str(p) for p in var], batch_rows, queue)
    )
    child.start()
    peak_kib, before_kib, pool_bytes = queue.get()
    child.join()
    return peak_kib / 1024, (peak_kib - before_kib) / 1024, pool_bytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=REFERENCE_TOKENS)
    parser.add_argument("--features", type=int, default=REFERENCE_FEATURES)
    parser.add_argument(
        "--density", type=float, default=REFERENCE_NONZEROS / (REFERENCE_TOKENS * REFERENCE_FEATURES),
        help="fraction of (token, feature) cells nonzero in FP (default: ~12.1M at reference scale)",
    )  # fmt: skip
    parser.add_argument("--shards", type=int, default=6, help="shards per side (timing set)")
    parser.add_argument("--write-tokens", type=int, default=4096, help="tokens per writer call")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    parser.add_argument("--batch-rows", type=int, default=1 << 20, help="read batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--workdir", type=Path, default=None,
        help="keep the shards here and reuse them on a later run with the same parameters",
    )  # fmt: skip
    args = parser.parse_args()

    from sae_audit.correlate import correlate_variant

    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="correlate-bench-"))
        )
        gen = (args.features, args.density)
        started = time.perf_counter()
        fp, var, rows = cached_generate(
            root / "timing", args.tokens, *gen, args.shards, args.write_tokens, args.seed
        )
        print(f"shards: {args.tokens:,} tokens x {args.features:,} features, {args.shards} "
              f"shard(s) a side; FP {rows[0]:,} rows, variant {rows[1]:,} rows "
              f"(ready in {time.perf_counter() - started:.1f} s)")  # fmt: skip
        correlate_variant(fp, var, args.batch_rows)  # warm-up: page cache, checksum cache
        times = interleaved(
            args.repeats,
            {
                "read": lambda: read_all(fp + var, args.batch_rows),
                "correlate": lambda: correlate_variant(fp, var, args.batch_rows),
            },
        )
        read = Timing(*(min(t[i] for t in times["read"]) for i in range(2)))
        corr = Timing(*(min(t[i] for t in times["correlate"]) for i in range(2)))
        # Beside the ratio of the bests: each round's ratio (its read and correlate ran back
        # to back) and their median, less at the mercy of one quiet moment for either.
        per_round = [
            Timing(c.wall / r.wall, c.cpu / r.cpu)
            for r, c in zip(times["read"], times["correlate"], strict=True)
        ]
        print(f"best of {args.repeats}, the two taking turns:  wall s    CPU s (all threads)")
        print(f"  read both sides                   {read.wall:8.3f} {read.cpu:8.3f}")
        print(f"  correlate_variant                 {corr.wall:8.3f} {corr.cpu:8.3f}")
        print(f"  ratio correlate/read              {corr.wall / read.wall:7.2f}x "
              f"{corr.cpu / read.cpu:7.2f}x")  # fmt: skip
        print(f"  median of the rounds' ratios      "
              f"{np.median([r.wall for r in per_round]):7.2f}x "
              f"{np.median([r.cpu for r in per_round]):7.2f}x")  # fmt: skip
        if args.no_memory:
            return
        print("peak memory of correlate_variant, one shard pair, fresh process:")
        for n_tokens in (args.tokens // 2, args.tokens):
            mfp, mvar, mrows = cached_generate(
                root / f"memory-{n_tokens}", n_tokens, *gen, 1, args.write_tokens, args.seed + 1
            )
            peak, rise, pool = peak_memory(mfp, mvar, args.batch_rows)
            print(f"  {n_tokens:>9,} tokens ({mrows[0]:>11,} FP rows): peak RSS {peak:7.1f} MiB, "
                  f"rise during the call {rise:7.1f} MiB, pyarrow pool peak {pool:6.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
