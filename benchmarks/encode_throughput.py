"""Encode throughput of the real encode path (`encode_shard_multi`), per device and dtype.

Builds a Pythia-70M-shaped GPT-NeoX (random weights: throughput does not depend on
them) and a 32768-wide standard sae-lens SAE on blocks.4.hook_resid_post, writes one
token shard, and times one forward pass + SAE encode + sparse shard write per
configuration, all in this one run, printing tokens/s and the ratio to the first
configuration. It also checks that every configuration's codes agree with the first's.

    python benchmarks/encode_throughput.py --configs cpu:float32 cuda:float32 cuda:bfloat16

With --vs-bare it instead times, per configuration and on the same loaded model and
SAE, a bare loop (forward with the hook captured + SAE encode per batch, nothing kept)
against the real encode path (which also scores the NLL and writes both shards),
interleaved, best of --repeats each, and prints tokens/s of both and encode/bare: the
share of the encode path's time that is the model and SAE themselves. Beside it, the
median over rounds of each round's own ratio: on a machine other jobs share, the two
passes of one round see about the same load, where the two bests may come from
different moments. A third pass per round, the bare loop plus the SAE-quality sums
encode adds (a sparse SAE decode per batch, and the nonzero scan encode shares with
the shard write), gives their cost as a time ratio to the bare loop: an upper bound.

    python benchmarks/encode_throughput.py --vs-bare
    python benchmarks/encode_throughput.py --vs-bare --threads 1 --repeats 9
    python benchmarks/encode_throughput.py --vs-bare --configs cuda:float32 --sequences 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def build(root: Path, n_sequences: int, seq_len: int, d_sae: int) -> tuple[Path, Path, Path]:
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from sae_audit.shards import write_token_shard

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(cfg)
    model.save_pretrained(root / "model")
    sae_cfg = StandardSAEConfig(d_in=512, d_sae=d_sae)
    sae_cfg.metadata.hook_name = "blocks.4.hook_resid_post"
    sae = StandardSAE(sae_cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 512**-0.5)
        sae.b_enc.fill_(-1.5)  # a few percent of features fire on random-model activations
    sae.save_model(root / "sae")
    ids = np.random.default_rng(0).integers(0, 50304, (n_sequences, seq_len))
    write_token_shard(root / "tokens.parquet", ids, 0, {"seq_len": seq_len})
    return root / "model", root / "sae", root / "tokens.parquet"


def run(
    model_dir: Path, sae_dir: Path, tokens: Path, out: Path, device: str, dtype: str, batch: int
) -> dict:
    from sae_lens import SAE

    from sae_audit.encode import EncodeConfig, EncodeTarget, encode_shard_multi
    from sae_audit.models import load_model

    dev = torch.device(device)
    model = load_model(model_dir, dtype=dtype, device=dev)
    sae = SAE.load_from_disk(str(sae_dir), device=device)
    target = EncodeTarget(sae, "blocks.4.hook_resid_post", out / "codes.parquet", "sae")
    meta = {"model": "pythia-70m-shaped", "variant": f"{device}-{dtype}", "config_hash": "bench"}
    cfg = EncodeConfig(batch_size=batch, device=device)
    if dev.type == "cuda":  # warm-up: kernels, allocator
        encode_shard_multi(model, [target], tokens, out / "nll.parquet", meta, cfg, dev)
        torch.cuda.synchronize()
    started = time.perf_counter()
    info = encode_shard_multi(model, [target], tokens, out / "nll.parquet", meta, cfg, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    info["wall_s"] = time.perf_counter() - started
    return info


@torch.no_grad()
def bare_loop(
    model: torch.nn.Module,
    sae,
    hook: str,
    ids: np.ndarray,
    batch: int,
    dev: torch.device,
    quality: bool = False,
) -> None:
    """The work encode cannot skip: one forward per batch with the SAE's hook captured (as
    encode captures it) and the SAE encode of the activations; nothing is kept. With
    `quality`, also the SAE-quality sums encode adds (a decode and QualitySums.add)."""
    from sae_audit.encode import QualitySums, sparse_decode
    from sae_audit.models import ActivationCapture

    sae_dtype = next(sae.parameters()).dtype
    sums = QualitySums(int(sae.cfg.d_in), int(sae.cfg.d_sae), dev)
    for lo in range(0, len(ids), batch):
        input_ids = torch.from_numpy(ids[lo : lo + batch]).to(dev)
        with ActivationCapture(model, [hook]) as capture:
            model(input_ids=input_ids)
        acts = capture.activations[hook]
        flat = acts.to(sae_dtype).reshape(-1, acts.shape[-1])
        codes = sae.encode(flat)
        if quality:
            flat_codes = codes.reshape(-1)
            nonzero = torch.nonzero(flat_codes).squeeze(1)
            sums.add(flat, sparse_decode(sae, codes, nonzero, flat_codes[nonzero]))


def vs_bare(
    model_dir: Path,
    sae_dir: Path,
    tokens: Path,
    out: Path,
    device: str,
    dtype: str,
    batch: int,
    repeats: int,
) -> tuple[int, dict[str, list[float]]]:
    """(tokens, seconds of each round's "bare" and "encode" pass)."""
    from sae_lens import SAE

    from sae_audit.encode import EncodeConfig, EncodeTarget, encode_shard_multi
    from sae_audit.models import load_model
    from sae_audit.shards import read_token_shard

    dev = torch.device(device)
    model = load_model(model_dir, dtype=dtype, device=dev)
    sae = SAE.load_from_disk(str(sae_dir), device=device)
    hook = "blocks.4.hook_resid_post"
    ids = read_token_shard(tokens)[1]
    target = EncodeTarget(sae, hook, out / "codes.parquet", "sae")
    meta = {"model": "pythia-70m-shaped", "variant": f"{device}-{dtype}", "config_hash": "bench"}
    cfg = EncodeConfig(batch_size=batch, device=device)
    loops: dict[str, Callable[[], object]] = {
        "bare": lambda: bare_loop(model, sae, hook, ids, batch, dev),
        "quality": lambda: bare_loop(model, sae, hook, ids, batch, dev, quality=True),
        "encode": lambda: encode_shard_multi(
            model, [target], tokens, out / "nll.parquet", meta, cfg, dev
        ),
    }
    if dev.type == "cuda":  # warm-up: kernels, allocator
        for loop in loops.values():
            loop()
        torch.cuda.synchronize()
    seconds: dict[str, list[float]] = {name: [] for name in loops}
    for i in range(repeats):
        # Alternate which goes first, so a drift in the machine's load hits both alike.
        for name in sorted(loops, reverse=bool(i % 2)):
            started = time.perf_counter()
            loops[name]()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
    return ids.size, seconds


def agreement(a: Path, b: Path) -> tuple[float, float]:
    """Jaccard of the (token, feature) sets and max |value difference| on shared entries."""
    ta, tb = pq.read_table(a), pq.read_table(b)
    ka = ta["token"].to_numpy() * 1_000_000 + ta["feature"].to_numpy()
    kb = tb["token"].to_numpy() * 1_000_000 + tb["feature"].to_numpy()
    common, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
    jaccard = len(common) / len(np.union1d(ka, kb))
    diff = (
        np.abs(ta["value"].to_numpy()[ia] - tb["value"].to_numpy()[ib]).max()
        if len(common)
        else np.nan
    )
    return jaccard, float(diff)


# (sequences, seq_len, batch) by mode: --vs-bare runs each configuration 2 x --repeats
# times, so its default is sized to finish in a minute or two on two CPU cores; many short
# passes give best-of-N a better chance on a machine that other jobs share.
DEFAULT_SIZES = {"configs": (64, 512, 16), "vs_bare": (8, 256, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["cpu:float32"])
    parser.add_argument("--sequences", type=int, help="default 64 (8 with --vs-bare)")
    parser.add_argument("--seq-len", type=int, help="default 512 (256 with --vs-bare)")
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, help="default 16 (4 with --vs-bare)")
    parser.add_argument(
        "--vs-bare", action="store_true", help="time encode against a bare forward + SAE loop"
    )
    parser.add_argument("--repeats", type=int, default=7, help="--vs-bare: rounds (best of)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = DEFAULT_SIZES["vs_bare" if args.vs_bare else "configs"]
    args.sequences = args.sequences or sizes[0]
    args.seq_len = args.seq_len or sizes[1]
    args.batch_size = args.batch_size or sizes[2]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, sae_dir, tokens = build(root, args.sequences, args.seq_len, args.d_sae)
        header = (
            f"{args.sequences} x {args.seq_len} tokens, d_sae {args.d_sae}, batch {args.batch_size}"
        )
        if args.vs_bare:
            results = []
            for config in args.configs:
                device, dtype = config.split(":")
                out = root / config.replace(":", "-")
                out.mkdir()
                results.append(
                    (
                        config,
                        *vs_bare(
                            model_dir, sae_dir, tokens, out, device, dtype,
                            args.batch_size, args.repeats,
                        ),
                    )
                )  # fmt: skip
            print(f"{header}, best of {args.repeats}, torch threads {torch.get_num_threads()}")
            print(
                f"{'config':>16} {'bare tok/s':>11} {'encode tok/s':>13} {'encode/bare':>12} "
                f"{'median of rounds':>17} {'bare+quality/bare':>18}"
            )
            for config, n_tokens, seconds in results:
                bare, encode = min(seconds["bare"]), min(seconds["encode"])
                per_round = statistics.median(
                    b / e for b, e in zip(seconds["bare"], seconds["encode"], strict=True)
                )
                # The SAE-quality sums' share: the bare loop with them against without,
                # as a time ratio (1.10: they add 10 % to the forward + SAE encode).
                quality = statistics.median(
                    q / b for q, b in zip(seconds["quality"], seconds["bare"], strict=True)
                )
                print(
                    f"{config:>16} {n_tokens / bare:>11.0f} {n_tokens / encode:>13.0f} "
                    f"{bare / encode:>12.3f} {per_round:>17.3f} {quality:>18.3f}"
                )
            return
        rows = []
        for config in args.configs:
            device, dtype = config.split(":")
            out = root / config.replace(":", "-")
            out.mkdir()
            info = run(model_dir, sae_dir, tokens, out, device, dtype, args.batch_size)
            rows.append((config, info, out / "codes.parquet"))
        base_tps = rows[0][1]["n_tokens"] / rows[0][1]["wall_s"]
        print(header)
        print(
            f"{'config':>16} {'tokens/s':>10} {'x first':>8} {'L0':>7} {'jaccard':>8} {'max|dv|':>9}"
        )
        for config, info, codes in rows:
            tps = info["n_tokens"] / info["wall_s"]
            jac, dv = agreement(rows[0][2], codes)
            print(
                f"{config:>16} {tps:>10.0f} {tps / base_tps:>8.2f} {info['l0']['sae']:>7.1f} {jac:>8.4f} {dv:>9.2e}"
            )


if __name__ == "__main__":
    main()
