"""Outlier diagnostics on real tiny transformers models: planted outliers of known size
are found, statistics match scipy, and the stage writes a table without NaN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats

from sae_audit import plots, stages
from sae_audit.models import load_model
from sae_audit.outliers import (
    COLUMNS,
    SCHEMA,
    Moments,
    OutliersConfig,
    kurtosis,
    matrix_rows,
    max_over_median,
    outlier_table,
    uniform_sink,
)
from sae_audit.shards import write_token_shard

from .conftest import TINY_FAMILIES, save_tiny_model

SEQ_LEN = 16
CFG = OutliersConfig(n_sequences=6, batch_size=4)


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory) -> Path:
    return save_tiny_model("gpt_neox", tmp_path_factory.mktemp("neox") / "model")


def _ids(n: int = 6, seed: int = 0, first: int | None = None) -> np.ndarray:
    """Token ids [n, SEQ_LEN] from the tiny vocabulary, BOS-free; `first` at position 0."""
    ids = np.random.default_rng(seed).integers(5, 64, (n, SEQ_LEN))
    if first is not None:
        ids[:, 0] = first
    return ids


def _row(table: pl.DataFrame, name: str) -> dict:
    return table.filter(pl.col("name") == name).row(0, named=True)


def test_kurtosis_and_ratios_match_scipy_and_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_t(4, size=(40, 25)) + 2.0
    expected = stats.kurtosis(x.ravel(), fisher=False, bias=True)
    assert kurtosis(x) == pytest.approx(expected, rel=1e-12)
    assert kurtosis(rng.normal(size=200_000)) == pytest.approx(3.0, abs=0.05)  # Pearson
    assert kurtosis(np.full((3, 3), 2.0)) is None
    # streamed over uneven batches, merged exactly as one pass
    moments = Moments()
    for chunk in np.array_split(x.ravel(), [1, 7, 300, 301]):
        moments.add(torch.from_numpy(chunk))
    assert moments.kurtosis() == pytest.approx(expected, rel=1e-9)
    assert Moments().kurtosis() is None
    assert max_over_median(np.array([1.0, 2.0, 3.0, 10.0])) == pytest.approx(10 / 2.5)
    assert max_over_median(np.array([0.0, 0.0, 1.0])) is None
    assert uniform_sink(4) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert uniform_sink(1) is None


def test_matrix_rows_match_scipy_on_the_weights(neox_dir):
    model = load_model(neox_dir)
    rows = {r["name"]: r for r in matrix_rows(model)}
    assert len(rows) == 3 * 4  # layers x GPT-NeoX block matrices
    w = model.get_parameter("gpt_neox.layers.1.mlp.dense_4h_to_h.weight").detach().double()
    row = rows["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    assert (row["n_out"], row["n_in"]) == tuple(w.shape) == (32, 128)
    assert row["weight_kurtosis"] == pytest.approx(stats.kurtosis(w.numpy().ravel(), fisher=False))
    cols = w.abs().amax(dim=0).numpy()
    assert row["col_absmax_ratio"] == pytest.approx(cols.max() / np.median(cols))
    assert row["top_col"] == int(cols.argmax())
    rows_absmax = w.abs().amax(dim=1).numpy()
    assert row["row_absmax_ratio"] == pytest.approx(rows_absmax.max() / np.median(rows_absmax))


def test_planted_input_column_is_found_and_the_function_kept(neox_dir):
    """The exact reparameterization of the fragile-fixture note: LayerNorm gain and bias
    of dim m divided by k, the MLP's input column m multiplied by k."""
    model = load_model(neox_dir)
    ids = _ids()
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    before = outlier_table(model, ids, CFG)
    m, k = int(_row(before, name)["top_col"]), 20.0
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)).logits
        block = model.gpt_neox.layers[1]
        block.post_attention_layernorm.weight[m] /= k
        block.post_attention_layernorm.bias[m] /= k
        block.mlp.dense_h_to_4h.weight[:, m] *= k
        torch.testing.assert_close(model(torch.as_tensor(ids)).logits, logits, rtol=1e-4, atol=1e-4)
    after = outlier_table(model, ids, CFG)
    old, new = _row(before, name), _row(after, name)
    assert new["top_col"] == m
    assert new["col_absmax_ratio"] / old["col_absmax_ratio"] == pytest.approx(k, rel=0.15)
    assert new["weight_kurtosis"] > 3 * old["weight_kurtosis"]
    # every other matrix and every layer statistic is unchanged
    others = pl.col("name") != name
    cols = ["col_absmax_ratio", "row_absmax_ratio", "weight_kurtosis", "act_kurtosis",
            "dim_ratio", "first_token_norm_ratio", "sink_score"]  # fmt: skip
    for col in cols:
        a, b = before.filter(others)[col].to_numpy(), after.filter(others)[col].to_numpy()
        np.testing.assert_allclose(b.astype(float), a.astype(float), rtol=1e-4)


def test_massive_first_token_activation_is_found(neox_dir):
    """A token seen only at position 0 whose embedding carries one huge dimension."""
    model = load_model(neox_dir)
    first, dim = 4, 7
    ids = _ids(first=first)
    plain = outlier_table(model, ids, CFG).filter(pl.col("scope") == "layer")
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[first, dim] = 200.0
    planted = outlier_table(model, ids, CFG).filter(pl.col("scope") == "layer")
    assert plain["first_token_norm_ratio"].max() < 3
    assert planted["first_token_norm_ratio"].min() > 10
    assert planted["top_dim"].to_list() == [dim] * 3
    assert (planted["dim_ratio"] > 3 * plain["dim_ratio"]).all()
    assert (planted["act_kurtosis"] > 3 * plain["act_kurtosis"]).all()


def _zero_queries(model, layer: int) -> None:
    """Zero queries: the layer's attention is uniform over the causal prefix."""
    attn = model.gpt_neox.layers[layer].attention
    hs = attn.head_size
    with torch.no_grad():
        for h in range(model.config.num_attention_heads):  # each head's rows: [q | k | v]
            attn.query_key_value.weight[3 * hs * h : 3 * hs * h + hs] = 0.0
            attn.query_key_value.bias[3 * hs * h : 3 * hs * h + hs] = 0.0


def _plant_sink(model, first: int, dim: int) -> None:
    """A massive dimension on the token seen only at position 0, and layer 0's keys reading
    it against a constant query (in the head dimensions rotary leaves alone): every query
    of layer 0 attends to position 0, as attention sinks do."""
    attn = model.gpt_neox.layers[0].attention
    hs, r, qkv = attn.head_size, attn.rotary_ndims, attn.query_key_value
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[first, dim] = 200.0
        for h in range(model.config.num_attention_heads):
            q, k = 3 * hs * h, 3 * hs * h + hs
            qkv.weight[q : q + hs] = 0.0
            qkv.bias[q : q + hs] = 0.0
            qkv.bias[q + r : q + hs] = 1.0
            qkv.weight[k + r : k + hs] = 0.0
            qkv.weight[k + r : k + hs, dim] = 30.0
            qkv.bias[k + r : k + hs] = 0.0


def test_sink_score_is_the_attention_mass_on_position_0(neox_dir):
    """A planted sink in layer 0 is found (score near 1, what the attention probabilities
    of an eager copy say); zero queries in layer 2 make its attention uniform, and its score
    the hand-computed mean over queries q > 0 of 1/(q+1)."""
    model = load_model(neox_dir)
    assert model.config._attn_implementation == "sdpa"
    first, dim = 4, 7
    ids = _ids(first=first)
    plain = outlier_table(model, ids, CFG).filter(pl.col("scope") == "layer")
    _plant_sink(model, first, dim)
    _zero_queries(model, 2)
    layers = outlier_table(model, ids, CFG).filter(pl.col("scope") == "layer")
    assert model.config._attn_implementation == "sdpa"  # switched back after the pass
    assert plain["sink_score"][0] < 0.3 and layers["sink_score"][0] > 0.95
    hand = np.mean([1.0 / (q + 1) for q in range(1, SEQ_LEN)])
    assert layers["sink_score"][2] == pytest.approx(hand, rel=1e-6)
    assert layers["sink_uniform"].to_list() == pytest.approx([hand] * 3)
    eager = load_model(neox_dir, attn_implementation="eager")
    _plant_sink(eager, first, dim)
    _zero_queries(eager, 2)
    with torch.no_grad():
        probs = eager(torch.as_tensor(ids), output_attentions=True).attentions
    for layer in range(3):
        mass = float(probs[layer][:, :, 1:, 0].double().mean())
        assert layers["sink_score"][layer] == pytest.approx(mass, rel=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_gives_a_full_table(family, tmp_path):
    model = load_model(save_tiny_model(family, tmp_path / family, layers=2))
    table = outlier_table(model, _ids(n=3), OutliersConfig(n_sequences=3, batch_size=2))
    assert table.schema == pl.Schema(SCHEMA) and set(COLUMNS) == set(SCHEMA)
    matrices, layers = (table.filter(pl.col("scope") == s) for s in ("matrix", "layer"))
    assert matrices.height == 2 * {"gpt_neox": 4, "gpt2": 4}.get(family, 7)
    assert layers["name"].to_list() == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert (matrices["n_in"] >= 1).all() and (layers["n_tokens"] == 3 * SEQ_LEN).all()
    metrics = ["weight_kurtosis", "row_absmax_ratio", "col_absmax_ratio", "top_col"]
    assert matrices.select(metrics).null_count().sum_horizontal().item() == 0
    metrics = ["act_kurtosis", "dim_ratio", "first_token_norm_ratio", "sink_score"]
    assert layers.select(metrics).null_count().sum_horizontal().item() == 0
    assert ((layers["sink_score"] > 0) & (layers["sink_score"] < 1)).all()
    assert table["reason"].null_count() == table.height


def test_stage_writes_the_table_and_the_figure_draws_it(neox_dir, tmp_path, monkeypatch):
    tokens = []
    ids = _ids(n=8)
    for i in range(2):
        path = tmp_path / f"shard-{i:03d}.parquet"
        write_token_shard(path, ids[4 * i : 4 * i + 4], 4 * i, {"seq_len": SEQ_LEN})
        tokens.append(path)
    out = tmp_path / "tables" / "outliers.parquet"
    summary = stages.outliers(
        model={"source": str(neox_dir), "dtype": "float32"},
        outliers={"n_sequences": 5, "batch_size": 2},
        encode={"device": "cpu"},
        base=str(neox_dir),
        tokens=tokens,
        out=out,
    )
    table = pl.read_parquet(out)
    assert table.height == 12 + 3 and summary["n_layers"] == 3
    assert table.filter(pl.col("scope") == "layer")["n_tokens"].to_list() == [5 * SEQ_LEN] * 3
    floats = table.select(pl.col(pl.Float64))
    assert not floats.select(pl.all().is_nan().any()).row(0).count(True)
    assert summary["max_sink_score"]["value"] == pytest.approx(table["sink_score"].max(), abs=1e-4)

    drawn = {}
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.update(fig=fig), save(fig, path)))
    png = tmp_path / "outlier_diagnostics.png"
    plots.outlier_diagnostics(out, out=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    axes = [ax for ax in drawn["fig"].axes if ax.get_visible()]
    assert len(axes) == 4
    # the sink panel draws the measured score and the uniform line at the measured values
    sink = [ln.get_ydata() for ln in axes[1].lines]
    layers = table.filter(pl.col("scope") == "layer")
    np.testing.assert_allclose(sink[0], layers["sink_score"].to_numpy())
    np.testing.assert_allclose(sink[1], layers["sink_uniform"].to_numpy())
    # one bar per matrix in the input-column panel
    assert len([p for p in axes[2].patches if p.get_height() > 0]) == 12
