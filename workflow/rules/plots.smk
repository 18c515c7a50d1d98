# Figures and the result tables shown in the Snakemake report.
# Build the report after a run with: snakemake --report report.html
#
# One rule definition for every figure of the registry (sae_audit.figures): a rule
# plot_NAME per figure, made in this loop, reading the figure's registered tables and
# calling `sae-audit plot NAME`, i.e. sae_audit.plots.NAME, captioned with
# workflow/report/NAME.rst. Figures that draw the class thresholds get the `analysis`
# config slice (so changed thresholds re-draw them), plus causal.survived/destroyed
# under "causal" for one that draws the causal classes (Figure.rule_params); the
# others get "{}". Every figure
# gets the weight bits per variant (config.variant_bits): the order and grouping of the
# variants it draws, shipped formats beside RTN at the same bits. The job writes the
# figure in every format of report.figure_formats (FIGURE_FORMATS, common.smk); the
# report shows the PNG.
# (A single rule with a {figure} wildcard cannot caption each figure: report()
# takes one fixed caption file per rule.) Seconds-long jobs: local, not queued.
for fig in FIGURE_REGISTRY.values():

    rule:
        f"Figure {fig.name} of one basis ({fig.category}), drawn by sae_audit.plots.{fig.function}."
        name:
            f"plot_{fig.name}"
        input:
            [f"{R}/tables/{t}" for t in fig.inputs],
        output:
            report(
                f"{R}/figures/{{model}}/{{sae}}/{fig.name}.png",
                caption=f"../report/{fig.caption}",
                category=fig.category,
                subcategory="{model} / {sae}",
            ),
            *[
                f"{R}/figures/{{model}}/{{sae}}/{fig.name}.{ext}"
                for ext in FIGURE_FORMATS[1:]
            ],
        log:
            f"{R}/logs/plots/{{model}}/{{sae}}/{fig.name}.log",
        benchmark:
            f"{R}/benchmarks/plots/{{model}}/{{sae}}/{fig.name}.tsv"
        localrule: True
        conda:
            "../../envs/analysis.yaml"
        params:
            figure=fig.name,
            analysis=dumps(fig.rule_params(config)),
            variants=dumps(audit_config.variant_bits(config)),
        shell:
            "sae-audit plot {params.figure:q} --analysis {params.analysis:q} "
            "--variants {params.variants:q} --inputs {input:q} --out {output:q} > {log:q} 2>&1"


# The main result tables, once per table: an HTML page the report shows inline
# (the report only renders images, PDF and HTML) and a CSV to download
# (sae_audit.report_tables), rows in the figures' variant order with a bits column.
rule report_tables:
    "One result table of a basis as an HTML page for the report and a CSV download."
    input:
        lambda w: report_table_source(w.model, w.sae, w.table),
    output:
        html=report(
            f"{R}/report/{{model}}/{{sae}}/{{table}}.html",
            caption="../report/tables.rst",
            category="6. Tables",
            subcategory="{model} / {sae}",
            labels={"table": "{table}"},
        ),
        csv=report(
            f"{R}/report/{{model}}/{{sae}}/{{table}}.csv",
            caption="../report/tables.rst",
            category="7. Tables (CSV download)",
            subcategory="{model} / {sae}",
            labels={"table": "{table}"},
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/report_table_{{table}}.log",
    benchmark:
        f"{R}/benchmarks/plots/{{model}}/{{sae}}/report_table_{{table}}.tsv"
    wildcard_constraints:
        table="|".join([*REPORT_TABLES, "reference_comparison"]),
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        variants=dumps(audit_config.variant_bits(config)),
    shell:
        "sae-audit report-tables --input {input:q} --out {output.html:q} {output.csv:q} "
        "--variants {params.variants:q} > {log:q} 2>&1"


# The columns of every output table, one page per run: rendered by `sae-audit table-docs`
# from the package's tables.schema.yaml (sae_audit.table_docs), the file it reads as
# input so that editing it re-renders the page. The tables' captions link to it.
from sae_audit.table_docs import SCHEMA_PATH as TABLE_DOCS_SCHEMA


rule table_docs:
    "The columns of every output table (the package's tables.schema.yaml) as a report page."
    input:
        TABLE_DOCS_SCHEMA,
    output:
        report(
            f"{R}/report/columns.html",
            caption="../report/columns.rst",
            category="6. Tables",
            subcategory="columns of every table",
            labels={"table": "columns"},
        ),
    log:
        f"{R}/logs/plots/table_docs.log",
    benchmark:
        f"{R}/benchmarks/plots/table_docs.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit table-docs --out {output:q} > {log:q} 2>&1"


# The interactive per-feature table of one basis (sae_audit.feature_table): itables with
# its JavaScript embedded, so the report shows it offline.
rule feature_table:
    "Interactive per-feature table of one basis: FP statistics, r and class per variant, contexts."
    input:
        features=f"{R}/tables/{{model}}/{{sae}}/features.parquet",
        contexts=f"{R}/tables/{{model}}/{{sae}}/damaged_contexts.parquet",
    output:
        report(
            f"{R}/report/{{model}}/{{sae}}/features.html",
            caption="../report/feature_table.rst",
            category="8. Features (interactive table)",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/feature_table.log",
    benchmark:
        f"{R}/benchmarks/plots/{{model}}/{{sae}}/feature_table.tsv"
    localrule: True
    # the torch env: the Neuronpedia link comes from sae-lens' registry (sae-lens needs torch)
    conda:
        "../../envs/torch.yaml"
    threads: 1
    params:
        sae_spec=lambda w: dumps(model_cfg(w.model)["saes"][w.sae]),
        title=lambda w: f"features of {w.model} / {w.sae}",
    shell:
        "sae-audit feature-table --features {input.features:q} --contexts {input.contexts:q} "
        "--sae-spec {params.sae_spec:q} --title {params.title:q} --out {output:q} > {log:q} 2>&1"
