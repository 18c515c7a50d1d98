#!/usr/bin/env bash
# Installs this workflow's own package, sae-audit, into a conda env that Snakemake has just
# created from the env file of the same name (--software-deployment-method conda; the
# analysis env's post-deploy script is a link to this one). Snakemake runs it once per env,
# in the activated env, from its working directory, as `bash <this file's path>`: the
# repository is this file's parent directory. An env file cannot install the package
# itself: conda resolves `pip: -e ../` against Snakemake's copy of the env file under
# .snakemake/conda/, not against this repository.
#
# Editable, so that the env runs the repository's current code, as the Python running
# Snakemake does. --no-deps: the env file pins the dependencies, and pyproject's would pull
# torch into the analysis env.
#
# A workflow used as a module from a remote source (e.g. a GitHub URL) hands this script
# over as a temporary copy, with no repository beside it: set SAE_AUDIT_SOURCE to a clone
# of the repository, or to a pip requirement (git+https://...@<tag>).
set -euo pipefail

source="${SAE_AUDIT_SOURCE:-$(cd "$(dirname "$0")/.." && pwd)}"
if [[ -e "$source" ]]; then
    if ! grep -qs '^name = "sae-audit"$' "$source/pyproject.toml"; then
        echo "sae-audit post-deploy: $source is not the sae-audit repository (this script" \
            "ran from a copy, as Snakemake makes for a workflow used from a remote source):" \
            "set SAE_AUDIT_SOURCE to a clone of it or to a pip requirement" >&2
        exit 1
    fi
    python -m pip install --no-deps --editable "$source"
else
    python -m pip install --no-deps "$source"
fi
command -v sae-audit
