# Run each variant on each token shard; cache SAE codes (sparse) and per-token NLL.


rule encode:
    input:
        checkpoint=f"{R}/checkpoints/{{model}}/{{variant}}",
        tokens=token_dir,
        sae=sae_dir_input,
    output:
        codes=f"{R}/codes/{{model}}/{{variant}}/shard-{{shard}}.parquet",
        nll=f"{R}/nll/{{model}}/{{variant}}/shard-{{shard}}.parquet",
    params:
        sae_path=sae_path_arg,
        cfg=lambda w: dumps(
            model=model_cfg(w.model)["model"],
            sae=model_cfg(w.model)["sae"],
            encode=config["encode"],
        ),
    resources:
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    conda:
        "../../envs/torch.yaml"
    log:
        f"{R}/logs/encode/{{model}}/{{variant}}/shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/encode/{{model}}/{{variant}}/shard-{{shard}}.tsv"
    shell:
        "sae-audit encode --params {params.cfg:q} --checkpoint {input.checkpoint} {params.sae_path} "
        "--tokens {input.tokens}/shard-{wildcards.shard}.parquet --codes {output.codes} --nll {output.nll} "
        "--model-name {wildcards.model} > {log} 2>&1"
