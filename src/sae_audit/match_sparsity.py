"""Matched-perplexity pruning: the sparsity whose perplexity equals a target's."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_audit.config import FROM_SCHEMA, ConfigSection, check_matched, schema_default
from sae_audit.variants import parse_variant

log = logging.getLogger("sae_audit")


@dataclass(frozen=True)
class MatchedConfig(ConfigSection, section="compression.prune.matched", extra_fields=("target",)):
    """Bisection setup: target variant, relative tolerance, sparsity bracket, budget.

    One search per target: `target` is one of the section's `targets` (no key of its own),
    so the stage passes it, `MatchedConfig.from_dict(matched, target=target)`.
    """

    target: str = schema_default("compression.prune.matched", "targets")[0]
    tolerance: float = FROM_SCHEMA
    lo: float = FROM_SCHEMA
    hi: float = FROM_SCHEMA
    max_steps: int = FROM_SCHEMA
    n_sequences: int | None = FROM_SCHEMA  # token-set prefix searched on (None: all of it)

    def _check(self) -> None:
        if parse_variant(self.target).kind not in ("rtn", "prune"):
            # A config's targets are checked against its variants by config.validate.
            raise ValueError(
                f"config key '{self.section}.targets': target must be an rtn or prune "
                f"variant, got {self.target!r}"
            )
        check_matched(self.to_dict(), self.section)


def bisect_sparsity(
    perplexity_at: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    tolerance: float,
    max_steps: int,
) -> tuple[float, list[tuple[int, float, float]]]:
    """Bisect sparsity in [lo, hi] until |ppl/target - 1| <= tolerance or
    max_steps evaluations; perplexity is assumed non-decreasing in sparsity.

    Only midpoints are evaluated (each evaluation prunes and scores a model, so
    the endpoints are not spent on). Returns the evaluated sparsity whose
    perplexity is closest to the target, and the trace of
    (step, sparsity, perplexity) with steps counted from 1.
    """
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target perplexity must be positive and finite, got {target}")
    if not lo < hi:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    trace: list[tuple[int, float, float]] = []
    for step in range(1, max_steps + 1):
        mid = (lo + hi) / 2.0
        ppl = float(perplexity_at(mid))
        if math.isnan(ppl):
            raise ValueError(f"perplexity at sparsity {mid} is NaN")
        trace.append((step, mid, ppl))
        if abs(ppl / target - 1.0) <= tolerance:
            break
        if ppl < target:
            lo = mid
        else:
            hi = mid
    best = min(trace, key=lambda t: abs(t[2] / target - 1.0))
    return best[1], trace


class PruneSearch:
    """The matched-pruning candidate at any sparsity, exactly as encode would run it.

    Masks come from `checkpoints.compress_state` on the float32 base (what `compress`
    writes), and are written with `apply_state` into a model loaded by
    `checkpoints.load_run_model` (what `encode` loads): for the sparsity the search
    picks, its logits are bit-identical to the encoded checkpoint's.
    """

    def __init__(
        self,
        base: str,
        target: str,
        dtype: str = "float32",
        revision: str | None = None,
        attn_implementation: str | None = None,
        device: str | Any = "cpu",
    ):
        from .checkpoints import load_run_model
        from .models import load_model

        self.variant = parse_variant(f"prune-matched-{target}")
        self.reference = load_model(base, dtype="float32", revision=revision)
        self.model = load_run_model(
            base,
            dtype=dtype,
            revision=revision,
            attn_implementation=attn_implementation,
            device=device,
        )

    def model_at(self, sparsity: float) -> Any:
        from .checkpoints import apply_state, compress_state

        payload, method = compress_state(self.reference, self.variant, sparsity=sparsity)
        return apply_state(self.model, payload, method)


def sequence_perplexity(model: Any, ids: np.ndarray, batch_size: int, desc: str = "") -> float:
    """Token-weighted perplexity of `ids` [n_seq, seq_len] from the encode forward (`batch_nll`)."""
    import torch
    from tqdm import tqdm

    from .encode import batch_nll

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in tqdm(range(0, len(ids), batch_size), desc=desc, leave=False):
            batch = torch.from_numpy(ids[lo : lo + batch_size]).to(device)
            nll = batch_nll(model, batch)
            total += float(nll.double().sum())
            count += nll.numel()
    return float(np.exp(total / count))


def match_sparsity(
    search: PruneSearch,
    ids: np.ndarray,
    target_perplexity: float,
    cfg: MatchedConfig,
    batch_size: int,
) -> tuple[float, list[tuple[int, float, float]]]:
    """Bisect the sparsity whose pruned model's perplexity on `ids` matches the target's."""

    def perplexity_at(sparsity: float) -> float:
        ppl = sequence_perplexity(
            search.model_at(sparsity), ids, batch_size, desc=f"ppl @ sparsity {sparsity:.4f}"
        )
        log.info("sparsity %.5f -> perplexity %.4f (target %.4f)", sparsity, ppl, target_perplexity)
        return ppl

    return bisect_sparsity(
        perplexity_at, target_perplexity, cfg.lo, cfg.hi, cfg.tolerance, cfg.max_steps
    )
