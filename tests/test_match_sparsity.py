"""The matched-pruning search: the sparsity whose perplexity matches a target's."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sae_audit import stages
from sae_audit.checkpoints import apply_state, compress_state, load_run_model
from sae_audit.match_sparsity import (
    SEARCH_METHOD,
    MatchedConfig,
    PruneSearch,
    bisect_sparsity,
    interpolate_sparsity,
    sequence_perplexity,
)
from sae_audit.models import target_weights
from sae_audit.shards import write_token_shard
from sae_audit.variants import parse_variant


def counted(fn: Callable[[float], float]) -> tuple[Callable[[float], float], list[float]]:
    """`fn`, recording every sparsity it is called at."""
    calls: list[float] = []

    def wrapped(s: float) -> float:
        calls.append(s)
        return fn(s)

    return wrapped, calls


def pruning_curve(s: float) -> float:
    """Perplexity shaped like magnitude pruning's: flat at first, then steeply convex."""
    return 20.0 * math.exp(0.5 * s**4 / (1.0 - s))


# ---------------------------------------------------------------- the old bisection (baseline)
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


# ---------------------------------------------------------------- the search the stage runs
@pytest.mark.parametrize("with_lo", [True, False])
def test_search_matches_in_fewer_evaluations_than_bisection(with_lo: bool) -> None:
    """Every target is matched within tolerance; on an exponential each in fewer
    evaluations than bisection, on a pruning-shaped curve in far fewer over all (where
    the curve is flat a lucky midpoint can beat an interpolation by a step or two)."""
    curves = {
        "exponential": (lambda s: 10.0 * math.exp(3.0 * s), [0.05, 0.3, 0.55, 0.8]),
        "pruning": (pruning_curve, [0.2, 0.45, 0.6, 0.75, 0.85, 0.9]),
    }
    total_new = total_old = 0
    for name, (curve, roots) in curves.items():
        for root in roots:
            target = curve(root)
            fn, calls = counted(curve)
            found = interpolate_sparsity(
                fn, target, 0.0, 0.95, 5e-4, 20, lo_perplexity=curve(0.0) if with_lo else None
            )
            _, old_trace = bisect_sparsity(curve, target, 0.0, 0.95, 5e-4, 20)
            assert found.stopped == "tolerance", (name, root, found)
            assert abs(curve(found.sparsity) / target - 1) <= 5e-4
            assert len(calls) == len(found.trace)
            if name == "exponential":
                assert len(calls) < len(old_trace), (root, found.trace)
            assert found.trace[0][1] == 0.95 / 2  # first step: the midpoint, as bisection's
            assert found.method == SEARCH_METHOD
            total_new += len(found.trace)
            total_old += len(old_trace)
    assert total_new <= 0.75 * total_old, (total_new, total_old)


def test_search_returns_the_closest_point_and_numbers_its_steps() -> None:
    found = interpolate_sparsity(pruning_curve, pruning_curve(0.6), 0.0, 0.95, 1e-6, 30)
    steps = [step for step, _, _ in found.trace]
    assert steps == list(range(1, len(steps) + 1))
    assert found.trace[-1][1] == found.sparsity
    assert abs(pruning_curve(found.sparsity) / pruning_curve(0.6) - 1) <= 1e-6


@pytest.mark.parametrize("max_steps", [1, 2, 5])
def test_search_respects_max_steps_and_the_bracket(max_steps: int) -> None:
    # A jump no sparsity matches: the budget is spent, never exceeded.
    def jump(s: float) -> float:
        return 10.0 if s < 0.5 else 20.0

    fn, calls = counted(jump)
    found = interpolate_sparsity(fn, 14.0, 0.1, 0.9, 0.01, max_steps, lo_perplexity=10.0)
    assert len(calls) == len(found.trace) == max_steps and found.stopped == "max_steps"
    assert all(0.1 <= s <= 0.9 for s in calls)
    if max_steps > 1:  # the second step lands below the jump: 10 is nearer 14 than 20 is
        assert jump(found.sparsity) == 10.0
    if max_steps == 5:  # the bracket closes in on the jump at least as fast as bisection's
        assert abs(calls[-1] - 0.5) <= 0.8 / 2**4


def test_search_never_leaves_the_bracket_nor_repeats_a_point() -> None:
    lo, hi = 0.15, 0.85
    for target in [pruning_curve(s) for s in np.linspace(0.0, 0.95, 23)]:
        for lo_ppl in (None, pruning_curve(lo)):
            fn, calls = counted(pruning_curve)
            found = interpolate_sparsity(fn, target, lo, hi, 1e-4, 12, lo_perplexity=lo_ppl)
            assert all(lo <= s <= hi for s in calls), calls
            assert len(set(calls)) == len(calls), calls
            # No evaluation only where ppl(lo) is given and already at or above the target.
            assert calls or (lo_ppl is not None and lo_ppl >= target and found.sparsity == lo)


def test_search_on_a_noisy_non_monotone_curve_keeps_to_the_bracket() -> None:
    # Pruning's real curve wobbles by about 0.1% where it is flat: the search must still
    # end within its budget and inside [lo, hi], and report the closest point it saw.
    rng = np.random.default_rng(0)
    wobble = {s: 1.0 + 1e-3 * rng.standard_normal() for s in np.round(np.linspace(0, 1, 2001), 4)}

    def noisy(s: float) -> float:
        return pruning_curve(s) * wobble[round(round(s * 2000) / 2000, 4)]

    for root in (0.1, 0.3, 0.6, 0.8):
        target = pruning_curve(root)
        fn, calls = counted(noisy)
        found = interpolate_sparsity(fn, target, 0.0, 0.95, 5e-4, 14, lo_perplexity=noisy(0.0))
        assert len(calls) <= 14 and all(0.0 <= s <= 0.95 for s in calls)
        if found.stopped == "below_bracket":  # the wobble put ppl(0) above the target
            assert noisy(0.0) >= target and found.sparsity == 0.0
        else:
            errors = [abs(p / target - 1) for _, _, p in found.trace]
            assert abs(noisy(found.sparsity) / target - 1) == min(errors)


def test_target_above_the_bracket_ends_at_hi() -> None:
    """The target needs more pruning than hi: the search evaluates hi once its secant
    points past it, finds it short, and stops there (bisection spends every step)."""
    target = pruning_curve(0.9)
    fn, calls = counted(pruning_curve)
    found = interpolate_sparsity(fn, target, 0.0, 0.5, 5e-4, 12, lo_perplexity=pruning_curve(0.0))
    assert found.stopped == "above_bracket" and found.sparsity == 0.5 == calls[-1]
    assert len(calls) < 12
    _, old_trace = bisect_sparsity(pruning_curve, target, 0.0, 0.5, 5e-4, 12)
    assert len(old_trace) == 12  # bisection's answer: the highest midpoint, just below hi
    assert all(0.0 <= s <= 0.5 for s in calls)


def test_target_below_the_bracket_ends_at_lo() -> None:
    """The target's perplexity is at or below the one at lo (e.g. an INT8 target a hair
    under FP): no sparsity in the bracket does better than lo, so lo is the match. Given
    ppl(lo), that takes no evaluation; without it, the search finds lo by evaluating it."""
    below = pruning_curve(0.0) * 0.999
    fn, calls = counted(pruning_curve)
    found = interpolate_sparsity(fn, below, 0.0, 0.9, 5e-4, 12, lo_perplexity=pruning_curve(0.0))
    assert (found.sparsity, found.trace, found.stopped, calls) == (0.0, [], "below_bracket", [])
    fn, calls = counted(pruning_curve)
    found = interpolate_sparsity(fn, below, 0.2, 0.9, 5e-4, 12)
    assert found.stopped == "below_bracket" and found.sparsity == 0.2 == calls[-1]
    assert len(calls) < 12 and all(0.2 <= s <= 0.9 for s in calls)


def test_search_rejects_what_it_cannot_search() -> None:
    with pytest.raises(ValueError, match="nan"):
        interpolate_sparsity(lambda s: math.nan, 10.0, 0.0, 0.9, 0.01, 5)
    with pytest.raises(ValueError, match="lo_perplexity"):
        interpolate_sparsity(pruning_curve, 30.0, 0.0, 0.9, 0.01, 5, lo_perplexity=math.nan)
    with pytest.raises(ValueError, match="lo < hi"):
        interpolate_sparsity(pruning_curve, 30.0, 0.5, 0.5, 0.01, 5)
    with pytest.raises(ValueError, match="max_steps"):
        interpolate_sparsity(pruning_curve, 30.0, 0.0, 0.9, 0.01, 0)
    with pytest.raises(ValueError, match="target"):
        interpolate_sparsity(pruning_curve, math.inf, 0.0, 0.9, 0.01, 5)


def test_search_survives_an_infinite_perplexity() -> None:
    def overflowing(s: float) -> float:
        return math.inf if s > 0.8 else pruning_curve(s)

    found = interpolate_sparsity(overflowing, pruning_curve(0.7), 0.0, 0.95, 5e-4, 20, 20.0)
    assert found.stopped == "tolerance"


# ---------------------------------------------------------------- the model it scores
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prune_search_writes_what_compress_and_apply_state_write(gpt_neox_dir, dtype) -> None:
    """Sorted once, the search's pruned weights are bit-identical to the checkpoint path's
    at every sparsity, in any order of sparsities (each step overwrites every matrix)."""
    search = PruneSearch(str(gpt_neox_dir), "rtn-int6", dtype=dtype)
    variant = parse_variant("prune-matched-rtn-int6")
    for sparsity in [0.6, 0.0, 0.3125, 0.95, 0.1]:
        searched = dict(target_weights(search.model_at(sparsity)))
        expected = apply_state(
            load_run_model(gpt_neox_dir, dtype=dtype),
            *compress_state(search.reference, variant, sparsity=sparsity),
        )
        for name, param in target_weights(expected):
            got = searched[name]
            assert got.dtype == param.dtype
            assert torch.equal(got.view(torch.int16 if dtype == "bfloat16" else torch.int32),
                               param.view(torch.int16 if dtype == "bfloat16" else torch.int32)), name  # fmt: skip


def peaked_model(path: Path) -> Path:
    """A tiny GPT-NeoX with 5x the default weight spread, so its logits are peaked and
    pruning moves its perplexity (at the default 0.02 it barely moves)."""
    from transformers import AutoModelForCausalLM

    from .conftest import tiny_config

    config = tiny_config("gpt_neox")
    config.initializer_range = 0.1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


def test_stage_reads_the_fp_perplexity_and_records_the_search(tmp_path) -> None:
    """The stage takes ppl(0) from the FP NLL shards (no forward pass at sparsity 0) and
    writes the trace keys compress reads, plus the method and why it stopped."""
    from .test_families import make_sae

    base = peaked_model(tmp_path / "model")
    seq_len, params = 32, {"source": "x", "dtype": "float32"}
    encode = {"batch_size": 4, "device": "cpu"}
    # Text the model sampled itself: there, pruning can only raise its perplexity (in
    # expectation: cross-entropy = entropy + KL), so the target lies inside the bracket.
    torch.manual_seed(0)
    sampler: Any = load_run_model(base, "float32")  # typed nn.Module; it has generate
    with torch.no_grad():
        ids = sampler.generate(
            torch.zeros(8, 1, dtype=torch.long), do_sample=True, top_k=0,
            min_length=seq_len, max_length=seq_len, pad_token_id=3,
        ).numpy()  # fmt: skip
    write_token_shard(tmp_path / "tokens/shard-000.parquet", ids, 0, {"seq_len": seq_len})
    make_sae("standard", 32, 48, "blocks.1.hook_resid_post").save_model(tmp_path / "sae")
    sae = {"res": {"path": str(tmp_path / "sae"), "architecture": "standard"}}
    for variant in ("fp", "prune-0.5"):
        stages.compress(model=params, base=str(base), variant=variant,
                        out=tmp_path / f"ckpt/{variant}")  # fmt: skip
        stages.encode(model=params, saes=sae, encode=encode, checkpoint=tmp_path / f"ckpt/{variant}",
                      tokens=tmp_path / "tokens/shard-000.parquet", codes_dir=tmp_path / f"codes/{variant}",
                      nll=tmp_path / f"nll/{variant}.parquet", model_name="tiny")  # fmt: skip
    matched = {"tolerance": 1e-3, "lo": 0.0, "hi": 0.9, "max_steps": 8, "n_sequences": 6}
    result = stages.match_sparsity(
        model=params, base=str(base), target="prune-0.5", encode=encode, matched=matched,
        target_nll=[str(tmp_path / "nll/prune-0.5.parquet")], fp_nll=[str(tmp_path / "nll/fp.parquet")],
        tokens=[str(tmp_path / "tokens/shard-000.parquet")], model_name="tiny", out=tmp_path / "m.json",
    )  # fmt: skip
    assert json.loads(Path(tmp_path / "m.json").read_text()) == result
    assert result["method"] == SEARCH_METHOD and result["params"] == matched
    assert result["n_sequences"] == 6 and 1 <= len(result["trace"]) <= 8
    assert set(result["trace"][0]) == {"step", "sparsity", "perplexity"}
    assert result["stopped"] in ("tolerance", "max_steps")
    assert 0.0 not in [t["sparsity"] for t in result["trace"]]  # ppl(0) was not evaluated
    # ppl(0) from the FP shards equals the search's own forward pass at sparsity 0.
    search = PruneSearch(str(base), "prune-0.5")
    fp_ppl = sequence_perplexity(search.model_at(0.0), ids[:6], batch_size=4)
    assert result["lo_perplexity"] == pytest.approx(fp_ppl, rel=1e-12)
    target = result["target_perplexity"]
    best = min(result["trace"], key=lambda t: abs(t["perplexity"] / target - 1))
    assert best["sparsity"] == result["sparsity"]
    # Without the FP shards the search still runs, from the midpoint on its own.
    again = stages.match_sparsity(
        model=params, base=str(base), target="prune-0.5", encode=encode, matched=matched,
        target_nll=[str(tmp_path / "nll/prune-0.5.parquet")],
        tokens=[str(tmp_path / "tokens/shard-000.parquet")], model_name="tiny", out=tmp_path / "n.json",
    )  # fmt: skip
    assert again["lo_perplexity"] is None and again["trace"][0]["sparsity"] == 0.45
