# Why a model is fragile: outlier diagnostics of the FP model (every model, the fixture
# and hub models alike), on the first evaluation sequences (sae_audit.outliers).


rule outliers:
    "Outlier diagnostics of the FP model: weight kurtosis, channel absmax ratios, residual and attention outliers."
    input:
        model=base_model_input,
        tokens=token_dir,
    output:
        f"{R}/tables/{{model}}/outliers.parquet",
    log:
        f"{R}/logs/outliers/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/outliers/{{model}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    params:
        base=base_model,
        tokens=lambda w: token_files(w.model),
        model=lambda w: dumps(model_cfg(w.model)["model"]),
        outliers=dumps(config["outliers"]),
        # only the device: a batch size change must not re-run the diagnostics
        encode=dumps(device=config["encode"]["device"]),
    shell:
        "sae-audit outliers --model {params.model:q} --outliers {params.outliers:q} "
        "--encode {params.encode:q} --base {params.base:q} --tokens {params.tokens:q} "
        "--out {output:q} > {log:q} 2>&1"
