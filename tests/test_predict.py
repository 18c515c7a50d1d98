"""The survival predictor: planted rarity dependence, chance on random labels, degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from sae_audit.predict import (
    PREDICTORS,
    PredictConfig,
    predict_survival,
    register_predictor,
    survival_by_quantile,
)


def _predict_table(rng: np.random.Generator, n: int, survived: np.ndarray | None) -> pl.DataFrame:
    rate = np.exp(rng.uniform(np.log(2e-3), np.log(0.5), n))
    mean = np.exp(rng.normal(0, 0.5, n))
    peak = mean * np.exp(rng.uniform(0.1, 2.0, n))
    if survived is None:
        survived = -np.log(rate) < np.median(-np.log(rate))  # common features survive
    return pl.DataFrame(
        {
            "feature": np.arange(n, dtype=np.int32),
            "firing_rate": rate,
            "mean_when_firing": mean,
            "peak": peak,
            "active": np.ones(n, dtype=bool),
            "class": np.where(survived, "survived", "destroyed"),
        }
    )


def test_predictor_recovers_planted_rarity_dependence() -> None:
    table = _predict_table(np.random.default_rng(0), 600, None)
    out = predict_survival(table, PredictConfig())
    assert out["reason"] is None
    assert out["auc_mean"] > 0.95
    assert len(out["fold_aucs"]) == 5 and out["auc_sd"] >= 0
    # Survival falls with rarity exactly, so rarity alone ranks perfectly, inverted.
    assert out["marginal_auc"]["rarity"] == pytest.approx(0.0)
    assert out["marginal_auc_best"]["rarity"] == pytest.approx(1.0)
    assert out["coefficients"]["rarity"] < 0
    assert not np.isnan(out["oof_proba"]).any() and out["oof_proba"].shape == (600,)


def test_predictor_on_random_labels_is_chance() -> None:
    rng = np.random.default_rng(1)
    table = _predict_table(rng, 1000, rng.random(1000) < 0.5)
    out = predict_survival(table, PredictConfig(seed=3))
    assert abs(out["auc_mean"] - 0.5) < 0.1


def test_predictor_degenerate_cases_and_config() -> None:
    rng = np.random.default_rng(2)
    all_survive = _predict_table(rng, 50, np.ones(50, dtype=bool))
    out = predict_survival(all_survive)
    assert out["auc_mean"] is None and out["auc_sd"] is None and "one class" in out["reason"]
    few = _predict_table(rng, 50, np.arange(50) < 3)
    out = predict_survival(few)
    assert out["auc_mean"] is None and "fewer than folds" in out["reason"]
    assert out["coefficients"]["rarity"] is not None and math.isfinite(
        out["coefficients"]["rarity"]
    )
    with pytest.raises(ValueError, match="predictors"):
        PredictConfig(predictors=("rarity", "nope"))
    with pytest.raises(ValueError, match="folds"):
        PredictConfig(folds=1)


def test_register_predictor_and_quantiles() -> None:
    @register_predictor("test_identity_rate")
    def _rate(table: pl.DataFrame) -> np.ndarray:
        return table["firing_rate"].to_numpy()

    try:
        assert PredictConfig(predictors=("test_identity_rate",)).predictors == (
            "test_identity_rate",
        )
        table = pl.DataFrame(
            {
                "feature": np.arange(9, dtype=np.int32),
                "firing_rate": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.5],
                "active": [True] * 8 + [False],
                "class": ["destroyed", "destroyed", "survived", "destroyed",
                          "survived", "survived", "survived", "survived", None],
            }
        )  # fmt: skip
        q = survival_by_quantile(table, "test_identity_rate", 4)
        assert q.columns == [
            "predictor",
            "bin",
            "n",
            "predictor_min",
            "predictor_max",
            "survived_frac",
        ]
        assert q["bin"].to_list() == [1, 2, 3, 4]
        assert q["n"].to_list() == [2, 2, 2, 2]
        assert q["survived_frac"].to_list() == [0.0, 0.5, 1.0, 1.0]
        assert q["predictor_max"].to_list() == [0.02, 0.04, 0.06, 0.08]
    finally:
        del PREDICTORS["test_identity_rate"]


def test_insufficient_features_are_left_out_of_the_labels() -> None:
    """An "insufficient" feature is neither survived nor not: it has no label, so it is
    out of n, the folds, the out-of-fold rows and the quantile bins, and counted apart."""
    rng = np.random.default_rng(5)
    table = _predict_table(rng, 300, None)
    unsure = np.zeros(300, dtype=bool)
    unsure[::7] = True
    marked = table.with_columns(
        pl.when(pl.Series(unsure)).then(pl.lit("insufficient")).otherwise("class").alias("class")
    )
    out = predict_survival(marked, PredictConfig())
    assert out["n"] == 300 - unsure.sum() and out["n_insufficient"] == unsure.sum()
    assert not set(out["feature"].tolist()) & set(np.flatnonzero(unsure).tolist())
    # the same as the predictor fitted on the labelled features alone
    alone = predict_survival(table.filter(~pl.Series(unsure)), PredictConfig())
    assert out["auc_mean"] == pytest.approx(alone["auc_mean"])
    assert out["n_survived"] == alone["n_survived"] and alone["n_insufficient"] == 0
    bins = survival_by_quantile(marked, "rarity", 4)
    assert bins["n"].sum() == 300 - unsure.sum()
    every = marked.with_columns(pl.lit("insufficient").alias("class"))
    assert "no active features" in predict_survival(every, PredictConfig())["reason"]
