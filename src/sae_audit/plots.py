"""Seaborn figures of the audit; each function reads tables and writes one PNG.

Every figure is registered in ``sae_audit.figures`` (its input tables, caption and
report category) and has the signature ``name(*input_paths, out, variants=None)``, or
``name(*input_paths, out, params=None, variants=None)`` when it draws the class
thresholds (``params`` is the config's ``analysis`` slice, and for a figure that draws
the causal classes too, ``causal.survived`` / ``causal.destroyed`` under the key
``causal``; without them the schema's defaults apply). ``variants`` is the weight bits per variant (``config.variant_bits``):
variants are drawn in ``figures.variant_order`` (most bits first, each shipped format
right after the RTN variant of its bits) and the "vs bits" figures put shipped formats
at their bits beside RTN; without it only RTN names carry bits.
``sae-audit plot NAME [--analysis JSON] [--variants JSON] --inputs A [B ...] --out X``
calls it; the workflow runs each figure from its own rule plot_NAME
(workflow/rules/plots.smk, one loop over the registry) and captions it with
workflow/report/NAME.rst.

Figures never fail on a degenerate but valid study (no pruning pair, NaN AUCs,
a variant with one class only): they say so in the panel instead.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: rules run on nodes without a display
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.text import Annotation, Text

from .config import FROM_SCHEMA, ConfigSection, check_survival_thresholds
from .figures import VariantBits, variant_bits, variant_order_key
from .survival import CLASSES, SurvivalConfig
from .variants import Variant, parse_variant

PALETTE = {
    "survived": "#2a9d8f",
    "blurred": "#e9c46a",
    "destroyed": "#e76f51",
    "insufficient": "#adb5bd",  # insufficient evidence: the interval on r straddles a cut
}
KIND_LABEL = {
    "rtn": "RTN",
    "llmcompressor": "llm-compressor",
    "gguf": "GGUF",
    "external": "external",
    "prune": "pruning",
    "prune-matched": "matched pruning",
    "null": "null (FP rerun)",
    "noise": "noise null (FP, other dtype)",
    "other": "other",
}
KIND_COLOR = {
    "RTN": "#264653",
    "llm-compressor": "#7b2cbf",
    "GGUF": "#2d6a4f",
    "external": "#8c564b",
    "pruning": "#e76f51",
    "matched pruning": "#d62828",
    "null (FP rerun)": "#8d99ae",
    "noise null (FP, other dtype)": "#adb5bd",
    "other": "#6c757d",
}
# The kinds drawn against weight bits, and how a shipped kind's bars are hatched.
BITS_KINDS = ("RTN", "llm-compressor", "GGUF", "external")
KIND_HATCH = {"llm-compressor": "//", "GGUF": "..", "external": "xx"}
# Per-variant color ramps, one hue family per kind (dark = fewer bits within RTN).
KIND_RAMP = {
    "RTN": ("Blues", 2),
    "llm-compressor": ("Purples", 2),
    "GGUF": ("Greens", 2),
    "external": ("copper", 1),
    "pruning": ("Oranges", 1),
    "matched pruning": ("flare", 0),
    "null (FP rerun)": ("Greys", 1),
    "noise null (FP, other dtype)": ("Greys", 2),
    "other": ("Greys", 1),
}
NO_BITS = "no weight bits"
# The smallest damage (1 - r) the log-scaled damage axes show: below it float32
# activations agree to rounding; smaller damage is drawn at the floor, r = 1 counted apart.
DAMAGE_FLOOR = 1e-6

sns.set_theme(style="whitegrid", context="paper")


# The key of ``params`` that holds the causal class thresholds (figures.Figure.rule_params).
CAUSAL_PARAMS = "causal"


@dataclass(frozen=True)
class CausalThresholds(ConfigSection, section="causal"):
    """The causal class thresholds a figure draws (config ``causal.survived`` /
    ``causal.destroyed``, on the causal agreement); sae_audit.causal.CausalConfig holds
    the same keys, but importing it imports torch."""

    survived: float = FROM_SCHEMA
    destroyed: float = FROM_SCHEMA

    def _check(self) -> None:
        check_survival_thresholds(self.to_dict(), "causal")


# ---------------------------------------------------------------- helpers
def thresholds(params: Mapping[str, Any] | None = None) -> SurvivalConfig:
    """The class thresholds a figure draws: the ``analysis`` config slice the rule passes,
    the schema's defaults for any key it lacks (all of them when called without params)."""
    return SurvivalConfig.from_dict({k: v for k, v in (params or {}).items() if k != CAUSAL_PARAMS})


def causal_thresholds(params: Mapping[str, Any] | None = None) -> CausalThresholds:
    """The causal class thresholds a figure draws: ``params["causal"]`` (the rule passes
    the config's ``causal.survived`` / ``causal.destroyed`` there), the schema's defaults
    for any key it lacks."""
    return CausalThresholds.from_dict((params or {}).get(CAUSAL_PARAMS) or {})


def damage_cuts(params: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """The class thresholds on the damage scale (1 - r): (1 - survived, 1 - destroyed)."""
    t = thresholds(params)
    return (1.0 - t.survived, 1.0 - t.destroyed)


def _save(fig: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # leave room for a suptitle (tight_layout ignores it): about 0.4 inch at the top
    top = 1.0 - 0.4 / fig.get_figheight() if fig.get_suptitle() else 1.0
    fig.tight_layout(rect=(0.0, 0.0, 1.0, top))
    fig.savefig(path, dpi=130, bbox_inches="tight")  # keep legends placed outside the axes
    plt.close(fig)


def _parse(name: str) -> Variant | None:
    try:
        return parse_variant(name)
    except ValueError:
        return None


def _kind(name: str) -> str:
    v = _parse(name)
    return KIND_LABEL[v.kind if v is not None and v.kind in KIND_LABEL else "other"]


def _variant_order(names: Iterable[str], variants: VariantBits | None = None) -> list[str]:
    """Display order (``figures.variant_order_key``): by weight bits, shipped beside RTN."""
    return sorted({str(n) for n in names}, key=lambda n: variant_order_key(n, variants))


def _palette(
    names: Sequence[str], variants: VariantBits | None = None
) -> dict[str, tuple[float, float, float]]:
    """A stable color per variant, one hue family per kind: RTN blue (dark = fewer
    bits), llm-compressor purple, GGUF green, external brown, pruning warm, null grey."""
    names = _variant_order(names, variants)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_kind(n), []).append(n)
    colors: dict[str, tuple[float, float, float]] = {}
    for kind, members in groups.items():
        ramp_name, start = KIND_RAMP[kind]
        ramp = sns.color_palette(ramp_name, n_colors=len(members) + start)
        for i, n in enumerate(members):
            colors[n] = ramp[min(i + start, len(ramp) - 1)]
    return colors


def _without_null(table: pl.DataFrame, col: str = "variant") -> pl.DataFrame:
    """Drop the null (FP rerun) variant: every feature survives it, nothing to show."""
    keep = [_kind(v) != KIND_LABEL["null"] for v in table[col].cast(pl.String)]
    return table.filter(pl.Series(keep, dtype=pl.Boolean))


def _message(ax: Axes, text: str) -> None:
    """An empty panel that says why there is nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _message_figure(out: str | Path, title: str, text: str, size=(6.0, 4.0)) -> None:
    fig, ax = plt.subplots(figsize=size)
    _message(ax, text)
    ax.set_title(title)
    _save(fig, out)


def _finite(col: str) -> pl.Expr:
    return pl.col(col).is_not_null() & pl.col(col).cast(pl.Float64).is_finite()


def _bits_rows(table: pl.DataFrame, variants: VariantBits | None = None) -> pl.DataFrame:
    """The rows of RTN and shipped-format variants with their weight bits (``bits``, null
    for a shipped format that leaves the weights alone, e.g. KV-cache only) and ``kind``,
    in display order; FP, pruning and the null run are left out."""
    names = table["variant"].cast(pl.String).to_list()
    kinds = [_kind(n) for n in names]
    bits = [variant_bits(n, variants) for n in names]
    keep = [k in BITS_KINDS for k in kinds]
    out = table.with_columns(
        pl.col("variant").cast(pl.String),
        pl.Series("bits", bits, dtype=pl.Int64),
        pl.Series("kind", kinds, dtype=pl.String),
    ).filter(pl.Series(keep, dtype=pl.Boolean))
    rank = {n: i for i, n in enumerate(_variant_order(out["variant"], variants))}
    return out.sort(
        pl.col("variant").replace_strict(rank, return_dtype=pl.Int64), maintain_order=True
    )


def _bits_groups(rows: pl.DataFrame) -> list[tuple[int | None, list[str]]]:
    """Variants of ``_bits_rows`` grouped by bit-width, in order; no-bits last."""
    groups: list[tuple[int | None, list[str]]] = []
    for name, bits in zip(rows["variant"], rows["bits"], strict=True):
        if groups and groups[-1][0] == bits:
            groups[-1][1].append(name)
        else:
            groups.append((bits, [name]))
    return groups


def _grid(n: int, max_cols: int = 4, w: float = 3.2, h: float = 3.0):
    ncols = max(1, min(max_cols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, sharex=False
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _declutter(fig: Figure, texts: list[Annotation], step: float = 3.0, moves: int = 60) -> None:
    """Nudge annotations upwards (in offset points) until no two labels overlap."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]  (Agg canvas)

    def box(text: Annotation):
        # the text alone: an annotation's own extent includes its leader line
        text.update_positions(renderer)
        return Text.get_window_extent(text, renderer)

    placed = []
    for text in texts:
        for _ in range(moves):
            if not any(box(text).expanded(1.02, 1.1).overlaps(other) for other in placed):
                break
            x, y = text.get_position()
            text.set_position((x, y + step))
        placed.append(box(text))


def _place_labels(
    ax: Axes, texts: list[Text], x: np.ndarray, y: np.ndarray, levels: int = 4
) -> None:
    """Move point labels off the points (x, y) and off each other, each joined to its
    point by a thin leader line. Labels start staggered over ``levels`` heights above
    their points (left to right), adjustText spreads them, and any pair it leaves
    overlapping is resolved by lifting the upper one: labels never overlap."""
    from adjustText import adjust_text

    anchors = [t.get_position() for t in texts]
    lo, hi = ax.get_ylim()
    for k, i in enumerate(sorted(range(len(texts)), key=lambda i: anchors[i][0])):
        tx, ty = anchors[i]
        texts[i].set_position((tx, ty + (k % levels + 1) * 0.06 * (hi - lo)))
    # iterations, not seconds: the same figure on every machine
    adjust_text(texts, x=x, y=y, ax=ax, expand=(1.2, 1.6), iter_lim=1000, time_lim=None)
    renderer = ax.figure.canvas.get_renderer()  # type: ignore[attr-defined]  (Agg canvas)
    placed: list[Any] = []
    for text in sorted(texts, key=lambda t: t.get_position()[1]):
        for _ in range(200):
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            px, py = ax.transData.transform(text.get_position())
            x_new, y_new = ax.transData.inverted().transform((px, py + 3.0))
            text.set_position((float(x_new), float(y_new)))
        placed.append(text.get_window_extent(renderer).expanded(1.02, 1.05))
    for text, anchor in zip(texts, anchors, strict=True):
        ax.annotate(
            "",
            xy=anchor,
            xytext=text.get_position(),
            arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.5, "shrinkA": 0},
            zorder=1,
        )


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


# Lines of many variants on one axes: qualitative colors far apart (the kind ramps of
# _palette give nine near-identical blues for nine RTN variants), one marker per kind.
_QUALITATIVE = ("tab10", "Set1", "Dark2", "tab20")
_MIN_COLOR_DISTANCE = 0.2  # Euclidean, in RGB [0, 1]^3
KIND_MARKER = {
    "RTN": "o",
    "llm-compressor": "s",
    "GGUF": "D",
    "external": "P",
    "pruning": "v",
    "matched pruning": "^",
    "null (FP rerun)": "X",
    "noise null (FP, other dtype)": "X",
    "other": "*",
}


def _distinct_colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` colors, each at least ``_MIN_COLOR_DISTANCE`` from the others while the
    qualitative palettes last (about 20), then repeated; greys and pale colors, which
    vanish on the white background, are left out."""
    chosen: list[tuple[float, float, float]] = []
    for name in _QUALITATIVE:
        for color in sns.color_palette(name):
            rgb = np.array(color)
            grey = float(rgb.max() - rgb.min()) < 0.08
            pale = float(rgb @ np.array([0.299, 0.587, 0.114])) > 0.75
            if grey or pale:
                continue
            if all(np.linalg.norm(rgb - np.array(c)) >= _MIN_COLOR_DISTANCE for c in chosen):
                chosen.append((float(rgb[0]), float(rgb[1]), float(rgb[2])))
    return [chosen[i % len(chosen)] for i in range(n)]


def _line_styles(
    names: Sequence[str], variants: VariantBits | None = None
) -> dict[str, tuple[tuple[float, float, float], str]]:
    """A distinct color and its kind's marker per variant, in display order."""
    order = _variant_order(names, variants)
    return {
        n: (c, KIND_MARKER[_kind(n)])
        for n, c in zip(order, _distinct_colors(len(order)), strict=True)
    }


def _survival_lines(ax, table: pl.DataFrame, drawn, styles, offsets) -> None:
    """One line per drawn variant: % survived per bin (bins in table order), in the
    variant's colour and marker, shifted sideways by its offset so equal values stay apart."""
    for v in drawn:
        rows = table.filter(pl.col("variant") == v)
        color, marker = styles[v]
        ax.plot(
            rows["bin"].to_numpy() + offsets[v],
            rows["survived_frac"].to_numpy() * 100,
            color=color,
            marker=marker,
            ms=4,
            lw=1.2,
            label=v,
        )


def _dodge(order: Sequence[str], width: float) -> dict[str, float]:
    """Horizontal offsets spreading ``order`` over ``width`` (centered on 0), so lines and
    markers that share a value stay side by side instead of on top of each other."""
    if len(order) < 2:
        return dict.fromkeys(order, 0.0)
    return {n: width * (i / (len(order) - 1) - 0.5) for i, n in enumerate(order)}


def _always_survived_note(names: Sequence[str], what: str) -> str:
    """The legend-side note naming the variants left out because nothing changes."""
    if not names:
        return ""
    return textwrap.fill(
        f"100 % {what}, not drawn: " + ", ".join(names), 40, break_on_hyphens=False
    )


# ---------------------------------------------------------------- figures
def _bits_label(bits: int | None) -> str:
    return NO_BITS if bits is None else f"{bits}-bit"


def class_fractions_vs_bits(
    summary_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Stacked shares of active features per class, one bar per RTN or shipped-format variant,
    grouped by weight bit-width (most bits left): shipped formats stand beside the RTN
    variant of their bits, hatched by kind; those without weight bits form the last group."""
    rows = _bits_rows(pl.read_parquet(summary_path), variants)
    title = "Feature classes by weight bit-width: RTN and shipped formats"
    if rows.height == 0:
        _message_figure(out, title, "no RTN or shipped-format variant configured")
        return
    by_variant = {r["variant"]: r for r in rows.iter_rows(named=True)}
    groups = _bits_groups(rows)
    # one bar per variant, a gap between bit-widths
    xs: dict[str, float] = {}
    x = 0.0
    for _, members in groups:
        for name in members:
            xs[name] = x
            x += 1.0
        x += 0.6
    order = list(xs)
    pos = np.array([xs[v] for v in order])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(order) + 0.3 * len(groups) + 2.5), 4.5))
    bottom = np.zeros(len(order))
    hatches = [KIND_HATCH.get(by_variant[v]["kind"], "") for v in order]
    for cls in CLASSES:
        values = np.nan_to_num(
            np.array([float(by_variant[v][f"{cls}_pct"] or 0.0) for v in order], dtype=np.float64)
        )
        bars = ax.bar(pos, values, bottom=bottom, width=0.8, label=cls, color=PALETTE[cls])
        for bar, hatch in zip(bars, hatches, strict=True):
            if hatch:
                bar.set_hatch(hatch)
                bar.set_edgecolor("white")
                bar.set_linewidth(0.0)
        bottom += values
    for v in order:
        pct = by_variant[v]["survived_pct"]
        if pct is not None and math.isfinite(pct) and pct >= 8:
            ax.text(
                xs[v],
                pct / 2,
                f"{pct:.1f}%",
                ha="center",
                va="center",
                fontsize=7,
                color="white",
                rotation=90 if len(order) > 8 else 0,
                # readable over a hatched bar
                bbox={"facecolor": PALETTE["survived"], "edgecolor": "none", "pad": 1},
            )
    for bits, members in groups:
        center = (xs[members[0]] + xs[members[-1]]) / 2
        ax.text(center, 102, _bits_label(bits), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos, order, rotation=35, ha="right", fontsize=7)
    ax.set_ylim(0, 109)
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="x", visible=False)
    ax.set_xlabel("variant, grouped by weight bit-width (most bits left)")
    ax.set_ylabel("% of active features")
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()[0]
    handles += [
        Patch(facecolor="#bbbbbb", edgecolor="white", hatch=KIND_HATCH[k], label=k)
        for k in KIND_HATCH
        if k in set(rows["kind"])
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, out)


def _beside(groups: list[tuple[int | None, list[str]]], kinds: Mapping[str, str]) -> dict:
    """x of every variant on a bits axis: RTN at its bits, the shipped formats of the same
    bits spread just beside it (toward fewer bits), those without bits one step past the
    fewest bits."""
    known = [b for b, _ in groups if b is not None]
    none_x = (min(known) - 1.0) if known else 0.0
    xs: dict[str, float] = {}
    for bits, members in groups:
        base = float(bits) if bits is not None else none_x
        shipped = [m for m in members if kinds[m] != "RTN"]
        step = min(0.15, 0.6 / (len(shipped) + 1))
        for m in members:
            xs[m] = base
        for i, m in enumerate(shipped):
            xs[m] = base - step * (i + 1) if bits is not None else base - step * i
    return xs


def perplexity_vs_bits(
    perplexity_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Perplexity change (%) vs FP against weight bits, chunked and sliding-window: the RTN
    curve, and each shipped format as a marker of its kind's color at its bits beside it."""
    rows = _bits_rows(pl.read_parquet(perplexity_path), variants)
    title = "Perplexity by weight bit-width: RTN and shipped formats"
    evaluations = [e for e in ("chunked", "sliding") if f"dppl_{e}_pct" in rows.columns]
    long = (
        rows.unpivot(
            index=["variant", "bits", "kind"],
            on=[f"dppl_{e}_pct" for e in evaluations],
            variable_name="evaluation",
            value_name="dppl",
        )
        .with_columns(pl.col("evaluation").str.replace("dppl_", "").str.replace("_pct", ""))
        .filter(_finite("dppl"))
        if evaluations and rows.height
        else pl.DataFrame()
    )
    if long.height == 0:
        _message_figure(out, title, "no RTN or shipped-format variant with a perplexity")
        return
    present = rows.filter(pl.col("variant").is_in(long["variant"].implode()))
    groups = _bits_groups(present)
    kinds = dict(zip(present["variant"], present["kind"], strict=True))
    xs = _beside(groups, kinds)
    long = long.with_columns(
        pl.col("variant").replace_strict(xs, return_dtype=pl.Float64).alias("x")
    )
    markers = {"chunked": "o", "sliding": "X"}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for evaluation in evaluations:
        rtn = long.filter((pl.col("kind") == "RTN") & (pl.col("evaluation") == evaluation)).sort(
            "x"
        )
        ax.plot(
            rtn["x"],
            rtn["dppl"],
            color=KIND_COLOR["RTN"],
            marker=markers[evaluation],
            ls="-" if evaluation == "chunked" else "--",
            lw=1.2,
            ms=6,
            zorder=2,
        )
        shipped = long.filter((pl.col("kind") != "RTN") & (pl.col("evaluation") == evaluation))
        for r in shipped.iter_rows(named=True):
            ax.scatter(
                r["x"],
                r["dppl"],
                color=KIND_COLOR[r["kind"]],
                marker=markers[evaluation],
                s=45,
                edgecolor="white",
                linewidth=0.5,
                zorder=3,
            )
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="grey", lw=0.8)
    ticks = sorted({b for b, _ in groups if b is not None}, reverse=True)
    labels = [str(b) for b in ticks]
    if any(b is None for b, _ in groups):
        ticks.append(min(ticks) - 1 if ticks else 0)
        labels.append("\n".join(NO_BITS.rsplit(" ", 1)))
    ax.set_xticks(ticks, labels)
    ax.invert_xaxis()
    # name the shipped formats at their first evaluation's point
    fig.canvas.draw()
    first = long.filter(pl.col("kind") != "RTN").unique(
        "variant", keep="first", maintain_order=True
    )
    texts = [
        ax.annotate(
            r["variant"],
            (r["x"], r["dppl"]),
            xytext=(8, 8),
            textcoords="offset points",
            fontsize=7,
            color=KIND_COLOR[r["kind"]],
            va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 0.5},
            arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.5, "shrinkA": 0},
        )
        for r in first.iter_rows(named=True)
    ]
    _declutter(fig, texts)
    kinds_present = [k for k in BITS_KINDS if k in set(long["kind"])]
    handles = [
        Line2D([], [], color=KIND_COLOR[k], marker="s", ls="", label=k) for k in kinds_present
    ]
    handles += [
        Line2D(
            [],
            [],
            color="black",
            marker=markers[e],
            ls="-" if e == "chunked" else "--",
            label=f"{e} perplexity",
        )
        for e in evaluations
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("weight bit-width (shipped formats beside the RTN variant of their bits)")
    ax.set_ylabel("perplexity change vs FP (%)")
    ax.set_title(title)
    _save(fig, out)


def perplexity_vs_damage(
    summary_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Does the perplexity change reveal the feature damage? One point per variant:
    x = perplexity change (%) vs FP, y = % of active features not surviving."""
    summary = pl.read_parquet(summary_path).with_columns(pl.col("variant").cast(pl.String))
    title = "Does the perplexity change reveal the feature damage?"
    rows = []
    for r in summary.iter_rows(named=True):
        damaged = 100.0 - r["survived_pct"] if r["survived_pct"] is not None else math.nan
        for evaluation in ("chunked", "sliding"):
            x = r.get(f"dppl_{evaluation}_pct")
            if x is not None and math.isfinite(x) and math.isfinite(damaged):
                rows.append(
                    {
                        "variant": r["variant"],
                        "compression": _kind(r["variant"]),
                        "evaluation": evaluation,
                        "dppl": float(x),
                        "damaged": damaged,
                    }
                )
    if not rows:
        _message_figure(out, title, "no variant with both a perplexity and a survival share")
        return
    long = pl.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    # thin grey segments join the two perplexity evaluations of one variant
    for _, part in long.group_by(["variant"]):
        if part.height == 2:
            ax.plot(part["dppl"], part["damaged"], color="#bbbbbb", lw=0.8, zorder=1)
    # the RTN curve through its chunked points, bit-width order
    rtn = long.filter((pl.col("compression") == "RTN") & (pl.col("evaluation") == "chunked"))
    if rtn.height > 1:
        order = _variant_order(rtn["variant"], variants)
        pts = {r["variant"]: (r["dppl"], r["damaged"]) for r in rtn.iter_rows(named=True)}
        xs, ys = zip(*(pts[v] for v in order), strict=True)
        ax.plot(xs, ys, color=KIND_COLOR["RTN"], lw=1, alpha=0.5, zorder=1)
    kinds = [k for k in KIND_COLOR if k in set(long["compression"])]
    sns.scatterplot(
        data=long.to_pandas(),
        x="dppl",
        y="damaged",
        hue="compression",
        hue_order=kinds,
        palette=KIND_COLOR,
        style="evaluation",
        style_order=["chunked", "sliding"],
        markers={"chunked": "o", "sliding": "X"},
        s=70,
        zorder=3,
        ax=ax,
    )
    dppl = np.abs(long["dppl"].to_numpy())
    # symmetric-log x, linear only below the smallest change drawn: the mild variants'
    # changes of 0.01 % would otherwise sit on top of each other at the origin
    nonzero = dppl[dppl > 0]
    linthresh = 10.0 ** math.floor(math.log10(nonzero.min())) if nonzero.size else 1.0
    linthresh = min(1.0, max(1e-3, linthresh))
    if dppl.max() > 10 * linthresh:
        ax.set_xscale("symlog", linthresh=linthresh)
        signed = long["dppl"].to_numpy()
        lo, hi = float(signed.min()), float(signed.max())
        # a margin of about a quarter decade beyond the extreme points on either side
        ax.set_xlim(min(-linthresh, lo * 1.8), max(linthresh, hi * 1.8))
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_ylim(bottom=min(-2.0, float(long["damaged"].to_numpy().min()) - 2))
    ax.set_ylim(top=max(ax.get_ylim()[1], 10.0))  # room above the points for their labels
    # one label per variant at its chunked point (points that coincide on screen, within
    # 4 px, share one), placed by adjustText off the points and off each other
    labelled = long.sort("evaluation").unique("variant", keep="first", maintain_order=True)
    fig.canvas.draw()  # fix the limits so data -> pixel positions are final
    clusters: list[tuple[np.ndarray, tuple[float, float], list[str]]] = []
    order = _variant_order(labelled["variant"], variants)
    for r in sorted(labelled.iter_rows(named=True), key=lambda r: order.index(r["variant"])):
        xy = (r["dppl"], r["damaged"])
        px = ax.transData.transform(xy)
        for pos, _, names in clusters:
            if np.hypot(*(pos - px)) < 4:
                names.append(r["variant"])
                break
        else:
            clusters.append((px, xy, [r["variant"]]))
    ax.set_xlabel("perplexity change vs FP (%)")
    ax.set_ylabel("% of active features not surviving (blurred, destroyed, insufficient)")
    ax.set_title(title)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()  # the final axes size, so the labels are placed in final pixels
    texts = [
        ax.text(xy[0], xy[1], "\n".join(names), fontsize=7, va="bottom")
        for _, xy, names in clusters
    ]
    _place_labels(ax, texts, long["dppl"].to_numpy(), long["damaged"].to_numpy())
    _save(fig, out)


def correlation_histograms(
    features_path: str | Path,
    out: str | Path,
    params: Mapping[str, Any] | None = None,
    variants: VariantBits | None = None,
) -> None:
    """Histogram of per-feature damage 1 - r over active features on a log axis, one facet
    per variant, stacked by class; dashed lines at the class thresholds on that scale
    (1 - survived, 1 - destroyed; ``params``: the ``analysis`` slice). A log axis has no
    0: features with r = 1 exactly are counted in the panel's text, not drawn, and damage
    below ``DAMAGE_FLOOR`` is drawn in the first bin (the text says how many)."""
    t = thresholds(params)
    cols = ["variant", "r", "active", "class"]
    features = (
        pl.read_parquet(features_path, columns=cols)
        .filter(pl.col("active") & _finite("r") & pl.col("class").is_not_null())
        .with_columns(
            pl.col("variant").cast(pl.String),
            (1.0 - pl.col("r").clip(-1.0, 1.0)).alias("damage"),
        )
    )
    title = "Per-feature damage 1 - r between FP and compressed activations"
    if features.height == 0:
        _message_figure(out, title, "no active feature with a correlation")
        return
    order = _variant_order(features["variant"], variants)
    # one x range for every panel, so panels compare by position; damage is at most 2 (r = -1)
    bins = np.geomspace(DAMAGE_FLOOR, 2.0, 57)
    cuts = damage_cuts(params)
    fig, axes = _grid(len(order), max_cols=4, w=3.3, h=2.8)
    for ax, variant in zip(axes, order, strict=True):
        part = features.filter(pl.col("variant") == variant)
        exact = part.filter(pl.col("damage") <= 0.0)
        drawn = part.filter(pl.col("damage") > 0.0)
        below = int((drawn["damage"] < DAMAGE_FLOOR).sum())
        stacked = [
            drawn.filter(pl.col("class") == c)["damage"].clip(DAMAGE_FLOOR, 2.0).to_numpy()
            for c in CLASSES
        ]
        counts, _, _ = ax.hist(
            stacked,
            bins=bins,
            stacked=True,
            color=[PALETTE[c] for c in CLASSES],
            label=list(CLASSES),
        )
        for cut in cuts:
            ax.axvline(cut, color="black", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(bins[0], bins[-1])
        # headroom above the tallest bar for the panel's text
        ax.set_ylim(0, max(1.0, 1.5 * float(np.max(counts))))
        if drawn.height == 0:
            ax.text(0.5, 0.4, "nothing to draw:\nno feature with r < 1", ha="center",
                    transform=ax.transAxes, fontsize=8, color="#555555")  # fmt: skip
        ax.set_title(variant, fontsize=9)
        lines = [
            f"n={part.height}",
            f"median 1-r={_fmt(float(np.median(part['damage'].to_numpy())), '.1e')}",
        ]
        if exact.height:
            lines.append(f"r = 1 exactly: {exact.height} (not drawn)")
        if below:
            lines.append(f"1-r < {DAMAGE_FLOOR:g}: {below} (first bin)")
        ax.text(0.03, 0.95, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=7)
        ax.set_xlabel("damage 1 - r (log)")
        ax.set_ylabel("active features")
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.0, 0.95),
        title="class",
    )
    fig.suptitle(
        title
        + f" (dashed: damage {cuts[0]:.3g} / {cuts[1]:.3g}, i.e. r = {t.survived:g} / "
        + f"{t.destroyed:g}; axis from {DAMAGE_FLOOR:g})",
        fontsize=10,
    )
    _save(fig, out)


def roc_curves(
    oof_path: str | Path,
    predict_path: str | Path,
    out: str | Path,
    variants: VariantBits | None = None,
) -> None:
    """Out-of-fold ROC curve of the survival predictor per variant; CV AUC in the legend."""
    from sklearn.metrics import roc_curve

    oof = pl.read_parquet(oof_path).with_columns(pl.col("variant").cast(pl.String))
    summary = pl.read_parquet(predict_path).with_columns(pl.col("variant").cast(pl.String))
    by_variant = {r["variant"]: r for r in summary.iter_rows(named=True)}
    title = "Survival predictor: out-of-fold ROC"
    shown = [
        v
        for v in _variant_order([*oof["variant"], *summary["variant"]], variants)
        if _kind(v) != KIND_LABEL["null"]
    ]
    colors = _palette(shown, variants)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    skipped = []
    for v in shown:
        part = oof.filter((pl.col("variant") == v) & _finite("proba"))
        labels = part["label"].cast(pl.Boolean).to_numpy() if part.height else np.array([])
        if part.height == 0 or labels.all() or not labels.any():
            reason = (by_variant.get(v) or {}).get("reason") or "no out-of-fold predictions"
            skipped.append(f"{v}: {reason}")
            continue
        fpr, tpr, _ = roc_curve(labels, part["proba"].to_numpy())
        row = by_variant.get(v) or {}
        auc, sd = row.get("auc_mean"), row.get("auc_sd")
        auc_text = f"AUC {_fmt(auc)}" + (
            f" ± {_fmt(sd)}" if sd is not None and math.isfinite(sd) else ""
        )
        ax.plot(fpr, tpr, color=colors[v], lw=1.6, label=f"{v} ({auc_text})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (damaged features predicted to survive)")
    ax.set_ylabel("true positive rate (surviving features found)")
    ax.set_title(title)
    # variants without a curve are listed (with the reason) at the end of the legend
    handles = ax.get_legend_handles_labels()[0]
    handles += [
        Line2D([], [], ls="", label=textwrap.fill(f"not shown: {s}", 48, subsequent_indent="  "))
        for s in skipped
    ]
    ax.legend(
        handles=handles,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        title="CV AUC mean ± sd over folds",
        title_fontsize=7,
    )
    _save(fig, out)


def _quantile_lines(
    table: pl.DataFrame,
    predictors: list[str],
    q: int,
    title: str,
    xlabel,
    out: str | Path,
    variants: VariantBits | None = None,
) -> None:
    """One facet per predictor, one line per variant: a distinct color and its kind's
    marker, each variant shifted a little sideways so equal values stay visible; variants
    with every feature surviving in every bin are named in the legend, not drawn."""
    table = _without_null(table.with_columns(pl.col("variant").cast(pl.String)))
    order = _variant_order(table["variant"], variants)
    damaged = set(table.filter(pl.col("survived_frac") < 1.0)["variant"])
    drawn = [v for v in order if v in damaged]
    styles = _line_styles(order, variants)  # by every variant: one color each in all figures
    offsets = _dodge(drawn, 0.4)
    fig, axes = _grid(len(predictors), max_cols=4, w=3.4, h=3.4)
    for ax, predictor in zip(axes, predictors, strict=True):
        part = table.filter(pl.col("predictor") == predictor).sort("bin")
        _survival_lines(ax, part, drawn, styles, offsets)
        ax.set_xticks(range(1, q + 1))
        ax.set_ylim(-3, 103)
        ax.set_xlabel(xlabel(predictor, part))
        ax.set_ylabel("% of active features surviving")
        ax.set_title(predictor, fontsize=9)
    handles = [
        Line2D([], [], color=styles[v][0], marker=styles[v][1], ms=4, label=v) for v in drawn
    ]
    note = _always_survived_note([v for v in order if v not in damaged], "survived in every bin")
    if note:
        handles.append(Line2D([], [], ls="", label=note))
    if handles and axes:
        axes[-1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    _save(fig, out)


def survival_by_quartile(
    quantile_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Survival fraction per quartile of each FP predictor (facets), one line per variant."""
    table = pl.read_parquet(quantile_path).filter(pl.col("q") == 4)
    title = "Survival by predictor quartile"
    predictors = list(dict.fromkeys(table["predictor"].to_list()))
    if not predictors or _without_null(table).height == 0:
        _message_figure(
            out, title, "no quartile table (no compressed variant with active features)"
        )
        return
    _quantile_lines(
        table,
        predictors,
        4,
        title + " (bin 1 = lowest 25% of the predictor)",
        lambda p, _: f"{p} quartile",
        out,
        variants,
    )


def _rarity_trend(table: pl.DataFrame, drawn: Sequence[str]) -> str:
    """What this run's deciles say, from the table: per drawn variant, does the rarest
    decile survive less or more than the most frequent one?"""
    first, last = table["bin"].min(), table["bin"].max()
    less = more = 0
    for v in drawn:
        rows = table.filter(pl.col("variant") == v)
        frequent = rows.filter(pl.col("bin") == first)["survived_frac"]
        rare = rows.filter(pl.col("bin") == last)["survived_frac"]
        if frequent.len() and rare.len():
            less += int(rare[0] < frequent[0])
            more += int(rare[0] > frequent[0])
    if not drawn:
        return "This run: every feature survived every variant"
    return (
        f"This run: the rarest decile survives less than the most frequent one under {less} "
        f"of {len(drawn)} variants with damage, more under {more}"
    )


def survival_by_firing_rate_decile(
    quantile_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Survival fraction per decile of FP firing rate (deciles of rarity = -log rate), one
    line per damaged variant (distinct colors, kind markers, shifted sideways); the title
    says from the table whether the rarest features survive less or more in this run."""
    table = pl.read_parquet(quantile_path).filter(
        (pl.col("q") == 10) & (pl.col("predictor") == "rarity")
    )
    title = "Survival by FP firing-rate decile"
    table = _without_null(table.with_columns(pl.col("variant").cast(pl.String)))
    if table.height == 0:
        _message_figure(out, title, "no decile table for the 'rarity' predictor")
        return
    order = _variant_order(table["variant"], variants)
    damaged = set(table.filter(pl.col("survived_frac") < 1.0)["variant"])
    drawn = [v for v in order if v in damaged]
    styles = _line_styles(order, variants)  # by every variant: one color each in all figures
    offsets = _dodge(drawn, 0.5)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    _survival_lines(ax, table.sort("bin"), drawn, styles, offsets)
    # the bins are FP-only, so one variant's edges label them all; rarity = -log(rate)
    edges = table.filter(pl.col("variant") == order[0]).sort("bin")
    ticks, labels = [], []
    for r in edges.iter_rows(named=True):
        lo, hi = math.exp(-r["predictor_max"]), math.exp(-r["predictor_min"])
        ticks.append(r["bin"])
        labels.append(f"{r['bin']}\n{lo:.1e}\nto {hi:.1e}")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("FP firing-rate decile (1 = most frequent … 10 = rarest; firing-rate range)")
    ax.set_ylabel("% of active features surviving")
    ax.set_title(f"{title}\n{_rarity_trend(table, drawn)}", fontsize=9)
    handles = ax.get_legend_handles_labels()[0]
    note = _always_survived_note([v for v in order if v not in damaged], "survived in every decile")
    if note:
        handles.append(Line2D([], [], ls="", label=note))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    _save(fig, out)


def coefficients(
    coef_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Standardized logistic coefficients per predictor and variant, and each predictor's AUC alone."""
    table = _without_null(
        pl.read_parquet(coef_path).with_columns(pl.col("variant").cast(pl.String))
    )
    order = _variant_order(table["variant"], variants)
    colors = {v: color for v, (color, _) in _line_styles(order, variants).items()}
    predictors = list(dict.fromkeys(table["predictor"].to_list()))
    # wider with many variants: each predictor holds one bar per variant
    width = 12 + 0.3 * max(0, len(order) - 6)
    fig, (left, right) = plt.subplots(1, 2, figsize=(width, 4.5))
    for ax, col, ylabel, ref in (
        (left, "coefficient", "coefficient per SD (log-odds of surviving)", 0.0),
        (right, "marginal_auc", "AUC of the predictor alone", 0.5),
    ):
        part = table.filter(_finite(col))
        if part.height == 0:
            _message(ax, f"no finite {col.replace('_', ' ')} (one class only?)")
            continue
        present = [v for v in order if v in set(part["variant"])]
        sns.barplot(
            data=part.to_pandas(),
            x="predictor",
            y=col,
            order=predictors,
            hue="variant",
            hue_order=present,
            palette=colors,
            ax=ax,
            legend=ax is right,
        )
        ax.axhline(ref, color="black", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("")
        # what this run's table says, under each predictor: the direction is data, not a
        # claim of the caption (rarity helps survival in one model and hurts in another)
        labels = []
        for predictor in predictors:
            values = part.filter(pl.col("predictor") == predictor)[col]
            up = int((values > ref).sum())
            labels.append(f"{predictor}\nhigher survives more:\n{up} of {values.len()} variants")
        ax.set_xticks(range(len(predictors)), labels, fontsize=8)
    if right.get_legend() is not None:
        sns.move_legend(right, "center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    if right.has_data():
        right.set_ylim(0, 1)
    left.set_title("Standardized logistic coefficients (all predictors together)", fontsize=9)
    right.set_title("Marginal AUC (< 0.5: higher values predict damage)", fontsize=9)
    _save(fig, out)


def _scatter_title(a: str, b: str, row: Mapping[str, Any]) -> str:
    """A facet's title: the pair, the damage Spearman beside the null variant's, the
    non-surviving Jaccard beside its chance value and hypergeometric p-value."""
    rho, jac = row.get("spearman"), row.get("jaccard_nonsurviving")
    null = row.get("spearman_null")
    spearman = f"Spearman $\\rho$ = {_fmt(rho)}" + (
        f" (null {_fmt(null)})" if null is not None else ""
    )
    if jac is None:
        return f"{a} vs {b}\n{spearman}\nJaccard(non-surv.) undefined (none damaged)"
    chance, p = row.get("jaccard_nonsurviving_chance"), row.get("jaccard_nonsurviving_p")
    baseline = (
        f" (chance {_fmt(chance, '.2f')}, p = {_fmt(p, '.2g')})" if chance is not None else ""
    )
    return f"{a} vs {b}\n{spearman}\nJaccard(non-surv.) = {_fmt(jac, '.2f')}{baseline}"


def _matched_to(a: str, b: str) -> bool:
    """Is ``b`` the pruning matched to ``a``'s perplexity (prune-matched-<a>)?"""
    v = _parse(b)
    return v is not None and v.kind == "prune-matched" and v.target == a


def scatter_pairs(overlap: pl.DataFrame) -> pl.DataFrame:
    """The rows of the overlap table that the scatter draws: each variant against the
    pruning matched to its perplexity (the comparison the matched search exists for; by
    default the table also holds every other RTN x matched-pruning pair and the shipped
    formats against RTN, which the equal_bits table covers); a table without such a pair
    (``overlap.pairs`` configured to others) is drawn whole."""
    pairs = zip(overlap["variant_a"].cast(pl.String), overlap["variant_b"], strict=True)
    keep = [_matched_to(str(a), str(b)) or _matched_to(str(b), str(a)) for a, b in pairs]
    return overlap.filter(pl.Series(keep, dtype=pl.Boolean)) if any(keep) else overlap


def rtn_vs_pruning_scatter(
    features_path: str | Path,
    overlap_path: str | Path,
    out: str | Path,
    params: Mapping[str, Any] | None = None,
    variants: VariantBits | None = None,
) -> None:
    """Per-feature damage (1 - r) of the RTN variant (x) vs the other variant of a pair (y):
    one facet per pair that ``scatter_pairs`` picks from the overlap table (each variant
    against the pruning matched to it; all the table's pairs when it has none of those),
    RTN variants in display order, with counts in each class cell; the title gives
    the damage Spearman (beside the null variant's, ``spearman_null``) and the Jaccard of
    the non-surviving sets beside its chance value and hypergeometric p-value; the cells
    are cut at the class thresholds (``params``: the ``analysis`` slice)."""
    overlap = pl.read_parquet(overlap_path)
    title = "Do two compressions damage the same features?"
    if overlap.height == 0 or not {"variant_a", "variant_b"} <= set(overlap.columns):
        _message_figure(
            out,
            title,
            "no variant pairs configured\n(add a matched-pruning variant, a shipped format\n"
            "at an RTN bit-width, or overlap.pairs)",
        )
        return
    features = (
        pl.read_parquet(features_path, columns=["variant", "feature", "active", "damage"])
        .filter(pl.col("active") & _finite("damage"))
        .with_columns(pl.col("variant").cast(pl.String))
    )
    pairs = []
    for r in scatter_pairs(overlap).iter_rows(named=True):
        a, b = str(r["variant_a"]), str(r["variant_b"])
        # RTN on x when one side is RTN; otherwise keep the table's order
        if _kind(b) == "RTN" and _kind(a) != "RTN":
            a, b = b, a
        # null Jaccard: neither variant damaged anything (undefined, not agreement); each
        # number with its baseline where the table has one (Spearman of the null variant,
        # the chance Jaccard and its hypergeometric p-value)
        pairs.append((a, b, r))
    pairs.sort(key=lambda p: (variant_order_key(p[0], variants), variant_order_key(p[1], variants)))
    fig, axes = _grid(len(pairs), max_cols=3, w=3.8, h=4.0)
    cuts = damage_cuts(params)  # damage 1 - survived and 1 - destroyed (0.1 and 0.5 by default)
    for ax, (a, b, row) in zip(axes, pairs, strict=True):
        joined = (
            features.filter(pl.col("variant") == a)
            .select("feature", pl.col("damage").alias("x"))
            .join(
                features.filter(pl.col("variant") == b).select(
                    "feature", pl.col("damage").alias("y")
                ),
                on="feature",
            )
        )
        if joined.height == 0:
            _message(ax, f"no active features\nfor {a} and {b}")
            ax.set_title(f"{a} vs {b}", fontsize=9)
            continue
        x, y = joined["x"].to_numpy(), joined["y"].to_numpy()
        alpha = 0.4 if x.size < 2000 else 0.12  # dense clouds stay readable
        # log axes from just below the smallest damage of the pair (never below the floor):
        # mild compressions damage by 1e-5, which a linear or symlog axis flattens to 0
        positive = np.concatenate([x[x > 0], y[y > 0]])
        low = max(DAMAGE_FLOOR, float(positive.min()) / 2 if positive.size else DAMAGE_FLOOR)
        top = max(1.0, float(np.nanmax([x.max(), y.max()])) * 1.2)
        ax.scatter(
            np.clip(x, low, None),
            np.clip(y, low, None),
            s=5,
            alpha=alpha,
            color="#264653",
            edgecolor="none",
            rasterized=True,
        )
        ax.plot([low, top], [low, top], color="grey", ls=":", lw=0.8)
        for cut in cuts:
            ax.axvline(cut, color="#e76f51", ls="--", lw=0.8)
            ax.axhline(cut, color="#e76f51", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, top)
        ax.set_ylim(low, top)
        # feature counts in each (class under a, class under b) cell
        edges = [-np.inf, cuts[0], cuts[1], np.inf]
        centers = [
            math.sqrt(low * cuts[0]) if low < cuts[0] else cuts[0] / 2,
            math.sqrt(cuts[0] * cuts[1]),
            math.sqrt(cuts[1] * top),
        ]
        counts, _, _ = np.histogram2d(x, y, bins=[edges, edges])
        for i, cx in enumerate(centers):
            for j, cy in enumerate(centers):
                ax.text(
                    cx,
                    cy,
                    str(int(counts[i, j])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="#d62828",
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
                )
        ax.set_title(_scatter_title(a, b, row), fontsize=8)
        ax.set_xlabel(f"damage 1 - r, {a}")
        ax.set_ylabel(f"damage 1 - r, {b}")
    t = thresholds(params)
    fig.suptitle(
        title
        + f" (dashed: damage {cuts[0]:.3g} / {cuts[1]:.3g}, i.e. r = {t.survived:g} / {t.destroyed:g};"
        + "\nlog axes, damage below an axis's start drawn at its start)",
        fontsize=10,
    )
    _save(fig, out)


def stability(
    stability_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Survival share vs token-budget fraction per variant (a distinct color and its kind's
    marker each, shifted sideways so equal shares stay visible); random subsets as crosses
    of the variant's color; variants at 100 % everywhere are named, not drawn."""
    table = pl.read_parquet(stability_path).with_columns(pl.col("variant").cast(pl.String))
    title = "Is the token set large enough? Survival vs token budget"
    table = table.filter(_finite("survived_pct"))
    if table.height == 0:
        _message_figure(out, title, "no stability rows (no token budgets or subsets)")
        return
    order = _variant_order(table["variant"], variants)
    damaged = set(table.filter(pl.col("survived_pct") < 100.0)["variant"])
    drawn = [v for v in order if v in damaged]
    styles = _line_styles(order, variants)  # by every variant: one color each in all figures
    # offsets in octaves: the x axis is log2 when the budgets span 4x or more
    shift = {v: 2.0**o for v, o in _dodge(drawn, 0.12).items()}
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for v in drawn:
        color, marker = styles[v]
        rows = table.filter(pl.col("variant") == v)
        budgets = rows.filter(pl.col("selection") == "budget").sort("fraction")
        ax.plot(
            budgets["fraction"].to_numpy() * shift[v],
            budgets["survived_pct"].to_numpy(),
            color=color,
            marker=marker,
            ms=4,
            lw=1.2,
            label=v,
        )
        subsets = rows.filter(pl.col("selection") == "subset")
        # a small deterministic spread to the right so the subsets don't hide each other
        spread = 1.0 + 0.03 * (subsets["subset"].fill_null(0).to_numpy() + 1)
        ax.scatter(
            subsets["fraction"].to_numpy() * shift[v] * spread,
            subsets["survived_pct"].to_numpy(),
            marker="x",
            s=30,
            color=color,
            linewidth=1.0,
            zorder=3,
        )
    fractions = sorted(set(table["fraction"].to_list()))
    if fractions and fractions[0] > 0 and fractions[-1] / fractions[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    # zoom on the data (small drifts are the point), but never below a 10-point span
    values = table.filter(pl.col("variant").is_in(drawn))["survived_pct"].to_numpy()
    values = values if values.size else np.array([100.0])
    lo, hi = float(values.min()), float(values.max())
    pad = max(2.0, 0.1 * (hi - lo), (10.0 - (hi - lo)) / 2)
    ax.set_ylim(max(-1.0, lo - pad), min(101.0, hi + pad))
    ax.set_xlabel("fraction of the token set")
    ax.set_ylabel("% of active features surviving")
    ax.set_title(title)
    handles = ax.get_legend_handles_labels()[0]
    handles += [
        Line2D([], [], color="black", ls="-", label="budget (first fraction f)"),
        Line2D([], [], color="black", marker="x", ls="", label="random subset (fraction f)"),
    ]
    note = _always_survived_note([v for v in order if v not in damaged], "survived throughout")
    if note:
        handles.append(Line2D([], [], ls="", label=note))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    _save(fig, out)


def outlier_diagnostics(
    outliers_path: str | Path, out: str | Path, variants: VariantBits | None = None
) -> None:
    """Why the model is fragile under per-channel RTN (the FP model; ``variants`` unused):
    per layer the residual stream's largest dimension and first-token norm against the
    typical one, and the attention mass on position 0 against uniform attention; per block
    matrix the input-column absmax max/median (what per-output-channel RTN's scale
    suffers from), and the kurtosis of weights and residual stream."""
    del variants  # one model, no variants: the signature every figure has
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    table = pl.read_parquet(outliers_path)
    title = "Outlier diagnostics of the FP model"
    layers = table.filter(pl.col("scope") == "layer").sort("layer")
    matrices = table.filter(pl.col("scope") == "matrix").sort("layer", maintain_order=True)
    if layers.height == 0 and matrices.height == 0:
        _message_figure(out, title, "no outlier diagnostics (empty table)")
        return
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 7.5), squeeze=False)
    (ratios_ax, sink_ax), (cols_ax, kurt_ax) = axes

    # (a) residual stream: largest dimension / median, first token / the rest
    series = [
        ("dim_ratio", "largest dim / median dim (mean |act|)", "#264653", "o"),
        ("first_token_norm_ratio", "first-token norm / mean of the rest", "#e76f51", "s"),
    ]
    drawn = False
    for col, label, color, marker in series:
        rows = layers.filter(_finite(col))
        if rows.height:
            ratios_ax.plot(rows["layer"], rows[col], marker=marker, color=color, label=label)
            drawn = True
    if drawn:
        ratios_ax.axhline(1.0, color="#888888", ls=":", lw=1)
        _ratio_scale(ratios_ax, layers, ["dim_ratio", "first_token_norm_ratio"])
        ratios_ax.set_xlabel("layer (residual stream after the block)")
        ratios_ax.set_ylabel("ratio (1 = no outlier)")
        ratios_ax.legend(fontsize=7)
    else:
        _message(ratios_ax, "no residual-stream ratios")
    ratios_ax.set_title("Massive residual dimensions and first token", fontsize=9)

    # (b) attention sink: mass on position 0, beside uniform causal attention
    sinks = layers.filter(_finite("sink_score"))
    if sinks.height:
        sink_ax.plot(sinks["layer"], sinks["sink_score"], marker="o", color="#7b2cbf",
                     label="attention on position 0")  # fmt: skip
        if "sink_uniform" in sinks.columns and sinks.filter(_finite("sink_uniform")).height:
            uniform = sinks.filter(_finite("sink_uniform"))
            sink_ax.plot(uniform["layer"], uniform["sink_uniform"], ls="--", color="#888888",
                         label="uniform causal attention")  # fmt: skip
        sink_ax.set_ylim(0, 1.02)
        sink_ax.set_xlabel("layer")
        sink_ax.set_ylabel("mean attention probability")
        sink_ax.legend(fontsize=7)
    else:
        _message(sink_ax, "no sink score (sequences of one token)")
    sink_ax.set_title("Attention sink (heads, queries after the first)", fontsize=9)

    # (c) per block matrix: input-column absmax max/median, one bar per matrix
    cols = matrices.filter(_finite("col_absmax_ratio"))
    if cols.height:
        sns.barplot(
            data=cols.to_pandas(),
            x="layer",
            y="col_absmax_ratio",
            hue="matrix",
            hue_order=list(dict.fromkeys(cols["matrix"].to_list())),
            palette="deep",
            ax=cols_ax,
        )
        cols_ax.axhline(1.0, color="#888888", ls=":", lw=1)
        _ratio_scale(cols_ax, cols, ["col_absmax_ratio"], bars=True)
        cols_ax.set_xlabel("layer")
        cols_ax.set_ylabel("max / median input-column absmax")
        cols_ax.legend(fontsize=6, title=None, ncol=2, loc="upper left")
    else:
        _message(cols_ax, "no block matrix with a nonzero median column absmax")
    cols_ax.set_title("Large input columns (what hurts per-output-channel RTN)", fontsize=9)

    # (d) kurtosis: weights per matrix, residual stream per layer; a Gaussian has 3
    weights = matrices.filter(_finite("weight_kurtosis"))
    acts = layers.filter(_finite("act_kurtosis"))
    if weights.height or acts.height:
        if weights.height:
            sns.stripplot(
                data=weights.to_pandas(),
                x="layer",
                y="weight_kurtosis",
                hue="matrix",
                hue_order=list(dict.fromkeys(weights["matrix"].to_list())),
                palette="deep",
                native_scale=True,
                jitter=0.15,
                size=5,
                legend=False,
                ax=kurt_ax,
            )
        if acts.height:
            kurt_ax.plot(acts["layer"], acts["act_kurtosis"], marker="D", color="black",
                         label="residual stream")  # fmt: skip
        kurt_ax.axhline(3.0, color="#888888", ls=":", lw=1, label="Gaussian (3)")
        _ratio_scale(kurt_ax, pl.concat([weights.select(k=pl.col("weight_kurtosis")),
                                         acts.select(k=pl.col("act_kurtosis"))]), ["k"])  # fmt: skip
        kurt_ax.set_xlabel("layer")
        kurt_ax.set_ylabel("Pearson kurtosis")
        kurt_ax.legend(fontsize=7)
    else:
        _message(kurt_ax, "no kurtosis defined")
    kurt_ax.set_title("Kurtosis: weights (dots, colored as above) and residual", fontsize=9)
    for ax in (ratios_ax, sink_ax, kurt_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))
    fig.suptitle(title)
    _save(fig, out)


def _ratio_scale(ax: Axes, table: pl.DataFrame, cols: Sequence[str], bars: bool = False) -> None:
    """Logarithmic y when the values span more than tenfold (plain numbers on the ticks),
    else linear: from 0 for bars, around the data and the reference line otherwise."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    values = np.concatenate([table.filter(_finite(c))[c].to_numpy() for c in cols])
    if values.size and values.max() > 10 * max(values.min(), 1e-12):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        if bars:  # from below 1, with room for the legend above the tallest bar
            ax.set_ylim(0.8, 5.0 * float(values.max()))
    elif bars:
        ax.set_ylim(0, 1.45 * float(values.max()) if values.size else 1.0)  # room for the legend


# The two ways causal and Pearson survival disagree (causal.parquet's ``dissociation``):
# a colour each, far from each other and from the grey of the features where they agree.
DISSOCIATION_STYLE = {
    "fires_same_acts_differently": (
        "#d62828",
        "fires the same, acts differently\n(Pearson survived, causally blurred/destroyed)",
    ),
    "acts_same_fires_differently": (
        "#0077b6",
        "acts the same, fires differently\n(causally survived, Pearson blurred/destroyed)",
    ),
}
AGREE_COLOR = "#9aa0a6"
_DISSOCIATION_SHORT = {
    "fires_same_acts_differently": "fires same/acts diff.",
    "acts_same_fires_differently": "acts same/fires diff.",
}


def dissociation_counts(part: pl.DataFrame) -> dict[str, int]:
    """Rows of each dissociation kind in a part of causal.parquet (0 for a kind absent)."""
    kinds = part["dissociation"].cast(pl.String).to_list()
    return {k: sum(1 for x in kinds if x == k) for k in DISSOCIATION_STYLE}


def causal_vs_pearson(
    causal_path: str | Path,
    out: str | Path,
    params: Mapping[str, Any] | None = None,
    variants: VariantBits | None = None,
) -> None:
    """Per feature of the causal table (a selected subset of the active features), its
    Pearson damage 1 - r (x) against its causal damage 1 - causal agreement (y), one facet
    per variant in display order, the null runs included (they are the controls); both
    axes logarithmic and the same in every panel, from just below the table's smallest
    positive damage (never below ``DAMAGE_FLOOR``) to 2 (r or agreement = -1), so the
    small damage of mild variants is spread out; smaller damage is drawn at that floor,
    just inside the axes, so a variant equal to FP puts every point in the lower-left
    corner (r = agreement = 1). Dashed vertical lines: the Pearson class thresholds (``params``, the
    ``analysis`` slice); dash-dotted horizontal lines: the causal ones (``params["causal"]``).
    Points are coloured by the table's ``dissociation`` (the classes, not the position:
    they also cut r's interval and the KL ratios), grey where the two agree; causally
    insufficient features (agreement undefined, stored as 0) hollow. Each title counts
    the features, those at (1, 1), and each dissociation kind."""
    t, c = thresholds(params), causal_thresholds(params)
    table = pl.read_parquet(causal_path)
    title = "Causal vs Pearson survival per feature"
    if table.height == 0:
        _message_figure(
            out,
            title,
            "no causal measurements\n(causal.enabled is false, or no feature was selected)",
        )
        return
    table = table.with_columns(
        pl.col("variant").cast(pl.String),
        pl.col("dissociation").cast(pl.String),
        (1.0 - pl.col("r").cast(pl.Float64).clip(-1.0, 1.0)).alias("_x"),
        (1.0 - pl.col("causal_agreement").cast(pl.Float64).clip(-1.0, 1.0)).alias("_y"),
        (_finite("r") & _finite("causal_agreement")).alias("_valid"),
    )
    order = _variant_order(table["variant"], variants)
    valid = table.filter(pl.col("_valid"))
    positive = np.concatenate([valid["_x"].to_numpy(), valid["_y"].to_numpy()])
    positive = positive[positive > 0]
    # one range for every panel, from half a decade or more below the smallest damage
    low = DAMAGE_FLOOR
    if positive.size:
        low = max(DAMAGE_FLOOR, 10.0 ** math.floor(math.log10(float(positive.min())) - 0.5))
    top = 3.0  # damage at most 2 (-1), with room above it
    x_cuts = damage_cuts(params)
    y_cuts = (1.0 - c.survived, 1.0 - c.destroyed)
    fig, axes = _grid(len(order), max_cols=4, w=3.5, h=3.6)
    for ax, variant in zip(axes, order, strict=True):
        part = table.filter(pl.col("variant") == variant)
        drawn = part.filter(pl.col("_valid"))
        # where the two schemes disagree, shaded (the dissociations' classes also need r's
        # interval and the KL ratios, so the colours, not the shading, are the verdict)
        ax.fill_between(
            [low / 2, x_cuts[0]],
            y_cuts[0],
            top,
            color=DISSOCIATION_STYLE["fires_same_acts_differently"][0],
            alpha=0.06,
            lw=0,
            zorder=0,
        )
        ax.fill_between(
            [x_cuts[0], top],
            low / 2,
            y_cuts[0],
            color=DISSOCIATION_STYLE["acts_same_fires_differently"][0],
            alpha=0.06,
            lw=0,
            zorder=0,
        )
        undefined = pl.col("causal_class") == "insufficient"
        agree = drawn.filter(pl.col("dissociation").is_null() & ~undefined.fill_null(False))
        hollow = drawn.filter(undefined.fill_null(False) & pl.col("dissociation").is_null())
        alpha = 0.6 if drawn.height < 2000 else 0.2  # dense clouds stay readable

        def xy(rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
            return (
                np.clip(rows["_x"].to_numpy(), low, top),
                np.clip(rows["_y"].to_numpy(), low, top),
            )

        ax.scatter(
            *xy(agree),
            s=10,
            color=AGREE_COLOR,
            alpha=alpha,
            edgecolor="none",
            rasterized=True,
            zorder=2,
        )
        ax.scatter(
            *xy(hollow),
            s=14,
            facecolor="none",
            edgecolor=AGREE_COLOR,
            lw=0.8,
            rasterized=True,
            zorder=2,
        )
        for kind, (color, _) in DISSOCIATION_STYLE.items():
            rows = drawn.filter(pl.col("dissociation") == kind)
            ax.scatter(
                *xy(rows),
                s=22,
                color=color,
                edgecolor="white",
                lw=0.4,
                rasterized=True,
                zorder=3,
                label=kind,
            )
        ax.plot([low / 2, top], [low / 2, top], color="grey", ls=":", lw=0.8, zorder=1)
        for cut in x_cuts:
            ax.axvline(cut, color="black", ls="--", lw=0.8, zorder=1)
        for cut in y_cuts:
            ax.axhline(cut, color="black", ls="-.", lw=0.8, zorder=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # a little room below the start, so the points drawn there stay whole
        ax.set_xlim(low / 2, top)
        ax.set_ylim(low / 2, top)
        counts = dissociation_counts(part)
        at_fp = int(
            drawn.filter((pl.col("_x") < DAMAGE_FLOOR) & (pl.col("_y") < DAMAGE_FLOOR)).height
        )
        stats = [f"n={part.height}", f"at (1, 1): {at_fp}"]
        if hollow.height:
            stats.append(f"causally insufficient: {hollow.height}")
        if part.height - drawn.height:
            stats.append(f"no r or agreement: {part.height - drawn.height}")
        ax.set_title(
            f"{variant}\n"
            + ", ".join(stats)
            + "\n"
            + ", ".join(f"{_DISSOCIATION_SHORT[k]}: {n}" for k, n in counts.items()),
            fontsize=7,
        )
        ax.set_xlabel("Pearson damage 1 - r (log)", fontsize=8)
        ax.set_ylabel("causal damage 1 - agreement (log)", fontsize=8)
    handles = [
        Line2D([], [], color=AGREE_COLOR, marker="o", ls="", label="the two agree"),
        Line2D(
            [],
            [],
            markeredgecolor=AGREE_COLOR,
            markerfacecolor="none",
            marker="o",
            ls="",
            label="causally insufficient\n(never fires in FP here)",
        ),
        *[
            Line2D([], [], color=color, marker="o", ls="", label=label)
            for color, label in DISSOCIATION_STYLE.values()
        ],
        Line2D(
            [],
            [],
            color="black",
            ls="--",
            lw=0.8,
            label=f"Pearson class cuts\n(r = {t.survived:g} / {t.destroyed:g})",
        ),
        Line2D(
            [],
            [],
            color="black",
            ls="-.",
            lw=0.8,
            label=f"causal class cuts\n(agreement = {c.survived:g} / {c.destroyed:g})",
        ),
        Line2D([], [], color="grey", ls=":", lw=0.8, label="y = x"),
    ]
    fig.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(
        title
        + f" (x: damage 1 - r, dashed at {x_cuts[0]:.3g} / {x_cuts[1]:.3g}; y: 1 - causal "
        + f"agreement, dash-dotted at {y_cuts[0]:.3g} / {y_cuts[1]:.3g};"
        + f"\nlog axes, damage below {low:.0e} drawn there: a variant equal to FP "
        + "sits in the lower-left corner, r = agreement = 1)",
        fontsize=9,
    )
    _save(fig, out)
