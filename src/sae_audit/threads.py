"""A job's torch thread count: the rule's `threads:`, set on torch whenever torch loads.

Snakemake exports OMP_NUM_THREADS={threads} (and the MKL/OpenBLAS counterparts) to every
job's shell. torch must use that many threads, or `snakemake --cores 32` runs 16 jobs with
32 threads each. A warm child (sae_audit.warm) inherits the server's torch, loaded under
whichever job started the server, so the count is set explicitly, not left to libgomp.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType

log = logging.getLogger("sae_audit")


def torch_threads(environ: Mapping[str, str] | None = None) -> int:
    """Threads for this job's torch: OMP_NUM_THREADS (a Snakemake job's {threads}), else
    the cores this process may run on (a command run by hand)."""
    env = os.environ if environ is None else environ
    # OMP_NUM_THREADS may list one count per nesting level ("4,2"): the first is ours.
    first = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_torch_threads(torch: ModuleType) -> int:
    """Give `torch` torch_threads() threads and log the count; return it."""
    threads = torch_threads()
    torch.set_num_threads(threads)
    log.info("torch threads: %d", threads)
    return threads


def apply_torch_threads() -> None:
    """Set torch's threads now if torch is loaded (a warm child), else the moment it loads.

    Table commands never load torch and must not pay seconds to import it, so a cold
    command watches for the import instead of importing torch itself.
    """
    if "torch" in sys.modules:
        set_torch_threads(sys.modules["torch"])
    elif not any(isinstance(finder, _OnTorchImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OnTorchImport())


class _OnTorchImport(importlib.abc.MetaPathFinder):
    """Finds torch with the other finders, then sets its threads once its module has run."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torch":
            return None
        # A lookup alone (transformers' is_torch_available) loads nothing: every spec found
        # gets the wrapper, and the one whose module runs removes this finder.
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None:
            return spec
        exec_module = loader.exec_module

        def exec_then_set_threads(module: ModuleType) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            set_torch_threads(module)

        # The loader stays torch's own (its resources, its type); only this call is wrapped.
        loader.exec_module = exec_then_set_threads  # type: ignore[method-assign]
        return spec
