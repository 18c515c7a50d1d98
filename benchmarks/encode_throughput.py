"""Encode throughput of the real encode path (`encode_shard_multi`), per device and dtype.

Builds a Pythia-70M-shaped GPT-NeoX (random weights: throughput does not depend on
them) and a 32768-wide standard sae-lens SAE on blocks.4.hook_resid_post, writes one
token shard, and times one forward pass + SAE encode + sparse shard write per
configuration, all in this one run, printing tokens/s and the ratio to the first
configuration. It also checks that every configuration's codes agree with the first's.

    python benchmarks/encode_throughput.py --configs cpu:float32 cuda:float32 cuda:bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="+", default=["cpu:float32"])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, sae_dir, tokens = build(root, args.sequences, args.seq_len, args.d_sae)
        rows = []
        for config in args.configs:
            device, dtype = config.split(":")
            out = root / config.replace(":", "-")
            out.mkdir()
            info = run(model_dir, sae_dir, tokens, out, device, dtype, args.batch_size)
            rows.append((config, info, out / "codes.parquet"))
        base_tps = rows[0][1]["n_tokens"] / rows[0][1]["wall_s"]
        print(
            f"{args.sequences} x {args.seq_len} tokens, d_sae {args.d_sae}, batch {args.batch_size}"
        )
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
