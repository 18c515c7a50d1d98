"""The figure registry: registering, looking up, and what a figure reads (drawing every
figure of the report: test_plots.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_audit.figures import (
    FIGURE_REGISTRY,
    Figure,
    FigureCallError,
    figure_names,
    get_figure,
    register_figure,
    variant_bits,
    variant_order,
)


def test_register_figure_defaults_and_refusals():
    fig = register_figure("test_only_figure", ["{model}/{sae}/survival.parquet"], "Tests")
    try:
        assert get_figure("test_only_figure") is fig and "test_only_figure" in figure_names()
        assert fig.caption == "test_only_figure.rst" and fig.function == "test_only_figure"
        assert fig.inputs == ("{model}/{sae}/survival.parquet",) and not fig.thresholds
        with pytest.raises(ValueError, match="already registered"):
            register_figure("test_only_figure", ["x.parquet"], "Tests")
    finally:
        del FIGURE_REGISTRY["test_only_figure"]
    with pytest.raises(ValueError, match="reads no table"):
        register_figure("test_only_empty", [], "Tests")
    assert "test_only_empty" not in FIGURE_REGISTRY
    with pytest.raises(KeyError, match="unknown figure 'test_only_figure'; registered: "):
        get_figure("test_only_figure")


def test_input_paths_and_the_number_of_tables():
    fig = Figure(
        name="f",
        inputs=("{model}/{sae}/survival.parquet", "{model}/perplexity.parquet"),
        caption="f.rst",
        category="Tests",
        function="no_such_function",
    )
    assert fig.input_paths("results/tables", "pythia", "res") == [
        Path("results/tables/pythia/res/survival.parquet"),
        Path("results/tables/pythia/perplexity.parquet"),
    ]
    # Checked before the plotting function is looked up.
    with pytest.raises(FigureCallError, match=r"reads 2 table\(s\).*got 1"):
        fig.draw("a.parquet", out="f.png")


# the weight bits config.variant_bits gives for the demo config with shipped formats
BITS = {
    "rtn-int8": 8, "rtn-int4": 4, "rtn-int3": 3, "lc-gptq-w4a16": 4, "lc-w8a8-int8": 8,
    "lc-kv-fp8": None, "gguf-q8_0": 8, "gguf-q4_0": 4, "ext-awq4": 4,
    "prune-matched-rtn-int4": None, "prune-matched-lc-gptq-w4a16": None, "prune-0.3": None,
    "fp-null": None,
}  # fmt: skip


def test_variant_order_puts_shipped_formats_after_the_rtn_variant_of_their_bits():
    names = [*reversed(BITS), "fp", "weird"]
    assert variant_order(names, BITS) == [
        "fp",
        "rtn-int8", "lc-w8a8-int8", "gguf-q8_0",
        "rtn-int4", "lc-gptq-w4a16", "gguf-q4_0", "ext-awq4",
        "rtn-int3",
        "prune-0.3", "prune-matched-lc-gptq-w4a16", "prune-matched-rtn-int4",
        "lc-kv-fp8",  # no weight bits: after pruning
        "fp-null", "weird",
    ]  # fmt: skip
    # bits: the config's, else an RTN name's own; none for the rest
    assert variant_bits("lc-gptq-w4a16", BITS) == 4 and variant_bits("lc-gptq-w4a16") is None
    assert variant_bits("rtn-int6", BITS) == 6 and variant_bits("fp", BITS) is None
    # without the config's bits, the shipped formats have none and follow pruning
    assert variant_order(["lc-gptq-w4a16", "rtn-int3", "prune-0.3", "rtn-int4"]) == [
        "rtn-int4", "rtn-int3", "prune-0.3", "lc-gptq-w4a16",
    ]  # fmt: skip


def test_draw_passes_the_variant_bits(monkeypatch):
    from sae_audit import plots

    calls = []

    def spy(*inputs, out, variants=None):
        calls.append((inputs, out, variants))

    monkeypatch.setattr(plots, "test_only_spy", spy, raising=False)
    fig = Figure(
        name="f", inputs=("a",), caption="f.rst", category="Tests", function="test_only_spy"
    )
    fig.draw("a.parquet", out="f.png", variants=BITS)
    fig.draw("a.parquet", out="g.png")
    assert calls == [(("a.parquet",), "f.png", BITS), (("a.parquet",), "g.png", None)]
