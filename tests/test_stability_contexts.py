"""Stability selections and damaged-feature contexts, on codes written as real shards."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from sae_audit.contexts import ContextConfig, damaged_contexts, render_context
from sae_audit.correlate import correlate_variant
from sae_audit.stability import StabilityConfig, stability_table
from sae_audit.survival import SurvivalConfig

from .test_analysis import write_dense

SEQ_LEN = 20


def _dense_pair(seed: int = 0, n_tokens: int = 400, d: int = 12):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n_tokens, d)) < 0.3, rng.random((n_tokens, d)) + 0.1, 0.0)
    noise = rng.normal(0, 1, (n_tokens, d)) * np.linspace(0.0, 1.5, d)
    y = np.where(x > 0, np.maximum(x + noise * x.std(), 0), 0.0)
    return x.astype(np.float32), y.astype(np.float32)


def _classes(x: np.ndarray, y: np.ndarray, cfg: SurvivalConfig) -> dict[str, float]:
    active = (x > 0).mean(0) > cfg.active_rate
    r = np.array(
        [np.corrcoef(x[:, f], y[:, f])[0, 1] if y[:, f].any() else 0.0 for f in range(x.shape[1])]
    )
    r = r[active]
    return {
        "survived_pct": 100 * (r > cfg.survived).mean(),
        "destroyed_pct": 100 * (r < cfg.destroyed).mean(),
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
    assert full["survived_pct"] == pytest.approx(_classes(x, y, cfg)["survived_pct"])
    # The full budget agrees with the streaming correlation of the whole set.
    r = correlate_variant(fp, var)["r"].to_numpy()
    assert full["survived_pct"] == pytest.approx(100 * (r > 0.9).mean())
    quarter = table.filter(
        (pl.col("selection") == "budget") & (pl.col("fraction") == 0.25)
    ).to_dicts()[0]
    assert quarter["n_tokens"] == 100
    assert quarter["destroyed_pct"] == pytest.approx(
        _classes(x[:100], y[:100], cfg)["destroyed_pct"]
    )
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


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_render_context_marks_token_and_stays_in_sequence():
    ids = np.arange(20) % 26
    # token 12 is in the second 10-token sequence: context starts at 10, not 12 - window.
    text = render_context(ids, 12, seq_len=10, window=5, tokenizer=_CharTokenizer())
    assert text == "kl⟦m⟧nop"


def test_damaged_contexts_picks_most_damaged_and_reads_variant_values(tmp_path):
    n_tokens, d = 60, 4
    x = np.zeros((n_tokens, d), dtype=np.float32)
    x[[5, 17, 33], 2] = [1.0, 3.0, 2.0]  # feature 2's top FP contexts: 17, 33, 5
    x[::3, 0] = 1.0
    y = x.copy()
    y[17, 2] = 0.5
    fp = write_dense(tmp_path, "fp", x, n_shards=2)
    var = write_dense(tmp_path, "v", y, n_shards=2)
    features = pl.DataFrame(
        {
            "variant": ["v"] * d,
            "feature": list(range(d)),
            "active": [True, False, True, True],
            "r": [0.99, 0.0, 0.2, 0.95],
        }
    )
    ids = (np.arange(n_tokens) % 26).reshape(3, 20)
    table = damaged_contexts(
        features,
        fp,
        {"v": var},
        ids,
        _CharTokenizer(),
        ContextConfig(n_features=1, n_contexts=2, window=3),
    )
    assert table["feature"].to_list() == [
        2,
        2,
    ]  # lowest r among active features; inactive 1 skipped
    assert table["token"].to_list() == [17, 33]
    assert table["fp_value"].to_list() == [3.0, 2.0]
    assert table["variant_value"].to_list() == [0.5, 2.0]
    assert (
        table["context"][0] == "opq⟦r⟧st"
    )  # 3 tokens of left context, right side cut at the sequence end
