"""SAE seed turnover: best decoder matches against a twin SAE, and the survival shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sae_audit import stages
from sae_audit.config import ConfigError
from sae_audit.seed_turnover import SeedTurnoverConfig, read_decoder, turnover_table
from sae_audit.survival import SurvivalConfig, survival_tables

from .test_families import make_sae

HOOK = "blocks.1.hook_resid_post"
D_IN, D_SAE = 32, 64


def _saved(sae, path: Path) -> Path:
    sae.save_model(path)
    return path


def test_a_permuted_twin_matches_every_feature_exactly(tmp_path: Path) -> None:
    main = make_sae("standard", D_IN, D_SAE, HOOK, seed=0)
    perm = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))
    twin = make_sae("standard", D_IN, D_SAE, HOOK, seed=0)
    with torch.no_grad():
        twin.W_dec.copy_(main.W_dec[perm])  # twin feature j is main feature perm[j]
        twin.W_enc.copy_(main.W_enc[:, perm])
    a, b = _saved(main, tmp_path / "sae"), _saved(twin, tmp_path / "twin")
    assert np.array_equal(read_decoder(a), main.W_dec.detach().double().numpy())
    table = stages.seed_turnover(
        seed_turnover={"stable": 0.7}, sae=a, twin=b, out=tmp_path / "seed_turnover.parquet"
    )
    assert table.columns == ["feature", "best_match", "best_cosine", "stable"]
    assert table["feature"].to_list() == list(range(D_SAE))
    assert table["best_match"].to_list() == torch.argsort(perm).tolist()
    assert np.allclose(table["best_cosine"].to_numpy(), 1.0, atol=1e-6)
    assert table["stable"].all()
    assert pl.read_parquet(tmp_path / "seed_turnover.parquet").equals(table)


def test_a_random_twin_leaves_few_features_stable(tmp_path: Path) -> None:
    main = _saved(make_sae("standard", D_IN, D_SAE, HOOK, seed=0), tmp_path / "sae")
    twin = _saved(make_sae("standard", D_IN, D_SAE, HOOK, seed=1), tmp_path / "twin")
    table = stages.seed_turnover(
        seed_turnover=SeedTurnoverConfig(), sae=main, twin=twin, out=tmp_path / "t.parquet"
    )
    assert table["stable"].mean() < 0.1  # type: ignore[operator]
    assert table["best_cosine"].max() < 0.9  # type: ignore[operator]
    assert table["best_match"].is_between(0, D_SAE - 1).all()


def test_no_nan_for_zero_directions_and_bad_shapes_are_errors() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 4))
    w[2] = 0.0  # a dead feature with no direction
    twin = np.vstack([w[:2], np.zeros((1, 4))])
    table = turnover_table(w, twin, SeedTurnoverConfig(stable=0.99))
    assert table.null_count().sum_horizontal().item() == 0
    assert not table["best_cosine"].is_nan().any()
    assert table["stable"].to_list()[:3] == [True, True, False]
    assert table["best_cosine"][2] == 0.0
    with pytest.raises(ValueError, match="d_in"):
        turnover_table(w, rng.normal(size=(5, 3)))
    with pytest.raises(ConfigError, match=r"seed_turnover\.stable"):
        SeedTurnoverConfig(stable=1.5)


def test_survival_summary_reads_destroyed_against_seed_stability() -> None:
    fp_stats = pl.DataFrame({"feature": [0, 1, 2, 3], "firing_rate": [0.5] * 4})
    corr = pl.DataFrame(
        {"feature": [0, 1, 2, 3], "r": [0.99, 0.1, 0.1, 0.99], "n_support": [1000] * 4}
    )
    turnover = pl.DataFrame({"feature": [0, 1, 2, 3], "stable": [True, False, True, False]})
    cfg = SurvivalConfig()
    features, summary = survival_tables(fp_stats, {"v": corr}, None, cfg, turnover)
    assert features["stable"].to_list() == [True, False, True, False]
    assert summary["n_destroyed"].item() == 2
    assert summary["unstable_pct"].item() == 50.0
    assert summary["destroyed_unstable_pct"].item() == 50.0
    # Nothing destroyed: the share of destroyed features is undefined (null, not NaN).
    kept = corr.with_columns(pl.lit(0.99).alias("r"))
    _, summary = survival_tables(fp_stats, {"v": kept}, None, cfg, turnover)
    assert summary["destroyed_unstable_pct"].item() is None
    # Without a twin the summary has no such columns; a twin of other features is an error.
    _, plain = survival_tables(fp_stats, {"v": corr}, None, cfg)
    assert "unstable_pct" not in plain.columns
    with pytest.raises(ValueError, match="feature ids"):
        survival_tables(fp_stats, {"v": corr}, None, cfg, turnover.head(3))
