"""The reference study's config: plans offline, ships the published numbers, and says what to prefetch."""

from __future__ import annotations

import polars as pl
import pytest

from sae_audit import config as audit_config
from sae_audit.prefetch import plan

from .conftest import ROOT, planned_jobs, snakemake

PAPER = ROOT / "config" / "paper.yaml"


def test_paper_config_plans_the_whole_study_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jobs = planned_jobs(snakemake(tmp_path, PAPER, "-n"))
    # 2 models x (fp + 5 RTN + matched + null + noise) checkpoints; encode per
    # (variant, shard): 9 x (6 + 8).
    assert jobs["compress"] == 18
    assert jobs["encode"] == 9 * 6 + 9 * 8
    assert jobs["match_sparsity"] == 2 and jobs["reference_comparison"] == 2
    assert "fixture_model" not in jobs  # the demo config does not leak into a named one


def test_paper_config_facts():
    cfg = audit_config.load(PAPER)
    pythia, gemma = cfg["models"]["pythia-70m"], cfg["models"]["gemma-2-2b"]
    assert pythia["tokens"]["seq_len"] * pythia["tokens"]["n_sequences"] == 199_680
    assert gemma["tokens"]["seq_len"] * gemma["tokens"]["n_sequences"] == 499_968
    assert gemma["model"]["dtype"] == "bfloat16" and pythia["model"]["dtype"] == "float32"
    assert audit_config.rtn_variants(cfg) == [f"rtn-int{b}" for b in (8, 7, 6, 5, 4)]
    assert audit_config.matched_variants(cfg) == ["prune-matched-rtn-int6"]
    items = {(i.kind, i.model): i for i in plan(cfg)}
    assert items[("model", "pythia-70m")].what == "EleutherAI/pythia-70m-deduped"
    assert (
        items[("sae", "gemma-2-2b")].what
        == "gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical"
    )
    assert items[("dataset", "pythia-70m")].what == "wikitext/wikitext-2-raw-v1/train"
    assert not any(i.local for i in plan(cfg))


@pytest.mark.parametrize("model", ["pythia-70m", "gemma-2-2b"])
def test_reference_numbers_match_the_shared_table(model):
    # config/reference/*.csv transcribe shared/reference/paper-results.md; spot-check the headline.
    ref = pl.read_csv(ROOT / "config" / "reference" / f"{model}.csv")
    int6 = ref.filter(pl.col("variant") == "rtn-int6").to_dicts()[0]
    expected = {
        "pythia-70m": (62.39, 0.924, 0.860, 0.976),
        "gemma-2-2b": (51.30, 0.971, 0.792, 0.978),
    }[model]
    assert (
        int6["survived_pct"],
        int6["auc_mean"],
        int6["jaccard_nonsurviving"],
        int6["spearman"],
    ) == expected
    for row in ref.to_dicts():
        if row["variant"] != "fp":
            assert row["survived_pct"] + row["blurred_pct"] + row["destroyed_pct"] == pytest.approx(
                100, abs=0.02
            )
