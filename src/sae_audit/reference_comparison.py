"""Published results beside the run's own: does the reproduction match?"""

from __future__ import annotations

from pathlib import Path

import polars as pl

# reference CSV column -> (run table, run column)
METRICS: dict[str, tuple[str, str]] = {
    "perplexity": ("perplexity", "ppl_chunked"),
    "dppl_pct": ("perplexity", "dppl_chunked_pct"),
    "n_active": ("survival", "n_active"),
    "survived_pct": ("survival", "survived_pct"),
    "blurred_pct": ("survival", "blurred_pct"),
    "destroyed_pct": ("survival", "destroyed_pct"),
    "mean_r": ("survival", "mean_r"),
    "auc_mean": ("predict", "auc_mean"),
    "auc_sd": ("predict", "auc_sd"),
    "jaccard_nonsurviving": ("overlap", "jaccard_nonsurviving"),
    "spearman": ("overlap", "spearman"),
    "pearson": ("overlap", "pearson"),
}


def compare(
    reference_csv: str | Path,
    survival: pl.DataFrame,
    perplexity: pl.DataFrame,
    predict: pl.DataFrame,
    overlap: pl.DataFrame,
) -> pl.DataFrame:
    """Long table: variant, metric, paper, run, difference (run - paper).

    Overlap metrics on a reference row of variant V are "V vs pruning matched to V",
    the way the reference reports RTN-INT6 vs matched pruning: the run's row with
    variant_a == V and variant_b == prune-matched-V, matched on both sides (with
    several matched targets, any other pairing would compare another pair's numbers).
    """
    reference = pl.read_csv(reference_csv)
    matched = (
        overlap.filter(pl.col("variant_b") == pl.lit("prune-matched-") + pl.col("variant_a"))
        if overlap.width
        else overlap
    )
    runs = {
        "perplexity": perplexity,
        "survival": survival,
        "predict": predict,
        "overlap": matched.rename({"variant_a": "variant"})
        if matched.width
        else pl.DataFrame({"variant": []}),
    }
    rows = []
    for rec in reference.to_dicts():
        variant = rec["variant"]
        for metric, (table, column) in METRICS.items():
            paper = rec.get(metric)
            if paper is None:
                continue
            frame = runs[table]
            hit = (
                frame.filter(pl.col("variant") == variant)
                if "variant" in frame.columns
                else frame.clear()
            )
            run = (
                float(hit[column][0])
                if hit.height and column in hit.columns and hit[column][0] is not None
                else None
            )
            rows.append(
                {
                    "variant": variant,
                    "metric": metric,
                    "paper": float(paper),
                    "run": run,
                    "difference": None if run is None else run - float(paper),
                }
            )
    return pl.DataFrame(
        rows,
        schema={
            "variant": pl.String,
            "metric": pl.String,
            "paper": pl.Float64,
            "run": pl.Float64,
            "difference": pl.Float64,
        },
    )
