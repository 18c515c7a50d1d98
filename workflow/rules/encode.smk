# Run each variant on each token shard; cache SAE codes (sparse) and per-token NLL.


rule encode:
    input:
        checkpoint=f"{R}/checkpoints/{{model}}/{{variant}}",
        tokens=token_dir,
        saes=lambda w: list(sae_dirs(w.model).values()),
    output:
        codes=directory(f"{R}/codes/{{model}}/{{variant}}/shard-{{shard}}"),
        nll=f"{R}/nll/{{model}}/{{variant}}/shard-{{shard}}.parquet",
    log:
        f"{R}/logs/encode/{{model}}/{{variant}}/shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/encode/{{model}}/{{variant}}/shard-{{shard}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: lambda w: model_cfg(w.model)["resources"]["threads"]
    resources:
        mem_mb=lambda w: model_cfg(w.model)["resources"]["mem_mb"],
        runtime=lambda w: model_cfg(w.model)["resources"]["runtime"],
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    params:
        sae_paths=lambda w: [
            f"{name}={path}" for name, path in sae_dirs(w.model).items()
        ],
        cfg=lambda w: dumps(
            model=model_cfg(w.model)["model"],
            saes=model_cfg(w.model)["saes"],
            encode=config["encode"],
        ),
    shell:
        "sae-audit encode --params {params.cfg:q} --checkpoint {input.checkpoint:q} --sae-path {params.sae_paths:q} "
        "--tokens {input.tokens:q}/shard-{wildcards.shard:q}.parquet --codes-dir {output.codes:q} --nll {output.nll:q} "
        "--model-name {wildcards.model:q} > {log:q} 2>&1"
