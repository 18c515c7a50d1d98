"""Predicting feature survival from FP statistics alone.

Predictors are named functions of a feature table, kept in a registry so a
config can name them and new ones can be added without touching the model code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from .config import FROM_SCHEMA, ConfigSection, check_predictors
from .survival import INSUFFICIENT

Predictor = Callable[[pl.DataFrame], np.ndarray]
PREDICTORS: dict[str, Predictor] = {}


def register_predictor(name: str) -> Callable[[Predictor], Predictor]:
    """Decorator: add a predictor (feature table -> float64 array) under ``name``."""

    def add(fn: Predictor) -> Predictor:
        if name in PREDICTORS:
            raise ValueError(f"predictor {name!r} is already registered")
        PREDICTORS[name] = fn
        return fn

    return add


def _col(table: pl.DataFrame, name: str) -> np.ndarray:
    return table.get_column(name).cast(pl.Float64).to_numpy()


@register_predictor("rarity")
def rarity(table: pl.DataFrame) -> np.ndarray:
    """-log(FP firing rate)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.log(_col(table, "firing_rate"))


@register_predictor("log_mean")
def log_mean(table: pl.DataFrame) -> np.ndarray:
    """log(mean FP activation when firing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(_col(table, "mean_when_firing"))


@register_predictor("log_peak")
def log_peak(table: pl.DataFrame) -> np.ndarray:
    """log(peak FP activation)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(_col(table, "peak"))


@register_predictor("log_concentration")
def log_concentration(table: pl.DataFrame) -> np.ndarray:
    """log(peak / mean when firing): how spiky the feature is."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(_col(table, "peak") / _col(table, "mean_when_firing"))


@dataclass(frozen=True)
class PredictConfig(ConfigSection, section="predict"):
    """Which predictors enter the logistic regression, and the CV setup."""

    predictors: tuple[str, ...] = FROM_SCHEMA
    folds: int = FROM_SCHEMA
    seed: int = FROM_SCHEMA

    def _check(self) -> None:
        check_predictors(self.predictors, PREDICTORS, self.section)


def _active(table: pl.DataFrame) -> pl.DataFrame:
    missing = [c for c in ("feature", "active", "class") if c not in table.columns]
    if missing:
        raise ValueError(f"feature table lacks columns {missing}")
    return table.filter(pl.col("active"))


def _labelled(table: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Active features with a label, and how many active ones have none: a feature of
    class "insufficient" (its interval on r straddles a threshold) is neither survived
    nor not, so it is left out of the predictor's labels, its folds and its AUCs."""
    active = _active(table)
    unsure = (active.get_column("class") == INSUFFICIENT).fill_null(False)
    return active.filter(~unsure), int(unsure.sum())


def predictor_matrix(table: pl.DataFrame, names: tuple[str, ...]) -> np.ndarray:
    """[n_features, n_predictors] float64 matrix of the named predictors."""
    return np.column_stack([np.asarray(PREDICTORS[n](table), dtype=np.float64) for n in names])


def _model(seed: int) -> Pipeline:
    # Standardizing inside the pipeline fits the scaler on each training fold only.
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(max_iter=1000, random_state=seed)),
        ]
    )


def cross_validated(
    x: np.ndarray, y: np.ndarray, folds: int, seed: int
) -> tuple[list[float], np.ndarray]:
    """The study's cross-validation: stratified shuffled folds, `_model` fitted on each
    training part; the per-fold ROC AUCs and the out-of-fold probabilities. Both classes
    must have at least `folds` members (the callers check and say why not)."""
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_aucs, oof = [], np.full(y.size, np.nan)
    for train, test in cv.split(x, y):
        proba = _model(seed).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
        oof[test] = proba
        fold_aucs.append(float(roc_auc_score(y[test], proba)))
    return fold_aucs, oof


def predict_survival(
    feature_table: pl.DataFrame, cfg: PredictConfig = PredictConfig()
) -> dict[str, Any]:
    """Cross-validated logistic regression of survived (vs blurred or destroyed) over
    active features; "insufficient" features are left out (`_labelled`).

    Returns a dict: n, n_survived, n_insufficient (active features left out for want
    of evidence), n_dropped_nonfinite, predictors, auc_mean,
    auc_sd (sd over folds, ddof=0 as the reference study reports it), fold_aucs,
    coefficients (per standard
    deviation, fit on all rows), intercept, marginal_auc (raw predictor's AUC,
    may be < 0.5), marginal_auc_best (max(auc, 1 - auc)), oof_proba and
    oof_label and feature (arrays for ROC curves; oof_proba NaN where no fold scored
    a row), reason (None, or why AUCs are undefined). Degenerate data gives None
    AUCs and a reason, never an exception and never NaN.
    """
    active, n_insufficient = _labelled(feature_table)
    x_all = (
        predictor_matrix(active, cfg.predictors)
        if active.height
        else np.empty((0, len(cfg.predictors)))
    )
    finite = np.all(np.isfinite(x_all), axis=1)
    x = x_all[finite]
    y = (active.get_column("class") == "survived").to_numpy()[finite].astype(np.int64)
    feature = active.get_column("feature").to_numpy()[finite]
    n, n_pos = int(y.size), int(y.sum())
    nan_by_name: dict[str, float | None] = {p: None for p in cfg.predictors}
    out: dict[str, Any] = {
        "n": n,
        "n_survived": n_pos,
        "n_insufficient": n_insufficient,
        "n_dropped_nonfinite": int((~finite).sum()),
        "predictors": list(cfg.predictors),
        "auc_mean": None,
        "auc_sd": None,
        "fold_aucs": [],
        "coefficients": dict(nan_by_name),
        "intercept": None,
        "marginal_auc": dict(nan_by_name),
        "marginal_auc_best": dict(nan_by_name),
        "oof_proba": np.full(n, np.nan),
        "oof_label": y,
        "feature": feature,
        "reason": None,
    }
    minority = min(n_pos, n - n_pos)
    if n == 0:
        out["reason"] = "no active features with finite predictors" + (
            f" outside the {n_insufficient} of insufficient evidence" if n_insufficient else ""
        )
        return out
    if minority == 0:
        out["reason"] = f"only one class present ({'survived' if n_pos else 'not survived'})"
        return out

    for j, name in enumerate(cfg.predictors):
        auc = float(roc_auc_score(y, x[:, j]))
        out["marginal_auc"][name] = auc
        out["marginal_auc_best"][name] = max(auc, 1.0 - auc)
    full = _model(cfg.seed).fit(x, y)
    logreg = full.named_steps["logreg"]
    out["coefficients"] = {
        name: float(c) for name, c in zip(cfg.predictors, logreg.coef_[0], strict=True)
    }
    out["intercept"] = float(logreg.intercept_[0])

    if minority < cfg.folds:
        out["reason"] = f"minority class has {minority} members, fewer than folds={cfg.folds}"
        return out
    fold_aucs, out["oof_proba"] = cross_validated(x, y, cfg.folds, cfg.seed)
    out["fold_aucs"] = fold_aucs
    out["auc_mean"] = float(np.mean(fold_aucs))
    # Population sd over the folds (ddof=0): the reference study's convention, so the
    # comparison with its published spread is like for like.
    out["auc_sd"] = float(np.std(fold_aucs, ddof=0))
    return out


def survival_by_quantile(feature_table: pl.DataFrame, predictor: str, q: int) -> pl.DataFrame:
    """Survival fraction of active features per quantile bin of one predictor
    ("insufficient" features left out, as in `predict_survival`).

    Equal-count bins by rank (q=4 quartiles, q=10 deciles); tied values share a
    bin, so with ties some bins hold more features and an empty bin is omitted.
    Columns: predictor, bin (1..q, low to high), n, predictor_min,
    predictor_max, survived_frac.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor: unknown {predictor!r}; registered: {sorted(PREDICTORS)}")
    if q < 1:
        raise ValueError(f"q must be positive, got {q}")
    active, _ = _labelled(feature_table)
    values = np.asarray(PREDICTORS[predictor](active), dtype=np.float64)
    keep = np.isfinite(values)
    values = values[keep]
    survived = (active.get_column("class") == "survived").to_numpy()[keep]
    if values.size == 0:
        raise ValueError(f"no active features with a finite {predictor!r}")
    ranks = rankdata(values, method="average")
    bins = np.minimum(q - 1, np.floor((ranks - 0.5) * q / values.size)).astype(np.int64) + 1
    return (
        pl.DataFrame({"bin": bins, "value": values, "survived": survived})
        .group_by("bin")
        .agg(
            pl.len().alias("n"),
            pl.col("value").min().alias("predictor_min"),
            pl.col("value").max().alias("predictor_max"),
            pl.col("survived").mean().alias("survived_frac"),
        )
        .sort("bin")
        .select(pl.lit(predictor).alias("predictor"), pl.all())
    )


@dataclass(frozen=True)
class PredictTables:
    """The predict stage's four tables."""

    summary: pl.DataFrame  # per variant: n, n_survived, n_insufficient, CV AUC, intercept, reason
    coefficients: pl.DataFrame  # per variant and predictor: coefficient, marginal AUCs
    oof: pl.DataFrame  # per variant and feature: out-of-fold probability (null: unscored), label
    quantiles: pl.DataFrame  # per variant, predictor and q: survival by quantile bin


def predict_tables(by_variant: dict[str, pl.DataFrame], cfg: PredictConfig) -> PredictTables:
    """`predict_survival` and `survival_by_quantile` for every compressed variant's features.

    The null variant is skipped: every feature survives it by construction.
    """
    from .variants import parse_variant

    rows, coefficients, oof, quantiles = [], [], [], []
    for variant, table in by_variant.items():
        if parse_variant(variant).kind == "null":
            continue
        res = predict_survival(table, cfg)
        rows.append({"variant": variant, **{k: res[k] for k in _SUMMARY}})
        for name in cfg.predictors:
            coefficients.append(
                {
                    "variant": variant,
                    "predictor": name,
                    "coefficient": res["coefficients"].get(name),
                    "marginal_auc": res["marginal_auc"].get(name),
                    "marginal_auc_best": res["marginal_auc_best"].get(name),
                }
            )
            if res["n"] == 0:
                continue  # no active feature: no quantile bins (the summary says why)
            for q in (4, 10):
                quantiles.append(
                    survival_by_quantile(table, name, q).with_columns(
                        pl.lit(variant).alias("variant"), pl.lit(q).alias("q")
                    )
                )
        oof.append(
            pl.DataFrame(
                {
                    "variant": variant,
                    "feature": np.asarray(res["feature"], dtype=np.int32),
                    # null where no fold scored the row (too few of a class for the folds)
                    "proba": pl.Series(np.asarray(res["oof_proba"], dtype=np.float64)).fill_nan(
                        None
                    ),
                    "label": np.asarray(res["oof_label"], dtype=bool),
                }
            )
        )
    by_q = (
        pl.concat(quantiles, how="vertical_relaxed")
        if quantiles
        else pl.DataFrame(schema=_QUANTILE_SCHEMA)
    )
    return PredictTables(
        summary=pl.DataFrame(
            rows,
            schema_overrides={
                "reason": pl.String,
                **{k: pl.Float64 for k in ("auc_mean", "auc_sd", "intercept")},
            },
        ),
        coefficients=pl.DataFrame(
            coefficients,
            schema_overrides={
                k: pl.Float64 for k in ("coefficient", "marginal_auc", "marginal_auc_best")
            },
        ),
        oof=pl.concat(oof, how="vertical_relaxed"),
        quantiles=by_q.select("variant", "predictor", "q", pl.exclude("variant", "predictor", "q")),
    )


_SUMMARY = ("n", "n_survived", "n_insufficient", "auc_mean", "auc_sd", "intercept", "reason")
_QUANTILE_SCHEMA = {
    "variant": pl.String, "predictor": pl.String, "q": pl.Int32, "bin": pl.Int64, "n": pl.UInt32,
    "predictor_min": pl.Float64, "predictor_max": pl.Float64, "survived_frac": pl.Float64,
}  # fmt: skip
