"""SAE seed turnover: which features of an SAE a second SAE (another seed) also finds.

For each feature of the main SAE: the best cosine similarity of its decoder direction
(its ``W_dec`` row) to any decoder direction of the twin, and which twin feature that
is. A feature is seed-stable when that best cosine is at least ``seed_turnover.stable``.
The survival summary reads 'destroyed' against it (`survival.summary`): a feature that
is not stable across seeds even without compression says little when it is destroyed.

Torch-free: the decoders are read straight from sae-lens's ``sae_weights.safetensors``
(`read_decoder`), so the table rule runs in the analysis env.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .config import FROM_SCHEMA, ConfigSection

WEIGHTS = "sae_weights.safetensors"
# safetensors dtype names -> numpy (little-endian, as the format stores them)


@dataclass(frozen=True)
class SeedTurnoverConfig(ConfigSection, section="seed_turnover"):
    """The best-match cosine at or above which a feature is seed-stable."""

    stable: float = FROM_SCHEMA


def read_decoder(sae_dir: str | Path, name: str = "W_dec") -> np.ndarray:
    """The (d_sae, d_in) decoder of a saved sae-lens SAE, as float64, without torch
    (safetensors' numpy loader)."""
    from safetensors.numpy import load_file

    path = Path(sae_dir) / WEIGHTS
    tensors = load_file(path)
    if name not in tensors:
        raise ValueError(f"{path} holds no tensor {name!r} (has {sorted(tensors)})")
    return tensors[name].astype(np.float64)


def _unit_rows(w: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    # A zero row has no direction: it matches nothing (cosine 0), never NaN.
    return np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)


def turnover_table(
    w_dec: np.ndarray, twin_dec: np.ndarray, cfg: SeedTurnoverConfig = SeedTurnoverConfig()
) -> pl.DataFrame:
    """Per feature of `w_dec`: best_match (twin feature), best_cosine and stable."""
    if w_dec.ndim != 2 or twin_dec.ndim != 2 or w_dec.shape[1] != twin_dec.shape[1]:
        raise ValueError(
            f"decoders must be (d_sae, d_in) of one d_in, got {w_dec.shape} and {twin_dec.shape}"
        )
    cos = _unit_rows(w_dec) @ _unit_rows(twin_dec).T
    best = np.argmax(cos, axis=1)
    best_cos = np.clip(cos[np.arange(len(cos)), best], -1.0, 1.0)
    return pl.DataFrame(
        {
            "feature": np.arange(len(w_dec), dtype=np.int64),
            "best_match": best.astype(np.int64),
            "best_cosine": best_cos,
            "stable": best_cos >= cfg.stable,
        }
    )
