# sae-audit: do SAE features survive compression of a language model?
# Thin entry point: config, validation, rule includes, the final targets.
import sys

from sae_audit import config as audit_config

# The embedded demo unless the user names a config (--configfile config/paper.yaml):
# a named config replaces the demo rather than merging into it, so models never mix.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Validates against workflow/schemas/config.schema.yaml (fills defaults, cross-checks
# variant names): a bad key fails here, before any job runs, naming the key.
config.update(audit_config.validate(config))


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fixture.smk"
include: "workflow/rules/tokens.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/plots.smk"


# Seconds-long table jobs run on the submit host instead of queueing on a cluster.
localrules:
    all,
    fp_stats,
    correlate,
    perplexity,
    survival,
    predict,
    overlap,
    threshold_grid,


rule all:
    default_target: True
    input:
        all_targets(),


onerror:
    from sae_audit.hints import explain

    for hint in explain(log):
        print(f"sae-audit hint: {hint}", file=sys.stderr)
