"""How jobs find the `sae-audit` command: the one installed with the Python running Snakemake.

Every rule's shell calls the `sae-audit` console script. A venv's scripts are on PATH only
while the venv is activated, so `.venv/bin/snakemake` run from a plain shell would start
jobs that fail with `sae-audit: command not found`. The Snakefile calls `put_on_path` once
at start-up: the scripts directory of the running interpreter (where pip put `sae-audit`
beside `snakemake`) goes first on PATH, which every job inherits, locally and on SLURM
(whose jobs re-read the Snakefile with the same interpreter). With conda deployment the
job's activated env comes first and brings its own `sae-audit`.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import MutableMapping
from pathlib import Path

COMMAND = "sae-audit"


class CommandNotFound(RuntimeError):
    """Neither the running Python's install nor PATH has the `sae-audit` command."""


def scripts_dirs() -> list[Path]:
    """Where this interpreter's console scripts live, most specific first (a venv's
    bin/ is the interpreter's own directory; a user install has its own scripts dir)."""
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    user = sysconfig.get_path("scripts", f"{os.name}_user")
    if user:
        dirs.append(Path(user))
    return list(dict.fromkeys(dirs))


def put_on_path(environ: MutableMapping[str, str] | None = None) -> str:
    """Put the directory of this Python's `sae-audit` first on PATH; return the command's path.

    Raises CommandNotFound (one line: what is missing and the fix) when neither this
    Python's install nor PATH has the command.
    """
    env = os.environ if environ is None else environ
    path = env.get("PATH", "")
    for directory in scripts_dirs():
        if (directory / COMMAND).is_file():
            entries = [p for p in path.split(os.pathsep) if p and Path(p) != directory]
            env["PATH"] = os.pathsep.join([str(directory), *entries])
            return str(directory / COMMAND)
    found = shutil.which(COMMAND, path=path)
    if found is None:
        raise CommandNotFound(
            f"no `{COMMAND}` command beside {sys.executable} or on PATH: install the "
            f"package into the environment that runs snakemake (`{sys.executable} -m pip "
            "install -e <this repository>`)"
        )
    return found
