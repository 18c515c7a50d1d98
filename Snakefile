# sae-audit: do SAE features survive compression of a language model?
# Thin entry point: config, validation, rule includes, the final targets.
from sae_audit import config as audit_config


configfile: "config/config.yaml"


# Validates against workflow/schemas/config.schema.yaml (fills defaults, cross-checks
# variant names): a bad key fails here, before any job runs, naming the key.
config.update(audit_config.validate(config))


include: "workflow/rules/common.smk"
include: "workflow/rules/fixture.smk"
include: "workflow/rules/tokens.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/plots.smk"


rule all:
    input:
        all_targets(),
    default_target: True
