"""One function per workflow rule: paths and config slices in, files out.

These are what the CLI (and so every Snakemake rule) calls; tests call them
directly. Each writes its outputs atomically or not at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .files import read_json, read_parquet, write_csv, write_json, write_parquet
from .shards import Expected, encode_hash
from .tokens import TokenSetConfig, build_token_set, load_token_ids
from .variants import parse_variant

# Model-side stages import torch, transformers and sae-lens inside the function: the
# table stages run in their own processes and should not pay seconds to import them.

log = logging.getLogger("sae_audit")


def tokenize(
    tokenizer_source: str, text_paths: list[str], params: dict[str, Any], out_paths: list[str]
) -> dict[str, Any]:
    """Token shards from `models.<name>.tokens` (`params`).

    `text_paths` are the local input files (`tokens.paths`, or the fixture's
    held-out text); empty for `source: hf`.
    """
    from .models import load_tokenizer
    from .tokens import load_documents

    cfg = TokenSetConfig.from_dict(params)
    tokenizer = load_tokenizer(tokenizer_source)
    documents = load_documents(params, list(text_paths or []))
    log.info("%d documents from tokens.source=%s", len(documents), params.get("source"))
    info = build_token_set(documents, tokenizer, cfg, out_paths)
    log.info("token set: %s", info)
    return info


def compress(
    base: str,
    variant: str,
    model_params: dict[str, Any],
    out_dir: str,
    matched_json: str | None = None,
) -> Path:
    from .checkpoints import read_manifest, write_checkpoint

    sparsity = None
    extra: dict[str, Any] = {}
    if matched_json is not None:
        search = read_json(matched_json, "match_sparsity")
        sparsity = float(search["sparsity"])
        extra["matched_search"] = search
    path = write_checkpoint(
        base,
        variant,
        out_dir,
        revision=model_params.get("revision"),
        sparsity=sparsity,
        extra=extra,
    )
    log.info("wrote %s (%s)", path, read_manifest(path)["method"])
    return path


def encode(
    checkpoint: str,
    sae_specs: dict[str, dict[str, Any]],
    sae_paths: dict[str, str],
    token_shard: str,
    codes_dir: str,
    nll_path: str,
    model_name: str,
    model_params: dict[str, Any],
    encode_params: dict[str, Any],
) -> dict[str, Any]:
    """Encode one token shard with every SAE of the model: codes_dir/<sae name>.parquet each.

    `sae_paths` gives the directory of SAEs that live on disk (the fixture's, or a
    configured path); the others load by release and id.
    """
    import torch

    from .checkpoints import load_checkpoint, read_manifest
    from .encode import EncodeConfig, EncodeTarget, encode_shard_multi
    from .models import resolve_device
    from .saes import check_compatible, load_sae

    cfg = EncodeConfig(**encode_params)
    device = resolve_device(cfg.device)
    # What the scheduler handed this job, beside what the code uses: a GPU job on a node
    # without CUDA runs on CPU (e.g. SLURM sets CUDA_VISIBLE_DEVICES but no driver exists).
    log.info(
        "CUDA_VISIBLE_DEVICES=%s cuda_available=%s device=%s",
        os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        torch.cuda.is_available(),
        device,
    )
    manifest = read_manifest(checkpoint)
    model = load_checkpoint(
        checkpoint,
        dtype=model_params.get("dtype", "float32"),
        device=device,
        attn_implementation=model_params.get("attn_implementation"),
    )
    targets = []
    for name, spec in sae_specs.items():
        sae = load_sae(spec, device=device, path=sae_paths.get(name))
        hook = check_compatible(model, sae)
        shard = Path(codes_dir) / f"{name}.parquet"
        shard_hash = encode_hash(model_params, encode_params, spec)
        targets.append(EncodeTarget(sae, hook, shard, name, config_hash=shard_hash))
    meta = {
        "model": model_name,
        "variant": manifest["variant"],
        "config_hash": encode_hash(model_params, encode_params),
    }
    info = encode_shard_multi(model, targets, token_shard, nll_path, meta, cfg, device)
    log.info("encoded: %s", info)
    return info


def match_sparsity(
    base: str,
    target: str,
    target_nll_paths: list[str],
    token_paths: list[str],
    model_params: dict[str, Any],
    matched_params: dict[str, Any],
    encode_params: dict[str, Any],
    out_path: str,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Bisection on pruning sparsity until the pruned model's perplexity matches the target's.

    The target's perplexity comes from its encode NLL shards (no second forward pass),
    restricted to the same sequences the search evaluates; the search runs the model
    as encode does (`matched.PruneSearch`).
    """
    from .matched import MatchedConfig, PruneSearch
    from .matched import match_sparsity as search_sparsity
    from .models import resolve_device
    from .perplexity import chunked_perplexity
    from .shards import Expected

    cfg = MatchedConfig(
        target=target,
        tolerance=matched_params["tolerance"],
        lo=matched_params["lo"],
        hi=matched_params["hi"],
        max_steps=matched_params["max_steps"],
    )
    device = resolve_device(encode_params.get("device", "auto"))
    ids = load_token_ids(token_paths)
    n_seq = matched_params.get("n_sequences") or len(ids)
    ids = ids[:n_seq]
    target_ppl = chunked_perplexity(
        [Path(p) for p in target_nll_paths],
        token_stop=n_seq * ids.shape[1],
        variant=target,
        expect=Expected(model=model_name),
    )["perplexity"]
    search = PruneSearch(
        base,
        target,
        dtype=model_params.get("dtype", "float32"),
        revision=model_params.get("revision"),
        attn_implementation=model_params.get("attn_implementation"),
        device=device,
    )
    best, trace = search_sparsity(
        search, ids, target_ppl, cfg, batch_size=int(encode_params.get("batch_size", 16))
    )
    result = {
        "target": target,
        "target_perplexity": target_ppl,
        "sparsity": best,
        "trace": [{"step": s, "sparsity": x, "perplexity": p} for s, x, p in trace],
        "n_sequences": int(n_seq),
        "params": matched_params,
    }
    write_json(out_path, result)
    return result


# ---------------------------------------------------------------- analysis
def fp_stats(
    code_paths: list[str], out_path: str, expect: dict[str, Any] | None = None
) -> dict[str, Any]:
    from .stats import fp_feature_stats

    table = fp_feature_stats(
        [Path(p) for p in code_paths], expect=Expected.from_dict(expect), variant="fp"
    )
    write_parquet(table, out_path)
    return {"d_sae": table.height, "n_fired": int((table["firing_count"] > 0).sum())}


def correlate(
    fp_paths: list[str],
    variant_paths: list[str],
    out_path: str,
    variant: str | None = None,
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from .correlate import correlate_variant

    table = correlate_variant(
        [Path(p) for p in fp_paths],
        [Path(p) for p in variant_paths],
        variant=variant,
        expect=Expected.from_dict(expect),
    )
    write_parquet(table, out_path)
    return {"n_features": table.height, "flags": table["flag"].value_counts().to_dicts()}


def sliding_perplexity(
    checkpoint: str,
    token_paths: list[str],
    tokenizer_source: str,
    params: dict[str, Any],
    out_path: str,
) -> dict[str, Any]:
    """Strided sliding-window perplexity over the token set read as one stream.

    A BOS that the token set put at the start of every sequence is dropped first,
    so the stream is the text itself; the evaluation adds its own BOS per window.
    """
    import torch

    from .checkpoints import load_checkpoint, read_manifest
    from .models import load_tokenizer, resolve_device
    from .perplexity import sliding_window_nll

    model_params, ppl, enc = params["model"], params["perplexity"], params["encode"]
    device = resolve_device(enc.get("device", "auto"))
    ids = load_token_ids(token_paths)
    bos_id = load_tokenizer(tokenizer_source).bos_token_id
    if params.get("tokens", {}).get("bos") and bos_id is not None:
        ids = ids[:, 1:]
    stream = torch.from_numpy(ids.reshape(-1))
    model = load_checkpoint(
        checkpoint,
        dtype=model_params.get("dtype", "float32"),
        device=device,
        attn_implementation=model_params.get("attn_implementation"),
    )
    nll_sum, n_scored = sliding_window_nll(
        model,
        stream,
        window=ppl["window"],
        stride=ppl["stride"],
        bos_id=bos_id if ppl.get("bos", True) else None,
        batch_size=int(enc.get("batch_size", 16)),
        device=device,
    )
    variant = read_manifest(checkpoint)["variant"]
    if not np.isfinite(nll_sum):
        from .encode import NonFiniteError

        raise NonFiniteError(
            f"sliding-window perplexity of {variant!r} ({checkpoint}) is non-finite "
            f"(NLL sum {nll_sum}); try model.dtype: float32, or re-make the checkpoint with "
            "`snakemake --cores all --forcerun compress`"
        )
    result = {
        "variant": variant,
        "nll_sum": nll_sum,
        "n_scored": n_scored,
        "perplexity": float(np.exp(nll_sum / n_scored)),
        "window": ppl["window"],
        "stride": ppl["stride"],
        "bos": bos_id if ppl.get("bos", True) else None,
    }
    write_json(out_path, result)
    return result


def perplexity_table(
    nll_paths: dict[str, list[str]],
    sliding_paths: dict[str, str],
    out_path: str,
    expect: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Chunked (from encode NLL shards) and sliding-window perplexity per variant, with % change vs FP.

    Every NLL shard must say it is of the variant it is listed under (and of
    `expect["model"]`), and so must every sliding-window result.
    """
    from .files import InputError, rerun_hint
    from .perplexity import chunked_perplexity

    expected = Expected.from_dict(expect)
    rows = []
    for variant, paths in nll_paths.items():
        chunked = chunked_perplexity([Path(p) for p in paths], variant=variant, expect=expected)
        row: dict[str, Any] = {
            "variant": variant,
            "n_tokens": chunked["n_tokens"],
            "ppl_chunked": chunked["perplexity"],
        }
        if variant in sliding_paths:
            sliding = read_json(sliding_paths[variant], "sliding_perplexity")
            if sliding.get("variant") != variant:
                raise InputError(
                    f"{sliding_paths[variant]}: holds variant {sliding.get('variant')!r}, "
                    f"listed as {variant!r}; {rerun_hint('sliding_perplexity')}"
                )
            row.update(ppl_sliding=sliding["perplexity"], n_tokens_sliding=sliding["n_scored"])
        rows.append(row)
    table = pl.DataFrame(rows)
    if "fp" not in nll_paths:
        raise ValueError("perplexity table needs the fp variant as reference")
    for col in ("ppl_chunked", "ppl_sliding"):
        if col in table.columns:
            ref = table.filter(pl.col("variant") == "fp")[col][0]
            table = table.with_columns((100.0 * (pl.col(col) / ref - 1.0)).alias(f"d{col}_pct"))
    write_parquet(table, out_path)
    return {"variants": table.height}


def survival(
    fp_stats_path: str,
    correlation_paths: dict[str, str],
    perplexity_path: str,
    params: dict[str, Any],
    features_out: str,
    summary_out: str,
) -> pl.DataFrame:
    """Per-feature classes for every variant (long table) and the per-variant summary."""
    from .survival import SurvivalConfig, feature_table, summary

    cfg = SurvivalConfig(**params)
    stats = read_parquet(fp_stats_path)
    tables = {v: feature_table(stats, read_parquet(p), cfg) for v, p in correlation_paths.items()}
    long = pl.concat(
        [t.with_columns(pl.lit(v).alias("variant")) for v, t in tables.items()],
        how="vertical_relaxed",
    )
    write_parquet(long.select("variant", pl.exclude("variant")), features_out)
    table = summary(tables, read_parquet(perplexity_path))
    write_parquet(table, summary_out)
    write_csv(table, Path(summary_out).with_suffix(".csv"))
    return table


def _by_variant(features_path: str) -> dict[str, pl.DataFrame]:
    features = read_parquet(features_path)
    return {str(k[0]): t for k, t in features.group_by("variant", maintain_order=True)}


def predict(features_path: str, params: dict[str, Any], out_dir: str) -> pl.DataFrame:
    """Survival predictor for every compressed variant, plus survival by predictor quantile."""
    from .predict import PredictConfig, predict_survival, survival_by_quantile

    cfg = PredictConfig(
        predictors=tuple(params["predictors"]), folds=params["folds"], seed=params["seed"]
    )
    rows, coefficients, oof, quantiles = [], [], [], []
    for variant, table in _by_variant(features_path).items():
        if parse_variant(variant).kind == "null":
            continue  # every feature survives by construction: nothing to predict
        res = predict_survival(table, cfg)
        rows.append(
            {
                "variant": variant,
                "n": res["n"],
                "n_survived": res["n_survived"],
                "auc_mean": res["auc_mean"],
                "auc_sd": res["auc_sd"],
                "intercept": res["intercept"],
                "reason": res["reason"],
            }
        )
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
    out = Path(out_dir)
    floats = {"auc_mean", "auc_sd", "intercept", "coefficient", "marginal_auc", "marginal_auc_best"}
    summary = pl.DataFrame(
        rows,
        schema_overrides={
            "reason": pl.String,
            **{k: pl.Float64 for k in floats & {"auc_mean", "auc_sd", "intercept"}},
        },
    )
    write_parquet(summary, out / "predict.parquet")
    write_parquet(
        pl.DataFrame(
            coefficients,
            schema_overrides={
                k: pl.Float64 for k in ("coefficient", "marginal_auc", "marginal_auc_best")
            },
        ),
        out / "predict_coefficients.parquet",
    )
    write_parquet(pl.concat(oof, how="vertical_relaxed"), out / "predict_oof.parquet")
    by_q = pl.concat(quantiles, how="vertical_relaxed")
    write_parquet(
        by_q.select("variant", "predictor", "q", pl.exclude("variant", "predictor", "q")),
        out / "survival_by_quantile.parquet",
    )
    return summary


def overlap_table(features_path: str, pairs: list[list[str]], out_path: str) -> pl.DataFrame:
    """Jaccard of non-surviving/blurred/destroyed sets and damage rank correlation per variant pair."""
    from .overlap import overlap

    tables = _by_variant(features_path)
    rows = [{"variant_a": a, "variant_b": b, **overlap(tables[a], tables[b])} for a, b in pairs]
    # Undefined numbers are null (None), never NaN; keep their columns Float64 when all are.
    table = (
        pl.DataFrame(rows, infer_schema_length=None).with_columns(
            pl.col(r"^(jaccard|spearman|pearson).*$").cast(pl.Float64),
            pl.col("reason").cast(pl.String),
        )
        if rows
        else pl.DataFrame(rows)
    )
    write_parquet(table, out_path)
    return table


def stability(
    fp_codes: list[str],
    variant_codes: dict[str, list[str]],
    params: dict[str, Any],
    out_path: str,
    expect: dict[str, Any] | None = None,
) -> pl.DataFrame:
    from .stability import StabilityConfig, stability_table
    from .survival import SurvivalConfig

    table = stability_table(
        fp_codes,
        variant_codes,
        expect=Expected.from_dict(expect),
        check_variants=True,
        seq_len=params["seq_len"],
        survival=SurvivalConfig(**params["analysis"]),
        cfg=StabilityConfig(
            token_budgets=tuple(params["stability"]["token_budgets"]),
            subsets=params["stability"]["subsets"],
            seed=params["stability"]["seed"],
        ),
    )
    write_parquet(table, out_path)
    return table


def threshold_grid(features_path: str, params: dict[str, Any], out_path: str) -> pl.DataFrame:
    from .survival import threshold_grid as grid

    tables = {v: t for v, t in _by_variant(features_path).items()}
    table = grid(tables, params["survived_grid"], params["destroyed_grid"])
    write_parquet(table, out_path)
    return table


def contexts(
    features_path: str,
    fp_codes: list[str],
    variant_codes: dict[str, list[str]],
    token_paths: list[str],
    tokenizer_source: str,
    params: dict[str, Any],
    out_path: str,
    expect: dict[str, Any] | None = None,
) -> pl.DataFrame:
    from .contexts import ContextConfig, damaged_contexts
    from .models import load_tokenizer

    features = read_parquet(features_path).filter(pl.col("variant").is_in(list(variant_codes)))
    table = damaged_contexts(
        features,
        fp_codes,
        variant_codes,
        load_token_ids(token_paths),
        load_tokenizer(tokenizer_source),
        ContextConfig(**params),
        expect=Expected.from_dict(expect),
        check_variants=True,
    )
    write_parquet(table, out_path)
    write_csv(table, Path(out_path).with_suffix(".csv"))
    return table


def reference_comparison(
    reference_csv: str, tables_dir: str, perplexity_path: str, out_path: str
) -> pl.DataFrame:
    from .reference import compare

    tables = Path(tables_dir)
    table = compare(
        reference_csv,
        read_parquet(tables / "survival.parquet"),
        read_parquet(perplexity_path),
        read_parquet(tables / "predict.parquet"),
        read_parquet(tables / "overlap.parquet"),
    )
    write_parquet(table, out_path)
    return table
