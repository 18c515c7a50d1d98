"""Causal-survival throughput (`sae_audit.causal.measure_effects`): features per second at
several features-per-forward settings, side by side in one run.

Builds a small GPT-NeoX (random weights: throughput does not depend on them) and a
standard sae-lens SAE on blocks.2.hook_resid_post, then measures the ablation, steering
and direct logit effects of the same features on the same sequences once per setting of
K (features one forward serves), best of --repeats each, and prints features/s, the
speed-up over the first setting, and the largest difference of every setting's numbers
from the first's (they must agree to float rounding).

    python benchmarks/causal_throughput.py
    python benchmarks/causal_throughput.py --per-forward 1 4 8 16 --device cuda
    python benchmarks/causal_throughput.py --hidden 512 --layers 6 --vocab 50304 --device cuda

One feature costs, per batch of sequences, one ablation forward (only where it fires) and
one steering forward of the batch; K features share a forward of K times the batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

HOOK = "blocks.2.hook_resid_post"


def build(args: argparse.Namespace):
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, intermediate_size=4 * args.hidden,
        max_position_embeddings=max(2048, args.seq_len), rotary_pct=0.25,
    )  # fmt: skip
    model = GPTNeoXForCausalLM(cfg).eval().to(args.device)
    sae_cfg = StandardSAEConfig(d_in=args.hidden, d_sae=args.d_sae)
    sae_cfg.metadata.hook_name = HOOK
    sae = StandardSAE(sae_cfg).to(args.device)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.sequences, args.seq_len))
    from sae_audit.models import ActivationCapture

    with torch.no_grad(), ActivationCapture(model, [HOOK]) as cap:
        model(input_ids=torch.from_numpy(ids).to(args.device))
        acts = cap.activations[HOOK].reshape(-1, args.hidden)
        sae.W_enc.normal_(0, args.hidden**-0.5)
        sae.W_enc.div_((acts @ sae.W_enc).std())  # unit-spread pre-activations
        sae.b_enc.fill_(-1.5)  # a few percent of features fire on each token
        sae.W_dec.copy_(sae.W_enc.t() / sae.W_enc.t().norm(dim=1, keepdim=True))
    return model, sae, ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-forward", type=int, nargs="+", default=[1, 8], help="K settings")
    p.add_argument("--features", type=int, default=16, help="features measured")
    p.add_argument("--sequences", type=int, default=8, help="sequences (causal.n_sequences)")
    p.add_argument(
        "--batch-size", type=int, default=4, help="sequences per forward before the repeat"
    )
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2, help="rounds, each timing every K once")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sae_audit.causal import measure_effects

    model, sae, ids = build(args)
    from sae_audit.models import ActivationCapture

    with torch.no_grad(), ActivationCapture(model, [HOOK]) as cap:
        model(input_ids=torch.from_numpy(ids).to(args.device))
        codes = sae.encode(cap.activations[HOOK])
    count = (codes > 0).sum(dim=(0, 1)).cpu().numpy()
    mean = (codes.sum(dim=(0, 1)).cpu().numpy() / np.maximum(count, 1)).astype(np.float64)
    features = np.argsort(-count, kind="stable")[: args.features]
    print(
        f"model: GPT-NeoX d={args.hidden} layers={args.layers} vocab={args.vocab}; SAE "
        f"d_sae={args.d_sae}; {args.features} features (firing on {count[features].min()}.."
        f"{count[features].max()} of {ids.size} positions), {args.sequences} x {args.seq_len} "
        f"tokens, batch {args.batch_size}, device {args.device}, threads "
        f"{torch.get_num_threads()}"
    )

    def measure(k: int):
        return measure_effects(
            model, sae, None, features, mean[features], ids,
            batch_size=args.batch_size, features_per_forward=k, device=args.device,
        )  # fmt: skip

    measure(args.per_forward[0])  # warm-up
    # Rounds interleave the settings: on a machine other jobs share, the settings of one
    # round see about the same load, where best-of-n per setting may not.
    times: dict[int, list[float]] = {k: [] for k in args.per_forward}
    first, diffs = None, dict.fromkeys(args.per_forward, 0.0)
    for _ in range(args.repeats):
        for k in args.per_forward:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            eff = measure(k)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
            first = first or eff
            diffs[k] = max(
                float(np.max(np.abs(getattr(eff, n) - getattr(first, n))))
                for n in ("ablation_kl", "steering_kl", "ablation_logits", "steering_logits")
            )
    k0 = args.per_forward[0]
    print(
        f"{'K':>4} {'best s':>8} {'features/s':>11} {'speed-up':>9} {'median round speed-up':>22} "
        f"{'max |diff|':>11}"
    )
    for k in args.per_forward:
        best = min(times[k])
        ratio = statistics.median(a / b for a, b in zip(times[k0], times[k], strict=True))
        print(
            f"{k:>4} {best:>8.3f} {args.features / best:>11.2f} {min(times[k0]) / best:>8.2f}x "
            f"{ratio:>21.2f}x {diffs[k]:>11.2e}"
        )


if __name__ == "__main__":
    main()
