# sae-audit: do SAE features survive compression of a language model?
# Thin entry point: config, validation, rule includes, the final targets.
from snakemake.utils import min_version

# pyproject's snakemake floor: an older Snakemake stops here saying so, not on a
# setting it lacks further down (workflow.deployment_settings, profiles).
min_version("9.0")

import os
import sys

from snakemake.exceptions import WorkflowError

# All logic lives in the sae_audit package: a Python without it (a module deployment, a
# venv not installed into) stops here with the fix instead of a traceback.
try:
    from sae_audit import config as audit_config
    from sae_audit.launcher import CommandNotFound, put_on_path
except ModuleNotFoundError as missing:
    raise WorkflowError(
        f"sae-audit: the Python running snakemake ({sys.executable}) cannot import "
        f"{missing.name!r}: install the workflow's package into it "
        f"(`{sys.executable} -m pip install -e {workflow.current_basedir}`; see README.md)"
    ) from None

# Jobs inherit this: torch's OpenMP threads sleep rather than spin while they wait, so two
# jobs sharing the cores do not starve each other (issue 12 measured 3.8-4.5x slower
# with spinning threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The embedded demo unless the user names a config (--configfile config/paper.yaml):
# a named config replaces the demo rather than merging into it, so models never mix.
if not workflow.overwrite_configfiles:
    # Snakemake's own YAML error names neither the file nor the line; this one does.
    # (A --configfile is parsed by Snakemake before this file runs, out of our reach.)
    audit_config.check_config_file("config/config.yaml")

    configfile: "config/config.yaml"


# Validates against workflow/schemas/config.schema.yaml (fills defaults, cross-checks
# variant names): a bad key fails here, before any job runs, naming the key.
config.update(audit_config.validate(config))

# Jobs run the `sae-audit` installed with this Python, whether or not its venv is
# activated; with conda deployment each job's env brings its own.
try:
    put_on_path()
except CommandNotFound as missing:
    if "CONDA" not in {m.name for m in workflow.deployment_settings.deployment_method}:
        raise WorkflowError(f"sae-audit: {missing}") from None

# After kill -9 Snakemake stops on its stale lock before onerror could run: say the
# one recovery command here, while the Snakefile is read (not for --unlock itself).
if workflow.is_main_process and not workflow.dryrun and "--unlock" not in sys.argv:
    from sae_audit.hints import stale_lock

    if lock_hint := stale_lock():
        print(f"sae-audit hint: {lock_hint}", file=sys.stderr)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fixture.smk"
include: "workflow/rules/tokens.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/diagnostics.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/causal.smk"
include: "workflow/rules/deploy.smk"
include: "workflow/rules/plots.smk"


rule all:
    "Every table, figure and report table of every configured model and SAE (the default target)."
    default_target: True
    input:
        all_targets(),
    localrule: True


onerror:
    # explain() also reads the logs of the jobs this log reports as failed: a job's own
    # error (e.g. "CUDA is not available") is only there. A stale lock after kill -9
    # stops Snakemake before onerror runs: its hint is printed at the top instead.
    from sae_audit.hints import explain

    for hint in explain(log):
        print(f"sae-audit hint: {hint}", file=sys.stderr)
