# Per-feature statistics, correlations, perplexity and survival tables.
# Paths with {model}/{sae}: one measurement basis (an SAE of a model); perplexity is per model.
# Every rule calls the stage of its own name: `sae-audit <rule>` with the stage's flags.
# Seconds-long table jobs are `localrule`s: on a cluster they run on the submit host.


rule fp_stats:
    "Per-feature FP statistics of one basis (firing rate, mean, peak, concentration) from the FP code shards."
    input:
        lambda w: code_dirs(w.model, "fp"),
    output:
        f"{R}/features/{{model}}/{{sae}}/fp_stats.parquet",
    log:
        f"{R}/logs/fp_stats/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/fp_stats/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        codes=lambda w: code_files(w.model, "fp", w.sae),
        expect=lambda w: shard_expectation(w.model, w.sae),
    shell:
        "sae-audit fp-stats --expect {params.expect:q} --codes {params.codes:q} --out {output:q} > {log:q} 2>&1"


rule sae_quality:
    "The SAE's quality on every variant's activations (explained variance, MSE, L0, dead fraction) from the code shards' footers."
    input:
        lambda w: [d for v in ALL_VARIANTS for d in code_dirs(w.model, v)],
    output:
        f"{R}/tables/{{model}}/{{sae}}/sae_quality.parquet",
    log:
        f"{R}/logs/sae_quality/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/sae_quality/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        codes=lambda w: [
            f"{v}={p}" for v in ALL_VARIANTS for p in code_files(w.model, v, w.sae)
        ],
        expect=lambda w: shard_expectation(w.model, w.sae),
    shell:
        "sae-audit sae-quality --expect {params.expect:q} --codes {params.codes:q} --out {output:q} > {log:q} 2>&1"


rule correlate:
    "Per-feature Pearson r between FP and one variant's SAE codes, with its interval (analysis.confidence)."
    input:
        fp=lambda w: code_dirs(w.model, "fp"),
        variant=lambda w: code_dirs(w.model, w.variant),
    output:
        f"{R}/features/{{model}}/{{sae}}/{{variant}}/correlation.parquet",
    log:
        f"{R}/logs/correlate/{{model}}/{{sae}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/correlate/{{model}}/{{sae}}/{{variant}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        fp=lambda w: code_files(w.model, "fp", w.sae),
        variant=lambda w: code_files(w.model, w.variant, w.sae),
        expect=lambda w: shard_expectation(w.model, w.sae),
        # only the interval's level: a class threshold change re-runs no correlation
        analysis=dumps(confidence=config["analysis"]["confidence"]),
    shell:
        "sae-audit correlate --expect {params.expect:q} --fp {params.fp:q} --variant {params.variant:q} "
        "--variant-name {wildcards.variant:q} --analysis {params.analysis:q} --out {output:q} > {log:q} 2>&1"


rule perplexity:
    "Perplexity of every variant of a model: chunked from the encode NLL shards, plus sliding windows if on."
    input:
        nll=lambda w: [p for v in ALL_VARIANTS for p in nll_shards(w.model, v)],
        sliding=lambda w: list(sliding_files(w.model).values()),
    output:
        f"{R}/tables/{{model}}/perplexity.parquet",
    log:
        f"{R}/logs/perplexity/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/perplexity/{{model}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        nll=lambda w: [f"{v}={p}" for v in ALL_VARIANTS for p in nll_shards(w.model, v)],
        sliding=lambda w: [f"{v}={p}" for v, p in sliding_files(w.model).items()],
        expect=lambda w: shard_expectation(w.model),
    shell:
        "sae-audit perplexity --expect {params.expect:q} --nll {params.nll:q} --sliding {params.sliding:q} "
        "--out {output:q} > {log:q} 2>&1"


rule survival:
    "Class of every active feature per variant (survived, blurred, destroyed) and the survival summary."
    input:
        fp_stats=f"{R}/features/{{model}}/{{sae}}/fp_stats.parquet",
        correlation=lambda w: [
            f"{R}/features/{w.model}/{w.sae}/{v}/correlation.parquet" for v in VARIANTS
        ],
        perplexity=f"{R}/tables/{{model}}/perplexity.parquet",
        # read-against numbers where the basis has a twin SAE (rule seed_turnover)
        seed_turnover=lambda w: seed_turnover_input(w.model, w.sae),
        # the matched searches' chosen sparsities (the summary's sparsity column)
        matched=lambda w: list(matched_files(w.model).values()),
    output:
        features=f"{R}/tables/{{model}}/{{sae}}/features.parquet",
        features_csv=f"{R}/tables/{{model}}/{{sae}}/features.csv",
        summary=f"{R}/tables/{{model}}/{{sae}}/survival.parquet",
        csv=f"{R}/tables/{{model}}/{{sae}}/survival.csv",
    log:
        f"{R}/logs/survival/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/survival/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        correlation=lambda w: [
            f"{v}={R}/features/{w.model}/{w.sae}/{v}/correlation.parquet"
            for v in VARIANTS
        ],
        analysis=dumps(config["analysis"]),
        matched=lambda w: [f"{v}={p}" for v, p in matched_files(w.model).items()],
    shell:
        "sae-audit survival --analysis {params.analysis:q} --fp-stats {input.fp_stats:q} "
        "--correlation {params.correlation:q} --perplexity {input.perplexity:q} "
        "--features-out {output.features:q} --summary-out {output.summary:q} "
        "--seed-turnover {input.seed_turnover:q} --matched {params.matched:q} > {log:q} 2>&1"


rule seed_turnover:
    "Best decoder cosine of each feature to the twin SAE: which features are stable across SAE seeds."
    input:
        sae=lambda w: sae_dirs(w.model)[w.sae],
        twin=lambda w: twin_sae_dir(w.model, w.sae),
    output:
        f"{R}/tables/{{model}}/{{sae}}/seed_turnover.parquet",
    log:
        f"{R}/logs/seed_turnover/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/seed_turnover/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        seed_turnover=dumps(config["seed_turnover"]),
    shell:
        "sae-audit seed-turnover --seed-turnover {params.seed_turnover:q} --sae {input.sae:q} "
        "--twin {input.twin:q} --out {output:q} > {log:q} 2>&1"


rule predict:
    "Cross-validated logistic regression of survival on FP feature statistics, and survival by quantile."
    input:
        f"{R}/tables/{{model}}/{{sae}}/features.parquet",
    output:
        summary=f"{R}/tables/{{model}}/{{sae}}/predict.parquet",
        coefficients=f"{R}/tables/{{model}}/{{sae}}/predict_coefficients.parquet",
        oof=f"{R}/tables/{{model}}/{{sae}}/predict_oof.parquet",
        quantiles=f"{R}/tables/{{model}}/{{sae}}/survival_by_quantile.parquet",
    log:
        f"{R}/logs/predict/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        predict=dumps(config["predict"]),
        out_dir=lambda w: f"{R}/tables/{w.model}/{w.sae}",
    shell:
        "sae-audit predict --predict {params.predict:q} --features {input:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule overlap:
    "Whether variant pairs damage the same features: overlap against chance and damage rank correlation."
    input:
        f"{R}/tables/{{model}}/{{sae}}/features.parquet",
    output:
        f"{R}/tables/{{model}}/{{sae}}/overlap.parquet",
    log:
        f"{R}/logs/overlap/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/overlap/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        pairs=dumps([list(p) for p in audit_config.overlap_pairs(config)]),
    shell:
        "sae-audit overlap --pairs {params.pairs:q} --features {input:q} --out {output:q} > {log:q} 2>&1"


rule stability:
    "How stable each feature's r is over token budgets and random half-size sequence subsets."
    input:
        fp=lambda w: code_dirs(w.model, "fp"),
        codes=lambda w: [d for v in VARIANTS for d in code_dirs(w.model, v)],
    output:
        f"{R}/tables/{{model}}/{{sae}}/stability.parquet",
    log:
        f"{R}/logs/stability/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/stability/{{model}}/{{sae}}.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        fp=lambda w: code_files(w.model, "fp", w.sae),
        codes=lambda w: [
            f"{v}={p}" for v in VARIANTS for p in code_files(w.model, v, w.sae)
        ],
        stability=dumps(
            {k: config["stability"][k] for k in ("token_budgets", "subsets", "seed")}
        ),
        analysis=dumps(config["analysis"]),
        seq_len=lambda w: model_cfg(w.model)["tokens"]["seq_len"],
        expect=lambda w: shard_expectation(w.model, w.sae),
    shell:
        "sae-audit stability --stability {params.stability:q} --analysis {params.analysis:q} "
        "--seq-len {params.seq_len:q} --expect {params.expect:q} --fp {params.fp:q} --codes {params.codes:q} "
        "--out {output:q} > {log:q} 2>&1"


rule threshold_grid:
    "Class shares over a grid of survived / destroyed thresholds (how much the thresholds matter)."
    input:
        f"{R}/tables/{{model}}/{{sae}}/features.parquet",
    output:
        f"{R}/tables/{{model}}/{{sae}}/threshold_grid.parquet",
    log:
        f"{R}/logs/threshold_grid/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/threshold_grid/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        threshold_grid=dumps(config["threshold_grid"]),
    shell:
        "sae-audit threshold-grid --threshold-grid {params.threshold_grid:q} --features {input:q} "
        "--out {output:q} > {log:q} 2>&1"


rule damaged_contexts:
    "Top FP contexts of the most damaged active features of each variant."
    input:
        features=f"{R}/tables/{{model}}/{{sae}}/features.parquet",
        fp=lambda w: code_dirs(w.model, "fp"),
        codes=lambda w: [d for v in VARIANTS for d in code_dirs(w.model, v)],
        tokens=token_dir,
        model=base_model_input,
    output:
        parquet=f"{R}/tables/{{model}}/{{sae}}/damaged_contexts.parquet",
        csv=f"{R}/tables/{{model}}/{{sae}}/damaged_contexts.csv",
    log:
        f"{R}/logs/damaged_contexts/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/damaged_contexts/{{model}}/{{sae}}.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        fp=lambda w: code_files(w.model, "fp", w.sae),
        codes=lambda w: [
            f"{v}={p}" for v in VARIANTS for p in code_files(w.model, v, w.sae)
        ],
        tokens=lambda w: token_files(w.model),
        tokenizer=tokenizer_source,
        damaged_contexts=dumps(config["damaged_contexts"]),
        expect=lambda w: shard_expectation(w.model, w.sae),
    shell:
        "sae-audit damaged-contexts --damaged-contexts {params.damaged_contexts:q} --expect {params.expect:q} "
        "--features {input.features:q} --fp {params.fp:q} --codes {params.codes:q} --tokens {params.tokens:q} "
        "--tokenizer {params.tokenizer:q} --out {output.parquet:q} > {log:q} 2>&1"


# Per (RTN, shipped) pair at the same weight bits (config.equal_bits_pairs): the features
# the shipped format saves that RTN destroys and back, with their top FP contexts.
rule equal_bits:
    "Features a shipped format saves or loses against RTN at the same weight bits, with their contexts."
    input:
        features=f"{R}/tables/{{model}}/{{sae}}/features.parquet",
        fp=lambda w: code_dirs(w.model, "fp"),
        codes=lambda w: [
            d for v in equal_bits_variants() for d in code_dirs(w.model, v)
        ],
        tokens=token_dir,
        model=base_model_input,
    output:
        f"{R}/tables/{{model}}/{{sae}}/equal_bits.parquet",
    log:
        f"{R}/logs/equal_bits/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/equal_bits/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        pairs=dumps([list(p) for p in audit_config.equal_bits_pairs(config)]),
        fp=lambda w: code_files(w.model, "fp", w.sae),
        codes=lambda w: [
            f"{v}={p}"
            for v in equal_bits_variants()
            for p in code_files(w.model, v, w.sae)
        ],
        tokens=lambda w: token_files(w.model),
        tokenizer=tokenizer_source,
        damaged_contexts=dumps(config["damaged_contexts"]),
        expect=lambda w: shard_expectation(w.model, w.sae),
    shell:
        "sae-audit equal-bits --damaged-contexts {params.damaged_contexts:q} --pairs {params.pairs:q} "
        "--expect {params.expect:q} --features {input.features:q} --fp {params.fp:q} --codes {params.codes:q} "
        "--tokens {params.tokens:q} --tokenizer {params.tokenizer:q} --out {output:q} > {log:q} 2>&1"


rule reference_comparison:
    "This run's numbers beside the published ones (models.<name>.reference CSV)."
    input:
        reference=lambda w: reference_path(w.model),
        survival=f"{R}/tables/{{model}}/{{sae}}/survival.parquet",
        predict=f"{R}/tables/{{model}}/{{sae}}/predict.parquet",
        overlap=f"{R}/tables/{{model}}/{{sae}}/overlap.parquet",
        perplexity=f"{R}/tables/{{model}}/perplexity.parquet",
    output:
        f"{R}/tables/{{model}}/{{sae}}/reference_comparison.parquet",
    log:
        f"{R}/logs/reference_comparison/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/reference_comparison/{{model}}/{{sae}}.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        tables_dir=lambda w: f"{R}/tables/{w.model}/{w.sae}",
    shell:
        "sae-audit reference-comparison --reference {input.reference:q} --tables-dir {params.tables_dir:q} "
        "--perplexity {input.perplexity:q} --out {output:q} > {log:q} 2>&1"
