"""Seaborn figures; each function reads tables and writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: rules run on nodes without a display
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import seaborn as sns  # noqa: E402

from .survival import CLASSES  # noqa: E402
from .variants import parse_variant  # noqa: E402

PALETTE = {"survived": "#2a9d8f", "blurred": "#e9c46a", "destroyed": "#e76f51"}


def _save(fig: plt.Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _rtn_rows(summary: pl.DataFrame) -> pl.DataFrame:
    bits = [parse_variant(v).bits if parse_variant(v).kind == "rtn" else None for v in summary["variant"]]
    return summary.with_columns(pl.Series("bits", bits, dtype=pl.Int64)).filter(pl.col("bits").is_not_null())


def class_fractions_vs_bits(summary_path: str | Path, out: str | Path) -> None:
    """Stacked shares of active features per class, one bar per RTN bit-width."""
    rtn = _rtn_rows(pl.read_parquet(summary_path)).sort("bits", descending=True)
    long = rtn.unpivot(index="bits", on=[f"{c}_pct" for c in CLASSES], variable_name="class", value_name="pct")
    long = long.with_columns(pl.col("class").str.replace("_pct", ""))
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = {b: 0.0 for b in rtn["bits"]}
    order = [str(b) for b in rtn["bits"]]
    for cls in CLASSES:
        part = long.filter(pl.col("class") == cls)
        values = dict(zip(part["bits"], part["pct"], strict=True))
        ax.bar(order, [values[b] for b in rtn["bits"]], bottom=[bottom[b] for b in rtn["bits"]], label=cls, color=PALETTE[cls])
        for b in rtn["bits"]:
            bottom[b] += values[b]
    ax.set_xlabel("RTN bit-width")
    ax.set_ylabel("% of active features")
    ax.set_title("Feature classes under RTN quantization")
    ax.legend(loc="lower left")
    _save(fig, out)


def perplexity_vs_bits(perplexity_path: str | Path, out: str | Path) -> None:
    """Perplexity change (%) vs FP per RTN bit-width, chunked and sliding-window."""
    table = _rtn_rows(pl.read_parquet(perplexity_path))
    cols = [c for c in ("dppl_chunked_pct", "dppl_sliding_pct") if c in table.columns]
    long = table.unpivot(index="bits", on=cols, variable_name="evaluation", value_name="dppl")
    long = long.with_columns(pl.col("evaluation").str.replace("dppl_", "").str.replace("_pct", ""))
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(data=long.to_pandas(), x="bits", y="dppl", hue="evaluation", marker="o", ax=ax)
    ax.invert_xaxis()
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("RTN bit-width")
    ax.set_ylabel("perplexity change vs FP (%)")
    ax.set_title("Perplexity under RTN quantization")
    _save(fig, out)
