# Causal survival (config `causal`): whether a feature still does what it did. Per
# variant, its selected features are ablated, steered and read through the unembedding
# in FP and in the variant; then every variant's rows are joined to the Pearson classes.


rule causal:
    "One variant's causal feature survival under one SAE: ablation, steering and direct logit effects in FP and the variant."
    input:
        fp_checkpoint=f"{R}/checkpoints/{{model}}/fp",
        checkpoint=f"{R}/checkpoints/{{model}}/{{variant}}",
        tokens=token_dir,
        fp_stats=f"{R}/features/{{model}}/{{sae}}/fp_stats.parquet",
        sae=lambda w: [d for n, d in sae_dirs(w.model).items() if n == w.sae],
        watchlist=causal_watchlist,
    output:
        f"{R}/features/{{model}}/{{sae}}/{{variant}}/causal.parquet",
    log:
        f"{R}/logs/causal/{{model}}/{{sae}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/causal/{{model}}/{{sae}}/{{variant}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    params:
        model=lambda w: dumps(model_cfg(w.model)["model"]),
        saes=lambda w: dumps({w.sae: model_cfg(w.model)["saes"][w.sae]}),
        sae_path=lambda w: [
            f"{n}={d}" for n, d in sae_dirs(w.model).items() if n == w.sae
        ],
        # Only what the forward passes read: the class thresholds are causal_survival's,
        # and encode's batch size is not used here.
        encode=dumps(CAUSAL_ENCODE),
        causal=dumps(CAUSAL_MEASURE),
        analysis=dumps({"active_rate": config["analysis"]["active_rate"]}),
        tokens=lambda w: token_files(w.model),
        tokenizer=tokenizer_source,
    shell:
        "sae-audit causal --model {params.model:q} --saes {params.saes:q} --encode {params.encode:q} "
        "--causal {params.causal:q} --analysis {params.analysis:q} --fp-checkpoint {input.fp_checkpoint:q} "
        "--checkpoint {input.checkpoint:q} --sae-path {params.sae_path:q} --tokens {params.tokens:q} "
        "--fp-stats {input.fp_stats:q} --tokenizer {params.tokenizer:q} --out {output:q} > {log:q} 2>&1"


rule causal_survival:
    "Causal survival beside Pearson survival: per feature, per variant, and the features where they disagree (with contexts)."
    input:
        causal=lambda w: [
            f"{R}/features/{w.model}/{w.sae}/{v}/causal.parquet" for v in VARIANTS
        ],
        features=f"{R}/tables/{{model}}/{{sae}}/features.parquet",
        fp=lambda w: code_dirs(w.model, "fp"),
        codes=lambda w: [d for v in VARIANTS for d in code_dirs(w.model, v)],
        tokens=token_dir,
        model=base_model_input,
    output:
        table=f"{R}/tables/{{model}}/{{sae}}/causal.parquet",
        summary=f"{R}/tables/{{model}}/{{sae}}/causal_survival.parquet",
        summary_csv=f"{R}/tables/{{model}}/{{sae}}/causal_survival.csv",
        disagreements=f"{R}/tables/{{model}}/{{sae}}/causal_disagreements.parquet",
        disagreements_csv=f"{R}/tables/{{model}}/{{sae}}/causal_disagreements.csv",
    log:
        f"{R}/logs/causal_survival/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/causal_survival/{{model}}/{{sae}}.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        causal=lambda w: [
            f"{v}={R}/features/{w.model}/{w.sae}/{v}/causal.parquet" for v in VARIANTS
        ],
        fp=lambda w: code_files(w.model, "fp", w.sae),
        codes=lambda w: [
            f"{v}={p}" for v in VARIANTS for p in code_files(w.model, v, w.sae)
        ],
        tokens=lambda w: token_files(w.model),
        tokenizer=tokenizer_source,
        damaged_contexts=dumps(config["damaged_contexts"]),
        thresholds=dumps(CAUSAL_THRESHOLDS),
        expect=lambda w: shard_expectation(w.model, w.sae),
    shell:
        "sae-audit causal-survival --damaged-contexts {params.damaged_contexts:q} --thresholds {params.thresholds:q} "
        "--causal {params.causal:q} "
        "--features {input.features:q} --fp {params.fp:q} --codes {params.codes:q} --tokens {params.tokens:q} "
        "--tokenizer {params.tokenizer:q} --expect {params.expect:q} --out {output.table:q} "
        "--summary-out {output.summary:q} --disagreements-out {output.disagreements:q} > {log:q} 2>&1"
