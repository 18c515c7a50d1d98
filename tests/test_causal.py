"""Causal feature survival (issue 14): known answers on tiny real models and SAEs.

- a variant equal to FP agrees exactly (KL correlation, KL ratio, cosines, overlaps 1);
- a variant whose network downstream of the hook reads the residual stream reflected
  along one feature's decoder direction: the feature's activation is bit-identical
  (Pearson r = 1, Pearson class survived), its effect on the logits flips: causal
  survival calls it destroyed;
- K features per forward gives the numbers of one feature per forward;
- the edit acts at resid_pre, resid_post and mlp_out, on its own copy only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sae_audit.causal import (
    COLUMNS,
    ActivationEdit,
    CausalConfig,
    Effects,
    causal_table,
    compare_effects,
    direct_logit_effect,
    measure_effects,
    read_watchlist,
    select_features,
)
from sae_audit.causal_survival import with_causal_class
from sae_audit.config import ConfigError
from sae_audit.files import InputError
from sae_audit.models import ActivationCapture, blocks_of, load_model

from .conftest import save_tiny_model
from .test_families import make_sae

HIDDEN, D_SAE, N_SEQ, SEQ_LEN = 32, 48, 6, 16
HOOK = "blocks.0.hook_resid_post"
CFG = CausalConfig(n_features=6, n_sequences=N_SEQ, batch_size=3, features_per_forward=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model("gpt_neox", tmp_path_factory.mktemp("causal") / "model")


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, 64, (N_SEQ, SEQ_LEN), generator=gen).numpy()


@pytest.fixture(scope="module")
def fp(model_dir: Path):
    return load_model(model_dir)


def hooked(model, ids: np.ndarray, hook: str = HOOK) -> torch.Tensor:
    with ActivationCapture(model, [hook]) as cap, torch.no_grad():
        model(input_ids=torch.from_numpy(ids))
    return cap.activations[hook]


@pytest.fixture(scope="module")
def sae(fp, ids: np.ndarray):
    """A real sae-lens StandardSAE on blocks.0.hook_resid_post, decoder rows mean-zero
    (a direction orthogonal to the all-ones vector commutes with LayerNorm's centering)."""
    made = make_sae("standard", HIDDEN, D_SAE, HOOK, acts=hooked(fp, ids))
    with torch.no_grad():
        made.W_dec.sub_(made.W_dec.mean(dim=1, keepdim=True))
    return made


def fp_stats_of(model, sae, ids: np.ndarray) -> pl.DataFrame:
    """fp_stats columns of the model's codes on ids (as sae_audit.fp_stats computes them)."""
    with torch.no_grad():
        codes = sae.encode(hooked(model, ids)).reshape(-1, D_SAE).double().numpy()
    fires = codes > 0
    count = fires.sum(axis=0)
    mean = np.where(count > 0, codes.sum(axis=0) / np.maximum(count, 1), np.nan)
    return pl.DataFrame(
        {
            "feature": np.arange(D_SAE, dtype=np.int32),
            "firing_count": count.astype(np.int64),
            "firing_rate": count / codes.shape[0],
            "mean_when_firing": pl.Series(mean).fill_nan(None),
            "peak": codes.max(axis=0),
        }
    )


@pytest.fixture(scope="module")
def stats(fp, sae, ids: np.ndarray) -> pl.DataFrame:
    return fp_stats_of(fp, sae, ids)


def reflected(model, direction: torch.Tensor, after_layer: int):
    """A copy whose blocks after `after_layer` and unembedding read the residual stream
    reflected along `direction` (R = I - 2 d d^T, d unit, mean-zero): every matrix that
    reads the stream gets W R, every one that writes to it R W (and R b).

    With LayerNorm gains 1 and biases 0 (a freshly initialised model) LN(R h) = R LN(h),
    so the copy computes exactly FP's downstream network on R h: upstream of the hook
    nothing changes, downstream a feature along d is read with its sign flipped.
    """
    out = copy.deepcopy(model)
    d = direction.double()
    assert abs(float(d.mean())) < 1e-6, "the direction must be orthogonal to the ones vector"
    d = d - d.mean()  # exactly, in float64 (float32 rows are mean-zero to rounding)
    d = d / d.norm()
    r = torch.eye(d.numel(), dtype=torch.float64) - 2 * torch.outer(d, d)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                target = 1.0 if name.endswith("weight") else 0.0
                assert torch.all(p == target), f"{name}: the construction needs LN 1 / 0"
        for i, block in enumerate(blocks_of(out)):
            if i <= after_layer:
                continue
            for reader in (block.attention.query_key_value, block.mlp.dense_h_to_4h):
                reader.weight.copy_((reader.weight.double() @ r).float())
            for writer in (block.attention.dense, block.mlp.dense_4h_to_h):
                writer.weight.copy_((r @ writer.weight.double()).float())
                writer.bias.copy_((r @ writer.bias.double()).float())
        unembed = out.get_output_embeddings()
        unembed.weight.copy_((unembed.weight.double() @ r).float())
    return out


# ---------------------------------------------------------------- the edit at a hook
EDIT_FAMILIES = ("gpt_neox", "llama", "gpt2", "gemma2")


@pytest.mark.parametrize("family", EDIT_FAMILIES)
def test_edit_at_resid_post_resid_pre_and_mlp_out_is_one_residual_edit(tmp_path, family, ids):
    """Adding delta to block 1's mlp_out, to its resid_post and to block 2's resid_pre are
    the same change of the residual stream: the same logits. A zero edit changes nothing,
    and a real one changes the logits of its own copy of the batch only."""
    model = load_model(save_tiny_model(family, tmp_path / family))
    batch = torch.from_numpy(ids[:2])
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(2, SEQ_LEN, HIDDEN, generator=gen)
    with torch.no_grad():
        clean = model(input_ids=batch).logits
        got = {}
        for hook in (
            "blocks.1.hook_mlp_out",
            "blocks.1.hook_resid_post",
            "blocks.2.hook_resid_pre",
        ):
            with ActivationEdit(model, hook) as edit:
                edit.delta = torch.zeros_like(delta)
                assert torch.equal(model(input_ids=batch).logits, clean), hook
                edit.delta = delta
                got[hook] = model(input_ids=batch).logits
                seen = edit.seen
            assert seen is not None and seen.shape == (2, SEQ_LEN, HIDDEN)
            # outside the context manager nothing is edited any more
            assert torch.equal(model(input_ids=batch).logits, clean), hook
        first = got["blocks.1.hook_resid_post"]
        assert (first - clean).abs().max() > 1e-3
        for hook, logits in got.items():
            torch.testing.assert_close(logits, first, rtol=1e-4, atol=1e-5, msg=hook)
        # the hook sees the clean activation: resid_pre of block 2 is resid_post of block 1
        with ActivationEdit(model, "blocks.2.hook_resid_pre") as edit:
            model(input_ids=batch)
            pre = edit.seen
        torch.testing.assert_close(pre, hooked(model, ids[:2], "blocks.1.hook_resid_post"))
        # per copy: the batch twice, only the second copy edited
        with ActivationEdit(model, "blocks.1.hook_resid_post") as edit:
            edit.delta = torch.cat([torch.zeros_like(delta), delta])
            both = model(input_ids=batch.repeat(2, 1)).logits
        torch.testing.assert_close(both[:2], clean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both[2:], first, rtol=1e-4, atol=1e-5)


def test_direct_logit_effect_is_the_folded_logit_lens(fp, sae):
    w = sae.W_dec[:3].detach()
    got = direct_logit_effect(fp, w)
    norm = fp.gpt_neox.final_layer_norm
    centered = w - w.mean(dim=-1, keepdim=True)
    expected = (centered * norm.weight) @ fp.get_output_embeddings().weight.t()
    expected = expected - expected.mean(dim=-1, keepdim=True)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- known answers
def test_a_variant_equal_to_fp_agrees_exactly_for_every_feature(model_dir, fp, sae, ids, stats):
    twin = load_model(model_dir)  # another load of the same weights: the identical forward
    selected = select_features(stats, CFG, active_rate=0.001)
    assert selected.height == CFG.n_features
    table = causal_table(fp, twin, sae, None, selected, ids, CFG, variant="fp-null")
    assert table.columns == list(COLUMNS)
    assert table.height == CFG.n_features
    for col in ("ablation_kl_r", "ablation_kl_ratio", "ablation_logit_cos", "ablation_top_overlap_fraction",
                "steering_kl_r", "steering_kl_ratio", "steering_logit_cos", "steering_top_overlap_fraction",
                "direct_logit_cos", "direct_top_overlap_fraction", "causal_agreement"):  # fmt: skip
        assert table[col].to_list() == [1.0] * table.height, col
    assert (table["fp_fire_count"] == table["variant_fire_count"]).all()
    assert (table["fp_fire_count"] > 0).all() and (table["ablation_kl_fp"] > 0).all()
    for col in ("ablation_flag", "steering_flag", "direct_flag"):
        assert table[col].null_count() == table.height, col
    classed = with_causal_class(
        table, survived=CFG.survived, destroyed=CFG.destroyed, kl_ratio_band=CFG.kl_ratio_band
    )
    assert classed["causal_class"].to_list() == ["survived"] * table.height


def test_a_downstream_reflection_keeps_pearson_but_flips_the_effect(fp, sae, ids, stats):
    """The FP network after the hook, reading the stream reflected along feature f's
    decoder direction: f fires exactly as before (Pearson r = 1, survived), but ablating
    it now adds it and steering subtracts it: causal survival says destroyed."""
    selected = select_features(stats, CFG, active_rate=0.001)
    f = int(selected["feature"][0])
    direction = sae.W_dec[f].detach()
    variant = reflected(fp, direction, after_layer=0)

    # 1. Upstream is untouched: f's codes are bit-identical, Pearson r = 1.
    fp_codes = sae.encode(hooked(fp, ids)).detach().reshape(-1, D_SAE).double().numpy()
    var_codes = sae.encode(hooked(variant, ids)).detach().reshape(-1, D_SAE).double().numpy()
    assert np.array_equal(fp_codes, var_codes)
    r = np.corrcoef(fp_codes[:, f], var_codes[:, f])[0, 1]
    assert r == pytest.approx(1.0, abs=1e-12)  # Pearson class: survived (r > 0.9)

    # 2. The construction is exact: the variant is FP with the hooked stream reflected.
    d = direction / direction.norm()
    batch = torch.from_numpy(ids)
    with torch.no_grad(), ActivationEdit(fp, HOOK) as edit:
        h = hooked(fp, ids)
        edit.delta = -2 * (h @ d)[..., None] * d
        fp_on_reflected = fp(input_ids=batch).logits
        torch.testing.assert_close(variant(input_ids=batch).logits, fp_on_reflected,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip

    # 3. Causal survival flags it.
    table = causal_table(fp, variant, sae, None, selected, ids, CFG, variant="reflected")
    row = table.filter(pl.col("feature") == f).row(0, named=True)
    assert row["fp_fire_count"] == row["variant_fire_count"] > 0
    assert row["direct_logit_cos"] == pytest.approx(-1.0, abs=1e-6)
    assert row["direct_top_overlap_fraction"] == 0.0
    assert row["ablation_logit_cos"] < 0
    assert row["steering_logit_cos"] < 0
    assert row["causal_agreement"] < CFG.destroyed
    classed = with_causal_class(
        table, survived=CFG.survived, destroyed=CFG.destroyed, kl_ratio_band=CFG.kl_ratio_band
    )
    assert classed.filter(pl.col("feature") == f)["causal_class"].item() == "destroyed"
    assert row["ablation_flag"] is None and row["steering_flag"] is None
    # every number is finite
    floats = table.select(pl.col(pl.Float64))
    assert all(np.isfinite(floats[c].to_numpy()).all() for c in floats.columns)


@pytest.mark.parametrize(("batch_size", "per_forward"), [(6, 6), (4, 3), (2, 5)])
def test_k_features_per_forward_give_the_numbers_of_one_per_forward(
    fp, sae, ids, stats, batch_size, per_forward
):
    selected = select_features(stats, CFG, active_rate=0.001)
    feats = selected["feature"].to_numpy()
    means = selected["mean_when_firing"].to_numpy()
    one = measure_effects(fp, sae, None, feats, means, ids, batch_size=1, features_per_forward=1)
    many = measure_effects(
        fp, sae, None, feats, means, ids, batch_size=batch_size, features_per_forward=per_forward
    )
    assert np.array_equal(one.fire_count, many.fire_count)
    for name in ("ablation_kl", "steering_kl", "ablation_logits", "steering_logits"):
        a, b = getattr(one, name), getattr(many, name)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(one.direct_logits, many.direct_logits)
    # prefix positions before a sequence's first firing are exactly 0
    assert (one.ablation_kl == 0).any() and (one.ablation_kl > 0).any()


def test_ablation_acts_only_where_allowed(fp, sae, ids, stats):
    selected = select_features(stats, CFG, active_rate=0.001)
    feats = selected["feature"].to_numpy()[:2]
    means = selected["mean_when_firing"].to_numpy()[:2]
    nowhere = np.zeros(ids.shape, dtype=bool)
    eff = measure_effects(fp, sae, None, feats, means, ids, ablate=nowhere)
    assert (eff.fire_count == 0).all() and (eff.ablation_kl == 0).all()
    assert (eff.ablation_logits == 0).all() and (eff.steering_kl > 0).any()


# ---------------------------------------------------------------- edge cases, never NaN
def effects(fire: list[int], abl_kl: np.ndarray, steer_kl: np.ndarray, vec: np.ndarray) -> Effects:
    n = len(fire)
    return Effects(
        features=np.arange(n),
        fire_count=np.asarray(fire),
        ablation_kl=abl_kl,
        steering_kl=steer_kl,
        ablation_logits=vec,
        steering_logits=vec,
        direct_logits=vec,
    )


def test_silent_and_constant_features_are_flagged_never_nan():
    rng = np.random.default_rng(0)
    kl = rng.random((4, 20))
    vec = rng.normal(size=(4, 7))
    fp = effects([5, 5, 0, 5], kl, kl, vec)
    var_kl = kl.copy()
    var_kl[1] = 0.0  # feature 1 never fires in the variant: no ablation effect there
    var_abl = vec.copy()
    var_abl[1] = 0.0
    const = kl.copy()
    const[3] = 0.25  # feature 3: the variant's steering KL is one value everywhere
    var = Effects(np.arange(4), np.asarray([5, 0, 0, 5]), var_kl, const, var_abl, vec, vec)
    table = compare_effects(fp, var, CausalConfig())
    rows = table.to_dicts()
    assert [r["ablation_flag"] for r in rows] == [None, "variant_silent", "fp_silent", None]
    assert [r["steering_flag"] for r in rows] == [None, None, None, "variant_constant"]
    assert rows[1]["ablation_kl_r"] == rows[1]["ablation_logit_cos"] == 0.0
    assert rows[1]["ablation_kl_ratio"] == rows[1]["ablation_top_overlap_fraction"] == 0.0
    assert rows[2]["ablation_kl_r"] == rows[2]["ablation_kl_ratio"] == 0.0
    assert rows[3]["steering_kl_r"] == 0.0
    assert [r["causal_class"] for r in rows] == ["survived", "destroyed", "insufficient",
                                                 "destroyed"]  # fmt: skip
    assert rows[2]["causal_agreement"] == 0.0
    floats = table.select(pl.col(pl.Float64))
    assert all(np.isfinite(floats[c].to_numpy()).all() for c in floats.columns)


def test_the_class_needs_the_kl_ratio_in_band():
    rng = np.random.default_rng(1)
    kl = rng.random((1, 30))
    vec = rng.normal(size=(1, 9))
    fp = effects([3], kl, kl, vec)
    louder = effects([3], 3 * kl, 3 * kl, vec)  # same pattern, 3x the KL
    row = compare_effects(fp, louder, CausalConfig(kl_ratio_band=2.0)).row(0, named=True)
    assert row["ablation_kl_r"] == pytest.approx(1.0) and row["ablation_kl_ratio"] == pytest.approx(
        3.0
    )
    assert row["causal_class"] == "blurred"
    row = compare_effects(fp, louder, CausalConfig(kl_ratio_band=4.0)).row(0, named=True)
    assert row["causal_class"] == "survived"


# ---------------------------------------------------------------- which features
def test_select_top_random_and_watchlist(tmp_path, stats):
    active = stats.filter(pl.col("firing_rate") > 0.001)
    top = select_features(stats, CausalConfig(n_features=5), 0.001)
    expected = active.sort(["firing_count", "feature"], descending=[True, False]).head(5)
    assert top["feature"].to_list() == expected["feature"].to_list()
    assert top.columns == ["feature", "firing_count", "mean_when_firing"]
    rand = select_features(stats, CausalConfig(features="random", n_features=5, seed=3), 0.001)
    again = select_features(stats, CausalConfig(features="random", n_features=5, seed=3), 0.001)
    assert rand.equals(again) and rand.height == 5
    assert set(rand["feature"].to_list()) <= set(active["feature"].to_list())
    everything = select_features(stats, CausalConfig(features="random", n_features=999), 0.001)
    assert everything.height == active.height

    listed = tmp_path / "watch.txt"
    listed.write_text("# features to follow\n7\n3, 7\n\n12  # a comment\n")
    assert read_watchlist(listed) == [7, 3, 7, 12]
    cfg = CausalConfig(features="watchlist", watchlist=str(listed))
    watch = select_features(stats.with_columns(firing_count=pl.lit(5, pl.Int64)), cfg, 0.001)
    assert watch["feature"].to_list() == [7, 3, 12]
    with pytest.raises(InputError, match="not features of this SAE"):
        select_features(stats, cfg, 0.001, watchlist=[D_SAE + 1])
    silent = stats.with_columns(firing_count=pl.lit(0, pl.Int64))
    with pytest.raises(InputError, match="never fire in the FP model"):
        select_features(silent, cfg, 0.001, watchlist=[3])
    (tmp_path / "bad.txt").write_text("3\nseven\n")
    with pytest.raises(InputError, match=r"bad\.txt:2"):
        read_watchlist(tmp_path / "bad.txt")


def test_config_checks():
    with pytest.raises(ConfigError, match=r"causal\.destroyed"):
        CausalConfig(survived=0.4, destroyed=0.5)
    with pytest.raises(ConfigError, match=r"causal\.watchlist"):
        CausalConfig(features="watchlist")
    with pytest.raises(ConfigError, match=r"causal\.features"):
        CausalConfig(features="most")
    assert CausalConfig.from_dict({"n_features": 3}).n_features == 3
