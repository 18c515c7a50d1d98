# Forward passes: each variant on each token shard (SAE codes, sparse, and per-token NLL),
# and the strided sliding-window perplexity of each variant.


rule encode:
    "One variant's forward pass over one token shard: SAE codes of every SAE (sparse) and per-token NLL."
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
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    params:
        sae_path=lambda w: [
            f"{name}={path}" for name, path in sae_dirs(w.model).items()
        ],
        model=lambda w: dumps(model_cfg(w.model)["model"]),
        saes=lambda w: dumps(model_cfg(w.model)["saes"]),
        encode=dumps(config["encode"]),
        bos=lambda w: dumps(model_cfg(w.model)["tokens"]["bos"]),
        tokenizer=tokenizer_source,
    shell:
        "sae-audit encode --model {params.model:q} --saes {params.saes:q} --encode {params.encode:q} "
        "--checkpoint {input.checkpoint:q} --sae-path {params.sae_path:q} "
        "--tokens {input.tokens:q}/shard-{wildcards.shard:q}.parquet --codes-dir {output.codes:q} --nll {output.nll:q} "
        "--model-name {wildcards.model:q} --bos {params.bos:q} --tokenizer {params.tokenizer:q} > {log:q} 2>&1"


rule sliding_perplexity:
    "Strided sliding-window perplexity of one variant (perplexity.window / stride)."
    input:
        checkpoint=f"{R}/checkpoints/{{model}}/{{variant}}",
        tokens=token_dir,
    output:
        f"{R}/perplexity/{{model}}/{{variant}}/sliding.json",
    log:
        f"{R}/logs/sliding_perplexity/{{model}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/sliding_perplexity/{{model}}/{{variant}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=0 if config["encode"]["device"] == "cpu" else 1,
    params:
        tokenizer=tokenizer_source,
        tokens=lambda w: token_files(w.model),
        model=lambda w: dumps(model_cfg(w.model)["model"]),
        perplexity=dumps(config["perplexity"]),
        encode=dumps(config["encode"]),
        bos=lambda w: dumps(model_cfg(w.model)["tokens"]["bos"]),
    shell:
        "sae-audit sliding-perplexity --model {params.model:q} --perplexity {params.perplexity:q} "
        "--encode {params.encode:q} --bos {params.bos:q} --checkpoint {input.checkpoint:q} "
        "--tokens {params.tokens:q} --tokenizer {params.tokenizer:q} --out {output:q} > {log:q} 2>&1"
