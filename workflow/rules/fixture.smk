# The embedded offline fixture: corpus -> tokenizer -> GPT-NeoX -> SAE. With
# fixture.bundle (the default) each rule copies the package's bundled artifact when it was
# built from this config and these inputs (sae_audit.fixture.bundle), else builds it.


rule fixture_corpus:
    "Fixture corpus: standard-library docstrings split into train and held-out text (bundled copy if it matches)."
    input:
        bundle=bundle_manifest,
    output:
        train=f"{R}/fixture/corpus/train.txt",
        heldout=f"{R}/fixture/corpus/heldout.txt",
    log:
        f"{R}/logs/fixture_corpus.log",
    benchmark:
        f"{R}/benchmarks/fixture_corpus.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        corpus=dumps(FIXTURE_SLICES["corpus"]),
        bundle=BUNDLE,
    shell:
        "sae-audit fixture-corpus --bundle {params.bundle:q} --corpus {params.corpus:q} --train {output.train:q} --heldout {output.heldout:q} > {log:q} 2>&1"


rule fixture_tokenizer:
    "Fixture tokenizer: a byte-level BPE trained on the fixture's train text (bundled copy if it matches)."
    input:
        train=rules.fixture_corpus.output.train,
        bundle=bundle_manifest,
    output:
        directory(f"{R}/fixture/tokenizer"),
    log:
        f"{R}/logs/fixture_tokenizer.log",
    benchmark:
        f"{R}/benchmarks/fixture_tokenizer.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        tokenizer=dumps(FIXTURE_SLICES["tokenizer"]),
        bundle=BUNDLE,
    shell:
        "sae-audit fixture-tokenizer --bundle {params.bundle:q} --tokenizer {params.tokenizer:q} --train {input.train:q} --out {output:q} > {log:q} 2>&1"


rule fixture_model:
    "Fixture model: a small GPT-NeoX trained on the fixture's train text (bundled copy if it matches)."
    input:
        tokenizer=rules.fixture_tokenizer.output,
        train=rules.fixture_corpus.output.train,
        heldout=rules.fixture_corpus.output.heldout,
        bundle=bundle_manifest,
    output:
        directory(f"{R}/fixture/model"),
    log:
        f"{R}/logs/fixture_model.log",
    benchmark:
        f"{R}/benchmarks/fixture_model.tsv"
    conda:
        "../../envs/torch.yaml"
    # The bundled fixture was trained with 2 torch threads: its bits depend on the count.
    threads: 2
    params:
        model=dumps(FIXTURE_SLICES["model"]),
        bundle=BUNDLE,
    shell:
        "sae-audit fixture-model --bundle {params.bundle:q} --model {params.model:q} --tokenizer {input.tokenizer:q} "
        "--train {input.train:q} --heldout {input.heldout:q} --out {output:q} > {log:q} 2>&1"


rule fixture_sae:
    "Fixture SAE: a sae-lens SAE trained on the fixture model's residual stream (bundled copy if it matches)."
    input:
        model=rules.fixture_model.output,
        train=rules.fixture_corpus.output.train,
        bundle=bundle_manifest,
    output:
        directory(f"{R}/fixture/sae"),
    log:
        f"{R}/logs/fixture_sae.log",
    benchmark:
        f"{R}/benchmarks/fixture_sae.tsv"
    conda:
        "../../envs/torch.yaml"
    # The bundled fixture was trained with 2 torch threads: its bits depend on the count.
    threads: 2
    params:
        sae=dumps(FIXTURE_SLICES["sae"]),
        bundle=BUNDLE,
    shell:
        "sae-audit fixture-sae --bundle {params.bundle:q} --sae {params.sae:q} --model {input.model:q} --train {input.train:q} --out {output:q} > {log:q} 2>&1"


# The same SAE config trained with fixture.sae.twin_seed (rule seed_turnover reads both).
rule fixture_sae_twin:
    "Twin fixture SAE: the same config with fixture.sae.twin_seed, for the seed-turnover table."
    input:
        model=rules.fixture_model.output,
        train=rules.fixture_corpus.output.train,
        bundle=bundle_manifest,
    output:
        directory(f"{R}/fixture/sae-twin"),
    log:
        f"{R}/logs/fixture_sae_twin.log",
    benchmark:
        f"{R}/benchmarks/fixture_sae_twin.tsv"
    conda:
        "../../envs/torch.yaml"
    # The bundled fixture was trained with 2 torch threads: its bits depend on the count.
    threads: 2
    params:
        sae=dumps(FIXTURE_SLICES["sae-twin"]),
        bundle=BUNDLE,
    shell:
        "sae-audit fixture-sae-twin --bundle {params.bundle:q} --sae {params.sae:q} --model {input.model:q} --train {input.train:q} --out {output:q} > {log:q} 2>&1"


# A planted control, not a trained model: the fixture model reparameterized (exactly, same
# function) to have one large MLP input column (models with source: fixture-reparam).
rule fixture_reparam:
    "Planted control: a function-preserving reparameterized copy of the fixture model with one large MLP input column."
    input:
        model=rules.fixture_model.output,
    output:
        directory(f"{R}/fixture/model-reparam"),
    log:
        f"{R}/logs/fixture_reparam.log",
    benchmark:
        f"{R}/benchmarks/fixture_reparam.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        reparam=dumps(config["fixture"]["reparam"]),
    shell:
        "sae-audit fixture-reparam --reparam {params.reparam:q} --model {input.model:q} --out {output:q} > {log:q} 2>&1"


# Per run, not per basis: one table (and its report forms) with a row per trained artifact,
# captioned by workflow/report/tables.rst like the result tables of rule report_tables.
rule fixture_training:
    "Fixture training metrics: one row per trained fixture artifact (held-out vs unigram perplexity, SAE explained variance)."
    input:
        lambda w: list(fixture_trained_dirs().values()),
    output:
        table=f"{R}/tables/fixture_training.parquet",
        html=report(
            f"{R}/report/fixture_training.html",
            caption="../report/tables.rst",
            category="6. Tables",
            subcategory="fixture",
            labels={"table": "fixture_training"},
        ),
        csv=report(
            f"{R}/report/fixture_training.csv",
            caption="../report/tables.rst",
            category="7. Tables (CSV download)",
            subcategory="fixture",
            labels={"table": "fixture_training"},
        ),
    log:
        f"{R}/logs/fixture_training.log",
    benchmark:
        f"{R}/benchmarks/fixture_training.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    threads: 1
    params:
        artifacts=lambda w: [f"{k}={v}" for k, v in fixture_trained_dirs().items()],
    shell:
        "sae-audit fixture-training --artifacts {params.artifacts:q} --out {output.table:q} "
        "--report {output.html:q} {output.csv:q} > {log:q} 2>&1"
