"""The figure registry: every figure of the report, what it reads and how it is captioned.

In the style of SAELens's ``sae_lens/registry.py``: a module-level mapping filled by
``register_figure`` and read with ``get_figure`` / ``figure_names``. The workflow
builds one rule ``plot_NAME`` per entry (workflow/rules/plots.smk loops over
``FIGURE_REGISTRY``), ``sae-audit plot NAME`` draws it, and tests/test_plots.py checks
that the registry, the functions, the rules and the captions agree.

The registry is plain data so the Snakefile can read it without importing matplotlib
and seaborn (about 1.5 s on every Snakemake start, and on every cluster job's): the
plotting function is ``sae_audit.plots.<function>``, imported only when a figure is drawn.

Adding a figure: write ``plots.NAME(*input_paths, out)`` (plus ``params=None`` when it
draws the class thresholds), register it here, and write workflow/report/NAME.rst.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class FigureCallError(ValueError):
    """A figure called with the wrong number of tables, or with params it does not take."""


@dataclass(frozen=True)
class Figure:
    """One figure: ``{results}/figures/{model}/{sae}/NAME.png``.

    inputs: the result tables it reads, in the order the function takes them, as path
        templates relative to ``{results}/tables`` with the ``{model}`` and ``{sae}``
        wildcards (the per-model perplexity table has no ``{sae}``).
    caption: the caption file, relative to workflow/report.
    category: the report category the figure is shown under.
    function: the plotting function's name in ``sae_audit.plots``.
    thresholds: the function draws the class thresholds (reference lines, class cells)
        and takes the config's ``analysis`` slice as ``params`` (active_rate, survived,
        destroyed); the rule passes it, so a changed threshold re-draws the figure.
    """

    name: str
    inputs: tuple[str, ...]
    caption: str
    category: str
    function: str
    thresholds: bool = False

    def input_paths(self, tables_dir: str | Path, model: str, sae: str) -> list[Path]:
        """The figure's inputs for one (model, SAE) under a ``tables`` directory."""
        return [Path(tables_dir) / t.format(model=model, sae=sae) for t in self.inputs]

    def load(self) -> Callable[..., None]:
        from . import plots

        return getattr(plots, self.function)

    def draw(
        self,
        *inputs: str | Path,
        out: str | Path,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Draw the figure from its input tables into ``out``; ``params`` is the
        ``analysis`` config slice (only for figures that draw thresholds)."""
        if len(inputs) != len(self.inputs):
            raise FigureCallError(
                f"figure {self.name!r} reads {len(self.inputs)} table(s) "
                f"({', '.join(self.inputs)}), got {len(inputs)}"
            )
        fn = self.load()
        if self.thresholds:
            fn(*inputs, out=out, params=params or None)
        elif params:
            raise FigureCallError(f"figure {self.name!r} draws no thresholds and takes no params")
        else:
            fn(*inputs, out=out)


FIGURE_REGISTRY: dict[str, Figure] = {}


def register_figure(
    name: str,
    inputs: Sequence[str],
    category: str,
    *,
    caption: str | None = None,
    function: str | None = None,
    thresholds: bool = False,
) -> Figure:
    """Add a figure (caption defaults to NAME.rst, function to NAME)."""
    if name in FIGURE_REGISTRY:
        raise ValueError(f"figure {name!r} is already registered")
    if not inputs:
        raise ValueError(f"figure {name!r} reads no table")
    fig = Figure(
        name=name,
        inputs=tuple(inputs),
        caption=caption or f"{name}.rst",
        category=category,
        function=function or name,
        thresholds=thresholds,
    )
    FIGURE_REGISTRY[name] = fig
    return fig


def get_figure(name: str) -> Figure:
    try:
        return FIGURE_REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown figure {name!r}; registered: {', '.join(FIGURE_REGISTRY)}"
        ) from None


def figure_names() -> list[str]:
    return list(FIGURE_REGISTRY)


# ---------------------------------------------------------------- the figures
_BASIS = "{model}/{sae}"
SURVIVAL = "1. Feature survival"
PERPLEXITY = "2. Perplexity"
PREDICTOR = "3. Survival predictor"
OVERLAP = "4. RTN vs pruning"
STABILITY = "5. Stability"

register_figure("class_fractions_vs_bits", [f"{_BASIS}/survival.parquet"], SURVIVAL)
register_figure("correlation_histograms", [f"{_BASIS}/features.parquet"], SURVIVAL, thresholds=True)
register_figure("perplexity_vs_bits", ["{model}/perplexity.parquet"], PERPLEXITY)
register_figure("perplexity_vs_damage", [f"{_BASIS}/survival.parquet"], PERPLEXITY)
register_figure(
    "roc_curves", [f"{_BASIS}/predict_oof.parquet", f"{_BASIS}/predict.parquet"], PREDICTOR
)
register_figure("coefficients", [f"{_BASIS}/predict_coefficients.parquet"], PREDICTOR)
register_figure("survival_by_quartile", [f"{_BASIS}/survival_by_quantile.parquet"], PREDICTOR)
register_figure(
    "survival_by_firing_rate_decile", [f"{_BASIS}/survival_by_quantile.parquet"], PREDICTOR
)
register_figure(
    "rtn_vs_pruning_scatter",
    [f"{_BASIS}/features.parquet", f"{_BASIS}/overlap.parquet"],
    OVERLAP,
    thresholds=True,
)
register_figure("stability", [f"{_BASIS}/stability.parquet"], STABILITY)
