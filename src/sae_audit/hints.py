"""Plain-language hints for failures a user can fix, printed by the Snakefile's onerror."""

from __future__ import annotations

from pathlib import Path

# (substring of the Snakemake log, hint). SLURM prints the first when a job asks for
# resources no node has: for this workflow that is almost always the encode GPU.
HINTS: tuple[tuple[str, str], ...] = (
    (
        "Requested node configuration is not available",
        "SLURM rejected a job whose resources no node can provide. If it was an encode or "
        "sliding_perplexity job, the cluster has no (or too few) GPUs for its `gpu` request: run on "
        "CPU with `--set-resources encode:gpu=0 sliding_perplexity:gpu=0` and `encode.device: cpu` "
        "in the config, or point SAE_SLURM_PARTITION at a GPU partition.",
    ),
    (
        "CUDA is not available",
        "`encode.device` names a CUDA device but this node has none: use `encode.device: auto`.",
    ),
)


def explain(logs: str | Path | list[str | Path] | None) -> list[str]:
    """Hints whose trigger appears in the Snakemake log(s) (Snakemake 9 passes a list)."""
    paths = [logs] if isinstance(logs, str | Path) else list(logs or [])
    text = "".join(Path(p).read_text(errors="replace") for p in paths if Path(p).is_file())
    return [hint for trigger, hint in HINTS if trigger in text]
