# Figures and the result tables shown in the Snakemake report.
# Build the report after a run with: snakemake --report report.html
#
# One rule definition for every figure of the registry (sae_audit.figures): a rule
# plot_NAME per figure, made in this loop, reading the figure's registered tables and
# calling `sae-audit plot NAME`, i.e. sae_audit.plots.NAME, captioned with
# workflow/report/NAME.rst. Figures that draw the class thresholds get the `analysis`
# config slice (so changed thresholds re-draw them); the others get "{}". Every figure
# gets the weight bits per variant (config.variant_bits): the order and grouping of the
# variants it draws, shipped formats beside RTN at the same bits.
# (A single rule with a {figure} wildcard cannot caption each figure: report()
# takes one fixed caption file per rule.) Seconds-long jobs: local, not queued.
for fig in FIGURE_REGISTRY.values():

    rule:
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
        log:
            f"{R}/logs/plots/{{model}}/{{sae}}/{fig.name}.log",
        benchmark:
            f"{R}/benchmarks/plots/{{model}}/{{sae}}/{fig.name}.tsv"
        localrule: True
        conda:
            "../../envs/analysis.yaml"
        params:
            figure=fig.name,
            analysis=dumps(config["analysis"]) if fig.thresholds else "{}",
            variants=dumps(audit_config.variant_bits(config)),
        shell:
            "sae-audit plot {params.figure:q} --analysis {params.analysis:q} "
            "--variants {params.variants:q} --inputs {input:q} --out {output:q} > {log:q} 2>&1"


# The main result tables, once per table: an HTML page the report shows inline
# (the report only renders images, PDF and HTML) and a CSV to download
# (sae_audit.report_tables), rows in the figures' variant order with a bits column.
rule report_tables:
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
