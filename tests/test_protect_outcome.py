"""Predicted against achieved: a protect- variant built from its plan, measured in the audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sae_audit import cli
from sae_audit.checkpoints import load_checkpoint, read_payload, write_checkpoint
from sae_audit.files import InputError
from sae_audit.models import load_model, target_weights
from sae_audit.protect import (
    Level,
    apply_protected,
    module_shapes,
    outcome_table,
    plan_protection,
    storage_bits,
)
from sae_audit.table_docs import polars_schema

from .conftest import save_tiny_model

LEVELS = [Level("int4", 4), Level("int8", 8), Level("fp16", None)]


@pytest.fixture
def built(tmp_path: Path) -> dict:
    """A tiny GPT-NeoX, a plan that keeps one matrix at fp16 and one at int8 (it carries
    the watchlist's noise), the protect job's files and the built checkpoint."""
    base = save_tiny_model("gpt_neox", tmp_path / "model", hidden=64, layers=2)
    shapes = module_shapes(load_model(base))
    names = list(shapes)
    variance = np.full((len(LEVELS), len(names), 3), 1e-4)
    variance[:, 1] = [[5.0] * 3, [0.01] * 3, [0.0] * 3]  # matrix 1: only fp16 saves them
    variance[:, 3] = [[0.5] * 3, [0.0] * 3, [0.0] * 3]  # matrix 3: int8 is enough
    variance[2] = 0.0
    fp_variance = np.ones(3)
    plan = plan_protection(variance, fp_variance, shapes, LEVELS, budget_bits_per_weight=7.0)
    assert [plan.levels[c].name for c in plan.choice][1] == "fp16"
    assert [plan.levels[c].name for c in plan.choice][3] == "int8"
    protect_dir = tmp_path / "protect"
    protect_dir.mkdir()
    (protect_dir / "plan.json").write_text(json.dumps(plan.to_dict()))
    n = sum(o * i for o, i in shapes.values())
    record = {
        "watchlist": {"ids": [0, 2, 5], "source": "top 3 by FP firing count"},
        "budget": plan.budget,
        "predicted_survived": plan.predicted_survived,
        "bits_per_weight": plan.bits_per_weight,
        "base_predicted_survived": 0,
        "base_bits_per_weight": sum(storage_bits(LEVELS[0], s) for s in shapes.values()) / n,
        "solver": plan.solver,
        "gap": plan.gap,
        "shapes": {m: list(s) for m, s in shapes.items()},
    }
    (protect_dir / "protect.json").write_text(json.dumps(record))
    checkpoint = write_checkpoint(base, "protect-w", tmp_path / "ckpt", plan=plan.to_dict())
    return {"base": base, "plan": plan, "dir": protect_dir, "ckpt": checkpoint, "names": names}


def features(classes: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"variant": ["protect-w"] * 4, "feature": [0, 2, 5, 7], "class": classes})


def test_the_built_checkpoint_is_the_plan(built: dict) -> None:
    plan, names = built["plan"], built["names"]
    payload = read_payload(built["ckpt"])
    assert f"{names[1]}.codes" not in payload  # fp16: nothing stored, the base weight kept
    assert payload[f"{names[3]}.codes"].abs().max() > 7  # int8 codes
    assert payload[f"{names[0]}.codes"].abs().max() <= 8  # int4 codes
    loaded = dict(target_weights(load_checkpoint(built["ckpt"])))
    expected = dict(target_weights(apply_protected(load_model(built["base"]), payload,
                                                   {"kind": "protect", "plan": plan.to_dict()})))  # fmt: skip
    base = dict(target_weights(load_model(built["base"])))
    for name in names:
        assert torch.equal(loaded[name], expected[name]), name
    assert torch.equal(loaded[names[1]], base[names[1]])
    assert not torch.equal(loaded[names[0]], base[names[0]])


def test_outcome_compares_prediction_with_the_audit(built: dict) -> None:
    plan = built["plan"]
    table = outcome_table(
        {"protect-w": plan.to_dict()},
        {"protect-w": json.loads((built["dir"] / "protect.json").read_text())},
        {"protect-w": built["ckpt"]},
        features(["survived", "blurred", "survived", "destroyed"]),
    )
    assert dict(table.schema) == polars_schema("protect")
    row = table.row(0, named=True)
    assert row["achieved_watch_survived_pct"] == pytest.approx(200 / 3)  # features 0 and 5
    assert row["predicted_watch_survived_pct"] == pytest.approx(100 * plan.predicted_survived / 3)
    assert row["built_bits_per_weight"] == pytest.approx(plan.bits_per_weight)
    assert row["base_bits_per_weight"] < row["built_bits_per_weight"]
    assert row["n_protected"] == 2
    assert f"{built['names'][1]}=fp16" in row["protected"]


def test_a_checkpoint_of_another_plan_is_refused(built: dict, tmp_path: Path) -> None:
    other = built["plan"].to_dict() | {"choice": [0] * len(built["names"])}
    with pytest.raises(InputError, match="not the checkpoint of this plan"):
        outcome_table(
            {"protect-w": other},
            {"protect-w": json.loads((built["dir"] / "protect.json").read_text())},
            {"protect-w": built["ckpt"]},
            features(["survived"] * 4),
        )


def test_stage(built: dict, tmp_path: Path) -> None:
    feats = tmp_path / "features.parquet"
    features(["survived"] * 4).write_parquet(feats)
    out = tmp_path / "protect.parquet"
    argv = [
        "protect-outcome", "--plans", f"protect-w={built['dir']}",
        "--checkpoints", f"protect-w={built['ckpt']}", "--features", feats, "--out", out,
    ]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    assert pl.read_parquet(out)["achieved_watch_survived_pct"].to_list() == [100.0]
