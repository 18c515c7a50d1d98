"""The reference study's config: plans offline, ships the published numbers, and says what to prefetch."""

from __future__ import annotations

import polars as pl
import pytest

from sae_audit import config as audit_config
from sae_audit.prefetch import fetch, plan
from sae_audit.reference import compare

from .conftest import ROOT, planned_jobs, snakemake

PAPER = ROOT / "config" / "paper.yaml"


def test_paper_config_plans_the_whole_study_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jobs = planned_jobs(snakemake(tmp_path, PAPER, "-n"))
    # 2 models x (fp + 5 RTN + matched + null) checkpoints; encode per (variant, shard): 8 x (6 + 8).
    assert jobs["compress"] == 16
    assert jobs["encode"] == 8 * 6 + 8 * 8
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


def test_prefetch_of_local_config_fetches_nothing():
    cfg = audit_config.load(ROOT / "config" / "config.yaml")
    assert {d["status"] for d in fetch(cfg)} == {"local"}


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


def test_compare_puts_run_beside_paper(tmp_path):
    ref = tmp_path / "ref.csv"
    ref.write_text(
        "variant,perplexity,survived_pct,auc_mean,spearman\nfp,10.0,100,,\nrtn-int6,12.0,60.0,0.9,0.95\n"
    )
    survival = pl.DataFrame({"variant": ["rtn-int6"], "survived_pct": [55.0]})
    perplexity = pl.DataFrame({"variant": ["fp", "rtn-int6"], "ppl_chunked": [10.5, 12.0]})
    predict = pl.DataFrame({"variant": ["rtn-int6"], "auc_mean": [0.8]})
    overlap = pl.DataFrame(
        {
            "variant_a": ["rtn-int6", "rtn-int6"],
            "variant_b": ["prune-matched-rtn-int6", "rtn-int8"],
            "spearman": [0.5, 0.1],
        }
    )
    table = compare(ref, survival, perplexity, predict, overlap)
    got = {
        (r["variant"], r["metric"]): (r["paper"], r["run"], r["difference"])
        for r in table.to_dicts()
    }
    assert got[("fp", "perplexity")] == (10.0, 10.5, 0.5)
    assert got[("rtn-int6", "survived_pct")] == (60.0, 55.0, -5.0)
    assert got[("rtn-int6", "auc_mean")][1] == 0.8
    assert got[("rtn-int6", "spearman")][1] == 0.5  # against the matched pruning variant only
    # The published FP row has no counterpart in the survival table: shown, run left empty.
    assert got[("fp", "survived_pct")] == (100.0, None, None)
