"""The published results beside this run's: one row per (variant, metric)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from sae_audit.reference_comparison import compare


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


def test_reference_overlap_matches_both_variants():
    from sae_audit.reference_comparison import compare

    ref = Path(__file__).parent / "_ref.csv"
    ref.write_text("variant,jaccard_nonsurviving,spearman\nrtn-int6,0.86,0.976\nrtn-int3,0.5,0.9\n")
    try:
        # Two matched targets, listed "in the other order": each RTN row against the other's pruning first.
        overlap = pl.DataFrame({
            "variant_a": ["rtn-int6", "rtn-int3", "rtn-int6", "rtn-int3"],
            "variant_b": ["prune-matched-rtn-int3", "prune-matched-rtn-int6",
                          "prune-matched-rtn-int6", "prune-matched-rtn-int3"],
            "jaccard_nonsurviving": [0.11, 0.22, 0.33, 0.44], "spearman": [0.1, 0.2, 0.3, 0.4],
        })  # fmt: skip
        empty = pl.DataFrame({"variant": []}, schema={"variant": pl.String})
        table = compare(ref, empty, empty, empty, overlap)
    finally:
        ref.unlink()
    run = {(r["variant"], r["metric"]): r["run"] for r in table.to_dicts()}
    assert (
        run[("rtn-int6", "jaccard_nonsurviving")] == 0.33 and run[("rtn-int6", "spearman")] == 0.3
    )
    assert run[("rtn-int3", "jaccard_nonsurviving")] == 0.44
