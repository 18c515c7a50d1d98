# Per-feature statistics, correlations, perplexity and survival tables.


rule fp_stats:
    input:
        lambda w: code_shards(w.model, "fp"),
    output:
        f"{R}/features/{{model}}/fp_stats.parquet",
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/fp_stats/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/fp_stats/{{model}}.tsv"
    shell:
        "sae-audit stats --codes {input} --out {output} > {log} 2>&1"


rule correlate:
    input:
        fp=lambda w: code_shards(w.model, "fp"),
        variant=lambda w: code_shards(w.model, w.variant),
    output:
        f"{R}/features/{{model}}/{{variant}}/correlation.parquet",
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/correlate/{{model}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/correlate/{{model}}/{{variant}}.tsv"
    shell:
        "sae-audit correlate --fp {input.fp} --variant {input.variant} --out {output} > {log} 2>&1"


rule sliding_perplexity:
    input:
        checkpoint=f"{R}/checkpoints/{{model}}/{{variant}}",
        tokens=token_dir,
    output:
        f"{R}/perplexity/{{model}}/{{variant}}/sliding.json",
    params:
        tokenizer=tokenizer_source,
        tokens=lambda w: token_files(w.model),
        cfg=lambda w: dumps(
            model=model_cfg(w.model)["model"],
            tokens={"bos": model_cfg(w.model)["tokens"]["bos"]},
            perplexity=config["perplexity"],
            encode=config["encode"],
        ),
    resources:
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/sliding_perplexity/{{model}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/sliding_perplexity/{{model}}/{{variant}}.tsv"
    shell:
        "sae-audit sliding-perplexity --params {params.cfg:q} --checkpoint {input.checkpoint} "
        "--tokens {params.tokens} --tokenizer {params.tokenizer} --out {output} > {log} 2>&1"


rule perplexity:
    input:
        nll=lambda w: [p for v in ALL_VARIANTS for p in nll_shards(w.model, v)],
        sliding=lambda w: [f"{R}/perplexity/{w.model}/{v}/sliding.json" for v in ALL_VARIANTS],
    output:
        f"{R}/tables/{{model}}/perplexity.parquet",
    params:
        nll=lambda w: [f"{v}={p}" for v in ALL_VARIANTS for p in nll_shards(w.model, v)],
        sliding=lambda w: [f"{v}={R}/perplexity/{w.model}/{v}/sliding.json" for v in ALL_VARIANTS],
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/perplexity/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/perplexity/{{model}}.tsv"
    shell:
        "sae-audit perplexity --nll {params.nll} --sliding {params.sliding} --out {output} > {log} 2>&1"


rule survival:
    input:
        fp_stats=f"{R}/features/{{model}}/fp_stats.parquet",
        correlation=lambda w: [f"{R}/features/{w.model}/{v}/correlation.parquet" for v in VARIANTS],
        perplexity=f"{R}/tables/{{model}}/perplexity.parquet",
    output:
        features=f"{R}/tables/{{model}}/features.parquet",
        summary=f"{R}/tables/{{model}}/survival.parquet",
        csv=f"{R}/tables/{{model}}/survival.csv",
    params:
        correlation=lambda w: [f"{v}={R}/features/{w.model}/{v}/correlation.parquet" for v in VARIANTS],
        cfg=dumps(config["analysis"]),
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/survival/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/survival/{{model}}.tsv"
    shell:
        "sae-audit survival --params {params.cfg:q} --fp-stats {input.fp_stats} "
        "--correlation {params.correlation} --perplexity {input.perplexity} "
        "--features-out {output.features} --summary-out {output.summary} > {log} 2>&1"


rule predict:
    input:
        f"{R}/tables/{{model}}/features.parquet",
    output:
        summary=f"{R}/tables/{{model}}/predict.parquet",
        coefficients=f"{R}/tables/{{model}}/predict_coefficients.parquet",
        oof=f"{R}/tables/{{model}}/predict_oof.parquet",
        quantiles=f"{R}/tables/{{model}}/survival_by_quantile.parquet",
    params:
        cfg=dumps(config["predict"]),
        out_dir=lambda w: f"{R}/tables/{w.model}",
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/predict/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{{model}}.tsv"
    shell:
        "sae-audit predict --params {params.cfg:q} --features {input} --out-dir {params.out_dir} > {log} 2>&1"


rule overlap:
    input:
        f"{R}/tables/{{model}}/features.parquet",
    output:
        f"{R}/tables/{{model}}/overlap.parquet",
    params:
        cfg=dumps(pairs=audit_config.overlap_pairs(config)),
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/overlap/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/overlap/{{model}}.tsv"
    shell:
        "sae-audit overlap --params {params.cfg:q} --features {input} --out {output} > {log} 2>&1"


rule stability:
    input:
        fp=lambda w: code_shards(w.model, "fp"),
        codes=lambda w: [p for v in VARIANTS for p in code_shards(w.model, v)],
    output:
        f"{R}/tables/{{model}}/stability.parquet",
    params:
        codes=lambda w: [f"{v}={p}" for v in VARIANTS for p in code_shards(w.model, v)],
        cfg=lambda w: dumps(
            seq_len=model_cfg(w.model)["tokens"]["seq_len"],
            analysis=config["analysis"],
            stability={k: config["stability"][k] for k in ("token_budgets", "subsets", "seed")},
        ),
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/stability/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/stability/{{model}}.tsv"
    shell:
        "sae-audit stability --params {params.cfg:q} --fp {input.fp} --codes {params.codes} --out {output} > {log} 2>&1"


rule threshold_grid:
    input:
        f"{R}/tables/{{model}}/features.parquet",
    output:
        f"{R}/tables/{{model}}/threshold_grid.parquet",
    params:
        cfg=dumps({k: config["stability"][k] for k in ("survived_grid", "destroyed_grid")}),
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/threshold_grid/{{model}}.log",
    shell:
        "sae-audit threshold-grid --params {params.cfg:q} --features {input} --out {output} > {log} 2>&1"


rule damaged_contexts:
    input:
        features=f"{R}/tables/{{model}}/features.parquet",
        fp=lambda w: code_shards(w.model, "fp"),
        codes=lambda w: [p for v in VARIANTS for p in code_shards(w.model, v)],
        tokens=token_dir,
        model=base_model_input,
    output:
        parquet=f"{R}/tables/{{model}}/damaged_contexts.parquet",
        csv=f"{R}/tables/{{model}}/damaged_contexts.csv",
    params:
        codes=lambda w: [f"{v}={p}" for v in VARIANTS for p in code_shards(w.model, v)],
        tokens=lambda w: token_files(w.model),
        tokenizer=tokenizer_source,
        cfg=dumps(config["inspect"]),
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/damaged_contexts/{{model}}.log",
    shell:
        "sae-audit contexts --params {params.cfg:q} --features {input.features} --fp {input.fp} "
        "--codes {params.codes} --tokens {params.tokens} --tokenizer {params.tokenizer} "
        "--out {output.parquet} > {log} 2>&1"
