"""Matched-perplexity pruning: the sparsity whose perplexity equals a target's."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_audit import progress
from sae_audit.config import FROM_SCHEMA, ConfigSection, check_matched, schema_default
from sae_audit.variants import parse_variant

log = logging.getLogger("sae_audit")


@dataclass(frozen=True)
class MatchedConfig(ConfigSection, section="compression.prune.matched", extra_fields=("target",)):
    """Matched-sparsity search setup: target variant, relative tolerance, sparsity bracket, budget.

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


def _check_search(target: float, lo: float, hi: float, tolerance: float, max_steps: int) -> None:
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target perplexity must be positive and finite, got {target}")
    if not lo < hi:
        raise ValueError(f"need lo < hi, got lo={lo}, hi={hi}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")


def _relative_error(ppl: float, target: float) -> float:
    return abs(ppl / target - 1.0)


def bisect_sparsity(
    perplexity_at: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    tolerance: float,
    max_steps: int,
) -> tuple[float, list[tuple[int, float, float]]]:
    """Midpoint bisection, the search `match_sparsity` ran before `interpolate_sparsity`:
    kept as the baseline that benchmarks/matched_search.py and the tests measure against.

    Bisect sparsity in [lo, hi] until |ppl/target - 1| <= tolerance or max_steps
    evaluations; perplexity is assumed non-decreasing in sparsity. Only midpoints are
    evaluated. Returns the evaluated sparsity whose perplexity is closest to the target,
    and the trace of (step, sparsity, perplexity) with steps counted from 1.
    """
    _check_search(target, lo, hi, tolerance, max_steps)
    trace: list[tuple[int, float, float]] = []
    for step in range(1, max_steps + 1):
        mid = (lo + hi) / 2.0
        ppl = float(perplexity_at(mid))
        if math.isnan(ppl):
            raise ValueError(f"perplexity at sparsity {mid} is NaN")
        trace.append((step, mid, ppl))
        if _relative_error(ppl, target) <= tolerance:
            break
        if ppl < target:
            lo = mid
        else:
            hi = mid
    best = min(trace, key=lambda t: _relative_error(t[2], target))
    return best[1], trace


SEARCH_METHOD = "regula-falsi-power-law"
# The exponent of Delta(s) = log ppl(s) - log ppl(0) ~ c s^p assumed while only one point
# besides s = 0 is known. Pruning the smallest |w| of a smooth weight distribution
# removes a squared norm growing as a power of s (s^3 for small s), and a loss near its
# optimum rises with it, so Delta does too. Measured on small GPT-NeoX models, p runs
# from about 2 (up to half sparsity) to 6 (beyond): 2, the low end, puts the first guess
# farther from the evaluated point than the root is, so that step brackets the root,
# and later steps fit p from two points.
ASSUMED_EXPONENT = 2.0


@dataclass(frozen=True)
class SparsitySearch:
    """What a matched-sparsity search found, and why it stopped.

    `trace` holds every perplexity evaluation as (step, sparsity, perplexity), steps
    counted from 1. `stopped` is "tolerance" (a point matched), "max_steps" (budget
    spent; `sparsity` is the closest point seen), "below_bracket" (the perplexity at lo
    is at or above the target's: `sparsity` is lo) or "above_bracket" (the perplexity at
    hi is still below the target's: `sparsity` is hi).
    """

    sparsity: float
    trace: list[tuple[int, float, float]]
    stopped: str
    method: str = SEARCH_METHOD


def interpolate_sparsity(
    perplexity_at: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    tolerance: float,
    max_steps: int,
    lo_perplexity: float | None = None,
) -> SparsitySearch:
    """The sparsity in [lo, hi] whose perplexity matches `target` within `tolerance`
    (|ppl/target - 1|), in at most `max_steps` calls of `perplexity_at`.

    A bracketed search on f(s) = log ppl(s) - log target, perplexity assumed
    non-decreasing in sparsity: the bracket [a, b] keeps f(a) < 0 <= f(b) where known, so
    no step leaves it or [lo, hi], and each step interpolates the values at its ends.

    - `lo_perplexity` is ppl(lo) when it is known without a forward pass (the FP
      perplexity, for lo = 0). Given it, steps interpolate a power law
      Delta(s) = log ppl(s) - log ppl(lo) = c (s - lo)^p through the bracket's ends
      (regula falsi in log-log coordinates, `ASSUMED_EXPONENT` while one end is lo),
      which follows pruning's flat-then-steep curve; where that does not fit (a Delta
      at or below 0, as noise makes it on the flat start) and without ppl(lo), plain
      regula falsi on f, with the Illinois modification (an end kept twice in a row has
      its f halved). ppl(lo) is never returned as a match unless the target is at or
      below it: then nothing in the bracket does better, and lo is returned unevaluated.
    - Every interpolated point is nudged toward the midpoint by 0.2 w^2 / (hi - lo) (ITP's
      truncation): large while the bracket is wide, vanishing as it closes.
    - The first step is the midpoint, as bisection's (ppl(lo) alone gives no scale).
      While only one end's value is known, a step extrapolates through the
      two latest points on that side, no further than bisection's step; when the
      extrapolation passes the unknown end twice in a row, that end is evaluated, and if
      it is still short of the target the search ends there ("above_bracket" at hi,
      "below_bracket" at lo).
    - Wherever the bracket did not halve over the last two steps, the step bisects, so a
      poor interpolation costs at most every other step. No sparsity is evaluated twice.

    Returns the evaluated sparsity whose perplexity is closest to the target, with the
    trace and why the search stopped.
    """
    _check_search(target, lo, hi, tolerance, max_steps)
    if lo_perplexity is not None and not lo_perplexity > 0:  # NaN fails too
        raise ValueError(f"lo_perplexity must be positive, got {lo_perplexity}")
    log_target = math.log(target)
    trace: list[tuple[int, float, float]] = []

    def f_at(sparsity: float) -> float:
        ppl = float(perplexity_at(sparsity))
        if math.isnan(ppl) or ppl <= 0:
            raise ValueError(f"perplexity at sparsity {sparsity} is {ppl}")
        trace.append((len(trace) + 1, sparsity, ppl))
        return math.log(ppl) - log_target

    def result(stopped: str) -> SparsitySearch:
        best = min(trace, key=lambda t: _relative_error(t[2], target))
        return SparsitySearch(best[1], trace, stopped)

    if lo_perplexity is not None and lo_perplexity >= target:
        log.warning(
            "target perplexity %.6g is at or below the perplexity at lo=%g (%.6g, relative "
            "error %.2g): no more pruning can match it, so the matched sparsity is lo",
            target, lo, lo_perplexity, _relative_error(lo_perplexity, target),
        )  # fmt: skip
        return SparsitySearch(lo, trace, "below_bracket")
    # The bracket: f(a) < 0 <= f(b); None where an end's value is not known.
    a, b = lo, hi
    fa: float | None = None if lo_perplexity is None else math.log(lo_perplexity) - log_target
    fb: float | None = None
    # The target's Delta, log target - log ppl(lo) > 0, where ppl(lo) is known.
    delta_target = None if fa is None else -fa
    # Illinois weights: f at the ends, halved at an end that was kept twice in a row.
    weight_a, weight_b = fa, fb
    replaced = ""  # which end the last step moved: "a", "b"
    below: list[tuple[float, float]] = [] if fa is None else [(a, fa)]  # the a's, in order
    above: list[tuple[float, float]] = []  # the b's, in order
    widths = [hi - lo]
    overshoots = 0  # one-sided steps in a row whose extrapolation passed the unknown end

    def power_law_root(s0: float, f0: float, s1: float, f1: float) -> float | None:
        """Where Delta reaches the target's on the power law through (s0, f0) and
        (s1, f1), lo <= s0 < s1; None where no power law fits."""
        if delta_target is None:
            return None
        delta0, delta1 = f0 + delta_target, f1 + delta_target
        if not delta1 > 0:
            return None
        if s0 == lo:  # Delta(lo) = 0: the law goes through the origin
            exponent = ASSUMED_EXPONENT
        elif 0 < delta0 < delta1:
            exponent = math.log(delta1 / delta0) / math.log((s1 - lo) / (s0 - lo))
        else:
            return None
        # In logs, capped: a flat fit must not overflow (the caller bounds the step).
        scale = min(math.log(delta_target / delta1) / exponent, 10.0)
        return lo + (s1 - lo) * math.exp(scale)

    def one_sided(x: float, upward: bool, mid: float) -> float:
        """An extrapolated step toward the end whose value is unknown (hi when `upward`),
        no longer than bisection's: from the flat start of a convex ppl(s) a secant
        overshoots far. Only when it passes that end twice in a row is the end itself
        evaluated (the target may be out of reach)."""
        nonlocal overshoots
        end = hi if upward else lo
        overshoots = overshoots + 1 if (x >= end if upward else x <= end) else 0
        if overshoots >= 2:
            return end
        return min(x, mid) if upward else max(x, mid)

    def next_point() -> float:
        mid = (a + b) / 2.0
        if len(widths) >= 3 and widths[-1] > widths[-3] / 2:
            return mid
        if fa is not None and fb is not None and weight_a is not None and weight_b is not None:
            x = power_law_root(a, fa, b, fb)
            if x is None or not a < x < b:
                if not (math.isfinite(weight_a) and math.isfinite(weight_b)):
                    return mid
                x = a - weight_a * (b - a) / (weight_b - weight_a)
            nudge = 0.2 * (b - a) ** 2 / (hi - lo)
            x = mid if abs(mid - x) <= nudge else x + math.copysign(nudge, mid - x)
        elif fa is not None and len(below) >= 2:
            # b is hi, never evaluated: extrapolate the two latest points below the target.
            (s0, f0), (s1, f1) = below[-2:]
            x = power_law_root(s0, f0, s1, f1)
            if x is None:
                if not f1 > f0:
                    return mid
                x = s1 - f1 * (s1 - s0) / (f1 - f0)
            x = one_sided(x, True, mid)
        elif fb is not None and len(above) >= 2:
            # a is lo, never evaluated (so no power law): extrapolate the two latest above.
            (s0, f0), (s1, f1) = above[-2:]  # s1 < s0: b only moves down
            if not f0 > f1:
                return mid
            x = one_sided(s1 - f1 * (s0 - s1) / (f0 - f1), False, mid)
        else:
            return mid
        # Strictly inside the bracket, or an end whose value is unknown; never a repeat.
        inside = a < x < b or (x == b and fb is None) or (x == a and fa is None)
        if not inside or any(x == s for _, s, _ in trace):
            return mid
        return x

    for _ in range(max_steps):
        x = next_point()
        fx = f_at(x)
        if _relative_error(trace[-1][2], target) <= tolerance:
            return result("tolerance")
        if fx < 0:
            if x == hi:
                log.warning(
                    "perplexity at hi=%g (%.6g) is below the target %.6g: the target is "
                    "out of reach, so the matched sparsity is hi",
                    hi, trace[-1][2], target,
                )  # fmt: skip
                return result("above_bracket")
            if replaced == "a" and weight_b is not None:
                weight_b /= 2
            a, fa, weight_a, replaced = x, fx, fx, "a"
            below.append((x, fx))
        else:
            if x == lo:
                log.warning(
                    "perplexity at lo=%g (%.6g) is at or above the target %.6g: no more "
                    "pruning can match it, so the matched sparsity is lo",
                    lo, trace[-1][2], target,
                )  # fmt: skip
                return result("below_bracket")
            if replaced == "b" and weight_a is not None:
                weight_a /= 2
            b, fb, weight_b, replaced = x, fx, fx, "b"
            above.append((x, fx))
        widths.append(b - a)
    return result("max_steps")


class PruneSearch:
    """The matched-pruning candidate at any sparsity, exactly as encode would run it.

    The weights are those `checkpoints.compress_state` on the float32 base and
    `apply_state` write (what `compress` stores and `encode` loads), written into a model
    loaded by `checkpoints.load_run_model`: for the sparsity the search picks, its logits
    are bit-identical to the encoded checkpoint's. Each block matrix is sorted by |w|
    once (`prune.magnitude_ranks`), so a step only compares ranks, not sorts again.
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
        from .models import load_model, target_weights
        from .prune import magnitude_ranks

        self.variant = parse_variant(f"prune-matched-{target}")
        self.reference = load_model(base, dtype="float32", revision=revision)
        self.model = load_run_model(
            base,
            dtype=dtype,
            revision=revision,
            attn_implementation=attn_implementation,
            device=device,
        )
        self.ranks = {
            name: magnitude_ranks(param.data) for name, param in target_weights(self.reference)
        }

    def model_at(self, sparsity: float) -> Any:
        import torch

        from .models import target_weights
        from .prune import mask_from_ranks

        reference = dict(target_weights(self.reference))
        for name, param in target_weights(self.model):
            keep = mask_from_ranks(self.ranks[name], sparsity)
            # As apply_state builds it: kept float32 values, +0.0 elsewhere (masked_fill,
            # not a product, which would leave -0.0 for pruned negatives), then the run dtype.
            dense = reference[name].data.masked_fill(~keep, 0.0)
            with torch.no_grad():
                param.data.copy_(dense.to(device=param.device, dtype=param.dtype))
        return self.model


def sequence_perplexity(model: Any, ids: np.ndarray, batch_size: int, desc: str = "") -> float:
    """Token-weighted perplexity of `ids` [n_seq, seq_len] from the encode forward (`batch_nll`)."""
    import torch

    from .encode import batch_nll

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        batches = range(0, len(ids), batch_size)
        for lo in progress.bar(batches, desc=desc, unit="batch", transient=True):
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
    lo_perplexity: float | None = None,
) -> SparsitySearch:
    """The sparsity whose pruned model's perplexity on `ids` matches the target's
    (`interpolate_sparsity`); `lo_perplexity` is the perplexity at cfg.lo on `ids` when it is
    known without a forward pass (the FP model's, for lo = 0)."""

    # One step of the overall bar per perplexity evaluation, max_steps at most (the search
    # may stop sooner); each evaluation has its own bar over its batches.
    evaluations = progress.bar(
        total=cfg.max_steps, desc=f"match {search.variant.name}", unit="evaluation"
    )

    def perplexity_at(sparsity: float) -> float:
        ppl = sequence_perplexity(
            search.model_at(sparsity), ids, batch_size, desc=f"ppl @ sparsity {sparsity:.4f}"
        )
        log.info("sparsity %.5f -> perplexity %.4f (target %.4f)", sparsity, ppl, target_perplexity)
        evaluations.set_postfix(sparsity=f"{sparsity:.4f}", perplexity=f"{ppl:.4f}", refresh=False)
        evaluations.update(1)
        return ppl

    with evaluations:
        found = interpolate_sparsity(
            perplexity_at,
            target_perplexity,
            cfg.lo,
            cfg.hi,
            cfg.tolerance,
            cfg.max_steps,
            lo_perplexity=lo_perplexity,
        )
        evaluations.total = evaluations.n  # done: the last line says so, not "2/14"
    return found
