# One materialized checkpoint per variant; matched pruning first searches its sparsity.


rule compress:
    "Materializes one compressed checkpoint of a model: RTN, pruning, llm-compressor, GGUF or external."
    input:
        model=base_model_input,
        matched=matched_input,
        calibration=calibration_input,
        external=external_input,
        plan=protect_plan_input,
    output:
        directory(f"{R}/checkpoints/{{model}}/{{variant}}"),
    log:
        f"{R}/logs/compress/{{model}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/compress/{{model}}/{{variant}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
        gpu=compress_gpu,
    params:
        base=base_model,
        # compress reads the base in float32 whatever the run dtype: dtype and attention
        # are not its slice (changing them must not re-run every checkpoint), except for
        # the noise null, which records the other dtype to run in
        model=lambda w: dumps(
            {
                k: model_cfg(w.model)["model"][k]
                for k in ("source", "revision")
                + (("dtype",) if w.variant == "fp-noise" else ())
            }
        ),
        entry=shipped_entry,
    shell:
        "sae-audit compress --model {params.model:q} --base {params.base:q} --variant {wildcards.variant:q} "
        "--matched {input.matched:q} --entry {params.entry:q} --calibration {input.calibration:q} --plan {input.plan:q} "
        "--out {output:q} > {log:q} 2>&1"


rule match_sparsity:
    "Searches the pruning sparsity whose perplexity matches a target variant's (prune-matched-<target>)."
    input:
        model=base_model_input,
        tokens=token_dir,
        target_nll=lambda w: nll_shards(w.model, w.target),
        # FP perplexity = perplexity at sparsity 0: the search's lower end, no forward pass
        fp_nll=lambda w: nll_shards(w.model, "fp"),
    output:
        f"{R}/matched/{{model}}/prune-matched-{{target}}.json",
    log:
        f"{R}/logs/match_sparsity/{{model}}/{{target}}.log",
    benchmark:
        f"{R}/benchmarks/match_sparsity/{{model}}/{{target}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: model_threads
    resources:
        mem_mb=model_mem_mb,
        runtime=model_runtime,
    params:
        base=base_model,
        tokens=lambda w: token_files(w.model),
        model=lambda w: dumps(model_cfg(w.model)["model"]),
        matched=dumps(
            {
                k: v
                for k, v in config["compression"]["prune"]["matched"].items()
                if k != "targets"
            }
        ),
        encode=dumps(config["encode"]),
    shell:
        "sae-audit match-sparsity --model {params.model:q} --matched {params.matched:q} "
        "--encode {params.encode:q} --base {params.base:q} --target {wildcards.target:q} "
        "--target-nll {input.target_nll:q} --fp-nll {input.fp_nll:q} --tokens {params.tokens:q} "
        "--model-name {wildcards.model:q} --out {output:q} > {log:q} 2>&1"
