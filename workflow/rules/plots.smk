# Figures: one rule each.


rule plot_class_fractions_vs_bits:
    input:
        f"{R}/tables/{{model}}/survival.parquet",
    output:
        f"{R}/figures/{{model}}/class_fractions_vs_bits.png",
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/plots/{{model}}/class_fractions_vs_bits.log",
    shell:
        "sae-audit plot class_fractions_vs_bits --inputs {input} --out {output} > {log} 2>&1"


rule plot_perplexity_vs_bits:
    input:
        f"{R}/tables/{{model}}/perplexity.parquet",
    output:
        f"{R}/figures/{{model}}/perplexity_vs_bits.png",
    conda:
        "../../envs/analysis.yaml"
    log:
        f"{R}/logs/plots/{{model}}/perplexity_vs_bits.log",
    shell:
        "sae-audit plot perplexity_vs_bits --inputs {input} --out {output} > {log} 2>&1"
