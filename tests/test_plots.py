"""Figures and report tables from small synthetic tables, and the figure registry
against the workflow's rules and captions."""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import shlex
from pathlib import Path

import matplotlib.colors
import numpy as np
import polars as pl
import pytest
from matplotlib.collections import PathCollection

from sae_audit import config as audit_config
from sae_audit import plots, report_tables
from sae_audit.cli import main as cli_main
from sae_audit.figures import (
    FIGURE_REGISTRY,
    FigureCallError,
    figure_formats,
    figure_names,
    get_figure,
)

from .conftest import TEST_CONFIG, snakemake

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR = ROOT / "workflow" / "report"
VARIANTS = ["rtn-int8", "rtn-int4", "prune-matched-rtn-int4", "fp-null"]
PREDICTORS = ["rarity", "log_mean", "log_peak", "log_concentration"]
N_FEATURES = 50
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The inputs each figure's rule passes, in order (table stems under tables/{model}/).
FIGURE_INPUTS = {name: [Path(t).stem for t in fig.inputs] for name, fig in FIGURE_REGISTRY.items()}
# Non-default class thresholds (the config's analysis slice).
THRESHOLDS = {"active_rate": 0.001, "survived": 0.8, "destroyed": 0.3}
# Non-default causal class thresholds (config causal.survived / causal.destroyed), which
# the figures that draw them get under params["causal"].
CAUSAL_THRESHOLDS = {"survived": 0.85, "destroyed": 0.4}
# The causal table's variants: the noise null too (a control, drawn like the others).
CAUSAL_VARIANTS = [*VARIANTS, "fp-noise"]
DISSOCIATIONS = ("fires_same_acts_differently", "acts_same_fires_differently")


def _classify(r: float) -> str:
    return "survived" if r > 0.9 else "blurred" if r >= 0.5 else "destroyed"


def _features(rng: np.random.Generator) -> pl.DataFrame:
    firing_rate = 10 ** rng.uniform(-4, -1, N_FEATURES)
    mean = rng.lognormal(0, 0.5, N_FEATURES)
    peak = mean * rng.uniform(1.5, 6, N_FEATURES)
    active = firing_rate > 0.001
    # damage grows with rarity, so the predictor has something to find
    base = np.clip(0.3 * (np.log10(1 / firing_rate) - 1) + rng.normal(0, 0.15, N_FEATURES), 0, 2)
    scale = {"rtn-int8": 0.02, "rtn-int4": 1.0, "prune-matched-rtn-int4": 0.9, "fp-null": 0.0}
    rows = []
    for v in VARIANTS:
        sd = {"rtn-int8": 0.005, "fp-null": 0.0}.get(v, 0.05)  # rtn-int8: every feature survives
        noise = rng.normal(0, sd, N_FEATURES) if sd else np.zeros(N_FEATURES)
        damage = np.clip(scale[v] * base + np.abs(noise) * (v != "fp-null"), 0, 2)
        r = 1 - damage
        for f in range(N_FEATURES):
            rows.append(
                {
                    "variant": v,
                    "feature": f,
                    "firing_count": int(firing_rate[f] * 10000),
                    "firing_rate": float(firing_rate[f]),
                    "mean_when_firing": float(mean[f]),
                    "peak": float(peak[f]),
                    "sum": float(mean[f] * firing_rate[f] * 10000),
                    "sum_sq": 1.0,
                    "n_tokens": 10000,
                    "r": float(r[f]),
                    "flag": None,
                    "fp_fire_count": int(firing_rate[f] * 10000),
                    "variant_fire_count": int(firing_rate[f] * 10000),
                    "active": bool(active[f]),
                    "class": _classify(r[f]) if active[f] else None,
                    "damage": float(damage[f]),
                }
            )
    return pl.DataFrame(rows, schema_overrides={"flag": pl.String, "class": pl.String})


def _survival(features: pl.DataFrame, perplexity: pl.DataFrame) -> pl.DataFrame:
    active = features.filter(pl.col("active"))
    summary = (
        active.group_by("variant", maintain_order=True)
        .agg(
            pl.len().alias("n_active"),
            *[(pl.col("class") == c).sum().alias(f"n_{c}") for c in plots.CLASSES],
            pl.col("r").mean().alias("mean_r"),
            pl.col("r").median().alias("median_r"),
            pl.lit(0).alias("n_variant_silent"),
        )
        .with_columns(
            *[
                (100 * pl.col(f"n_{c}") / pl.col("n_active")).alias(f"{c}_pct")
                for c in plots.CLASSES
            ]
        )
    )
    return summary.join(perplexity, on="variant", how="left")


def _sae_quality() -> pl.DataFrame:
    """The SAE's reconstruction quality per variant (a report table; columns: tables.schema.yaml)."""
    variants = ["fp", "rtn-int8", "rtn-int4", "prune-matched-rtn-int4", "fp-null"]
    return pl.DataFrame(
        {
            "variant": variants,
            "n_positions": [6144] * len(variants),
            "explained_variance": [0.9, 0.89, 0.7, 0.72, 0.9],
            "mse": [0.1, 0.11, 0.3, 0.28, 0.1],
            "l0": [12.0, 12.1, 15.0, 14.0, 12.0],
            "dead_fraction": [0.01, 0.01, 0.02, 0.02, 0.01],
            "hook": ["blocks.0.hook_resid_post"] * len(variants),
            "sae_prepend_bos": [True] * len(variants),
            "tokens_bos": [True] * len(variants),
            "normalize_activations": ["none"] * len(variants),
            "centered": [False] * len(variants),
        }
    )


def _forecast_accuracy(features: pl.DataFrame) -> pl.DataFrame:
    """The real forecast_accuracy on a forecast that is the measured damage plus noise."""
    from sae_audit.forecast import forecast_accuracy

    rng = np.random.default_rng(3)
    damage = features["damage"].fill_null(0.0).to_numpy()
    noisy = np.clip(damage + rng.normal(0, 0.02, damage.size), 0, 0.99)
    forecast = features.select(
        "variant",
        pl.col("feature").cast(pl.Int32),
        fp_variance=pl.lit(1.0),
        noise_variance=pl.Series(1 / (1 - noisy) ** 2 - 1),
        forecast_r=pl.Series(1 - noisy),
        forecast_damage=pl.Series(noisy),
        silent=pl.lit(False),
        top_source=pl.lit("gpt_neox.layers.0.mlp.dense_h_to_4h.weight"),
        top_source_fraction=pl.lit(0.5),
    )
    return forecast_accuracy(forecast, features, fit_on=["rtn-int4"])


def _protect() -> pl.DataFrame:
    from sae_audit.table_docs import polars_schema

    row = {
        "variant": "protect-w", "watchlist": "top 32 by FP firing count", "n_watch": 32,
        "budget": "5.25 bits/weight", "n_protected": 1,
        "protected": "gpt_neox.layers.0.mlp.dense_h_to_4h.weight=int8",
        "predicted_watch_survived_pct": 100.0, "achieved_watch_survived_pct": 96.875,
        "base_predicted_watch_survived_pct": 62.5, "predicted_bits_per_weight": 4.85,
        "built_bits_per_weight": 4.85, "base_bits_per_weight": 4.19, "solver": "milp",
        "gap": 0.0,
    }  # fmt: skip
    return pl.DataFrame([row], schema=polars_schema("protect"))


def _perplexity() -> pl.DataFrame:
    dppl = {"fp": 0.0, "rtn-int8": 0.1, "rtn-int4": 14.0, "prune-matched-rtn-int4": 13.5}
    dppl["fp-null"] = 0.0
    return pl.DataFrame(
        {
            "variant": list(dppl),
            "n_scored_chunked": [6144] * len(dppl),
            "ppl_chunked": [30 * (1 + d / 100) for d in dppl.values()],
            "ppl_sliding": [28 * (1 + d / 100) for d in dppl.values()],
            "n_scored_sliding": [6000] * len(dppl),
            "dppl_chunked_pct": list(dppl.values()),
            "dppl_sliding_pct": [d * 0.9 for d in dppl.values()],
        }
    )


def _predict(features: pl.DataFrame, rng: np.random.Generator):
    summary, coefs, oof, quantiles = [], [], [], []
    for v in VARIANTS:
        if v == "fp-null":
            continue
        t = features.filter(pl.col("variant") == v, pl.col("active"))
        label = (t["class"] == "survived").to_numpy()
        one_class = label.all() or not label.any()
        proba = (
            np.full(t.height, np.nan)
            if one_class
            else np.clip(label * 0.6 + rng.uniform(0, 0.5, t.height), 0, 1)
        )
        nan = float("nan")
        summary.append(
            {
                "variant": v,
                "n": t.height,
                "n_survived": int(label.sum()),
                "auc_mean": nan if one_class else 0.9,
                "auc_sd": nan if one_class else 0.03,
                "intercept": nan if one_class else 0.2,
                "reason": "only one class present (survived)" if one_class else None,
            }
        )
        for i, p in enumerate(PREDICTORS):
            coefs.append(
                {
                    "variant": v,
                    "predictor": p,
                    "coefficient": nan if one_class else (-1.0 + 0.4 * i),
                    "marginal_auc": nan if one_class else 0.3 + 0.1 * i,
                    "marginal_auc_best": nan if one_class else 0.7 - 0.05 * i,
                }
            )
            for q in (4, 10):
                for b in range(1, q + 1):
                    quantiles.append(
                        {
                            "variant": v,
                            "predictor": p,
                            "q": q,
                            "bin": b,
                            "n": 5,
                            "predictor_min": 2.0 + 0.5 * b,
                            "predictor_max": 2.4 + 0.5 * b,
                            "survived_frac": 1.0 if one_class else max(0.0, 1 - b / q),
                        }
                    )
        oof.append(
            pl.DataFrame(
                {"variant": v, "feature": t["feature"], "proba": proba, "label": label},
                schema_overrides={"feature": pl.Int32},
            )
        )
    return (
        pl.DataFrame(summary, schema_overrides={"reason": pl.String}),
        pl.DataFrame(coefs),
        pl.concat(oof),
        pl.DataFrame(quantiles),
    )


def _overlap() -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "variant_a": a,
                "variant_b": "prune-matched-rtn-int4",
                "n": 45,
                "n_active_a": 45,
                "n_active_b": 45,
                "spearman": s,
                "spearman_p": 0.0,
                "pearson": s,
                "pearson_p": 0.0,
                "n_nonsurviving_a": 10,
                "n_nonsurviving_b": 12,
                "jaccard_nonsurviving": 0.8,
                "n_blurred_a": 5,
                "n_blurred_b": 6,
                "jaccard_blurred": 0.7,
                "n_destroyed_a": 5,
                "n_destroyed_b": 6,
                "jaccard_destroyed": 0.6,
                # the baselines: the null variant's Spearman, chance Jaccard and p-value
                "spearman_null": 0.41 if s == s else None,
                "jaccard_nonsurviving_chance": 0.12,
                "jaccard_nonsurviving_p": 3e-5,
            }
            for a, s in (("rtn-int8", float("nan")), ("rtn-int4", 0.95))
        ]
    )


def _stability() -> pl.DataFrame:
    rows = []
    for v in VARIANTS:
        base = {"rtn-int8": 98.0, "rtn-int4": 55.0, "prune-matched-rtn-int4": 60.0}.get(v, 100.0)
        for f in (0.125, 0.25, 0.5, 1.0):
            rows.append((v, "budget", f, None, int(6144 * f), 45, base - 5 * (1 - f)))
        for i in range(3):
            rows.append((v, "subset", 0.5, i, 3072, 45, base - 2.5 + i))
    return pl.DataFrame(
        [
            {
                "variant": v,
                "selection": s,
                "fraction": f,
                "subset": i,
                "n_tokens": n,
                "n_active": a,
                "survived_pct": p,
                "blurred_pct": (100 - p) / 2,
                "destroyed_pct": (100 - p) / 2,
            }
            for v, s, f, i, n, a, p in rows
        ],
        schema_overrides={"subset": pl.Int64},
    )


def _threshold_grid(features: pl.DataFrame) -> pl.DataFrame:
    rows = []
    for v in VARIANTS:
        r = features.filter(pl.col("variant") == v, pl.col("active"))["r"]
        for hi in (0.8, 0.85, 0.9, 0.95):
            for lo in (0.3, 0.4, 0.5, 0.6):
                counts = {
                    "survived": int((r > hi).sum()),
                    "destroyed": int((r < lo).sum()),
                }
                counts["blurred"] = r.len() - counts["survived"] - counts["destroyed"]
                counts["insufficient"] = 0
                rows.append(
                    {
                        "variant": v,
                        "survived_threshold": hi,
                        "destroyed_threshold": lo,
                        "n_active": r.len(),
                        **{f"n_{c}": counts[c] for c in plots.CLASSES},
                        **{f"{c}_pct": 100 * counts[c] / r.len() for c in plots.CLASSES},
                    }
                )
    return pl.DataFrame(rows)


def _equal_bits() -> pl.DataFrame:
    """A summary row and one saved feature's context row, in the stage's schema."""
    from sae_audit.equal_bits import SCHEMA

    pair = {"rtn_variant": "rtn-int4", "shipped_variant": "lc-gptq-w4a16", "bits": 4}
    rows = [
        {**pair, "direction": "summary", "n_active": 45, "n_destroyed_rtn": 5,
         "n_destroyed_shipped": 3, "n_saved": 3, "n_lost": 1, "jaccard_destroyed": 0.4},
        {**pair, "direction": "saved_by_shipped", "rank": 1, "feature": 3, "firing_rate": 0.01,
         "r_rtn": 0.1, "r_shipped": 0.95, "class_rtn": "destroyed", "class_shipped": "survived",
         "context_rank": 1, "position": 10, "context": "the ⟦cat⟧ sat", "fp_value": 2.0,
         "rtn_value": 0.0, "shipped_value": 1.9},
    ]  # fmt: skip
    return pl.DataFrame(rows, schema=SCHEMA)


def _outliers() -> pl.DataFrame:
    """Two layers of block matrices and residual statistics, in the stage's schema; one
    matrix with a constant weight (null kurtosis and ratios, with a reason)."""
    from sae_audit.outliers import SCHEMA

    rows = []
    for layer in range(2):
        for i, matrix in enumerate(("attention.query_key_value", "mlp.dense_h_to_4h")):
            constant = layer == 1 and i == 0
            rows.append(
                {"scope": "matrix", "layer": layer, "name": f"l.{layer}.{matrix}.weight",
                 "matrix": matrix, "n_out": 96, "n_in": 32,
                 "weight_kurtosis": None if constant else 3.0 + 5 * layer * i,
                 "row_absmax_ratio": None if constant else 1.6,
                 "col_absmax_ratio": None if constant else 1.5 + 20 * layer * i,
                 "top_col": 5, "reason": "constant matrix" if constant else None}
            )  # fmt: skip
        rows.append(
            {"scope": "layer", "layer": layer, "name": f"blocks.{layer}.hook_resid_post",
             "n_tokens": 4096, "act_kurtosis": 3.0 + 40 * layer, "dim_ratio": 1.5 + 30 * layer,
             "top_dim": 5, "first_token_norm_ratio": 1.2 + 8 * layer,
             "sink_score": 0.05 + 0.6 * layer, "sink_uniform": 0.03}
        )  # fmt: skip
    return pl.DataFrame(rows, schema=SCHEMA)


def _damaged_contexts() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "variant": ["rtn-int4"] * 4,
            "feature": [3, 3, 7, 7],
            "damage_rank": [1, 1, 2, 2],
            "r": [0.1, 0.1, 0.3, 0.3],
            "context_rank": [1, 2, 1, 2],
            "position": [10, 200, 31, 45],
            "context": ["the ⟦cat⟧ sat", "a <b>&amp; ⟦dog⟧", "on ⟦the⟧ mat", "x ⟦y⟧ z"],
            "fp_value": [2.0, 1.5, 3.0, 0.5],
            "variant_value": [0.0, 0.2, 1.0, 0.0],
        }
    )


def _dissociation(pearson: str | None, causal: str) -> str | None:
    if pearson == "survived" and causal in ("blurred", "destroyed"):
        return DISSOCIATIONS[0]
    if pearson in ("blurred", "destroyed") and causal == "survived":
        return DISSOCIATIONS[1]
    return None


def _causal(rng: np.random.Generator, n: int = 24) -> pl.DataFrame:
    """causal.parquet (issue 14; columns: tables.schema.yaml) of n features per variant: the null run equal to FP
    (r = agreement = 1 exactly), the noise null and rtn-int8 barely off, dissociations
    planted in rtn-int4 (three that fire the same and act differently, two the reverse),
    and in the matched pruning a causally insufficient feature (agreement stored as 0)
    and a feature without r. Classes are the point cuts at 0.9 / 0.5."""
    scale = {"rtn-int8": 1e-4, "rtn-int4": 0.3, "prune-matched-rtn-int4": 0.4}
    scale |= {"fp-null": 0.0, "fp-noise": 1e-5}
    rows = []
    for v in CAUSAL_VARIANTS:
        r = 1 - scale[v] * rng.uniform(0.05, 2.0, n)
        agreement = 1 - scale[v] * rng.uniform(0.05, 2.0, n)
        if v == "rtn-int4":
            r[:3], agreement[:3] = 0.99, 0.2  # fires the same, acts differently
            r[3:5], agreement[3:5] = 0.3, 0.97  # acts the same, fires differently
        causal_class = [_classify(a) for a in agreement]
        pearson_class: list[str | None] = [_classify(x) for x in r]
        r_col: list[float | None] = [float(x) for x in r]
        if v == "prune-matched-rtn-int4":
            causal_class[5], agreement[5] = "insufficient", 0.0
            r_col[6], pearson_class[6] = None, None
        for f in range(n):
            rows.append(
                {"feature": f, "variant": v, "mean_when_firing": 1.5, "fp_fire_count": 40,
                 "variant_fire_count": 40, "ablation_kl_fp": 0.02, "ablation_kl_variant": 0.02,
                 "ablation_kl_r": float(agreement[f]), "ablation_kl_ratio": 1.0,
                 "ablation_logit_cos": float(agreement[f]), "ablation_top_overlap_fraction": 0.9,
                 "ablation_flag": "fp_silent" if causal_class[f] == "insufficient" else None,
                 "steering_kl_fp": 0.1, "steering_kl_variant": 0.1,
                 "steering_kl_r": float(agreement[f]), "steering_kl_ratio": 1.0,
                 "steering_logit_cos": float(agreement[f]), "steering_top_overlap_fraction": 0.9,
                 "steering_flag": None, "direct_logit_cos": 1.0, "direct_top_overlap_fraction": 1.0,
                 "direct_flag": None, "causal_agreement": float(agreement[f]),
                 "causal_class": causal_class[f], "r": r_col[f],
                 "pearson_class": pearson_class[f],
                 "dissociation": _dissociation(pearson_class[f], causal_class[f])}
            )  # fmt: skip
    text = ("ablation_flag", "steering_flag", "direct_flag", "pearson_class", "dissociation")
    return pl.DataFrame(
        rows,
        schema_overrides={"feature": pl.Int32, "r": pl.Float64, **dict.fromkeys(text, pl.String)},
    )


def _causal_report_tables(causal: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The causal report tables: the per-variant summary (sae_audit.causal_survival) and
    the dissociated features with a context each."""
    from sae_audit.causal_survival import causal_summary

    columns = ["variant", "feature", "dissociation", "r", "pearson_class", "causal_agreement",
               "causal_class", "ablation_kl_r", "ablation_logit_cos", "steering_kl_r",
               "steering_logit_cos", "direct_logit_cos"]  # fmt: skip
    rows = causal.filter(pl.col("dissociation").is_not_null()).select(columns)
    disagreements = rows.with_columns(
        pl.lit(1, dtype=pl.Int64).alias("context_rank"),
        pl.lit(10, dtype=pl.Int64).alias("position"),
        pl.lit("the ⟦cat⟧ sat").alias("context"),
        pl.lit(2.0).alias("fp_value"),
        pl.lit(1.9).alias("variant_value"),
    )
    return {"causal_survival": causal_summary(causal), "causal_disagreements": disagreements}


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("tables")
    features = _features(rng)
    perplexity = _perplexity()
    summary, coefs, oof, quantiles = _predict(features, rng)
    frames = {
        "features": features,
        "perplexity": perplexity,
        "survival": _survival(features, perplexity.filter(pl.col("variant") != "fp")),
        "predict": summary,
        "predict_coefficients": coefs,
        "predict_oof": oof,
        "survival_by_quantile": quantiles,
        "overlap": _overlap(),
        "stability": _stability(),
        "threshold_grid": _threshold_grid(features),
        "damaged_contexts": _damaged_contexts(),
        "equal_bits": _equal_bits(),
        "outliers": _outliers(),
        "sae_quality": _sae_quality(),
        "causal": _causal(np.random.default_rng(1)),
        "forecast_accuracy": _forecast_accuracy(features),
        "protect": _protect(),
    }
    frames |= _causal_report_tables(frames["causal"])
    paths = {}
    for name, frame in frames.items():
        paths[name] = out / f"{name}.parquet"
        frame.write_parquet(paths[name])
    return paths


def _assert_png(path: Path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"


def test_figure_inputs_cover_figures(tables):
    assert len(FIGURE_INPUTS) == 12
    for name, stems in FIGURE_INPUTS.items():
        assert stems and set(stems) <= set(tables), name


@pytest.mark.parametrize("name", sorted(FIGURE_INPUTS))
def test_figure_writes_png(name, tables, tmp_path):
    out = tmp_path / "fig" / f"{name}.png"
    get_figure(name).draw(*(tables[t] for t in FIGURE_INPUTS[name]), out=out)
    _assert_png(out)


def test_cli_plot(tables, tmp_path):
    out = tmp_path / "cli.png"
    cli_main(
        [
            "plot",
            "roc_curves",
            "--inputs",
            str(tables["predict_oof"]),
            str(tables["predict"]),
            "--out",
            str(out),
        ]
    )
    _assert_png(out)
    # the analysis slice reaches the figures that draw thresholds
    hist = tmp_path / "hist.png"
    args = ["--inputs", str(tables["features"]), "--out", str(hist)]
    cli_main(["plot", "correlation_histograms", "--analysis", json.dumps(THRESHOLDS), *args])
    _assert_png(hist)
    with pytest.raises(SystemExit, match="unknown figure '_save'"):
        cli_main(["plot", "_save", "--inputs", "x", "--out", str(out)])
    with pytest.raises(SystemExit, match="reads 2 table"):
        cli_main(["plot", "roc_curves", *args])
    with pytest.raises(SystemExit, match="takes no params"):
        cli_main(["plot", "stability", "--analysis", json.dumps(THRESHOLDS), *args])


def test_cli_report_table(tables, tmp_path):
    page, csv = tmp_path / "s.html", tmp_path / "s.csv"
    cli_main(["report-tables", "--input", str(tables["survival"]), "--out", str(page), str(csv)])
    assert "<table>" in page.read_text() and pl.read_csv(csv).height > 0


def _spy_save(monkeypatch) -> dict[str, list]:
    """The visible axes of every figure drawn from now on, by output stem."""
    captured: dict[str, list] = {}
    save = plots._save

    def spy(fig, path):
        captured[Path(path).stem] = [fig, [ax for ax in fig.axes if ax.get_visible()]]
        save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return captured


def _vlines(ax) -> set[float]:
    """x positions of the dashed vertical reference lines of an axes."""
    return {
        round(float(line.get_xdata()[0]), 6)
        for line in ax.lines
        if line.get_linestyle() == "--" and len(set(line.get_xdata())) == 1
    }


@pytest.mark.parametrize("params", [None, THRESHOLDS], ids=["defaults", "configured"])
def test_figures_draw_the_configured_thresholds(params, tables, tmp_path, monkeypatch):
    """The class thresholds the figures draw are the analysis slice's (the schema's
    defaults, 0.9 / 0.5, only without params)."""
    survived, destroyed = (0.9, 0.5) if params is None else (0.8, 0.3)
    assert plots.thresholds(params).survived == survived
    assert plots.damage_cuts(params) == pytest.approx((1 - survived, 1 - destroyed))
    captured = _spy_save(monkeypatch)
    for name, fig in FIGURE_REGISTRY.items():
        if fig.thresholds:
            fig.draw(
                *(tables[t] for t in FIGURE_INPUTS[name]),
                out=tmp_path / f"{name}.png",
                # the causal thresholds ride along only to the figures that draw them
                params={**params, "causal": CAUSAL_THRESHOLDS} if params and fig.causal else params,
            )
    assert {n for n, f in FIGURE_REGISTRY.items() if f.thresholds} == set(captured)

    # both draw the thresholds on the damage scale, 1 - r
    cuts = {round(1 - survived, 6), round(1 - destroyed, 6)}
    hist_fig, hist_axes = captured["correlation_histograms"]
    assert all(_vlines(ax) == cuts for ax in hist_axes)
    assert f"r = {survived:g} / {destroyed:g}" in hist_fig.get_suptitle()

    scatter_fig, scatter_axes = captured["rtn_vs_pruning_scatter"]
    assert all(_vlines(ax) == cuts for ax in scatter_axes)
    assert f"r = {survived:g} / {destroyed:g}" in scatter_fig.get_suptitle()
    # the cell counts follow the thresholds: the features put in the same class by both
    # variants (the diagonal cells), counted with the configured cuts
    features = pl.read_parquet(tables["features"]).filter(pl.col("active"))
    lo, hi = sorted(cuts)
    cls = pl.when(pl.col("damage") < lo).then(0).when(pl.col("damage") < hi).then(1).otherwise(2)
    by_variant = {
        v: features.filter(pl.col("variant") == v).sort("feature").select(cls)[:, 0].to_list()
        for v in ("rtn-int4", "prune-matched-rtn-int4")
    }
    (ax,) = [a for a in scatter_axes if a.get_xlabel().endswith("rtn-int4")]
    cells = [int(t.get_text()) for t in ax.texts]
    expected = np.histogram2d(
        by_variant["rtn-int4"], by_variant["prune-matched-rtn-int4"], bins=[-0.5, 0.5, 1.5, 2.5]
    )[0]
    assert cells == [int(c) for c in expected.ravel()]

    # causal vs Pearson: the Pearson cuts as dashed verticals on 1 - r, the causal cuts
    # (params["causal"], the schema's 0.9 / 0.5 without it) as dash-dotted horizontals
    c_survived, c_destroyed = (0.9, 0.5) if params is None else (0.85, 0.4)
    causal_cuts = {round(1 - c_survived, 6), round(1 - c_destroyed, 6)}
    causal_fig, causal_axes = captured["causal_vs_pearson"]
    assert all(_vlines(ax) == cuts for ax in causal_axes)
    for ax in causal_axes:
        hlines = {
            round(float(line.get_ydata()[0]), 6)
            for line in ax.lines
            if line.get_linestyle() == "-." and len(set(line.get_ydata())) == 1
        }
        assert hlines == causal_cuts
    assert f"dash-dotted at {1 - c_survived:.3g} / {1 - c_destroyed:.3g}" in (
        causal_fig.get_suptitle()
    )
    legend = " ".join(t.get_text() for t in causal_fig.legends[0].get_texts())
    assert f"r = {survived:g} / {destroyed:g}" in legend
    assert f"agreement = {c_survived:g} / {c_destroyed:g}" in legend


def test_figure_structure(tables, tmp_path, monkeypatch):
    """Inspect the matplotlib figures before they are saved."""
    captured = {}
    save = plots._save

    def spy(fig, path):
        captured[Path(path).stem] = {
            "axes": [ax for ax in fig.axes if ax.get_visible()],
            "titles": [ax.get_title() for ax in fig.axes],
        }
        save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    for name in ("correlation_histograms", "rtn_vs_pruning_scatter", "roc_curves", "coefficients"):
        plots.__dict__[name](
            *(tables[t] for t in FIGURE_INPUTS[name]), out=tmp_path / f"{name}.png"
        )

    # one histogram facet per variant, stacked by class (4 bar containers, insufficient too)
    hist_axes = captured["correlation_histograms"]["axes"]
    assert sorted(ax.get_title() for ax in hist_axes) == sorted(VARIANTS)
    assert len(plots.CLASSES) == 4 and set(plots.PALETTE) == set(plots.CLASSES)
    assert all(len(ax.containers) == 4 for ax in hist_axes)
    # one scatter facet per pair of a variant and its matched pruning: rtn-int4 against
    # prune-matched-rtn-int4, not rtn-int8 against it; RTN on x, Spearman in the title
    (scatter,) = captured["rtn_vs_pruning_scatter"]["axes"]
    assert scatter.get_xlabel().endswith("rtn-int4")
    assert scatter.get_ylabel().endswith("prune-matched-rtn-int4")
    # each number beside its baseline: the null's Spearman, the chance Jaccard and p
    assert "Spearman $\\rho$ = 0.950 (null 0.410)" in scatter.get_title()
    assert "= 0.80 (chance 0.12, p = 3e-05)" in scatter.get_title()
    # 4 damage lines (2 cuts x 2 axes) + diagonal
    assert len(scatter.lines) >= 5
    # ROC: rtn-int8 has one class only (NaN AUC) and is listed as not shown, fp-null is left out
    (roc,) = captured["roc_curves"]["axes"]
    labels = [" ".join(t.get_text().split()) for t in roc.get_legend().get_texts()]
    curves = [line.get_label() for line in roc.lines]
    assert any(lab.startswith("rtn-int4 (AUC 0.900") for lab in curves)
    assert any(lab.startswith("prune-matched-rtn-int4") for lab in curves)
    assert not any("rtn-int8" in lab or "fp-null" in lab for lab in curves)
    assert "not shown: rtn-int8: only one class present (survived)" in labels
    assert not any("fp-null" in lab for lab in labels)
    # coefficients: two panels, bars only for the variants with finite values
    coef_axes = captured["coefficients"]["axes"]
    assert len(coef_axes) == 2
    assert all(len(ax.patches) >= 2 * len(PREDICTORS) for ax in coef_axes)


def test_no_pruning_pairs(tables, tmp_path):
    """A config without pruning: overlap.parquet has no rows (and no columns)."""
    empty = tmp_path / "overlap.parquet"
    pl.DataFrame().write_parquet(empty)
    out = tmp_path / "scatter.png"
    plots.rtn_vs_pruning_scatter(tables["features"], empty, out=out)
    _assert_png(out)
    no_rtn = tmp_path / "features_no_rtn.parquet"
    pl.read_parquet(tables["features"]).filter(pl.col("variant") == "fp-null").write_parquet(no_rtn)
    plots.correlation_histograms(no_rtn, out=tmp_path / "hist.png")
    _assert_png(tmp_path / "hist.png")


def test_all_nan_predictor(tables, tmp_path):
    """Every AUC NaN (one class everywhere): the predictor figures still draw, saying why."""
    nan_coefs = pl.read_parquet(tables["predict_coefficients"]).with_columns(
        pl.lit(float("nan")).alias(c) for c in ("coefficient", "marginal_auc", "marginal_auc_best")
    )
    nan_oof = pl.read_parquet(tables["predict_oof"]).with_columns(
        pl.lit(float("nan")).alias("proba")
    )
    nan_predict = pl.read_parquet(tables["predict"]).with_columns(
        pl.lit(float("nan")).alias("auc_mean"), pl.lit("only one class present").alias("reason")
    )
    paths = {}
    for name, frame in (("c", nan_coefs), ("o", nan_oof), ("p", nan_predict)):
        paths[name] = tmp_path / f"{name}.parquet"
        frame.write_parquet(paths[name])
    plots.coefficients(paths["c"], out=tmp_path / "coef.png")
    plots.roc_curves(paths["o"], paths["p"], out=tmp_path / "roc.png")
    _assert_png(tmp_path / "coef.png")
    _assert_png(tmp_path / "roc.png")


def test_report_table_csv_and_html(tables, tmp_path):
    csv, page = tmp_path / "t.csv", tmp_path / "t.html"
    report_tables.report_table(tables["damaged_contexts"], out=csv)
    report_tables.report_table(tables["damaged_contexts"], out=page)
    back = pl.read_csv(csv)
    assert back.height == 4 and "⟦cat⟧" in back["context"][0]
    text = page.read_text(encoding="utf-8")
    assert text.count("<tr>") == 5  # header + 4 rows
    assert "⟦cat⟧" in text and "&lt;b&gt;&amp;amp;" in text  # escaped, not interpreted
    assert '<meta charset="utf-8">' in text
    report_tables.report_table(tables["predict"], out=page)
    assert "NaN" in page.read_text() and "—" in page.read_text()  # NaN AUC, null reason
    with pytest.raises(ValueError):
        report_tables.report_table(tables["predict"], out=tmp_path / "t.txt")


def test_every_figure_has_function_and_caption():
    """Registry, plotting functions and captions agree, with no stray caption."""
    for name, fig in FIGURE_REGISTRY.items():
        fn = getattr(plots, fig.function, None)
        assert callable(fn) and not fig.function.startswith("_"), f"plots.{fig.function} missing"
        assert fig.load() is fn
        params = list(inspect.signature(fn).parameters.values())
        # (*inputs, out, variants=None), with params=None before variants for the figures
        # that draw thresholds
        tail = ["out", "params", "variants"] if fig.thresholds else ["out", "variants"]
        assert [p.name for p in params[-len(tail) :]] == tail, f"plots.{name}: {params}"
        assert len(params) == len(fig.inputs) + len(tail), f"plots.{name} inputs vs registry"
        assert fig.caption == f"{name}.rst"
        caption = REPORT_DIR / fig.caption
        assert caption.is_file() and len(caption.read_text().split()) > 40, caption
        assert re.fullmatch(r"\d\. [A-Z].*", fig.category), fig.category
        for template in fig.inputs:
            assert template.startswith(
                ("{model}/{sae}/", "{model}/perplexity.parquet", "{model}/outliers.parquet")
            )
    captions = {p.name for p in REPORT_DIR.glob("*.rst")}
    assert captions - {f.caption for f in FIGURE_REGISTRY.values()} == {
        "workflow.rst",
        "tables.rst",
        "feature_table.rst",  # the interactive per-feature table (rule feature_table)
        "columns.rst",  # every output table's columns (rule table_docs)
    }
    # nothing outside the registry is drawable by name
    assert not [n for n in ("_save", "report_table", "thresholds") if n in FIGURE_REGISTRY]
    with pytest.raises(KeyError):
        get_figure("report_table")
    with pytest.raises(FigureCallError):
        get_figure("stability").draw("a", "b", out="x.png")


def test_workflow_has_one_rule_per_registered_figure(tmp_path):
    """`snakemake --list` and a dry run of the test config: one plot_NAME rule and job per
    registered figure, reading the registered tables, with the log and benchmark paths,
    and the analysis slice passed exactly to the figures that draw thresholds."""
    rules = snakemake(tmp_path, TEST_CONFIG, "--list", cores=None).stdout.split()
    assert sorted(r for r in rules if r.startswith("plot_")) == sorted(
        f"plot_{n}" for n in figure_names()
    )
    proc = snakemake(tmp_path, TEST_CONFIG, "-n", "-p")
    text = proc.stdout + proc.stderr
    jobs = {
        m["rule"]: m["body"]
        for m in re.finditer(
            r"^rule (?P<rule>plot_\w+):\n(?P<body>(?:    .*\n)+?)Shell command: .*$",
            text,
            flags=re.M,
        )
    }
    figures = {
        m[1]
        for m in re.finditer(
            r"^    output: results/figures/fixture/res/(\w+)\.png$", text, flags=re.M
        )
    }
    assert figures == set(FIGURE_REGISTRY)
    assert set(jobs) == {f"plot_{n}" for n in FIGURE_REGISTRY}
    shells = dict(re.findall(r"^Shell command: sae-audit plot (\w+) (.*)$", text, flags=re.M))
    # every figure gets the config's weight bits per variant
    bits = audit_config.variant_bits(audit_config.load(TEST_CONFIG))
    variants = shlex.quote(json.dumps(bits, sort_keys=True, separators=(",", ":")))
    for name, fig in FIGURE_REGISTRY.items():
        body = jobs[f"plot_{name}"]
        inputs = ", ".join(f"results/tables/{t}" for t in fig.inputs).format(
            model="fixture", sae="res"
        )
        assert f"    input: {inputs}\n" in body
        assert f"    log: results/logs/plots/fixture/res/{name}.log\n" in body
        assert f"    benchmark: results/benchmarks/plots/fixture/res/{name}.tsv\n" in body
        params = shells[name].split(" --inputs ")[0]
        analysis = {
            # the causal class thresholds, under "causal", for the figure that draws them
            (True, True): """'{"active_rate":0.001,"causal":{"destroyed":0.5,"survived":0.9},"""
            """"confidence":0.95,"destroyed":0.5,"survived":0.9}'""",
            (
                True,
                False,
            ): """'{"active_rate":0.001,"confidence":0.95,"destroyed":0.5,"survived":0.9}'""",
            (False, False): "'{}'",
        }[(fig.thresholds, fig.causal)]
        assert params == f"--analysis {analysis} --variants {variants}", name


@pytest.mark.slow
def test_report_shows_every_registered_figure(finished_run: Path):
    """The report of the shared finished run embeds every registered figure, captioned
    with the run's thresholds, and the tables."""
    report = finished_run / "report-figures.html"
    snakemake(finished_run, TEST_CONFIG, "--report", str(report))
    html = report.read_text()
    names = sorted(p.stem for p in (finished_run / "results/figures/fixture/res").glob("*.png"))
    assert names == sorted(FIGURE_REGISTRY)
    for name, fig in FIGURE_REGISTRY.items():
        assert f"{name}.png" in html, name
        assert fig.category in html, fig.category
    assert html.count("data:image/png") == len(FIGURE_REGISTRY)
    assert "The dashed lines at damage" in html and "1 - 0.9" in html
    for table in ("survival", "perplexity", "predict", "overlap", "damaged_contexts"):
        assert f"{table}.html" in html, table
    assert "columns.html" in html  # every table's columns (rule table_docs)


def test_variant_order_and_palette():
    names = ["fp-null", "prune-matched-rtn-int4", "rtn-int4", "rtn-int8", "prune-0.3", "weird"]
    assert plots._variant_order(names) == [
        "rtn-int8", "rtn-int4", "prune-0.3", "prune-matched-rtn-int4", "fp-null", "weird",
    ]  # fmt: skip
    colors = plots._palette(names)
    assert set(colors) == set(names)
    assert all(
        len(c) == 3 and all(0 <= x <= 1 and not math.isnan(x) for x in c) for c in colors.values()
    )


# ---------------------------------------------------------------- shipped formats beside RTN
# About what a study with shipped formats draws: 16 variants, bits as config.variant_bits gives.
SHIPPED_BITS: dict[str, int | None] = {
    **{f"rtn-int{b}": b for b in (8, 7, 6, 5, 4, 3, 2)},
    "lc-gptq-w4a16": 4, "lc-w8a8-int8": 8, "lc-fp8-dynamic": 8, "lc-kv-fp8": None,
    "gguf-q8_0": 8, "gguf-q4_0": 4,
    "prune-matched-rtn-int6": None, "prune-matched-rtn-int4": None, "fp-null": None,
}  # fmt: skip
SHIPPED_ORDER = [
    "rtn-int8", "lc-fp8-dynamic", "lc-w8a8-int8", "gguf-q8_0", "rtn-int7", "rtn-int6",
    "rtn-int5", "rtn-int4", "lc-gptq-w4a16", "gguf-q4_0", "rtn-int3", "rtn-int2",
    "prune-matched-rtn-int6", "prune-matched-rtn-int4", "lc-kv-fp8", "fp-null",
]  # fmt: skip


def _shipped_survived(v: str) -> float:
    bits = SHIPPED_BITS[v]
    base = 100.0 if bits is None else min(100.0, 20.0 * (bits - 1))
    return base if v.startswith("rtn-") or bits is None else min(100.0, base + 7.0)


@pytest.fixture(scope="module")
def shipped_tables(tmp_path_factory) -> dict[str, Path]:
    """Survival and perplexity tables of the 16 variants of SHIPPED_BITS, FP in perplexity."""
    out = tmp_path_factory.mktemp("shipped")
    names = list(SHIPPED_BITS)
    survived = [_shipped_survived(v) for v in names]
    dppl = [0.0 if b is None else 2.0 ** (8 - b) - 1 for b in SHIPPED_BITS.values()]
    perplexity = pl.DataFrame(
        {
            "variant": ["fp", *names],
            "n_scored_chunked": 6144,
            "ppl_chunked": [30.0] + [30 * (1 + d / 100) for d in dppl],
            "ppl_sliding": [28.0] + [28 * (1 + d / 100) for d in dppl],
            "n_scored_sliding": 6000,
            "dppl_chunked_pct": [0.0, *dppl],
            "dppl_sliding_pct": [0.0] + [0.9 * d for d in dppl],
        }
    )
    survival = pl.DataFrame(
        {
            "variant": names,
            "n_active": 100,
            "survived_pct": survived,
            "blurred_pct": [(100 - s) / 2 for s in survived],
            "destroyed_pct": [(100 - s) / 4 for s in survived],
            "insufficient_pct": [(100 - s) / 4 for s in survived],
            "mean_r": [s / 100 for s in survived],
        }
    ).join(perplexity.drop("n_scored_chunked"), on="variant", how="left")
    paths = {"survival": out / "survival.parquet", "perplexity": out / "perplexity.parquet"}
    survival.write_parquet(paths["survival"])
    perplexity.write_parquet(paths["perplexity"])
    return paths


def test_shipped_variants_follow_the_rtn_variant_of_their_bits():
    shuffled = sorted(SHIPPED_BITS, key=lambda n: hash(n) % 97)
    order = plots._variant_order(shuffled, SHIPPED_BITS)
    assert order == SHIPPED_ORDER
    at = order.index
    assert at("rtn-int4") < at("lc-gptq-w4a16") < at("rtn-int3")
    assert at("lc-gptq-w4a16") == at("rtn-int4") + 1
    # without the config's bits a shipped name carries none: it goes after the RTN curve
    bare = plots._variant_order(["rtn-int3", "lc-gptq-w4a16", "rtn-int4"])
    assert bare == ["rtn-int4", "rtn-int3", "lc-gptq-w4a16"]
    # one hue family per kind: the llm-compressor variants share the purple ramp
    colors = plots._palette(order, SHIPPED_BITS)
    purples = [colors[v] for v in order if v.startswith("lc-")]
    assert all(c[2] > c[1] for c in purples)  # more blue than green: purple
    assert {plots._kind(v) for v in order} >= {"RTN", "llm-compressor", "GGUF"}


def test_class_fractions_vs_bits_draws_shipped_at_their_bits(shipped_tables, tmp_path, monkeypatch):
    rows = plots._bits_rows(pl.read_parquet(shipped_tables["survival"]), SHIPPED_BITS)
    by_variant = {r["variant"]: r for r in rows.iter_rows(named=True)}
    assert by_variant["lc-gptq-w4a16"]["bits"] == 4
    assert by_variant["lc-gptq-w4a16"]["kind"] == "llm-compressor"
    assert by_variant["gguf-q8_0"]["bits"] == 8 and by_variant["lc-kv-fp8"]["bits"] is None
    assert not {"fp-null", "prune-matched-rtn-int4"} & set(by_variant)  # no weight bits
    captured = _spy_save(monkeypatch)
    plots.class_fractions_vs_bits(
        shipped_tables["survival"], out=tmp_path / "c.png", variants=SHIPPED_BITS
    )
    _assert_png(tmp_path / "c.png")
    (ax,) = captured["c"][1]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    drawn = [v for v in SHIPPED_ORDER if v in by_variant]
    assert ticks == drawn  # one bar per variant, the shipped ones beside RTN
    x = dict(zip(ticks, ax.get_xticks(), strict=True))
    groups = {t.get_text(): t.get_position()[0] for t in ax.texts if t.get_text().endswith("bits")}
    groups |= {t.get_text(): t.get_position()[0] for t in ax.texts if t.get_text().endswith("-bit")}
    assert set(groups) == {
        "8-bit",
        "7-bit",
        "6-bit",
        "5-bit",
        "4-bit",
        "3-bit",
        "2-bit",
        "no weight bits",
    }
    # the 4-bit group: rtn-int4, lc-gptq-w4a16, gguf-q4_0, adjacent, labelled at their center
    assert x["lc-gptq-w4a16"] - x["rtn-int4"] == pytest.approx(1.0)
    assert x["gguf-q4_0"] - x["lc-gptq-w4a16"] == pytest.approx(1.0)
    assert groups["4-bit"] == pytest.approx(x["lc-gptq-w4a16"])
    assert x["rtn-int3"] - x["gguf-q4_0"] > 1.0  # a gap before the next bit-width
    # the lc-gptq-w4a16 bar: its survived share, hatched as llm-compressor
    survived_bars = ax.containers[0]
    bar = survived_bars[ticks.index("lc-gptq-w4a16")]
    assert bar.get_height() == pytest.approx(_shipped_survived("lc-gptq-w4a16"))
    assert bar.get_hatch() == plots.KIND_HATCH["llm-compressor"]
    assert not survived_bars[ticks.index("rtn-int4")].get_hatch()
    # four stacked classes, insufficient evidence on top in its own colour
    assert len(ax.containers) == len(plots.CLASSES) == 4
    top = ax.containers[3][ticks.index("lc-gptq-w4a16")]
    assert top.get_height() == pytest.approx((100 - _shipped_survived("lc-gptq-w4a16")) / 4)


def test_perplexity_vs_bits_marks_shipped_beside_rtn(shipped_tables, tmp_path, monkeypatch):
    captured = _spy_save(monkeypatch)
    plots.perplexity_vs_bits(
        shipped_tables["perplexity"], out=tmp_path / "p.png", variants=SHIPPED_BITS
    )
    _assert_png(tmp_path / "p.png")
    (ax,) = captured["p"][1]
    named = {t.get_text(): t.xy for t in ax.texts if hasattr(t, "xy")}
    shipped = [v for v in SHIPPED_ORDER if not v.startswith(("rtn-", "prune-", "fp-"))]
    assert set(named) == set(shipped)  # every shipped format named, no RTN label
    for v in shipped:
        bits = SHIPPED_BITS[v]
        x, y = named[v]
        if bits is None:
            assert x == pytest.approx(1.0)  # one step past the fewest bits (2)
        else:
            assert bits - 0.5 < x < bits  # just beside the RTN point of its bits
            expected = 2.0 ** (8 - bits) - 1
            assert y == pytest.approx(expected)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["8", "7", "6", "5", "4", "3", "2", "no weight\nbits"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"RTN", "llm-compressor", "GGUF", "chunked perplexity"} <= set(legend)


def test_cli_plot_passes_the_variant_bits(shipped_tables, tmp_path, monkeypatch):
    """`sae-audit plot --variants JSON`, as the rules call it: the bits reach the figure."""
    captured = _spy_save(monkeypatch)
    for name in ("class_fractions_vs_bits", "perplexity_vs_damage"):
        out = tmp_path / f"{name}.png"
        inputs = [str(shipped_tables["survival"])]
        argv = ["plot", name, "--variants", json.dumps(SHIPPED_BITS), "--inputs", *inputs]
        assert cli_main([*argv, "--out", str(out)]) == 0
        _assert_png(out)
    (ax,) = captured["class_fractions_vs_bits"][1]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks.index("lc-gptq-w4a16") == ticks.index("rtn-int4") + 1
    (ax,) = captured["perplexity_vs_damage"][1]
    kinds = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"llm-compressor", "GGUF"} <= set(kinds)


def test_report_tables_cover_configured(tables, tmp_path):
    """Every table the report shows converts to CSV and HTML."""
    text = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    # the list's names, those added under a condition (causal.enabled) too
    m = re.search(r"^REPORT_TABLES\s*=\s*\[(.*?)^\]", text, flags=re.S | re.M)
    assert m, "REPORT_TABLES list not found in common.smk"
    names = [ast.literal_eval(q) for q in re.findall(r"\"[a-z_]+\"", m[1])]
    assert {"survival", "causal_survival", "causal_disagreements"} <= set(names)
    for name in names:
        for ext in ("csv", "html"):
            out = tmp_path / f"{name}.{ext}"
            report_tables.report_table(tables[name], out=out)
            assert out.stat().st_size > 100


# ---------------------------------------------------------------- readable figures
def _text_boxes(fig, ax) -> list:
    """Window extents of an axes' labels with text (leader lines are empty annotations)."""
    renderer = fig.canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in ax.texts if t.get_text().strip()]


def test_correlation_histograms_show_small_damage_on_a_log_axis(tables, tmp_path, monkeypatch):
    """Damage 1 - r on a log axis that covers every feature's damage; r = 1 exactly (a log
    axis has no 0) counted in the panel, and every active feature either drawn or counted."""
    captured = _spy_save(monkeypatch)
    plots.correlation_histograms(tables["features"], out=tmp_path / "h.png")
    fig, axes = captured["h"]
    features = pl.read_parquet(tables["features"]).filter(pl.col("active"))
    by_title = {ax.get_title(): ax for ax in axes}
    assert set(by_title) == set(VARIANTS)
    for variant, ax in by_title.items():
        damage = features.filter(pl.col("variant") == variant)["damage"].to_numpy()
        assert ax.get_xscale() == "log"
        lo, hi = ax.get_xlim()
        assert lo <= plots.DAMAGE_FLOOR and hi >= damage.max()
        drawn = sum(p.get_height() for c in ax.containers for p in c)
        exact = int((damage == 0).sum())
        assert drawn + exact == damage.size, variant
        text = " ".join(t.get_text() for t in ax.texts)
        assert f"n={damage.size}" in text
        assert (f"r = 1 exactly: {exact}" in text) == (exact > 0), (variant, text)
    # the null run is identical to FP: nothing on the axis, every feature counted as r = 1
    assert "r = 1 exactly: " in " ".join(t.get_text() for t in by_title["fp-null"].texts)
    # the mild variant is visible: its bars sit well left of the survival cut, not in one
    # spike at the right edge as on an r axis from -1 to 1
    mild = by_title["rtn-int8"]
    heights = [(p.get_x(), p.get_height()) for c in mild.containers for p in c if p.get_height()]
    assert len({x for x, _ in heights}) >= 5
    assert max(x for x, _ in heights) < 0.1
    assert f"axis from {plots.DAMAGE_FLOOR:g}" in fig.get_suptitle()


def test_scatter_draws_the_matched_pairs_only(tables, tmp_path, monkeypatch):
    """By default the overlap table holds every RTN x matched-pruning pair and the shipped
    formats against RTN: the scatter draws each variant against its own matched pruning.
    A table without such a pair (overlap.pairs configured to others) is drawn whole."""
    base = pl.read_parquet(tables["overlap"]).row(1, named=True)
    default = [
        ("rtn-int8", "prune-matched-rtn-int6"),
        ("rtn-int6", "prune-matched-rtn-int6"),
        ("rtn-int4", "prune-matched-rtn-int6"),
        ("rtn-int8", "prune-matched-rtn-int4"),
        ("rtn-int6", "prune-matched-rtn-int4"),
        ("rtn-int4", "prune-matched-rtn-int4"),
        ("rtn-int4", "lc-gptq-w4a16"),
        ("rtn-int8", "gguf-q8_0"),
    ]
    table = pl.DataFrame([{**base, "variant_a": a, "variant_b": b} for a, b in default])
    picked = plots.scatter_pairs(table).select("variant_a", "variant_b").rows()
    assert picked == [
        ("rtn-int6", "prune-matched-rtn-int6"),
        ("rtn-int4", "prune-matched-rtn-int4"),
    ]
    # the matched variant on either side
    swapped = table.rename({"variant_a": "variant_b", "variant_b": "variant_a"})
    assert plots.scatter_pairs(swapped).height == 2
    # configured pairs without a matched one: all of them, RTN on x, NaN Spearman as n/a
    configured = pl.read_parquet(tables["overlap"]).with_columns(
        pl.lit("fp-null").alias("variant_b")
    )
    path = tmp_path / "configured.parquet"
    configured.write_parquet(path)
    captured = _spy_save(monkeypatch)
    plots.rtn_vs_pruning_scatter(tables["features"], path, out=tmp_path / "s.png")
    _, axes = captured["s"]
    assert sorted((ax.get_xlabel(), ax.get_ylabel()) for ax in axes) == [
        ("damage 1 - r, rtn-int4", "damage 1 - r, fp-null"),
        ("damage 1 - r, rtn-int8", "damage 1 - r, fp-null"),
    ]
    assert "n/a" in " ".join(ax.get_title() for ax in axes)
    # log axes that start below the smallest damage of the pair, so mild damage shows
    features = pl.read_parquet(tables["features"]).filter(pl.col("active"))
    for ax in axes:
        a = ax.get_xlabel().rsplit(", ", 1)[1]
        damage = features.filter(pl.col("variant") == a, pl.col("damage") > 0)["damage"]
        assert ax.get_xscale() == ax.get_yscale() == "log"
        assert ax.get_xlim()[0] <= damage.min()


def test_line_figures_tell_variants_apart(shipped_tables, tables, tmp_path, monkeypatch):
    """Qualitative colors far apart (not nine shades of one hue), one per variant and the
    same in every figure; variants with nothing below 100 % named, not drawn on top of
    each other; the others shifted sideways so equal values stay visible."""
    colors = plots._distinct_colors(16)
    distances = [math.dist(a, b) for i, a in enumerate(colors) for b in colors[i + 1 :]]
    assert min(distances) >= 0.2
    styles = plots._line_styles(SHIPPED_ORDER, SHIPPED_BITS)
    rtn = [styles[v][0] for v in SHIPPED_ORDER if v.startswith("rtn-")]
    assert len(set(rtn)) == 7  # seven RTN variants, seven colors
    assert {styles[v][1] for v in SHIPPED_ORDER if v.startswith("lc-")} == {"s"}

    captured = _spy_save(monkeypatch)
    quantiles = tables["survival_by_quantile"]
    plots.survival_by_quartile(quantiles, out=tmp_path / "q.png")
    plots.survival_by_firing_rate_decile(quantiles, out=tmp_path / "d.png")
    table = pl.read_parquet(quantiles)
    # rtn-int8 survives in every bin: named in the legend, no line
    always = {
        v
        for v in table["variant"].unique()
        if table.filter(pl.col("variant") == v)["survived_frac"].min() == 1.0
    }
    assert always == {"rtn-int8"}
    for name in ("q", "d"):
        _, axes = captured[name]
        for ax in axes:
            lines = {line.get_label(): line for line in ax.lines}
            assert set(lines) == {"rtn-int4", "prune-matched-rtn-int4"}
            a, b = lines["rtn-int4"], lines["prune-matched-rtn-int4"]
            assert a.get_color() != b.get_color()
            assert a.get_marker() != b.get_marker()  # RTN circles, matched pruning triangles
            # same bins, shifted apart
            assert np.all(np.abs(a.get_xdata() - b.get_xdata()) > 0.1)
        legend = " ".join(
            " ".join(t.get_text().split())
            for ax in axes
            if ax.get_legend()
            for t in ax.get_legend().get_texts()
        )
        assert "not drawn" in legend and "rtn-int8" in legend
    # the same variant has the same color in the quartile and decile figures
    (q_ax, *_), (d_ax,) = captured["q"][1], captured["d"][1]
    q_colors = {line.get_label(): line.get_color() for line in q_ax.lines}
    d_colors = {line.get_label(): line.get_color() for line in d_ax.lines}
    assert q_colors == d_colors
    # the decile title states this run's direction, computed from the table
    assert "under 2 of 2 variants with damage, more under 0" in d_ax.get_title()
    # stability: a line per variant below 100 % somewhere, none for one at 100 % throughout
    full = pl.read_parquet(tables["stability"]).with_columns(
        pl.when(pl.col("variant") == "rtn-int8")
        .then(100.0)
        .otherwise("survived_pct")
        .alias("survived_pct")
    )
    full.write_parquet(tmp_path / "stability.parquet")
    plots.stability(tmp_path / "stability.parquet", out=tmp_path / "s.png")
    (s_ax,) = captured["s"][1]
    drawn = {line.get_label() for line in s_ax.lines if not line.get_label().startswith("_")}
    assert drawn == {"rtn-int4", "prune-matched-rtn-int4", "fp-null"}
    assert len({line.get_color() for line in s_ax.lines}) == 3
    legend = " ".join(" ".join(t.get_text().split()) for t in s_ax.get_legend().get_texts())
    assert "survived throughout, not drawn: rtn-int8" in legend


def test_perplexity_vs_damage_labels_do_not_overlap(shipped_tables, tables, tmp_path, monkeypatch):
    """Sixteen variants, most of them near the origin: every variant is labelled (adjustText
    places the labels), and no two label boxes overlap in the saved figure."""
    captured: dict[str, tuple[list[str], list]] = {}
    save = plots._save

    def spy(fig, path):
        (ax,) = fig.axes
        fig.tight_layout()  # what _save does first: the final pixel positions
        texts = [t for t in ax.texts if t.get_text().strip()]
        boxes = _text_boxes(fig, ax)
        captured[Path(path).stem] = ([t.get_text() for t in texts], boxes)
        save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    # as in the demo: sixteen distinct points, all but two within 0.3 % of FP and undamaged
    shipped = pl.read_parquet(shipped_tables["survival"])
    crowded = shipped.with_columns(
        pl.Series("dppl_chunked_pct", [0.02 * (i + 1) for i in range(shipped.height)]),
        pl.when(pl.col("variant").is_in(["rtn-int2", "rtn-int3"]))
        .then(pl.col("survived_pct"))
        .otherwise(100.0),
    ).drop("dppl_sliding_pct")
    crowded.write_parquet(tmp_path / "crowded.parquet")
    cases = {
        "crowded": tmp_path / "crowded.parquet",
        "shipped": shipped_tables["survival"],
        "small": tables["survival"],
    }
    for name, path in cases.items():
        plots.perplexity_vs_damage(path, out=tmp_path / f"{name}.png", variants=SHIPPED_BITS)
        labels, boxes = captured[name]
        named = [n for label in labels for n in label.split("\n")]
        survival = pl.read_parquet(path).filter(pl.col("dppl_chunked_pct").is_not_null())
        assert sorted(named) == sorted(survival["variant"])
        overlapping = [
            (labels[i], labels[j])
            for i, a in enumerate(boxes)
            for j, b in enumerate(boxes)
            if i < j and a.overlaps(b)
        ]
        assert not overlapping
    assert len(captured["crowded"][0]) == 16  # one label per point


def test_class_legend_clear_of_the_bars(shipped_tables, tmp_path, monkeypatch):
    """The class legend sits outside the bars (it covered the 8-bit bar)."""
    boxes: dict[str, list] = {}
    save = plots._save

    def spy(fig, path):
        (ax,) = fig.axes
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        boxes["legend"] = [ax.get_legend().get_window_extent(renderer)]
        boxes["bars"] = [p.get_window_extent(renderer) for c in ax.containers for p in c]
        save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    plots.class_fractions_vs_bits(
        shipped_tables["survival"], out=tmp_path / "c.png", variants=SHIPPED_BITS
    )
    (legend,) = boxes["legend"]
    assert len(boxes["bars"]) == 4 * 13  # four classes on each RTN or shipped variant
    assert not any(legend.overlaps(bar) for bar in boxes["bars"])


def test_coefficients_state_the_direction_from_the_table(tables, tmp_path, monkeypatch):
    """Which way a predictor goes is counted from the table under it, never claimed."""
    captured = _spy_save(monkeypatch)
    plots.coefficients(tables["predict_coefficients"], out=tmp_path / "c.png")
    _, (left, right) = captured["c"]
    ticks = {
        ax: {
            t.get_text().split("\n")[0]: " ".join(t.get_text().split("\n")[1:])
            for t in ax.get_xticklabels()
        }
        for ax in (left, right)
    }
    # coefficients -1.0, -0.6, -0.2, 0.2 and marginal AUCs 0.3 .. 0.6 in the two variants
    # with both classes (rtn-int8 has one class: no fit)
    assert ticks[left]["rarity"] == "higher survives more: 0 of 2 variants"
    assert ticks[left]["log_concentration"] == "higher survives more: 2 of 2 variants"
    assert ticks[right]["log_peak"] == "higher survives more: 0 of 2 variants"  # AUC 0.5
    assert ticks[right]["log_concentration"] == "higher survives more: 2 of 2 variants"
    caption = (REPORT_DIR / "coefficients.rst").read_text()
    assert "rare features dying first" not in caption


def test_figures_in_the_requested_formats(tables, tmp_path):
    """report.figure_formats: PNG always (the report's), then the others requested, each
    a real file of its format from one draw call."""
    assert figure_formats() == ["png"]
    assert figure_formats(["svg", "png", "pdf"]) == ["png", "svg", "pdf"]
    with pytest.raises(ValueError, match="eps"):
        figure_formats(["eps"])
    outs = [tmp_path / f"stability.{ext}" for ext in ("png", "svg", "pdf")]
    get_figure("stability").draw(tables["stability"], out=outs)
    _assert_png(outs[0])
    assert b"<svg" in outs[1].read_bytes()[:2000]
    assert outs[2].read_bytes()[:5] == b"%PDF-"
    with pytest.raises(FigureCallError, match=r"cannot write 'x\.eps'"):
        get_figure("stability").draw(tables["stability"], out=tmp_path / "x.eps")


def test_workflow_writes_the_requested_figure_formats(tmp_path):
    """With svg and pdf requested, a dry run plans every figure in every format from one
    job, PNG first (the report entry), and the default plans PNG only."""
    override = 'report={"figure_formats": ["svg", "pdf"]}'
    proc = snakemake(tmp_path, TEST_CONFIG, "-n", "-p", "--config", override)
    text = proc.stdout + proc.stderr
    outputs = dict(
        re.findall(r"^rule plot_(\w+):\n(?:    .*\n)*?    output: (.*)$", text, flags=re.M)
    )
    assert set(outputs) == set(FIGURE_REGISTRY)
    for name, listed in outputs.items():
        stem = f"results/figures/fixture/res/{name}"
        assert listed.split(", ") == [f"{stem}.png", f"{stem}.svg", f"{stem}.pdf"]
    shells = re.findall(
        r"^Shell command: sae-audit plot (\w+) .* --out (\S+ \S+ \S+) >", text, flags=re.M
    )
    assert len(shells) == len(FIGURE_REGISTRY)
    assert all(outs.endswith(".pdf") for _, outs in shells)


# ---------------------------------------------------------------- causal survival (issue 14)
def _title_counts(title: str) -> dict[str, int]:
    """The dissociation counts a causal_vs_pearson panel title states."""
    counts = dict(re.findall(r"(fires same/acts diff\.|acts same/fires diff\.): (\d+)", title))
    return {
        DISSOCIATIONS[0]: int(counts["fires same/acts diff."]),
        DISSOCIATIONS[1]: int(counts["acts same/fires diff."]),
    }


def test_causal_vs_pearson_counts_the_dissociations(tables, tmp_path, monkeypatch):
    """One panel per variant in display order, the null runs included; each title counts
    the dissociations of the table; the points coloured by kind, two colours apart from
    the grey of agreement; a variant equal to FP all in the lower-left corner (1, 1)."""
    captured = _spy_save(monkeypatch)
    plots.causal_vs_pearson(tables["causal"], out=tmp_path / "c.png")
    _assert_png(tmp_path / "c.png")
    fig, axes = captured["c"]
    table = pl.read_parquet(tables["causal"])
    order = plots._variant_order(CAUSAL_VARIANTS)
    assert order[-2:] == ["fp-null", "fp-noise"]  # the controls drawn, last
    assert [ax.get_title().split("\n")[0] for ax in axes] == order
    limits = {(ax.get_xlim(), ax.get_ylim()) for ax in axes}
    assert len(limits) == 1  # one range for every panel
    (((low, top), (low_y, top_y)),) = limits
    assert low == low_y and top == top_y >= 2.0
    assert all(ax.get_xscale() == ax.get_yscale() == "log" for ax in axes)
    colors = {kind: plots.DISSOCIATION_STYLE[kind][0] for kind in DISSOCIATIONS}
    assert len({*colors.values(), plots.AGREE_COLOR}) == 3
    for ax in axes:
        variant = ax.get_title().split("\n")[0]
        part = table.filter(pl.col("variant") == variant)
        expected = {k: int((part["dissociation"] == k).sum()) for k in DISSOCIATIONS}
        assert _title_counts(ax.get_title()) == expected, variant
        assert f"n={part.height}" in ax.get_title()
        drawn = {c.get_label(): c for c in ax.collections if c.get_label() in DISSOCIATIONS}
        for kind in DISSOCIATIONS:
            assert len(drawn[kind].get_offsets()) == expected[kind]
            if expected[kind]:
                assert matplotlib.colors.to_hex(drawn[kind].get_facecolor()[0]) == colors[kind]
    by_variant = {ax.get_title().split("\n")[0]: ax for ax in axes}
    # the planted cases: three that fire the same and act differently, two the reverse,
    # at their damage (1 - r, 1 - agreement)
    planted = by_variant["rtn-int4"]
    counts = _title_counts(planted.get_title())
    assert counts[DISSOCIATIONS[0]] >= 3 and counts[DISSOCIATIONS[1]] >= 2
    fires_same = {c.get_label(): c for c in planted.collections}[DISSOCIATIONS[0]]
    assert any(np.allclose(xy, (0.01, 0.8)) for xy in fires_same.get_offsets())
    # the null run equals FP: every point in the corner, counted at (1, 1), none dissociated
    null = by_variant["fp-null"]
    assert "at (1, 1): 24" in null.get_title()
    points = np.concatenate(
        [c.get_offsets() for c in null.collections if isinstance(c, PathCollection)]
    )
    corner = points.min()
    assert len(points) == 24 and np.allclose(points, corner) and low < corner < 1e-4
    others = [
        c.get_offsets() for ax in axes for c in ax.collections if isinstance(c, PathCollection)
    ]
    assert corner <= min(float(o.min()) for o in others if len(o))  # the lower-left corner
    # causally insufficient (agreement stored as 0) hollow and counted; no r: counted
    pruned = by_variant["prune-matched-rtn-int4"].get_title()
    assert "causally insufficient: 1" in pruned and "no r or agreement: 1" in pruned
    assert "lower-left corner" in fig.get_suptitle()


def test_causal_vs_pearson_without_measurements(tables, tmp_path, monkeypatch):
    """causal.enabled false writes the table with no row: the figure says so."""
    empty = tmp_path / "causal.parquet"
    pl.read_parquet(tables["causal"]).clear().write_parquet(empty)
    captured = _spy_save(monkeypatch)
    plots.causal_vs_pearson(empty, out=tmp_path / "e.png")
    _assert_png(tmp_path / "e.png", min_bytes=2_000)
    (ax,) = captured["e"][1]
    assert "no causal measurements" in " ".join(t.get_text() for t in ax.texts)


def test_causal_thresholds_reach_the_figure(tables, tmp_path):
    """Figure.rule_params: the analysis slice for threshold figures, with the causal class
    thresholds under "causal" only for the one that draws them; `sae-audit plot` passes
    them on, and the Pearson thresholds read past the extra key."""
    config = audit_config.load(TEST_CONFIG)
    causal_fig = get_figure("causal_vs_pearson")
    assert causal_fig.thresholds and causal_fig.causal
    assert causal_fig.category == get_figure("correlation_histograms").category
    assert causal_fig.rule_params(config) == {
        **config["analysis"],
        "causal": {k: config["causal"][k] for k in ("survived", "destroyed")},
    }
    assert get_figure("correlation_histograms").rule_params(config) == config["analysis"]
    assert get_figure("stability").rule_params(config) == {}
    params = {**THRESHOLDS, "causal": CAUSAL_THRESHOLDS}
    assert plots.thresholds(params).survived == 0.8
    assert plots.causal_thresholds(params).destroyed == 0.4
    assert plots.causal_thresholds(None).survived == 0.9  # the schema's default
    with pytest.raises(ValueError, match=r"causal\.destroyed"):
        plots.causal_thresholds({"causal": {"survived": 0.3, "destroyed": 0.6}})
    out = tmp_path / "cli.png"
    args = ["--inputs", str(tables["causal"]), "--out", str(out)]
    assert cli_main(["plot", "causal_vs_pearson", "--analysis", json.dumps(params), *args]) == 0
    _assert_png(out)
    from sae_audit.figures import register_figure

    with pytest.raises(ValueError, match="thresholds=True"):
        register_figure("x_causal_only", ["{model}/{sae}/causal.parquet"], "1. X", causal=True)
    assert "x_causal_only" not in FIGURE_REGISTRY
