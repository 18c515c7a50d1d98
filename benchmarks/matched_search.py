"""Matched-pruning search steps: the old bisection against the search the stage runs now.

For each target (RTN at a few bit-widths, quantized by the project's own `compress_state`),
both searches find the magnitude-pruning sparsity whose perplexity matches the target's,
side by side in this one run, on the same model and tokens:

- old: midpoint bisection (`match_sparsity.bisect_sparsity`), each step re-sorting every
  block matrix and round-tripping the checkpoint payload (`compress_state` +
  `apply_state`, as the search did before), never told the FP perplexity;
- new: `match_sparsity.interpolate_sparsity` through `match_sparsity.PruneSearch` (|w| sorted
  once per matrix), given ppl(0), which the workflow reads from the FP encode's NLL shards.

It prints perplexity evaluations and forward passes (batches), wall seconds (building the
search, incl. sorting for the new one, plus the search), the relative error reached, and the
ratios new/old. Both searches' pruned weights are checked to be bit-identical.

The default model is a random GPT-NeoX scored on text it sampled itself: on its own samples
any change to the weights raises the perplexity (cross-entropy = entropy + KL), as pruning a
trained model does on its data. A trained checkpoint and a text file can be given instead
(progress bars go to stderr):

    python benchmarks/matched_search.py 2>/dev/null
    python benchmarks/matched_search.py --model results/fixture/model \\
        --text results/fixture/corpus/heldout.txt --n-sequences 128 --seq-len 128 2>/dev/null

On models this small, ppl(s) is rough at the 0.1-0.5% scale (each step of sparsity prunes
few weights, each with an effect of its own sign), so near a tight tolerance such as the
demo's 0.0005 either search hits it partly by luck: compare totals over several targets.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_audit.checkpoints import apply_state, compress_state, load_run_model
from sae_audit.match_sparsity import (
    PruneSearch,
    bisect_sparsity,
    interpolate_sparsity,
    sequence_perplexity,
)
from sae_audit.models import load_model, target_weights
from sae_audit.variants import parse_variant


def random_model(root: Path, n_sequences: int, seq_len: int) -> tuple[Path, np.ndarray]:
    """A random GPT-NeoX saved under `root`, and `n_sequences` x `seq_len` tokens it sampled."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=max(256, seq_len),
        # Wider than the default 0.02, so the logits are peaked and the text it samples
        # has structure the weights carry (perplexity ~580 of 1024).
        initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    model: Any = GPTNeoXForCausalLM(config).eval()  # Any: transformers' generate() typing
    model.save_pretrained(root / "model")
    start = torch.zeros(n_sequences, 1, dtype=torch.long)
    with torch.no_grad():
        # Full-length samples: min_length keeps EOS (and so padding) out.
        ids = model.generate(
            start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
            min_length=seq_len, max_length=seq_len,
        )  # fmt: skip
    return root / "model", ids.numpy().astype(np.int64)


def text_tokens(model_dir: Path, text: Path, n_sequences: int, seq_len: int) -> np.ndarray:
    from transformers import AutoTokenizer

    stream = AutoTokenizer.from_pretrained(model_dir)(text.read_text())["input_ids"]
    if len(stream) < n_sequences * seq_len:
        raise SystemExit(f"{text}: {len(stream)} tokens, fewer than {n_sequences} x {seq_len}")
    return np.asarray(stream[: n_sequences * seq_len], dtype=np.int64).reshape(n_sequences, -1)


def target_perplexity(model_dir: Path, variant: str, ids: np.ndarray, batch_size: int) -> float:
    """The target's perplexity, as its encode NLL shards would give it."""
    reference = load_model(model_dir, dtype="float32")
    model = apply_state(
        load_run_model(model_dir, dtype="float32"),
        *compress_state(reference, parse_variant(variant)),
    )
    return sequence_perplexity(model, ids, batch_size)


class SortEveryStep:
    """The search's model before: every step prunes through `compress_state`, which sorts
    each matrix again, and writes the payload back with `apply_state`."""

    def __init__(self, model_dir: Path, target: str):
        self.variant = parse_variant(f"prune-matched-{target}")
        self.reference = load_model(model_dir, dtype="float32")
        self.model = load_run_model(model_dir, dtype="float32")

    def model_at(self, sparsity: float) -> Any:
        payload, method = compress_state(self.reference, self.variant, sparsity=sparsity)
        return apply_state(self.model, payload, method)


def run_search(
    new: bool,
    model_dir: Path,
    target: str,
    target_ppl: float,
    ids: np.ndarray,
    args: argparse.Namespace,
    fp_ppl: float,
) -> dict[str, Any]:
    """One search, timed from loading the model to the chosen sparsity."""
    started = time.perf_counter()
    search = PruneSearch(str(model_dir), target) if new else SortEveryStep(model_dir, target)
    built = time.perf_counter() - started
    mask_seconds = 0.0

    def perplexity_at(sparsity: float) -> float:
        nonlocal mask_seconds
        t0 = time.perf_counter()
        model = search.model_at(sparsity)
        mask_seconds += time.perf_counter() - t0
        return sequence_perplexity(model, ids, args.batch_size)

    bracket = (target_ppl, args.lo, args.hi, args.tolerance, args.max_steps)
    if new:
        found = interpolate_sparsity(perplexity_at, *bracket, lo_perplexity=fp_ppl)
        sparsity, trace, stopped = found.sparsity, found.trace, found.stopped
    else:
        sparsity, trace = bisect_sparsity(perplexity_at, *bracket)
        stopped = "-"
    seconds = time.perf_counter() - started
    ppl = next(p for _, s, p in trace if s == sparsity) if trace else fp_ppl
    return {
        "evals": len(trace),
        "forward": len(trace) * math.ceil(len(ids) / args.batch_size),
        "sparsity": sparsity,
        "error": abs(ppl / target_ppl - 1.0),
        "seconds": seconds,
        "build_s": built,
        "mask_s": mask_seconds,
        "stopped": stopped,
        "search": search,
    }


def same_weights(old: SortEveryStep, new: PruneSearch, sparsity: float) -> bool:
    """Both model paths give bit-identical block matrices at `sparsity`."""
    expected = dict(target_weights(old.model_at(sparsity)))
    return all(
        torch.equal(param, expected[name]) for name, param in target_weights(new.model_at(sparsity))
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="a GPT-NeoX checkpoint (default: a random one)")
    p.add_argument("--text", type=Path, help="text to score --model on (with --model)")
    p.add_argument(
        "--targets", nargs="+", default=["rtn-int6", "rtn-int5", "rtn-int4", "rtn-int3"],
        help="target variants (RTN, any bits / group / asym)",
    )  # fmt: skip
    # The demo config's search (config/config.yaml: compression.prune.matched, encode and
    # the fixture's tokens): 128 sequences of 128 tokens, 4 batches per evaluation.
    p.add_argument("--n-sequences", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.0005)
    p.add_argument("--lo", type=float, default=0.0)
    p.add_argument("--hi", type=float, default=0.95)
    p.add_argument("--max-steps", type=int, default=14)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if (args.model is None) != (args.text is None):
        p.error("--model and --text go together")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            model_dir, ids = random_model(Path(tmp), args.n_sequences, args.seq_len)
            what = "random GPT-NeoX (4 layers, d=128, vocab 1024) on text it sampled"
        else:
            model_dir = args.model
            ids = text_tokens(model_dir, args.text, args.n_sequences, args.seq_len)
            what = f"{model_dir} on {args.text}"
        fp_ppl = sequence_perplexity(load_run_model(model_dir, "float32"), ids, args.batch_size)
        print(f"model: {what}; {ids.shape[0]} x {ids.shape[1]} tokens, FP perplexity {fp_ppl:.4f}")
        print(
            f"search: tolerance {args.tolerance}, sparsity in [{args.lo}, {args.hi}], "
            f"max_steps {args.max_steps}, batch {args.batch_size}, {args.threads} threads"
        )
        print(
            "(the new search is given ppl(lo=0) = FP perplexity, read from encode's NLL in the workflow)"
        )
        header = (
            f"{'target':9} {'ppl':>9} | {'search':6} {'evals':>5} {'fwd':>4} {'sparsity':>9} "
            f"{'rel.err':>8} {'seconds':>8} {'(build':>7} {'masks)':>7} stopped"
        )
        print(header)
        totals = {"old": [0, 0.0], "new": [0, 0.0]}
        for target in args.targets:
            target_ppl = target_perplexity(model_dir, target, ids, args.batch_size)
            runs = {}
            for name, new in (("old", False), ("new", True)):
                run = runs[name] = run_search(new, model_dir, target, target_ppl, ids, args, fp_ppl)
                totals[name][0] += run["evals"]
                totals[name][1] += run["seconds"]
                print(
                    f"{target:9} {target_ppl:9.4f} | {name:6} {run['evals']:5d} {run['forward']:4d} "
                    f"{run['sparsity']:9.5f} {run['error']:8.2e} {run['seconds']:8.2f} "
                    f"{run['build_s']:7.2f} {run['mask_s']:7.2f} {run['stopped']}"
                )
            old, new = runs["old"], runs["new"]
            if not same_weights(old["search"], new["search"], new["sparsity"]):
                raise SystemExit(f"{target}: the two model paths prune differently")
            print(
                f"{'':9} {'':9} | new/old: evals {new['evals'] / old['evals']:.2f}, "
                f"seconds {new['seconds'] / old['seconds']:.2f}"
            )
        (old_evals, old_s), (new_evals, new_s) = totals["old"], totals["new"]
        print(
            f"total: evals old {old_evals} new {new_evals} (ratio {new_evals / old_evals:.2f}); "
            f"seconds old {old_s:.2f} new {new_s:.2f} (ratio {new_s / old_s:.2f})"
        )


if __name__ == "__main__":
    main()
