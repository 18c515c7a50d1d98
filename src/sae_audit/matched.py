"""Matched-perplexity pruning: the sparsity whose perplexity equals a target's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sae_audit.variants import parse_variant


@dataclass(frozen=True)
class MatchedConfig:
    """Bisection setup: target variant, relative tolerance, sparsity bracket, budget."""

    target: str = "rtn-int6"
    tolerance: float = 0.01
    lo: float = 0.0
    hi: float = 0.9
    max_steps: int = 12

    def __post_init__(self) -> None:
        if parse_variant(self.target).kind not in ("rtn", "prune"):
            raise ValueError(f"target must be an rtn or prune variant, got {self.target!r}")
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise ValueError(
                f"tolerance must be a positive relative tolerance, got {self.tolerance}"
            )
        if not 0.0 <= self.lo < self.hi < 1.0:
            raise ValueError(
                f"lo and hi must satisfy 0 <= lo < hi < 1, got lo={self.lo}, hi={self.hi}"
            )
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


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
