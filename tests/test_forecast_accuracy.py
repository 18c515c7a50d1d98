"""The forecast against the measured audit, as the workflow's forecast_accuracy job runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sae_audit import cli
from sae_audit.table_docs import polars_schema

VARIANTS = ("rtn-int4", "rtn-int3")


def tables(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """A features table with measured damage and a forecast whose damage tracks it."""
    rng = np.random.default_rng(seed)
    n = 120
    rows, forecast = [], []
    for i, variant in enumerate(VARIANTS):
        damage = rng.uniform(0, 0.3 + 0.4 * i, n)
        cls = np.where(damage < 0.1, "survived", np.where(damage > 0.5, "destroyed", "blurred"))
        predicted = np.clip(damage + rng.normal(0, 0.03, n), 0, 0.99)
        for f in range(n):
            rows.append({
                "variant": variant, "feature": f, "active": True, "class": str(cls[f]),
                "damage": float(damage[f]), "r": 1 - float(damage[f]),
                "firing_rate": float(rng.uniform(0.002, 0.2)),
                "mean_when_firing": float(rng.uniform(0.5, 3)),
                "peak": float(rng.uniform(3, 9)), "concentration": float(rng.uniform(0, 1)),
                "n_tokens": 4096, "firing_count": int(rng.integers(10, 800)),
            })  # fmt: skip
            forecast.append({
                "variant": variant, "feature": f, "fp_variance": 1.0,
                "noise_variance": 1 / (1 - predicted[f]) ** 2 - 1,
                "forecast_r": 1 - float(predicted[f]), "forecast_damage": float(predicted[f]),
                "silent": False, "top_source": "m.weight", "top_source_fraction": 1.0,
            })  # fmt: skip
    features = tmp_path / "features.parquet"
    pl.DataFrame(rows).write_parquet(features)
    forecast_path = tmp_path / "forecast.parquet"
    pl.DataFrame(forecast, schema=polars_schema("forecast")).write_parquet(forecast_path)
    return forecast_path, features


def test_stage_scores_each_variant_and_the_transfer(tmp_path: Path) -> None:
    forecast, features = tables(tmp_path)
    out = tmp_path / "accuracy.parquet"
    argv = ["forecast-accuracy", "--forecast", forecast, "--features", features,
            "--fit-on", "rtn-int4", "--predict", '{"seed": 0}', "--out", out]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    table = pl.read_parquet(out)
    assert dict(table.schema) == polars_schema("forecast_accuracy")
    own = table.filter(pl.col("fit_on").is_null()).sort("variant")
    assert own["variant"].to_list() == sorted(VARIANTS)
    # a forecast that tracks measured damage ranks and separates it
    assert (own["spearman"] > 0.9).all() and (own["forecast_auc"] > 0.9).all()
    transfer = table.filter(pl.col("fit_on") == "rtn-int4")
    assert transfer["variant"].to_list() == ["rtn-int3"]
    # the FP statistics here are noise: only the forecast carries the transfer
    assert transfer["transfer_auc"][0] > 0.9 > 0.7 > transfer["transfer_fpstats_auc"][0]
    assert (own["combined_cv_auc"] > own["fpstats_cv_auc"] + 0.2).all()
    floats = [c for c, t in table.schema.items() if t == pl.Float64]
    assert not table.select(pl.any_horizontal(pl.col(floats).is_nan())).to_series().any()


def test_no_transfer_without_fit_on(tmp_path: Path) -> None:
    forecast, features = tables(tmp_path)
    out = tmp_path / "accuracy.parquet"
    argv = ["forecast-accuracy", "--forecast", forecast, "--features", features, "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    assert pl.read_parquet(out)["fit_on"].null_count() == len(VARIANTS)
