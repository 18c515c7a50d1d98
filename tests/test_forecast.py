"""Forecasting feature damage before compressing (sae_audit.forecast).

- noise models: RTN std is quantize_rtn's own scale / sqrt(12); GGUF Q8_0/Q4_0 and fp8 std
  match the RMS of the real roundtrip error; pruning's std is the pruned magnitudes;
- first-order exactness: the forward-AD change of the codes for a fixed weight direction
  equals a central finite difference on a tiny real model and SAE;
- forecast vs measured on the trained fixture (per feature, and per source against
  leave-one-module-quantized runs);
- known answer: a super-weight-like outlier planted in exactly one module (the
  function-preserving reparameterization) makes that module the top source under
  per-channel INT4, in the forecast and in the measurement, and not under group-wise INT4;
- activation and KV-cache noise land on their own sources only;
- forecast_accuracy and the tables: known orders, nulls with notes, never NaN.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import spearmanr

from sae_audit.fixture.bundle import BUNDLE_DIR
from sae_audit.fixture.reparam import ReparamConfig, reparameterize
from sae_audit.forecast import (
    ACCURACY_SCHEMA,
    Forecast,
    NoiseScheme,
    compressed_weight,
    feature_jvp,
    forecast_accuracy,
    forecast_table,
    forecast_variances,
    measure_source_variances,
    scheme_for_variant,
    source_table,
    weight_noise_std,
)
from sae_audit.models import ActivationCapture, as_out_in, from_out_in, load_model, target_weights
from sae_audit.quantize import RTNSpec, fake_quantize, quantize_rtn
from sae_audit.saes import load_sae, sae_input
from sae_audit.variants import parse_variant

from .conftest import save_tiny_model
from .test_families import make_sae

PLANTED = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
INT4 = NoiseScheme("rtn-int4", weights=RTNSpec(bits=4))
INT4_G32 = NoiseScheme("rtn-int4-g32", weights=RTNSpec(bits=4, group_size=32))
INT8 = NoiseScheme("rtn-int8", weights=RTNSpec(bits=8))


def no_nan(df: pl.DataFrame) -> bool:
    floats = [c for c, t in df.schema.items() if t.is_float()]
    if not floats or df.height == 0:
        return True
    return not any(df.select(pl.col(floats).is_nan().any()).row(0))


# ---------------------------------------------------------------- noise models
@pytest.mark.parametrize("spec", [RTNSpec(4), RTNSpec(4, group_size=32), RTNSpec(3, symmetric=False, group_size=16), RTNSpec(8, full_range=True)])  # fmt: skip
def test_rtn_std_is_quantize_rtns_scale_over_sqrt12(spec: RTNSpec) -> None:
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(0))
    std = weight_noise_std(w, NoiseScheme("x", weights=spec))
    q = quantize_rtn(w, spec)
    cols = torch.arange(100) // q.group_size
    assert torch.equal(std, q.scale[:, cols] / np.sqrt(12))
    # and it is what the rounding error really is, on average
    err = fake_quantize(w, spec) - w
    assert float(err.pow(2).mean().sqrt()) == pytest.approx(
        float(std.pow(2).mean().sqrt()), rel=0.1
    )


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0"])
def test_gguf_std_matches_the_real_roundtrip_error(gguf_type: str) -> None:
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    scheme = NoiseScheme("g", gguf_type=gguf_type)
    std = weight_noise_std(w, scheme)
    err = compressed_weight(w, scheme) - w  # gguf.quants.quantize / dequantize
    rms_err, rms_std = float(err.pow(2).mean().sqrt()), float(std.pow(2).mean().sqrt())
    print(f"{gguf_type}: roundtrip RMS {rms_err:.4g}, forecast std RMS {rms_std:.4g}")
    assert rms_err == pytest.approx(rms_std, rel=0.1)
    with pytest.raises(ValueError, match="blocks of 32"):
        weight_noise_std(torch.randn(4, 40), scheme)


def test_fp8_std_matches_the_real_e4m3_roundtrip() -> None:
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    scheme = NoiseScheme("f", float_weights="fp8")
    err = compressed_weight(w, scheme) - w
    std = weight_noise_std(w, scheme)
    assert float(err.pow(2).mean().sqrt()) == pytest.approx(
        float(std.pow(2).mean().sqrt()), rel=0.1
    )


def test_pruning_std_is_the_pruned_magnitudes() -> None:
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    std = weight_noise_std(w, NoiseScheme("p", sparsity=0.25))
    pruned = std > 0
    assert int(pruned.sum()) == round(0.25 * w.numel())
    assert torch.equal(std[pruned], w.abs()[pruned])
    assert float(w.abs()[pruned].max()) <= float(w.abs()[~pruned].min())


def test_a_scheme_has_at_most_one_weight_part() -> None:
    with pytest.raises(ValueError, match="at most one weight part"):
        NoiseScheme("x", weights=RTNSpec(4), sparsity=0.5)
    with pytest.raises(ValueError, match="not one of"):
        NoiseScheme("x", gguf_type="Q5_K")
    assert not NoiseScheme("kv", kv_cache="fp8").has_weight_noise
    assert torch.equal(weight_noise_std(torch.ones(2, 2), NoiseScheme("z")), torch.zeros(2, 2))


def test_scheme_for_variant() -> None:
    rtn = scheme_for_variant(parse_variant("rtn-int4-g128-full"))
    assert rtn is not None and rtn.weights == RTNSpec(4, group_size=128, full_range=True)
    prune = scheme_for_variant(parse_variant("prune-0.3"))
    assert prune is not None and prune.sparsity == 0.3
    matched = scheme_for_variant(parse_variant("prune-matched-rtn-int6"), sparsity=0.2)
    assert matched is not None and matched.sparsity == 0.2
    with pytest.raises(ValueError, match="sparsity"):
        scheme_for_variant(parse_variant("prune-matched-rtn-int6"))
    q4 = scheme_for_variant(parse_variant("gguf-q4"), {"type": "Q4_0"})
    assert q4 is not None and q4.gguf_type == "Q4_0"
    assert scheme_for_variant(parse_variant("gguf-q5"), {"type": "Q5_0"}) is None
    for name in ("fp", "fp-null", "fp-noise", "ext-thing"):
        assert scheme_for_variant(parse_variant(name), {}) is None

    def lc(entry: dict) -> NoiseScheme:
        made = scheme_for_variant(parse_variant("lc-x"), entry)
        assert made is not None
        return made

    assert lc({"scheme": "W4A16"}).weights == RTNSpec(4, group_size=128, full_range=True)
    assert lc({"scheme": "W4A16_ASYM", "group_size": 32}).weights == RTNSpec(
        4, symmetric=False, group_size=32
    )
    w8a8 = lc({"scheme": "W8A8", "method": "smoothquant+gptq", "kv_cache": "int8"})
    assert (w8a8.weights, w8a8.activations, w8a8.kv_cache) == (RTNSpec(8, full_range=True), "int8", "int8")  # fmt: skip
    fp8 = lc({"scheme": "FP8_DYNAMIC"})
    assert (fp8.float_weights, fp8.activations) == ("fp8", "fp8")
    kv_only = lc({"kv_cache": "fp8"})
    assert not kv_only.has_weight_noise and kv_only.activations is None
    assert kv_only.kv_cache == "fp8"


def test_llmcompressor_weight_grids_are_compressed_tensors_presets() -> None:
    presets = pytest.importorskip("compressed_tensors.quantization")
    for name in ("W4A16", "W4A16_ASYM", "W8A16", "W8A8"):
        ours = scheme_for_variant(parse_variant("lc-x"), {"scheme": name})
        args = presets.preset_name_to_scheme(name, ["Linear"]).weights
        assert ours is not None and ours.weights is not None
        assert ours.weights.bits == args.num_bits and ours.weights.symmetric == args.symmetric
        assert ours.weights.group_size == args.group_size, name


# ---------------------------------------------------------------- tiny model: exactness, sources
HIDDEN = 32
TINY_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """family -> a tiny random model in float64 with a real sae-lens SAE on layer 1's output."""
    made: dict[str, tuple] = {}

    def get(family: str):
        if family not in made:
            path = save_tiny_model(family, tmp_path_factory.mktemp(family) / "model")
            model = load_model(path, dtype="float32").double()
            ids = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(0))
            acts = codes(model, None, None, ids)
            sae = make_sae("standard", HIDDEN, 64, TINY_HOOK, acts=acts.float())
            sae = sae.to(torch.float64).requires_grad_(False)
            made[family] = (model, sae, sae_input(sae, "tiny", False), ids)
        return made[family]

    return get


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("gpt_neox")


def codes(model, sae, sae_in, ids: torch.Tensor) -> torch.Tensor:
    """The SAE's codes at TINY_HOOK (the hooked activation itself when sae is None)."""
    with ActivationCapture(model, [TINY_HOOK]) as cap, torch.no_grad():
        model(input_ids=ids)
    acts = cap.activations[TINY_HOOK]
    return acts if sae is None else sae.encode(sae_in.prepare(acts))


# (family, weight, step h, tolerance on |jvp - finite difference| / |finite difference|).
# GPT-NeoX and GPT-2 run wholly in float64 here: a tight check. Llama and Gemma-2 compute
# their RMSNorms in float32 whatever the model's dtype, which caps a finite difference's
# accuracy near 1e-3 (round-off below h = 1e-4, curvature above): there the check is of
# the wiring (a wrong tangent is off by order 1), not of the last digits.
EXACTNESS_CASES = [
    ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value.weight", 1e-6, 1e-5),
    ("gpt_neox", "gpt_neox.layers.1.mlp.dense_h_to_4h.weight", 1e-6, 1e-5),
    ("gpt2", "transformer.h.0.attn.c_attn.weight", 1e-6, 1e-5),  # Conv1D: stored [in, out]
    ("llama", "model.layers.0.self_attn.v_proj.weight", 1e-4, 0.1),
    ("gemma2", "model.layers.1.mlp.gate_proj.weight", 1e-4, 0.1),
]


@pytest.mark.parametrize(("family", "weight", "h", "tol"), EXACTNESS_CASES)
def test_forward_ad_change_equals_a_finite_difference(tiny_models, family, weight, h, tol):
    model, sae, sae_in, ids = tiny_models(family)
    param = model.get_parameter(weight)
    shape = as_out_in(param, model).shape
    scale = float(param.detach().std())  # a direction of the weights' own size
    direction = torch.randn(shape, generator=torch.Generator().manual_seed(4)).double() * scale
    jvp = feature_jvp(model, sae, sae_in, ids, weight, direction)
    original = param.data.clone()
    try:
        param.data.add_(from_out_in(h * direction, model))
        up = codes(model, sae, sae_in, ids)
        param.data.copy_(original - from_out_in(h * direction, model))
        down = codes(model, sae, sae_in, ids)
    finally:
        param.data.copy_(original)
    finite = (up - down) / (2 * h)
    assert float(finite.norm()) > 1e-3  # the direction does move features
    error = float((jvp - finite).norm() / finite.norm())
    print(f"{family} {weight}: relative error {error:.2g}")
    assert error < tol


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_kv_sources_of_other_layouts(tiny_models, family: str) -> None:
    """GPT-2 keeps k and v in thirds of c_attn, Llama and Gemma-2 in k_proj and v_proj: all get
    KV noise, and the attention implementation the model had is back afterwards."""
    model, sae, sae_in, ids = tiny_models(family)
    before = model.config._attn_implementation
    fc = forecast_variances(
        model, sae, sae_in, ids, [NoiseScheme("kv", kv_cache="int8"), INT4], batch_size=4
    )
    assert model.config._attn_implementation == before
    kv = [i for i, s in enumerate(fc.sources) if s.endswith(":kv")]
    assert len(kv) == 2
    assert (fc.variance[0, kv].sum(axis=1) > 0).all()
    assert fc.variance[0].sum() == fc.variance[0, kv].sum()
    assert (fc.variance[1, kv] == 0).all() and fc.variance[1].sum() > 0


def kind_of(source: str) -> str:
    return "input" if source.endswith(":input") else "kv" if source.endswith(":kv") else "weight"


def test_activation_and_kv_noise_land_on_their_own_sources(tiny) -> None:
    model, sae, sae_in, ids = tiny
    schemes = [
        NoiseScheme("w8a8", weights=RTNSpec(8, full_range=True), activations="int8"),
        NoiseScheme("kv-fp8", kv_cache="fp8"),
        NoiseScheme("kv-int8", kv_cache="int8"),
        NoiseScheme("a-fp8", activations="fp8"),
    ]
    fc = forecast_variances(model, sae, sae_in, ids, schemes, batch_size=2)
    kinds = np.array([kind_of(s) for s in fc.sources])
    per = fc.variance.sum(axis=2)  # [scheme, source]
    # sources: the 8 block matrices of layers 0-1 (layer 2 is past the hook), their
    # inputs, and the two attention modules' KV caches
    assert (kinds == "weight").sum() == 8 and (kinds == "input").sum() == 8
    assert sorted(s for s in fc.sources if s.endswith(":kv")) == [
        "gpt_neox.layers.0.attention:kv", "gpt_neox.layers.1.attention:kv"
    ]  # fmt: skip
    assert (per[0, kinds == "input"] > 0).all() and (per[0, kinds == "weight"] > 0).all()
    assert (per[0, kinds == "kv"] == 0).all()
    for s in (1, 2):  # kv only: nothing anywhere else
        assert (per[s, kinds == "kv"] > 0).all()
        assert (per[s, kinds != "kv"] == 0).all()
    assert (per[3, kinds == "input"] > 0).all() and (per[3, kinds != "input"] == 0).all()
    assert np.isfinite(fc.variance).all()
    # a source's noise is seeded by its name: the same numbers without the other sources
    again = forecast_variances(model, sae, sae_in, ids, schemes[1:2], batch_size=2)
    assert again.sources == [s for s in fc.sources if s.endswith(":kv")]
    np.testing.assert_allclose(again.variance[0], fc.variance[1][kinds == "kv"], rtol=1e-9)


def test_measure_refuses_what_it_cannot_measure(tiny) -> None:
    model, sae, sae_in, ids = tiny
    with pytest.raises(ValueError, match="block matrices only"):
        measure_source_variances(model, sae, sae_in, ids, INT4, ["gpt_neox.layers.0.attention:kv"])
    with pytest.raises(ValueError, match="no weight part"):
        name = next(n for n, _ in target_weights(model))
        measure_source_variances(model, sae, sae_in, ids, NoiseScheme("kv", kv_cache="fp8"), [name])


# ---------------------------------------------------------------- the trained fixture
N_SEQ = 16


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled fixture model, unpacked (its weights are stored gzipped)."""
    out = tmp_path_factory.mktemp("fixture") / "model"
    shutil.copytree(BUNDLE_DIR / "model", out)
    for packed in out.glob("*.gz"):
        packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
        packed.unlink()
    return out


@pytest.fixture(scope="module")
def fixture_sae():
    sae = load_sae({"path": str(BUNDLE_DIR / "sae")})
    return sae, sae_input(sae, "fixture", False)


@pytest.fixture(scope="module")
def fixture_ids(fixture_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(fixture_dir))
    text = (BUNDLE_DIR / "corpus" / "heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[:100_000])["input_ids"][: N_SEQ * 128]
    return torch.tensor(ids, dtype=torch.long).view(N_SEQ, 128)


def fully_compressed_change(model, sae, sae_in, ids: torch.Tensor, spec: RTNSpec) -> np.ndarray:
    """Mean over tokens of (a_variant - a_fp)^2 with every block matrix quantized."""
    hook = sae.cfg.metadata.hook_name

    def run() -> torch.Tensor:
        with ActivationCapture(model, [hook]) as cap, torch.no_grad():
            model(input_ids=ids)
        return sae.encode(sae_in.prepare(cap.activations[hook]))

    fp = run()
    originals = {name: p.data.clone() for name, p in target_weights(model)}
    try:
        for _, p in target_weights(model):
            p.data.copy_(from_out_in(fake_quantize(as_out_in(p.data, model), spec), model))
        variant = run()
    finally:
        for name, p in target_weights(model):
            p.data.copy_(originals[name])
    return (variant - fp).double().pow(2).mean(dim=(0, 1)).numpy()


@pytest.fixture(scope="module")
def plain(fixture_dir: Path, fixture_sae, fixture_ids: torch.Tensor):
    model = load_model(fixture_dir)
    sae, sae_in = fixture_sae
    fc = forecast_variances(model, sae, sae_in, fixture_ids, [INT4, INT4_G32])
    return model, fc


def test_forecast_agrees_with_the_fully_quantized_model(plain, fixture_sae, fixture_ids) -> None:
    model, fc = plain
    sae, sae_in = fixture_sae
    measured = fully_compressed_change(model, sae, sae_in, fixture_ids, INT4.weights)
    active = fc.fp_variance > 0
    forecast = fc.variance[0].sum(axis=0)
    rho = float(spearmanr(forecast[active], measured[active]).statistic)
    ratio = float(np.median(forecast[active] / np.maximum(measured[active], 1e-30)))
    print(f"per-feature Spearman(forecast, measured) = {rho:.3f}; median ratio {ratio:.2f}")
    assert rho > 0.5
    assert 0.25 < ratio < 4  # the right size, not only the right order


def test_forecast_ranks_sources_as_leave_one_module_quantized_runs_do(
    plain, fixture_sae, fixture_ids
) -> None:
    model, fc = plain
    sae, sae_in = fixture_sae
    weights = [s for s in fc.sources if s.endswith(".weight")]
    measured = measure_source_variances(model, sae, sae_in, fixture_ids, INT4, weights)
    active = fc.fp_variance > 0
    rho = float(spearmanr(fc.variance[0][:, active].sum(1), measured[:, active].sum(1)).statistic)
    print(f"per-source Spearman(forecast, measured) = {rho:.3f}")
    assert rho > 0.7
    table = source_table(fc, {"rtn-int4": measured}, weights)
    assert table.height == 2 * len(fc.sources) and no_nan(table)
    assert table.filter(pl.col("variant") == "rtn-int4-g32")["measured_fraction"].is_null().all()
    int4 = table.filter(pl.col("variant") == "rtn-int4")
    assert int4["forecast_fraction"].sum() == pytest.approx(1.0)
    assert int4["measured_fraction"].sum() == pytest.approx(1.0)
    assert int4["n_features_led"].sum() == int(active.sum())


def test_known_answer_a_planted_outlier_module_tops_the_forecast(
    plain, fixture_dir: Path, fixture_sae, fixture_ids
) -> None:
    """The reparameterization scales one input column of layer 1's MLP input matrix by 20
    (the function is unchanged): per-channel INT4 rounds that matrix's rows coarsely, so
    it must become the top source; group-wise scales confine the outlier to its group."""
    model = load_model(fixture_dir)
    reparameterize(model, ReparamConfig(scale=20.0, dim=5, layers=(1,)))
    sae, sae_in = fixture_sae
    schemes = [INT4, INT4_G32, INT8]
    fc = forecast_variances(model, sae, sae_in, fixture_ids, schemes)
    weights = [s for s in fc.sources if s.endswith(".weight")]
    measured = {
        s.name: measure_source_variances(model, sae, sae_in, fixture_ids, s, weights)
        for s in (INT4, INT4_G32)
    }
    table = source_table(fc, measured, weights)
    planted = table.filter(pl.col("source") == PLANTED).sort("variant")
    before = source_table(plain[1]).filter(pl.col("source") == PLANTED)
    print(planted)
    print("unplanted model:", before.select("variant", "forecast_fraction", "forecast_rank"))
    row = {r["variant"]: r for r in planted.iter_rows(named=True)}
    assert row["rtn-int4"]["forecast_rank"] == 1 and row["rtn-int4"]["measured_rank"] == 1
    assert row["rtn-int4-g32"]["forecast_rank"] > 1 and row["rtn-int4-g32"]["measured_rank"] > 1
    assert row["rtn-int4-g32"]["forecast_fraction"] < row["rtn-int4"]["forecast_fraction"]
    unplanted = before.filter(pl.col("variant") == "rtn-int4")["forecast_fraction"].item()
    assert row["rtn-int4"]["forecast_fraction"] > 5 * unplanted
    # Per-channel INT8 has INT4's noise pattern scaled by (7/127)^2 at every source: the
    # shares, and so the ranking, are the same by construction.
    assert row["rtn-int8"]["forecast_rank"] == 1
    assert row["rtn-int8"]["forecast_fraction"] == pytest.approx(
        row["rtn-int4"]["forecast_fraction"], rel=1e-4
    )
    ratio = fc.variance[2].sum() / fc.variance[0].sum()
    assert ratio == pytest.approx((7 / 127) ** 2, rel=1e-4)


# ---------------------------------------------------------------- tables
def synthetic_forecast() -> Forecast:
    variance = np.zeros((2, 3, 5))
    variance[0, 0] = [1.0, 0.0, 0.5, 0.0, 2.0]
    variance[0, 1] = [0.5, 0.0, 1.5, 0.0, 0.0]
    return Forecast(
        schemes=["a", "b"],
        sources=["m0.weight", "m1.weight", "m1:input"],
        variance=variance,
        fp_mean=np.ones(5),
        fp_variance=np.array([1.0, 1.0, 2.0, 0.0, 3.0]),
        n_tokens=10,
    )


def test_forecast_table_is_null_where_undefined() -> None:
    table = forecast_table(synthetic_forecast())
    assert table.height == 10 and no_nan(table)
    assert dict(table.schema) == {
        "variant": pl.String, "feature": pl.Int32, "fp_variance": pl.Float64,
        "noise_variance": pl.Float64, "forecast_r": pl.Float64, "forecast_damage": pl.Float64,
        "silent": pl.Boolean, "top_source": pl.String, "top_source_fraction": pl.Float64,
    }  # fmt: skip
    a = table.filter(pl.col("variant") == "a").sort("feature")
    assert a["forecast_r"].to_list()[:3] == pytest.approx([np.sqrt(1 / 2.5), 1.0, np.sqrt(2 / 4)])
    assert a["silent"].to_list() == [False, False, False, True, False]
    assert a["forecast_r"][3] is None and a["forecast_damage"][3] is None
    assert a["top_source"].to_list() == ["m0.weight", None, "m1.weight", None, "m0.weight"]
    assert a["top_source_fraction"][0] == pytest.approx(1 / 1.5)
    b = table.filter(pl.col("variant") == "b")
    assert b["forecast_damage"].drop_nulls().to_list() == [0.0] * 4
    assert b["top_source"].is_null().all()


def test_source_table_shares_ranks_and_leaders() -> None:
    table = source_table(synthetic_forecast())
    assert no_nan(table)
    a = table.filter(pl.col("variant") == "a")
    # non-silent features 0, 1, 2, 4: m0 carries 3.5, m1 2.0 of 5.5
    assert a["forecast_fraction"].to_list() == pytest.approx([3.5 / 5.5, 2.0 / 5.5, 0.0])
    assert a["forecast_rank"].to_list() == [1, 2, 3]
    assert a["n_features_led"].to_list() == [2, 1, 0]
    assert a["measured_fraction"].is_null().all()
    b = table.filter(pl.col("variant") == "b")
    assert b["forecast_fraction"].is_null().all() and b["forecast_rank"].is_null().all()


def synthetic_features(n: int = 60) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A forecast table and a features table in which measured damage is monotone in the
    forecast damage, for variants a and b (and c, all survived)."""
    rng = np.random.default_rng(0)
    fc_rows, feat_rows = [], []
    for variant in ("a", "b", "c"):
        noise = np.sort(rng.uniform(0.001, 3.0, n))
        r = np.sqrt(1.0 / (1.0 + noise))
        damage = 1 - r if variant != "c" else np.linspace(0.0, 0.05, n)
        cls = np.where(damage < 0.1, "survived", np.where(damage < 0.5, "blurred", "destroyed"))
        for f in range(n):
            fc_rows.append({"variant": variant, "feature": f, "fp_variance": 1.0,
                            "noise_variance": noise[f], "forecast_r": r[f],
                            "forecast_damage": 1 - r[f], "silent": False,
                            "top_source": "m", "top_source_fraction": 1.0})  # fmt: skip
            feat_rows.append({"variant": variant, "feature": f, "firing_rate": rng.uniform(0.01, 0.2),
                              "mean_when_firing": rng.uniform(0.5, 2), "peak": rng.uniform(2, 5),
                              "active": True, "class": str(cls[f]), "damage": damage[f]})  # fmt: skip
    fc = pl.DataFrame(fc_rows, schema_overrides={"feature": pl.Int32})
    feat_rows.append({"variant": "a", "feature": 999, "firing_rate": 0.0001,
                      "mean_when_firing": 1.0, "peak": 1.0, "active": False, "class": None,
                      "damage": 0.0})  # fmt: skip
    return fc, pl.DataFrame(feat_rows, schema_overrides={"feature": pl.Int32})


def test_forecast_accuracy_on_a_known_order() -> None:
    fc, feats = synthetic_features()
    acc = forecast_accuracy(fc, feats, fit_on=["a"], seed=0)
    assert dict(acc.schema) == ACCURACY_SCHEMA and no_nan(acc)
    within = {r["variant"]: r for r in acc.filter(pl.col("fit_on").is_null()).iter_rows(named=True)}
    assert set(within) == {"a", "b", "c"}
    assert within["a"]["n_features"] == 60  # the inactive feature is left out
    assert within["a"]["spearman"] == pytest.approx(1.0)
    assert within["a"]["forecast_auc"] == pytest.approx(1.0)
    assert within["a"]["combined_cv_auc"] is not None and within["a"]["fpstats_cv_auc"] is not None
    assert within["a"]["combined_cv_auc"] > within["a"]["fpstats_cv_auc"]
    c = within["c"]  # one class only
    assert c["forecast_auc"] is None and c["fpstats_cv_auc"] is None and "single class" in c["note"]
    transfer = acc.filter(pl.col("fit_on") == "a")
    assert sorted(transfer["variant"].to_list()) == ["b", "c"]
    b = transfer.filter(pl.col("variant") == "b").row(0, named=True)
    assert b["transfer_auc"] is not None and b["transfer_auc"] > 0.9
    assert transfer.filter(pl.col("variant") == "c")["transfer_auc"].item() is None
    with pytest.raises(ValueError, match="fit_on"):
        forecast_accuracy(fc, feats, fit_on=["zz"])


def test_forecast_table_feeds_forecast_accuracy(plain) -> None:
    """The real forecast table joins a features table as the workflow writes it."""
    _, fc = plain
    table = forecast_table(fc)
    assert no_nan(table)
    damage = table.filter(pl.col("variant") == "rtn-int4", ~pl.col("silent"))
    feats = damage.select(
        "variant", "feature",
        pl.lit(0.05).alias("firing_rate"), pl.lit(1.0).alias("mean_when_firing"),
        pl.lit(3.0).alias("peak"), pl.lit(True).alias("active"),
        pl.when(pl.col("forecast_damage") > pl.col("forecast_damage").median())
        .then(pl.lit("blurred")).otherwise(pl.lit("survived")).alias("class"),
        pl.col("forecast_damage").alias("damage"),
    )  # fmt: skip
    acc = forecast_accuracy(table, feats)
    assert acc.height == 1 and no_nan(acc)
    assert acc["spearman"].item() == pytest.approx(1.0)
