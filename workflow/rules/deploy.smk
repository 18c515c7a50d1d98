# Acting on the audit (issue 15): forecast damage before compressing, protect a watchlist
# within a size budget, and gate a release. The forecast and the protect plan read only
# the FP model; the protected variant is then built (rule compress) and audited like any
# other, and rule gate certifies every variant against the policy file.


rule forecast:
    "Forecast of every variant's feature damage from the FP model alone: quantization noise propagated per block matrix with forward-mode AD."
    input:
        model=base_model_input,
        tokens=token_dir,
        sae=lambda w: [d for n, d in sae_dirs(w.model).items() if n == w.sae],
        matched=lambda w: [f"{R}/matched/{w.model}/{v}.json" for v in FORECAST_MATCHED],
    output:
        table=f"{R}/tables/{{model}}/{{sae}}/forecast.parquet",
        sources=f"{R}/tables/{{model}}/{{sae}}/forecast_sources.parquet",
    log:
        f"{R}/logs/forecast/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/forecast/{{model}}/{{sae}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    params:
        base=base_model,
        # which model, not how the audit runs it: the forecast is float32 and eager
        model=lambda w: dumps(
            {k: model_cfg(w.model)["model"][k] for k in ("source", "revision")}
        ),
        saes=lambda w: dumps({w.sae: model_cfg(w.model)["saes"][w.sae]}),
        sae_path=lambda w: [
            f"{n}={d}" for n, d in sae_dirs(w.model).items() if n == w.sae
        ],
        encode=dumps(device=config["encode"]["device"]),
        forecast=dumps(FORECAST_CONFIG),
        variants=dumps(FORECAST_VARIANTS),
        matched=lambda w: [
            f"{v}={R}/matched/{w.model}/{v}.json" for v in FORECAST_MATCHED
        ],
        tokens=lambda w: token_files(w.model),
        bos=lambda w: dumps(model_cfg(w.model)["tokens"]["bos"]),
    shell:
        "sae-audit forecast --model {params.model:q} --saes {params.saes:q} --encode {params.encode:q} "
        "--forecast {params.forecast:q} --variants {params.variants:q} --matched {params.matched:q} "
        "--base {params.base:q} --sae-path {params.sae_path:q} --tokens {params.tokens:q} --bos {params.bos:q} "
        "--out {output.table:q} --sources-out {output.sources:q} > {log:q} 2>&1"


rule forecast_accuracy:
    "The forecast against the measured audit: per variant the Spearman with measured damage, the AUC for not survived, and transfer."
    input:
        forecast=f"{R}/tables/{{model}}/{{sae}}/forecast.parquet",
        features=f"{R}/tables/{{model}}/{{sae}}/features.parquet",
    output:
        f"{R}/tables/{{model}}/{{sae}}/forecast_accuracy.parquet",
    log:
        f"{R}/logs/forecast_accuracy/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/forecast_accuracy/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        fit_on=config["forecast"]["fit_on"],
        predict=dumps(config["predict"]),
    shell:
        "sae-audit forecast-accuracy --forecast {input.forecast:q} --features {input.features:q} "
        "--fit-on {params.fit_on:q} --predict {params.predict:q} --out {output:q} > {log:q} 2>&1"


rule protect:
    "A mixed-precision recipe that keeps the watchlist's features alive within a size budget: plan, llm-compressor / compressed-tensors config and GGUF tensor types."
    input:
        model=base_model_input,
        tokens=token_dir,
        sae=lambda w: [
            d
            for n, d in sae_dirs(w.model).items()
            if n == audit_config.protect_sae(config, w.model, w.key)
        ],
        fp_stats=protect_fp_stats,
        watchlist=WATCHLIST_FILES,
    output:
        directory(f"{R}/protect/{{model}}/{{key}}"),
    log:
        f"{R}/logs/protect/{{model}}/{{key}}.log",
    benchmark:
        f"{R}/benchmarks/protect/{{model}}/{{key}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    params:
        base=base_model,
        # which model, not how the audit runs it: the forecast is float32 and eager
        model=lambda w: dumps(
            {k: model_cfg(w.model)["model"][k] for k in ("source", "revision")}
        ),
        saes=lambda w: dumps(
            {
                (s := audit_config.protect_sae(config, w.model, w.key)): model_cfg(
                    w.model
                )["saes"][s]
            }
        ),
        sae_path=lambda w: [
            f"{n}={d}"
            for n, d in sae_dirs(w.model).items()
            if n == audit_config.protect_sae(config, w.model, w.key)
        ],
        encode=dumps(device=config["encode"]["device"]),
        # the forward-AD passes' settings, not forecast.measure (the forecast rule's)
        forecast=dumps({k: v for k, v in FORECAST_CONFIG.items() if k != "measure"}),
        entry=lambda w: dumps(config["compression"]["protect"][w.key]),
        watchlist=dumps(config["watchlist"]),
        # the watchlist's active_rate, and the survived threshold unless the entry sets one
        analysis=lambda w: dumps(
            {
                k: config["analysis"][k]
                for k in ("active_rate", "survived")
                if k == "active_rate"
                or config["compression"]["protect"][w.key].get("survived_r") is None
            }
        ),
        tokens=lambda w: token_files(w.model),
        bos=lambda w: dumps(model_cfg(w.model)["tokens"]["bos"]),
    shell:
        "sae-audit protect --model {params.model:q} --saes {params.saes:q} --encode {params.encode:q} "
        "--forecast {params.forecast:q} --entry {params.entry:q} --watchlist {params.watchlist:q} "
        "--analysis {params.analysis:q} --base {params.base:q} --sae-path {params.sae_path:q} "
        "--tokens {params.tokens:q} --bos {params.bos:q} --fp-stats {input.fp_stats:q} "
        "--out {output:q} > {log:q} 2>&1"


rule protect_outcome:
    "Each protected variant's predicted against achieved watchlist survival and size, beside its plain base."
    input:
        plans=lambda w: [
            f"{R}/protect/{w.model}/{k}" for k in protect_keys(w.model, w.sae)
        ],
        checkpoints=lambda w: [
            f"{R}/checkpoints/{w.model}/protect-{k}"
            for k in protect_keys(w.model, w.sae)
        ],
        features=f"{R}/tables/{{model}}/{{sae}}/features.parquet",
    output:
        f"{R}/tables/{{model}}/{{sae}}/protect.parquet",
    log:
        f"{R}/logs/protect_outcome/{{model}}/{{sae}}.log",
    benchmark:
        f"{R}/benchmarks/protect_outcome/{{model}}/{{sae}}.tsv"
    localrule: True
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        plans=lambda w: [
            f"protect-{k}={R}/protect/{w.model}/{k}"
            for k in protect_keys(w.model, w.sae)
        ],
        checkpoints=lambda w: [
            f"protect-{k}={R}/checkpoints/{w.model}/protect-{k}"
            for k in protect_keys(w.model, w.sae)
        ],
    shell:
        "sae-audit protect-outcome --plans {params.plans:q} --checkpoints {params.checkpoints:q} "
        "--features {input.features:q} --out {output:q} > {log:q} 2>&1"


rule gate:
    "The release gate: every variant of every basis checked against the policy file, with a JSON certificate each and a JUnit XML."
    input:
        policy=str(audit_config.gate_policy(config)),
        tables=GATE_TABLES,
        checkpoints=[f"{R}/checkpoints/{m}/{v}" for m in MODELS for v in ALL_VARIANTS],
        tokens=[f"{R}/tokens/{m}" for m in MODELS],
        fp_stats=[
            f"{R}/features/{m}/{s}/fp_stats.parquet" for m in MODELS for s in saes(m)
        ],
        models=[FIXTURE_MODEL_DIRS[s] for s in GATE_FIXTURE_SOURCES],
        saes=sorted({d for m in MODELS for d in sae_dirs(m).values()}),
        watchlist=WATCHLIST_FILES,
    output:
        certificates=directory(f"{R}/certificates"),
        table=f"{R}/tables/gate.parquet",
    log:
        f"{R}/logs/gate/gate.log",
    benchmark:
        f"{R}/benchmarks/gate/gate.tsv"
    localrule: True
    conda:
        # jsonschema validates the certificates: it comes with snakemake, not in analysis.yaml
        "../../envs/torch.yaml"
    threads: 1
    params:
        # the results directory, from where the checks table goes (R/tables/gate.parquet)
        results=lambda w, output: str(Path(output.table).parent.parent),
        bases=dumps([[m, s] for m in MODELS for s in saes(m)]),
        base_dirs=[f"{m}={audit_config.base_model_source(config, m)}" for m in MODELS],
        sae_dirs=[
            f"{m}/{s}={d}"
            for m in MODELS
            for s, d in audit_config.sae_sources(config, m).items()
        ],
        watchlist=dumps(config["watchlist"]),
        analysis=dumps({"active_rate": config["analysis"]["active_rate"]}),
        report=config["gate"]["report"],
        causal=dumps(config["causal"]["enabled"]),
    shell:
        "sae-audit gate --results {params.results:q} --bases {params.bases:q} --policy {input.policy:q} "
        "--base-dirs {params.base_dirs:q} --sae-dirs {params.sae_dirs:q} --watchlist {params.watchlist:q} "
        "--analysis {params.analysis:q} --report {params.report:q} --causal {params.causal:q} --enforce false "
        "--out {output.certificates:q} --table-out {output.table:q} > {log:q} 2>&1"
