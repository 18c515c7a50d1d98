# The evaluation token set, as fixed-length sequences in Parquet shards
# (one directory per model: the shard count is a per-model config key).


rule tokenize:
    "The model's evaluation token set: fixed-length sequences in Parquet shards."
    input:
        text=token_text_inputs,
        model=base_model_input,
    output:
        directory(f"{R}/tokens/{{model}}"),
    log:
        f"{R}/logs/tokenize/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/tokenize/{{model}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        tokenizer=tokenizer_source,
        out=lambda w, output: [
            f"{output[0]}/shard-{s}.parquet" for s in shards(w.model)
        ],
        tokens=lambda w: dumps(model_cfg(w.model)["tokens"]),
    shell:
        "sae-audit tokenize --tokens {params.tokens:q} --tokenizer {params.tokenizer:q} "
        "--text {input.text:q} --out {params.out:q} > {log:q} 2>&1"


# The calibration token set of llm-compressor variants: other text than the evaluation's
# (the fixture's training split by default), checked to share no window with it.
rule tokenize_calibration:
    "The calibration token set of llm-compressor variants, checked to share no window with the evaluation's."
    input:
        text=calibration_text_inputs,
        model=base_model_input,
        tokens=token_dir,
    output:
        f"{R}/calibration/{{model}}/tokens.parquet",
    log:
        f"{R}/logs/tokenize_calibration/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/tokenize_calibration/{{model}}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        tokenizer=tokenizer_source,
        tokens=lambda w: token_files(w.model),
        calibration=lambda w: dumps(model_cfg(w.model)["calibration"]),
    shell:
        "sae-audit tokenize-calibration --calibration {params.calibration:q} "
        "--tokenizer {params.tokenizer:q} --text {input.text:q} --tokens {params.tokens:q} "
        "--out {output:q} > {log:q} 2>&1"
