"""Protection plans: the MILP and greedy on hand-made instances with a known optimum, and each
export (our payload, compressed-tensors, llm-compressor, GGUF) made real on tiny GPT-NeoX models.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import gguf
import numpy as np
import polars as pl
import pytest
import torch

from sae_audit.files import InputError
from sae_audit.gguf_checkpoint import read_gguf_state, write_gguf
from sae_audit.models import as_out_in, load_model, target_weights
from sae_audit.protect import (
    PLAN_SCHEMA,
    Level,
    Plan,
    apply_protected,
    compressed_tensors_config,
    gguf_tensor_types,
    gguf_types,
    llmcompressor_recipe,
    module_shapes,
    plan_for_watchlist,
    plan_protection,
    plan_table,
    predicted_r,
    protected_state,
    storage_bits,
)
from sae_audit.quantize import fake_quantize

from .conftest import save_tiny_model

INT4 = Level("int4", 4)
INT8 = Level("int8", 8)
FP16 = Level("fp16", None)
LEVELS = [INT4, INT8, FP16]

# ---------------------------------------------------------------- a hand-made instance
# Four 64x64 matrices. Per matrix: int4 17408 bits (4.25/weight with its scales), int8 33792,
# fp16 65536; 16384 weights in all, so every int4 -> int8 upgrade costs exactly 1 bit/weight.
SHAPES = {f"blocks.{i}.weight": (64, 64) for i in range(4)}
N_WEIGHTS = 4 * 64 * 64
CHEAPEST_BPW = 4.25
N_WATCH = 12


def hand_instance() -> tuple[np.ndarray, np.ndarray]:
    """Matrix 2 carries almost all the watchlist's noise at int4; int8 divides noise by 256.

    Feature 0 has no FP variance (never survivable); feature 1 has FP variance 4, so it
    survives even at int4 everywhere (relative noise (0.6 + 0.035) / 4 < 1/0.81 - 1).
    """
    rng = np.random.default_rng(0)
    variance = np.zeros((3, 4, N_WATCH))
    variance[0, 0] = 0.02
    variance[0, 1] = 0.005
    variance[0, 3] = 0.01
    variance[0, 2] = rng.uniform(0.5, 1.0, N_WATCH)
    variance[0, 2, 1] = 0.6
    variance[1] = variance[0] / 256
    fp_variance = np.ones(N_WATCH)
    fp_variance[0] = 0.0
    fp_variance[1] = 4.0
    return variance, fp_variance


def plan_at(bpw: float, solver: str = "milp", **kwargs) -> Plan:
    variance, fp_variance = hand_instance()
    return plan_protection(
        variance, fp_variance, SHAPES, LEVELS, budget_bits_per_weight=bpw, solver=solver, **kwargs
    )


def test_storage_bits_count_codes_and_fp16_scales():
    assert storage_bits(INT4, (64, 64)) == 4 * 64 * 64 + 16 * 64
    assert storage_bits(Level("g32", 4, 32), (10, 70)) == 4 * 700 + 16 * 10 * 3  # ceil(70/32)
    assert storage_bits(Level("g", 8, 128), (10, 70)) == 8 * 700 + 16 * 10  # group wider than row
    assert storage_bits(FP16, (10, 70)) == 16 * 700
    with pytest.raises(ValueError, match="no group_size"):
        Level("bad", None, 32)


def test_the_plan_protects_exactly_the_noisy_matrix():
    start = time.perf_counter()
    plan = plan_at(CHEAPEST_BPW + 1)
    elapsed = time.perf_counter() - start
    assert plan.solver == "milp" and plan.gap == 0
    assert [plan.levels[c].name for c in plan.choice] == ["int4", "int4", "int8", "int4"]
    assert plan.predicted_survived == N_WATCH - 1  # all but the feature without FP variance
    assert plan.bits_per_weight == CHEAPEST_BPW + 1
    assert plan.n_bytes == (4 * 17408 + 16384) // 8
    assert elapsed < 10, elapsed


def test_with_more_budget_the_rest_goes_to_the_least_noise_per_bit():
    # 8 bits/weight: matrix 2 at fp16 (+2.94 bits/weight) fits, but matrix 2 at int8 plus
    # matrices 0 and 3 at int8 (+3) leaves less noise; a fourth int8 (+4) does not fit.
    plan = plan_at(8.0)
    assert [plan.levels[c].name for c in plan.choice] == ["int8", "int4", "int8", "int8"]
    assert plan.gap == 0


def test_a_budget_too_small_for_any_upgrade_protects_nothing():
    plan = plan_at(CHEAPEST_BPW + 0.99)
    assert plan.choice == [0, 0, 0, 0]
    assert plan.predicted_survived == 1  # only feature 1, which survives at int4 anyway
    assert plan.gap == 0


def test_a_budget_below_the_cheapest_level_is_an_input_error_naming_it():
    with pytest.raises(InputError, match=r"budget of 4 bits/weight.*at least 4\.25 bits/weight"):
        plan_at(4.0)
    variance, fp_variance = hand_instance()
    need = 1000 + 4 * 17408 // 8
    with pytest.raises(InputError, match=rf"budget of {need - 1} bytes.*at least {need} bytes"):
        plan_protection(variance, fp_variance, SHAPES, LEVELS, budget_bytes=need - 1, base=1000)
    plan = plan_protection(variance, fp_variance, SHAPES, LEVELS, budget_bytes=need, base=1000)
    assert plan.n_bytes == need and plan.choice == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="exactly one"):
        plan_protection(variance, fp_variance, SHAPES, LEVELS)
    with pytest.raises(ValueError, match="exactly one"):
        plan_protection(
            variance, fp_variance, SHAPES, LEVELS, budget_bytes=need, budget_bits_per_weight=5
        )


@pytest.mark.parametrize("bpw", [CHEAPEST_BPW, 5.0, CHEAPEST_BPW + 1, 6.25, 8.0, 16.0])
def test_milp_and_greedy_agree_on_the_hand_instance(bpw):
    milp, greedy = plan_at(bpw), plan_at(bpw, solver="greedy")
    assert (milp.solver, greedy.solver) == ("milp", "greedy")
    assert greedy.choice == milp.choice
    assert greedy.predicted_survived == milp.predicted_survived
    assert milp.gap == 0
    assert greedy.gap >= 0  # against the LP relaxation, which big-M constraints make loose


def test_predictions_recomputed_by_hand():
    variance, fp_variance = hand_instance()
    plan = plan_at(CHEAPEST_BPW + 1)
    noise = sum(variance[k, m] for m, k in enumerate(plan.choice))
    r = np.array(
        [
            math.sqrt(fp / (fp + n)) if fp > 0 else 0.0
            for fp, n in zip(fp_variance, noise, strict=True)
        ]
    )
    np.testing.assert_allclose(plan.predicted_r, r, rtol=0, atol=1e-15)
    assert plan.predicted_survived == int((r >= 0.9).sum())
    assert plan.predicted_r[0] == 0.0
    np.testing.assert_array_equal(predicted_r(fp_variance, noise), plan.predicted_r)
    # a stricter threshold keeps fewer
    strict = plan_at(CHEAPEST_BPW + 1, survived_r=0.999)
    assert strict.predicted_survived < plan.predicted_survived


def test_plans_are_deterministic_and_round_trip_through_json():
    a, b = plan_at(6.25), plan_at(6.25)
    assert a.to_dict() == b.to_dict()
    back = Plan.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.to_dict() == a.to_dict()
    np.testing.assert_array_equal(back.predicted_r, a.predicted_r)
    assert back.levels == a.levels


def test_plan_table_columns():
    plan = plan_at(8.0)
    table = plan_table(plan, SHAPES)
    assert table.schema == PLAN_SCHEMA
    assert table["module"].to_list() == list(SHAPES)
    assert table["group_size"].null_count() == 4  # per channel everywhere
    assert table.select(pl.exclude("group_size")).null_count().row(0) == (0,) * 5
    assert table["storage_bits"].sum() == plan.bits_per_weight * N_WEIGHTS
    fp16 = plan_table(Plan.from_dict({**plan.to_dict(), "choice": [2, 0, 0, 0]}), SHAPES)
    assert fp16["bits"].to_list() == [None, 4, 4, 4]


def random_instance(n_watch: int) -> tuple[np.ndarray, np.ndarray, dict, list[Level]]:
    """24 matrices of three widths, four levels, heavy-tailed noise: many marginal features."""
    rng = np.random.default_rng(1)
    shapes = {f"blocks.{i}.weight": (64, 64 * (1 + i % 3)) for i in range(24)}
    levels = [Level("int4-g32", 4, 32), INT4, INT8, FP16]
    base = rng.gamma(0.5, 0.02, size=(24, n_watch))
    variance = np.stack([base, base * 1.3, base / 256, np.zeros_like(base)])
    return variance, rng.uniform(0.5, 2.0, n_watch), shapes, levels


def test_a_random_instance_milp_is_optimal_and_beats_or_ties_greedy():
    variance, fp_variance, shapes, levels = random_instance(60)
    start = time.perf_counter()
    milp = plan_protection(variance, fp_variance, shapes, levels, budget_bits_per_weight=5.0)
    milp_s = time.perf_counter() - start  # about 1 s here
    greedy = plan_protection(
        variance, fp_variance, shapes, levels, budget_bits_per_weight=5.0, solver="greedy"
    )
    assert milp.solver == "milp" and milp.gap == 0
    assert milp.predicted_survived >= greedy.predicted_survived
    assert greedy.gap >= milp.predicted_survived - greedy.predicted_survived
    assert milp.bits_per_weight <= 5.0 and greedy.bits_per_weight <= 5.0
    assert milp_s < 20, milp_s


def test_the_extended_lp_bounds_tighter_than_big_m_and_above_the_optimum():
    from sae_audit.protect import _lp_bound, _perspective_bound, _Problem

    variance, fp_variance, shapes, levels = random_instance(60)
    optimum = plan_protection(
        variance, fp_variance, shapes, levels, budget_bits_per_weight=5.0
    ).predicted_survived
    cost = np.array([[storage_bits(lv, s) for lv in levels] for s in shapes.values()])
    rel = variance / fp_variance
    problem = _Problem(
        rel=rel,
        cap=1 / 0.9**2 - 1,
        valid=fp_variance > 0,
        cost=cost,
        budget_bits=5 * sum(o * i for o, i in shapes.values()),
        noise_scale=float(rel.max(axis=0).sum()),
        size_scale=float(cost.max(axis=1).sum()),
    )
    tight = _perspective_bound(problem, 30)
    assert tight is not None
    assert optimum <= tight < _lp_bound(problem)  # 54 <= 56 < 58 here


def test_a_milp_stopped_by_its_time_limit_keeps_the_better_plan_and_states_the_gap():
    # 300 features: HiGHS does not close the big-M relaxation's gap in seconds (still about
    # 27 features after 10 s here), so the plan says how far from optimal it may be.
    variance, fp_variance, shapes, levels = random_instance(300)
    plan = plan_protection(
        variance, fp_variance, shapes, levels, budget_bits_per_weight=5.0, time_limit_s=2
    )
    greedy = plan_protection(
        variance,
        fp_variance,
        shapes,
        levels,
        budget_bits_per_weight=5.0,
        solver="greedy",
        time_limit_s=2,  # also caps its bounding LPs
    )
    assert plan.predicted_survived >= greedy.predicted_survived
    assert plan.gap > 0
    assert plan.bits_per_weight <= 5.0


# ---------------------------------------------------------------- real tiny models

PLANNED = {  # module index -> level name: one of each, the rest int4 in groups of 32
    0: "fp16",
    5: "int8",
}
REAL_LEVELS = [Level("int4-g32", 4, 32), Level("int8", 8), Level("fp16", None)]


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hidden 64: every block matrix's input width is a multiple of 32 (GGUF blocks, groups)
    root = tmp_path_factory.mktemp("protect")
    return save_tiny_model("gpt_neox", root / "neox", hidden=64, layers=2)


@pytest.fixture(scope="module")
def real_plan(neox_dir: Path) -> Plan:
    """A plan made by the MILP whose only all-surviving choice within budget is PLANNED."""
    shapes = module_shapes(load_model(neox_dir))
    n_mod, n_watch = len(shapes), 5
    variance = np.zeros((3, n_mod, n_watch))
    variance[0] = 0.001
    for m, name in PLANNED.items():
        variance[0, m] = 1.0
        variance[1, m] = 1.0 if name == "fp16" else 0.001
    want = [{"int4-g32": 0, "int8": 1, "fp16": 2}[PLANNED.get(m, "int4-g32")] for m in range(n_mod)]
    bits = sum(storage_bits(REAL_LEVELS[k], s) for k, s in zip(want, shapes.values(), strict=True))
    plan = plan_protection(
        variance, np.ones(n_watch), shapes, REAL_LEVELS, budget_bytes=-(-bits // 8)
    )
    assert plan.choice == want and plan.predicted_survived == n_watch
    return plan


def planned_name(plan: Plan, m: int) -> str:
    return plan.modules[m].removesuffix(".weight")


def test_our_payload_is_full_range_rtn_and_keeps_unquantized_weights(neox_dir, real_plan):
    model = load_model(neox_dir)
    payload, method = protected_state(model, real_plan)
    assert method == {"kind": "protect", "plan": real_plan.to_dict()}
    assert f"{real_plan.modules[0]}.codes" not in payload  # fp16: nothing stored
    assert payload[f"{real_plan.modules[1]}.codes"].dtype == torch.int8
    fp = dict(target_weights(load_model(neox_dir)))
    out = dict(target_weights(apply_protected(load_model(neox_dir), payload, method)))
    for name in real_plan.modules:
        spec = real_plan.level_of(name).spec
        want = fp[name] if spec is None else fake_quantize(fp[name].detach(), spec)
        assert torch.equal(out[name].detach(), want.detach()), name
    with pytest.raises(ValueError, match="not this model's"):
        protected_state(load_model(neox_dir), plan_at(5.0))


def test_compressed_tensors_config_validates_and_applies_the_plan(neox_dir, real_plan):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    cfg = compressed_tensors_config(real_plan)
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["ignore"] == [planned_name(real_plan, 0), "lm_head"]
    json.dumps(cfg)
    model = load_model(neox_dir)
    apply_quantization_config(model, QuantizationConfig.model_validate(cfg))
    for name in real_plan.modules:
        module = model.get_submodule(name.removesuffix(".weight"))
        scheme = getattr(module, "quantization_scheme", None)
        level = real_plan.level_of(name)
        if level.bits is None:
            assert scheme is None, name
            continue
        assert scheme is not None, name
        w = scheme.weights
        assert (w.num_bits, w.type, w.symmetric) == (level.bits, "int", True), name
        strategy = "channel" if level.group_size is None else "group"
        assert (w.strategy, w.group_size) == (strategy, level.group_size), name
    head = model.get_output_embeddings()  # type: ignore[operator]
    assert getattr(head, "quantization_scheme", None) is None


def test_llmcompressor_oneshot_of_the_recipe_equals_our_payload(neox_dir, real_plan, tmp_path):
    import yaml
    from llmcompressor import oneshot

    from sae_audit.shipped import load_compressed_tensors

    recipe = llmcompressor_recipe(real_plan)
    modifier = yaml.safe_load(recipe)["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert modifier["ignore"] == compressed_tensors_config(real_plan)["ignore"]
    model = load_model(neox_dir)
    start = time.perf_counter()
    oneshot(model=model, recipe=recipe)  # weight-only RTN: llm-compressor's data-free pipeline
    model.save_pretrained(tmp_path / "ct", save_compressed=True)  # type: ignore[operator]
    shipped = load_compressed_tensors(tmp_path / "ct", "float32")
    elapsed = time.perf_counter() - start
    payload, method = protected_state(load_model(neox_dir), real_plan)
    ours = dict(target_weights(apply_protected(load_model(neox_dir), payload, method)))
    theirs = dict(target_weights(shipped))
    for name in real_plan.modules:
        assert torch.equal(theirs[name].detach(), ours[name].detach()), name
    assert elapsed < 20, elapsed


def test_gguf_file_has_the_listed_tensor_types(neox_dir, real_plan, tmp_path):
    model = load_model(neox_dir)
    lines = gguf_tensor_types(real_plan, model)
    assert len(lines) == len(real_plan.modules)
    listed = dict(line.split("=") for line in lines)
    assert set(listed.values()) == {"q4_0", "q8_0", "f16"}
    path = tmp_path / "protected.gguf"
    info = write_gguf(model, "Q4_0", path, tensor_types=gguf_types(real_plan))
    assert info["tensor_types"] == gguf_types(real_plan)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, gguf_type in listed.items():
        assert name in tensors, name
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType[gguf_type.upper()], name
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # the F16 matrix reads back as the weight rounded to fp16
    state = read_gguf_state(path, model)
    name = real_plan.modules[0]
    weight = dict(target_weights(model))[name].detach()
    assert torch.equal(state[name], weight.half().float())
    assert not torch.equal(
        state[real_plan.modules[1]], dict(target_weights(model))[real_plan.modules[1]]
    )
    with pytest.raises(ValueError, match="not block matrices"):
        write_gguf(
            model, "Q4_0", tmp_path / "x.gguf", tensor_types={"gpt_neox.embed_in.weight": "Q8_0"}
        )


def test_gguf_types_reject_widths_gguf_lacks(neox_dir):
    plan = plan_protection(
        np.zeros((1, 8, 1)),
        np.ones(1),
        module_shapes(load_model(neox_dir)),
        [Level("int3", 3)],
        budget_bits_per_weight=4,
    )
    with pytest.raises(ValueError, match="3 bits"):
        gguf_types(plan)


def test_module_shapes_are_out_in(neox_dir):
    model = load_model(neox_dir)
    shapes = module_shapes(model)
    for name, p in target_weights(model):
        assert shapes[name] == tuple(as_out_in(p, model).shape)


def test_levels_from_entries_are_named_by_bits_and_group() -> None:
    assert Level.from_entry({"bits": 4}) == Level("int4", 4, None)
    assert Level.from_entry({"bits": 8, "group_size": 32}) == Level("int8-g32", 8, 32)
    assert Level.from_entry({"bits": None}) == Level("fp16", None, None)


def test_plan_for_watchlist_reads_the_forecast_rows_of_the_watched_features() -> None:
    from sae_audit.forecast import Forecast

    shapes = {"a.weight": (64, 64), "b.weight": (64, 64), "late.weight": (64, 64)}
    levels = [INT4, INT8]
    # sources: a and b only (late comes after the hook); features 0..3, watch 1 and 3
    variance = np.zeros((2, 2, 4))
    variance[0, 1] = [0.0, 3.0, 0.0, 3.0]  # b at int4 ruins the watched features
    variance[1, 1] = [0.0, 0.003, 0.0, 0.003]
    forecast = Forecast(
        schemes=["int4", "int8"], sources=["a.weight", "b.weight"], variance=variance,
        fp_mean=np.zeros(4), fp_variance=np.ones(4), n_tokens=128,
    )  # fmt: skip
    plan, record = plan_for_watchlist(
        forecast, shapes, levels, [1, 3], survived_r=0.9, budget={"bits_per_weight": 6.0}
    )
    assert [plan.levels[c].name for c in plan.choice] == ["int4", "int8", "int4"]
    assert (record["predicted_survived"], record["base_predicted_survived"]) == (2, 0)
    assert record["base_bits_per_weight"] == pytest.approx(4 + 16 / 64)
    assert record["shapes"]["late.weight"] == [64, 64]
