# One materialized checkpoint per variant; matched pruning first searches its sparsity.


rule compress:
    input:
        model=base_model_input,
        matched=matched_input,
    output:
        directory(f"{R}/checkpoints/{{model}}/{{variant}}"),
    log:
        f"{R}/logs/compress/{{model}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/compress/{{model}}/{{variant}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: lambda w: model_cfg(w.model)["resources"]["threads"]
    resources:
        mem_mb=lambda w: model_cfg(w.model)["resources"]["mem_mb"],
        runtime=lambda w: model_cfg(w.model)["resources"]["runtime"],
    params:
        base=base_model,
        cfg=lambda w: dumps(model_cfg(w.model)["model"]),
    shell:
        "sae-audit compress --params {params.cfg:q} --base {params.base:q} --variant {wildcards.variant:q} "
        "--matched {input.matched:q} --out {output:q} > {log:q} 2>&1"


rule match_sparsity:
    input:
        model=base_model_input,
        tokens=token_dir,
        target_nll=lambda w: nll_shards(w.model, w.target),
    output:
        f"{R}/matched/{{model}}/prune-matched-{{target}}.json",
    log:
        f"{R}/logs/match_sparsity/{{model}}/{{target}}.log",
    benchmark:
        f"{R}/benchmarks/match_sparsity/{{model}}/{{target}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: lambda w: model_cfg(w.model)["resources"]["threads"]
    resources:
        mem_mb=lambda w: model_cfg(w.model)["resources"]["mem_mb"],
        runtime=lambda w: model_cfg(w.model)["resources"]["runtime"],
    params:
        base=base_model,
        tokens=lambda w: token_files(w.model),
        cfg=lambda w: dumps(
            model=model_cfg(w.model)["model"],
            matched={
                k: v
                for k, v in config["compression"]["prune"]["matched"].items()
                if k != "targets"
            },
            encode=config["encode"],
        ),
    shell:
        "sae-audit match-sparsity --params {params.cfg:q} --base {params.base:q} --target {wildcards.target:q} "
        "--target-nll {input.target_nll:q} --tokens {params.tokens:q} --model-name {wildcards.model:q} "
        "--out {output:q} > {log:q} 2>&1"
