"""Stability selections (token budgets, sequence subsets), on codes written as real shards."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from sae_audit.correlate import correlate_variant
from sae_audit.stability import StabilityConfig, stability_table
from sae_audit.survival import SurvivalConfig

from .conftest import write_dense

SEQ_LEN = 20


def _dense_pair(seed: int = 0, n_tokens: int = 400, d: int = 12):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n_tokens, d)) < 0.3, rng.random((n_tokens, d)) + 0.1, 0.0)
    noise = rng.normal(0, 1, (n_tokens, d)) * np.linspace(0.0, 1.5, d)
    y = np.where(x > 0, np.maximum(x + noise * x.std(), 0), 0.0)
    return x.astype(np.float32), y.astype(np.float32)


def _classes(x: np.ndarray, y: np.ndarray, cfg: SurvivalConfig) -> dict[str, float]:
    """Class shares recomputed densely: r, its support and its Fisher interval by hand."""
    active = (x > 0).mean(0) > cfg.active_rate
    r = np.array(
        [np.corrcoef(x[:, f], y[:, f])[0, 1] if y[:, f].any() else 0.0 for f in range(x.shape[1])]
    )
    support = ((x != 0) | (y != 0)).sum(0)
    half = stats.norm.ppf(0.5 + cfg.confidence / 2) / np.sqrt(np.maximum(support - 3, 1))
    with np.errstate(divide="ignore"):  # r = 1: atanh is inf, the interval the point
        z = np.arctanh(r)
    lo = np.where(support > 3, np.tanh(z - half), -1.0)[active]
    hi = np.where(support > 3, np.tanh(z + half), 1.0)[active]
    survived, destroyed = lo > cfg.survived, hi < cfg.destroyed
    blurred = (lo >= cfg.destroyed) & (hi <= cfg.survived)
    return {
        "survived_pct": 100 * survived.mean(),
        "destroyed_pct": 100 * destroyed.mean(),
        "insufficient_pct": 100 * (~(survived | destroyed | blurred)).mean(),
    }


def test_budgets_and_subsets_match_dense_recomputation(tmp_path):
    x, y = _dense_pair()
    fp = write_dense(tmp_path, "fp", x, n_shards=3)
    var = write_dense(tmp_path, "v", y, n_shards=3)
    cfg = SurvivalConfig()
    table = stability_table(
        fp, {"v": var}, SEQ_LEN, cfg, StabilityConfig(token_budgets=(0.25, 1.0), subsets=2, seed=3)
    )
    assert table.height == 4
    full = table.filter((pl.col("selection") == "budget") & (pl.col("fraction") == 1.0)).to_dicts()[
        0
    ]
    assert full["n_tokens"] == 400
    dense = _classes(x, y, cfg)
    assert full["survived_pct"] == pytest.approx(dense["survived_pct"])
    assert full["insufficient_pct"] == pytest.approx(dense["insufficient_pct"])
    assert 0 < full["insufficient_pct"] < 100  # the planted noise ramp leaves some undecided
    # The full budget agrees with the streaming correlation of the whole set.
    r_lo = correlate_variant(fp, var)["r_lo"].to_numpy()
    assert full["survived_pct"] == pytest.approx(100 * (r_lo > 0.9).mean())
    pct = [full[f"{c}_pct"] for c in ("survived", "blurred", "destroyed", "insufficient")]
    assert sum(pct) == pytest.approx(100)
    quarter = table.filter(
        (pl.col("selection") == "budget") & (pl.col("fraction") == 0.25)
    ).to_dicts()[0]
    assert quarter["n_tokens"] == 100
    assert quarter["destroyed_pct"] == pytest.approx(
        _classes(x[:100], y[:100], cfg)["destroyed_pct"]
    )
    # a quarter of the tokens: less support, wider intervals, no fewer undecided
    assert quarter["insufficient_pct"] >= full["insufficient_pct"]
    # Subsets: seeded half of the sequences; recompute densely from the same draw.
    subsets = table.filter(pl.col("selection") == "subset").sort("subset")
    rng = np.random.default_rng(3)
    for row in subsets.to_dicts():
        chosen = np.sort(rng.choice(20, size=10, replace=False))
        rows = (chosen[:, None] * SEQ_LEN + np.arange(SEQ_LEN)).reshape(-1)
        assert row["n_tokens"] == 200
        assert row["survived_pct"] == pytest.approx(_classes(x[rows], y[rows], cfg)["survived_pct"])


def test_stability_config_validates():
    with pytest.raises(ValueError, match="token_budgets"):
        StabilityConfig(token_budgets=(0.0, 1.0))
