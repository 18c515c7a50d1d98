"""The figure registry: every figure of the report, what it reads and how it is captioned.

In the style of SAELens's ``sae_lens/registry.py``: a module-level mapping filled by
``register_figure`` and read with ``get_figure`` / ``figure_names``. The workflow
builds one rule ``plot_NAME`` per entry (workflow/rules/plots.smk loops over
``FIGURE_REGISTRY``), ``sae-audit plot NAME`` draws it, and tests/test_plots.py checks
that the registry, the functions, the rules and the captions agree.

The registry is plain data so the Snakefile can read it without importing matplotlib
and seaborn (about 1.5 s on every Snakemake start, and on every cluster job's): the
plotting function is ``sae_audit.plots.<function>``, imported only when a figure is drawn.

Adding a figure: write ``plots.NAME(*input_paths, out, variants=None)`` (plus
``params=None`` before ``variants`` when it draws the class thresholds), register it
here, and write workflow/report/NAME.rst. A figure that also draws the causal class
thresholds (``causal.survived`` / ``causal.destroyed``) registers with ``causal=True``
as well: its params then hold them under the key ``causal`` (``Figure.rule_params``).

The display order of variants is here too (``variant_order``), shared by the figures
and the report tables: by weight bits, most first, each shipped format (llm-compressor,
GGUF, external) right after the RTN variant of its bits; then the variants without a
bit-width. The bits come from the config (``sae_audit.config.variant_bits``), which the
rules pass as ``--variants JSON``; without them only RTN names carry bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .variants import Variant, parse_variant

# Weight bits per variant name (config.variant_bits): None for no bit-width.
VariantBits = Mapping[str, int | None]
# The file formats a figure can be written in (config report.figure_formats); the
# first is the one the report shows, always made.
FIGURE_FORMATS = ("png", "svg", "pdf")
# Within one bit-width: RTN first, then the shipped formats, one kind after another.
_BITS_KINDS = {"rtn": 0, "llmcompressor": 1, "gguf": 2, "external": 3}


def _parsed(name: str) -> Variant | None:
    try:
        return parse_variant(name)
    except ValueError:
        return None


def variant_bits(name: str, variants: VariantBits | None = None) -> int | None:
    """A variant's weight bits: from ``variants`` (the config's), else from its name (RTN)."""
    if variants and name in variants:
        return variants[name]
    v = _parsed(name)
    return v.bits if v is not None and v.kind == "rtn" else None


def variant_order_key(name: str, variants: VariantBits | None = None) -> tuple:
    """FP; every variant with weight bits, most bits first (RTN, then llm-compressor, GGUF,
    external at the same bits); pruning by sparsity; matched pruning by its target's bits;
    protected (mixed-precision) variants; shipped formats without weight bits (KV-cache only); the null run, then the noise null
    beside it; unknown names."""
    v = _parsed(name)
    if v is None:
        return (9, 0.0, 0, name)
    if v.kind == "fp":
        return (0, 0.0, 0, name)
    bits = variant_bits(name, variants)
    if v.kind in _BITS_KINDS and bits is not None:
        return (1, -float(bits), _BITS_KINDS[v.kind], name)
    if v.kind == "prune":
        return (2, v.sparsity or 0.0, 0, name)
    if v.kind == "prune-matched":
        target = variant_bits(v.target or "", variants)
        return (3, -float(target or 0), 0, name)
    if v.kind == "protect":  # mixed precision: after the matched pruning
        return (3, 1.0, 0, name)
    if v.kind in _BITS_KINDS:  # shipped, no weight bits
        return (4, 0.0, _BITS_KINDS[v.kind], name)
    if v.kind == "noise":  # the numeric-noise null, right after the null run
        return (5, 1.0, 0, name)
    return (5, 0.0, 0, name)  # the null run


def variant_order(names: Iterable[str], variants: VariantBits | None = None) -> list[str]:
    """Distinct variant names in display order (``variant_order_key``)."""
    return sorted({str(n) for n in names}, key=lambda n: variant_order_key(n, variants))


def figure_formats(requested: Iterable[str] = ()) -> list[str]:
    """The formats each figure is written in: PNG, which the report shows, then the other
    requested formats (config report.figure_formats) in ``FIGURE_FORMATS`` order."""
    unknown = set(requested) - set(FIGURE_FORMATS)
    if unknown:
        raise ValueError(f"unknown figure format(s) {sorted(unknown)}; known: {FIGURE_FORMATS}")
    return [FIGURE_FORMATS[0], *(f for f in FIGURE_FORMATS[1:] if f in set(requested))]


class FigureCallError(ValueError):
    """A figure called with the wrong number of tables, or with params it does not take."""


@dataclass(frozen=True)
class Figure:
    """One figure: ``{results}/figures/{model}/{sae}/NAME.png``, and NAME.svg / NAME.pdf
    where config report.figure_formats asks for them (``figure_formats``).

    inputs: the result tables it reads, in the order the function takes them, as path
        templates relative to ``{results}/tables`` with the ``{model}`` and ``{sae}``
        wildcards (the per-model perplexity and outliers tables have no ``{sae}``).
    caption: the caption file, relative to workflow/report.
    category: the report category the figure is shown under.
    function: the plotting function's name in ``sae_audit.plots``.
    thresholds: the function draws the class thresholds (reference lines, class cells)
        and takes the config's ``analysis`` slice as ``params`` (active_rate, survived,
        destroyed); the rule passes it, so a changed threshold re-draws the figure.
    causal: the function also draws the causal class thresholds: ``params`` holds
        ``causal.survived`` and ``causal.destroyed`` under the key ``causal`` beside the
        ``analysis`` slice (``rule_params``); needs ``thresholds``.

    Every function also takes ``variants``, the weight bits per variant
    (``config.variant_bits``), which orders and groups the variants it draws.
    """

    name: str
    inputs: tuple[str, ...]
    caption: str
    category: str
    function: str
    thresholds: bool = False
    causal: bool = False

    def rule_params(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """What the figure's rule passes as ``--analysis`` (and so what re-draws it): nothing
        for a figure without thresholds; the config's ``analysis`` slice for one with them;
        plus, for a figure that draws the causal thresholds, ``{"causal": {"survived": ..,
        "destroyed": ..}}`` from the config's ``causal`` section (keys it lacks: the
        schema's defaults apply in the figure)."""
        if not self.thresholds:
            return {}
        params = dict(config["analysis"])
        if self.causal:
            causal = config.get("causal") or {}
            params["causal"] = {k: causal[k] for k in ("survived", "destroyed") if k in causal}
        return params

    def input_paths(self, tables_dir: str | Path, model: str, sae: str) -> list[Path]:
        """The figure's inputs for one (model, SAE) under a ``tables`` directory."""
        return [Path(tables_dir) / t.format(model=model, sae=sae) for t in self.inputs]

    def load(self) -> Callable[..., None]:
        from . import plots

        return getattr(plots, self.function)

    def draw(
        self,
        *inputs: str | Path,
        out: str | Path | Sequence[str | Path],
        params: Mapping[str, Any] | None = None,
        variants: VariantBits | None = None,
    ) -> None:
        """Draw the figure from its input tables into ``out``, one path or several (one per
        format, ``FIGURE_FORMATS``, told by the suffix); ``params`` is the ``analysis``
        config slice (only for figures that draw thresholds; with the causal thresholds
        under ``causal`` for those that draw them, ``rule_params``), ``variants`` the
        weight bits per variant (``config.variant_bits``)."""
        if len(inputs) != len(self.inputs):
            raise FigureCallError(
                f"figure {self.name!r} reads {len(self.inputs)} table(s) "
                f"({', '.join(self.inputs)}), got {len(inputs)}"
            )
        if params and not self.thresholds:
            raise FigureCallError(f"figure {self.name!r} draws no thresholds and takes no params")
        outs = [out] if isinstance(out, str | Path) else list(out)
        for path in outs:
            if Path(path).suffix.lstrip(".") not in FIGURE_FORMATS:
                raise FigureCallError(
                    f"figure {self.name!r}: cannot write {Path(path).name!r}; formats: "
                    + ", ".join(FIGURE_FORMATS)
                )
        fn = self.load()
        bits = dict(variants) if variants else None
        # one drawing per file (matplotlib picks the format by the suffix): seconds each,
        # and every plotting function keeps its one-path signature
        for path in outs:
            if self.thresholds:
                fn(*inputs, out=path, params=params or None, variants=bits)
            else:
                fn(*inputs, out=path, variants=bits)


FIGURE_REGISTRY: dict[str, Figure] = {}


def register_figure(
    name: str,
    inputs: Sequence[str],
    category: str,
    *,
    caption: str | None = None,
    function: str | None = None,
    thresholds: bool = False,
    causal: bool = False,
) -> Figure:
    """Add a figure (caption defaults to NAME.rst, function to NAME)."""
    if name in FIGURE_REGISTRY:
        raise ValueError(f"figure {name!r} is already registered")
    if not inputs:
        raise ValueError(f"figure {name!r} reads no table")
    if causal and not thresholds:
        raise ValueError(f"figure {name!r}: causal thresholds come with thresholds=True")
    fig = Figure(
        name=name,
        inputs=tuple(inputs),
        caption=caption or f"{name}.rst",
        category=category,
        function=function or name,
        thresholds=thresholds,
        causal=causal,
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
OVERLAP = "4. RTN vs pruning and shipped formats"
STABILITY = "5. Stability"

register_figure("class_fractions_vs_bits", [f"{_BASIS}/survival.parquet"], SURVIVAL)
# Beside the survival curve: why the model is (or is not) fragile; one table per model.
register_figure("outlier_diagnostics", ["{model}/outliers.parquet"], SURVIVAL)
register_figure("correlation_histograms", [f"{_BASIS}/features.parquet"], SURVIVAL, thresholds=True)
# Causal survival (issue 14) beside Pearson survival: does a feature still do what it did?
register_figure(
    "causal_vs_pearson",
    [f"{_BASIS}/causal.parquet"],
    SURVIVAL,
    thresholds=True,
    causal=True,
)
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
