"""Issue 15's known answer, through the real workflow: a model with one planted sensitive
block matrix is forecast, protected and gated.

The planted control of the test fixture (`fixture.reparam`, every block but the last: with
two layers exactly block 0) moves a factor of 60 from block 0's post-attention LayerNorm
into one input column of `gpt_neox.layers.0.mlp.dense_h_to_4h`: the same function, but
every row of that one matrix now reads a huge column, so per-channel INT4 rounds its other
inputs away. The SAE reads block 0's residual output, downstream of it. Required:

- the forecast (FP model only) ranks that matrix first under rtn-int4, and the
  leave-one-module-quantized measurement agrees;
- protect keeps exactly that matrix at INT8 within its budget, and the built variant
  reaches the watchlist target it predicted;
- the gate fails plain rtn-int4 and passes the protected variant; `sae-audit gate`
  exits 1 with rtn-int4 a release candidate and 0 with only the protected one, and
  writes the same certificate hashes twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import polars as pl
import pytest
import yaml

from sae_audit.gate import read_certificate

from .conftest import TEST_CONFIG, snakemake

PLANTED = "gpt_neox.layers.0.mlp.dense_h_to_4h.weight"
POLICY = """\
min_survived_pct: 90
min_watchlist_survived_pct: 90
max_perplexity_change_pct: 5
variants: [rtn-int4, protect-keep]
"""


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("planted")
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    tokens = cfg["models"]["fixture"]["tokens"]
    cfg["models"] = {
        "planted": {
            "model": {"source": "fixture-reparam", "dtype": "float32"},
            "saes": {"res": {"source": "fixture"}},
            "tokens": tokens,
        }
    }
    cfg["compression"] = {
        "rtn": {"bits": [4]},
        "prune": {"sparsities": [], "matched": {"targets": []}},
        "protect": {
            "keep": {
                "levels": [{"bits": 4}, {"bits": 8}],
                "budget": {"bits_per_weight": 5.0},
                "survived_r": 0.99,
            }
        },
    }
    # the tiny test model shrugs off the demo's factor 20 at INT4 (median r 0.985)
    cfg["fixture"]["reparam"] = {"scale": 60.0}
    cfg["watchlist"] = {"top": 16}
    cfg["forecast"] = {"n_sequences": 16, "measure": ["rtn-int4"]}
    cfg["causal"] = {"enabled": False}
    cfg["stability"] = {"noise_null": False}
    (workdir / "policy.yaml").write_text(POLICY)
    cfg["gate"] = {"policy": "policy.yaml"}
    config = workdir / "planted.yaml"
    config.write_text(yaml.safe_dump(cfg))
    snakemake(workdir, config)
    return workdir


def table(run: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(run / "results" / "tables" / "planted" / "res" / f"{name}.parquet")


@pytest.mark.slow
def test_the_forecast_ranks_the_planted_matrix_first(planted_run: Path) -> None:
    sources = table(planted_run, "forecast_sources").filter(pl.col("variant") == "rtn-int4")
    first = sources.sort("forecast_fraction", descending=True).row(0, named=True)
    assert first["source"] == PLANTED, sources
    assert first["forecast_rank"] == 1 and first["measured_rank"] == 1
    print(sources.select("source", "forecast_fraction", "measured_fraction"))


@pytest.mark.slow
def test_protect_keeps_it_at_int8_within_budget_and_reaches_the_target(
    planted_run: Path,
) -> None:
    plan = pl.read_parquet(
        planted_run / "results" / "protect" / "planted" / "keep" / "plan.parquet"
    )
    levels = dict(zip(plan["module"], plan["level"], strict=True))
    assert levels[PLANTED] == "int8", levels
    outcome = table(planted_run, "protect").row(0, named=True)
    print(outcome)
    assert outcome["predicted_bits_per_weight"] <= 5.0
    assert outcome["built_bits_per_weight"] == pytest.approx(outcome["predicted_bits_per_weight"])
    # the plain base is forecast to lose watched features that the plan keeps
    assert outcome["base_predicted_watch_survived_pct"] < outcome["predicted_watch_survived_pct"]
    assert outcome["achieved_watch_survived_pct"] >= 90
    config = json.loads(
        (
            planted_run / "results" / "protect" / "planted" / "keep" / "quantization_config.json"
        ).read_text()
    )
    int8 = [g for g in config["config_groups"].values() if g["weights"]["num_bits"] == 8]
    assert int8 and PLANTED.removesuffix(".weight") in int8[0]["targets"]


@pytest.mark.slow
def test_the_gate_fails_plain_int4_and_passes_the_protected_variant(planted_run: Path) -> None:
    certs = planted_run / "results" / "certificates" / "planted" / "res"
    plain, kept = (
        read_certificate(certs / "rtn-int4.json"),
        read_certificate(certs / "protect-keep.json"),
    )
    assert plain["verdict"] == "fail" and kept["verdict"] == "pass", (
        plain["checks"],
        kept["checks"],
    )
    suites = ET.parse(planted_run / "results" / "certificates" / "junit.xml").getroot()
    failed = {c.get("classname") for c in suites.iter("testcase") if c.find("failure") is not None}
    assert failed == {"planted.res.rtn-int4"}

    def gate(policy: str, out: str) -> subprocess.CompletedProcess:
        name = f"policy-{abs(hash(policy))}.yaml"  # the same policy: the same file
        (planted_run / name).write_text(policy)
        return subprocess.run(
            [sys.executable, "-m", "sae_audit", "gate", "--configfile", "planted.yaml",
             "--policy", name, "--out", out, "--table-out", f"{out}.parquet"],
            cwd=planted_run, capture_output=True, text=True,
        )  # fmt: skip

    both = gate(POLICY, "ci")
    assert both.returncode == 1, both.stderr
    assert (
        "planted/res/rtn-int4" in both.stderr
        and "protect-keep" not in both.stderr.split("violate")[1]
    )
    only = gate(POLICY.replace("[rtn-int4, protect-keep]", "[protect-keep]"), "ci-kept")
    assert only.returncode == 0, only.stderr
    again = gate(POLICY.replace("[rtn-int4, protect-keep]", "[protect-keep]"), "ci-again")
    assert again.returncode == 0
    first = (planted_run / "ci-kept" / "planted" / "res" / "protect-keep.json").read_bytes()
    second = (planted_run / "ci-again" / "planted" / "res" / "protect-keep.json").read_bytes()
    assert first == second
    # the inputs' content hashes are the workflow's own certificate's
    again_cert = json.loads(second)
    for key in ("model", "saes", "compression_config", "token_set"):
        assert again_cert[key] == kept[key], key
