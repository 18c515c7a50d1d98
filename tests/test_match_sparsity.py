"""The matched-pruning search: bisection on sparsity until perplexity matches."""

from __future__ import annotations

import math

import pytest

from sae_audit.match_sparsity import MatchedConfig, bisect_sparsity


def test_bisection_finds_matching_sparsity() -> None:
    calls: list[float] = []

    def ppl(s: float) -> float:
        calls.append(s)
        return 10.0 * math.exp(3.0 * s)

    target = 10.0 * math.exp(0.9)
    best, trace = bisect_sparsity(ppl, target, lo=0.0, hi=0.9, tolerance=0.01, max_steps=12)
    assert abs(ppl(best) / target - 1) <= 0.01
    assert abs(best - 0.3) < 0.01 / 3 + 1e-12
    assert len(trace) < 12 and len(trace) == len(calls) - 1
    assert [t[0] for t in trace] == list(range(1, len(trace) + 1))
    assert trace[-1][1] == best


def test_bisection_stops_at_max_steps_when_unreachable() -> None:
    def step(s: float) -> float:
        return 10.0 if s < 0.5 else 20.0

    best, trace = bisect_sparsity(step, 14.0, lo=0.0, hi=0.9, tolerance=0.01, max_steps=7)
    assert len(trace) == 7
    # The bracket closes in on the jump at 0.5; 10 is nearer 14 than 20 is.
    sparsities = [s for _, s, _ in trace]
    assert abs(sparsities[-1] - 0.5) < 0.9 / 2**6
    assert step(best) == 10.0 and best in sparsities
    with pytest.raises(ValueError, match="tolerance"):
        MatchedConfig(tolerance=0.0)
    with pytest.raises(ValueError, match="lo < hi"):
        MatchedConfig(lo=0.5, hi=0.4)
    with pytest.raises(ValueError):
        MatchedConfig(target="fp")
