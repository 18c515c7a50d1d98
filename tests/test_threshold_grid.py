"""Class shares over a grid of thresholds, beside the per-variant summary they vary."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sae_audit.survival import feature_table, summary
from sae_audit.threshold_grid import ThresholdGridConfig, threshold_grid


def _table(
    r: list[float],
    active: list[bool],
    flag: list[str | None] | None = None,
    support: list[int] | None = None,
) -> pl.DataFrame:
    n = len(r)
    df = pl.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "firing_rate": [0.1 if a else 0.0 for a in active],
            "r": r,
            "flag": flag or [None] * n,
            # a million tokens of support: intervals about +-0.001 unless given
            "n_support": support or [1_000_000] * n,
        },
        schema_overrides={"flag": pl.String},
    )
    return feature_table(
        df.select("feature", "firing_rate"), df.select("feature", "r", "flag", "n_support")
    )


def test_summary_and_threshold_grid() -> None:
    a = _table([0.95, 0.8, 0.3, 0.0, 0.99], [True, True, True, True, False],
               [None, None, None, "variant_silent", None])  # fmt: skip
    b = _table([0.95, 0.92, 0.91, 0.6, 0.1], [True] * 5)
    ppl = pl.DataFrame({"variant": ["a"], "perplexity": [12.5]})
    out = summary({"a": a, "b": b}, ppl)
    rows = {row["variant"]: row for row in out.iter_rows(named=True)}
    assert rows["a"]["n_active"] == 4
    assert rows["a"]["survived_pct"] == pytest.approx(25.0)
    assert rows["a"]["blurred_pct"] == pytest.approx(25.0)
    assert rows["a"]["destroyed_pct"] == pytest.approx(50.0)
    assert rows["a"]["mean_r"] == pytest.approx((0.95 + 0.8 + 0.3 + 0.0) / 4)
    assert rows["a"]["n_variant_silent"] == 1
    assert rows["a"]["perplexity"] == 12.5 and rows["b"]["perplexity"] is None
    assert rows["b"]["survived_pct"] == pytest.approx(60.0)

    grid = threshold_grid({"a": a}, ThresholdGridConfig(survived=(0.9, 0.7), destroyed=(0.5, 0.8)))
    # (0.7, 0.8) is skipped: destroyed above survived.
    assert grid.height == 3
    row = grid.filter(
        (pl.col("survived_threshold") == 0.7) & (pl.col("destroyed_threshold") == 0.5)
    )
    assert row["survived_pct"][0] == pytest.approx(50.0)
    assert row["destroyed_pct"][0] == pytest.approx(50.0)
    assert row["insufficient_pct"][0] == 0.0


def test_threshold_grid_keeps_each_features_interval() -> None:
    """r = 0.85 on 100 tokens of support (interval about [0.78, 0.90]): blurred at the
    0.9 cut, insufficient at 0.8 (the cut inside its interval), never silently survived."""
    t = _table([0.85, 0.85], [True, True], support=[100, 1_000_000])
    assert t["class"].to_list() == ["blurred", "blurred"]
    grid = threshold_grid({"a": t}, ThresholdGridConfig(survived=(0.9, 0.8), destroyed=(0.5,)))
    at = {row["survived_threshold"]: row for row in grid.iter_rows(named=True)}
    assert (at[0.9]["n_blurred"], at[0.9]["n_insufficient"]) == (2, 0)
    assert (at[0.8]["n_survived"], at[0.8]["n_insufficient"]) == (1, 1)
    pct = [c for c in grid.columns if c.endswith("_pct")]
    assert grid.select(pl.sum_horizontal(pct)).to_series().to_list() == pytest.approx([100, 100])
