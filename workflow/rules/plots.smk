# Figures (one rule each) and the result tables shown in the Snakemake report.
# Each figure rule calls `sae-audit plot NAME --inputs ... --out ...`, i.e. the
# function sae_audit.plots.NAME, and captions its PNG with workflow/report/NAME.rst.
# Build the report after a run with: snakemake --report report.html


# Seconds-long jobs: run on the submit host instead of queueing on a cluster.
localrules:
    plot_class_fractions_vs_bits,
    plot_correlation_histograms,
    plot_perplexity_vs_bits,
    plot_perplexity_vs_damage,
    plot_roc_curves,
    plot_coefficients,
    plot_survival_by_quartile,
    plot_survival_by_firing_rate_decile,
    plot_rtn_vs_pruning_scatter,
    plot_stability,
    report_tables,


rule plot_class_fractions_vs_bits:
    input:
        f"{R}/tables/{{model}}/{{sae}}/survival.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/class_fractions_vs_bits.png",
            caption="../report/class_fractions_vs_bits.rst",
            category="1. Feature survival",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/class_fractions_vs_bits.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot class_fractions_vs_bits --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_correlation_histograms:
    input:
        f"{R}/tables/{{model}}/{{sae}}/features.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/correlation_histograms.png",
            caption="../report/correlation_histograms.rst",
            category="1. Feature survival",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/correlation_histograms.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot correlation_histograms --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_perplexity_vs_bits:
    input:
        f"{R}/tables/{{model}}/perplexity.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/perplexity_vs_bits.png",
            caption="../report/perplexity_vs_bits.rst",
            category="2. Perplexity",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/perplexity_vs_bits.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot perplexity_vs_bits --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_perplexity_vs_damage:
    input:
        f"{R}/tables/{{model}}/{{sae}}/survival.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/perplexity_vs_damage.png",
            caption="../report/perplexity_vs_damage.rst",
            category="2. Perplexity",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/perplexity_vs_damage.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot perplexity_vs_damage --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_roc_curves:
    input:
        f"{R}/tables/{{model}}/{{sae}}/predict_oof.parquet",
        f"{R}/tables/{{model}}/{{sae}}/predict.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/roc_curves.png",
            caption="../report/roc_curves.rst",
            category="3. Survival predictor",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/roc_curves.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot roc_curves --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_coefficients:
    input:
        f"{R}/tables/{{model}}/{{sae}}/predict_coefficients.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/coefficients.png",
            caption="../report/coefficients.rst",
            category="3. Survival predictor",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/coefficients.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot coefficients --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_survival_by_quartile:
    input:
        f"{R}/tables/{{model}}/{{sae}}/survival_by_quantile.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/survival_by_quartile.png",
            caption="../report/survival_by_quartile.rst",
            category="3. Survival predictor",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/survival_by_quartile.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot survival_by_quartile --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_survival_by_firing_rate_decile:
    input:
        f"{R}/tables/{{model}}/{{sae}}/survival_by_quantile.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/survival_by_firing_rate_decile.png",
            caption="../report/survival_by_firing_rate_decile.rst",
            category="3. Survival predictor",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/survival_by_firing_rate_decile.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot survival_by_firing_rate_decile --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_rtn_vs_pruning_scatter:
    input:
        f"{R}/tables/{{model}}/{{sae}}/features.parquet",
        f"{R}/tables/{{model}}/{{sae}}/overlap.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/rtn_vs_pruning_scatter.png",
            caption="../report/rtn_vs_pruning_scatter.rst",
            category="4. RTN vs pruning",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/rtn_vs_pruning_scatter.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot rtn_vs_pruning_scatter --inputs {input:q} --out {output:q} > {log:q} 2>&1"


rule plot_stability:
    input:
        f"{R}/tables/{{model}}/{{sae}}/stability.parquet",
    output:
        report(
            f"{R}/figures/{{model}}/{{sae}}/stability.png",
            caption="../report/stability.rst",
            category="5. Stability",
            subcategory="{model} / {sae}",
        ),
    log:
        f"{R}/logs/plots/{{model}}/{{sae}}/stability.log",
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot stability --inputs {input:q} --out {output:q} > {log:q} 2>&1"


# The main result tables, once per table: an HTML page the report shows inline
# (the report only renders images, PDF and HTML) and a CSV to download.
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
    wildcard_constraints:
        table="|".join([*REPORT_TABLES, "reference_comparison"]),
    conda:
        "../../envs/analysis.yaml"
    shell:
        "sae-audit plot report_table --inputs {input:q} --out {output.html:q} {output.csv:q} > {log:q} 2>&1"
