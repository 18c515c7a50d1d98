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
