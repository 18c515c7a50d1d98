"""Why a model is fragile under per-channel RTN: outlier diagnostics of the FP model.

Two scopes, one long table (``scope`` says which; a column that does not apply to a
scope is null there):

- ``matrix``: every block matrix compression touches (`models.target_weights`), as
  [out, in]. Per-output-channel RTN gives each output row one scale, its absmax, so a
  row whose absmax is far above its typical entry loses its small entries; one large
  *input* column raises the absmax of every row it feeds, which is what hurts.
- ``layer``: the residual stream after each block (`blocks.L.hook_resid_post`) on the
  first `outliers.n_sequences` evaluation sequences: massive residual dimensions, a
  first token whose residual norm dwarfs the rest, and attention sinks (attention mass
  on position 0). These are what put large input columns into the next block's
  matrices (through the norm gains) in pretrained models.

Attention probabilities need eager attention (transformers 5.17 returns no attentions
from sdpa, only a warning): the model is switched to eager in place for the pass and
back afterwards (`set_attn_implementation`; no second copy in memory). The residual
statistics come from the same eager pass; eager and sdpa agree to float rounding.

An undefined value (the kurtosis of a constant matrix, a ratio with median 0, the
first-token ratio of one-token sequences) is null, with `reason` saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from scipy import stats
from torch import nn

from .config import FROM_SCHEMA, ConfigSection
from .models import ActivationCapture, as_out_in, blocks_of, family_of, target_weights
from .table_docs import descriptions, polars_schema


@dataclass(frozen=True)
class OutliersConfig(ConfigSection, section="outliers"):
    """How many evaluation sequences the per-layer diagnostics read, in batches of how many."""

    n_sequences: int = FROM_SCHEMA
    batch_size: int = FROM_SCHEMA


# The table's columns, their dtypes and what each holds (kurtosis is Pearson's: a Gaussian
# has 3) are documented in tables.schema.yaml (table `outliers`), read here.
COLUMNS: dict[str, str] = descriptions("outliers")
SCHEMA: dict[str, Any] = polars_schema("outliers")


# ---------------------------------------------------------------- statistics
def kurtosis(values: np.ndarray) -> float | None:
    """Pearson kurtosis (scipy, fisher=False, biased moments) of all entries; None if constant."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or np.ptp(x) == 0:
        return None
    return float(stats.kurtosis(x, fisher=False, bias=True))


def max_over_median(values: torch.Tensor | np.ndarray) -> float | None:
    """max / median of non-negative values; None when the median is 0."""
    x = np.asarray(values, dtype=np.float64).ravel()
    median = float(np.median(x))
    return float(x.max() / median) if median > 0 else None


def uniform_sink(seq_len: int) -> float | None:
    """The sink score if every query attended uniformly to itself and all before it."""
    if seq_len < 2:
        return None
    return float(np.mean(1.0 / np.arange(2, seq_len + 1)))


@dataclass
class Moments:
    """Streaming central moments (n, mean, M2, M3, M4) in float64, merged per batch with
    Chan et al.'s pairwise formulas: the kurtosis of every token-dim of a layer without
    holding them all."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        nb = x.numel()
        if nb == 0:
            return
        mb = float(x.mean())
        d = x - mb
        d2 = d * d
        m2b, m3b, m4b = float(d2.sum()), float((d2 * d).sum()), float((d2 * d2).sum())
        na, n = self.n, self.n + nb
        delta = mb - self.mean
        self.m4 += (
            m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * self.m2) / n**2
            + 4 * delta * (na * m3b - nb * self.m3) / n
        )
        self.m3 += (
            m3b + delta**3 * na * nb * (na - nb) / n**2 + 3 * delta * (na * m2b - nb * self.m2) / n
        )
        self.m2 += m2b + delta**2 * na * nb / n
        self.mean += delta * nb / n
        self.n = n

    def kurtosis(self) -> float | None:
        """Pearson kurtosis n M4 / M2^2 (scipy's fisher=False, bias=True); None if constant."""
        if self.n == 0 or self.m2 <= 0:
            return None
        return self.n * self.m4 / (self.m2 * self.m2)


# ---------------------------------------------------------------- matrices
def _matrices(model: nn.Module) -> Iterator[tuple[int, str, str, torch.Tensor]]:
    """(layer, path in block, state-dict name, weight as [out, in]) per block matrix."""
    prefix = family_of(model).blocks + "."
    for name, param in target_weights(model):
        layer, path = name.removeprefix(prefix).removesuffix(".weight").split(".", 1)
        yield int(layer), path, name, as_out_in(param.detach(), model)


def matrix_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One row per block matrix: weight kurtosis and the row / column absmax ratios."""
    rows = []
    for layer, path, name, weight in _matrices(model):
        w = weight.to(torch.float64)
        row_absmax = w.abs().amax(dim=1).cpu().numpy()
        col_absmax = w.abs().amax(dim=0).cpu().numpy()
        row = {
            "scope": "matrix",
            "layer": layer,
            "name": name,
            "matrix": path,
            "n_out": int(w.shape[0]),
            "n_in": int(w.shape[1]),
            "weight_kurtosis": kurtosis(w.cpu().numpy()),
            "row_absmax_ratio": max_over_median(row_absmax),
            "col_absmax_ratio": max_over_median(col_absmax),
            "top_col": int(col_absmax.argmax()),
        }
        row["reason"] = _reason(
            row,
            weight_kurtosis="constant matrix",
            row_absmax_ratio="median row absmax is 0",
            col_absmax_ratio="median column absmax is 0",
        )
        rows.append(row)
    return rows


def _reason(row: dict[str, Any], **why: str) -> str | None:
    missing = [text for col, text in why.items() if row.get(col) is None]
    return "; ".join(missing) if missing else None


# ---------------------------------------------------------------- layers
@dataclass
class _LayerSums:
    moments: Moments = field(default_factory=Moments)
    abs_sum: torch.Tensor | None = None  # per residual dimension, float64
    first_norm: float = 0.0
    rest_norm: float = 0.0
    n_first: int = 0
    n_rest: int = 0
    sink: float = 0.0
    n_sink: int = 0
    seq_len: int = 0

    def add(self, h: torch.Tensor, attention: torch.Tensor | None) -> None:
        h = h.detach().to(torch.float64)  # [batch, seq, d_model]
        self.moments.add(h)
        abs_sum = h.abs().sum(dim=(0, 1))
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        norms = h.norm(dim=-1)
        self.first_norm += float(norms[:, 0].sum())
        self.rest_norm += float(norms[:, 1:].sum())
        self.n_first += norms.shape[0]
        self.seq_len = norms.shape[1]
        self.n_rest += norms[:, 1:].numel()
        if attention is not None:  # [batch, heads, query, key]
            on_first = attention.detach()[:, :, 1:, 0].to(torch.float64)
            self.sink += float(on_first.sum())
            self.n_sink += on_first.numel()

    def row(self, layer: int, hook: str) -> dict[str, Any]:
        assert self.abs_sum is not None
        mean_abs = (self.abs_sum / (self.n_first + self.n_rest)).cpu().numpy()
        rest = self.rest_norm / self.n_rest if self.n_rest else 0.0
        row = {
            "scope": "layer",
            "layer": layer,
            "name": hook,
            "n_tokens": self.n_first + self.n_rest,
            "act_kurtosis": self.moments.kurtosis(),
            "dim_ratio": max_over_median(mean_abs),
            "top_dim": int(mean_abs.argmax()),
            "first_token_norm_ratio": (self.first_norm / self.n_first) / rest if rest else None,
            "sink_score": self.sink / self.n_sink if self.n_sink else None,
            "sink_uniform": uniform_sink(self.seq_len),
        }
        row["reason"] = _reason(
            row,
            act_kurtosis="constant residual",
            dim_ratio="median dimension's mean |activation| is 0",
            first_token_norm_ratio="no token after the first, or their residual is 0",
            sink_score="no query after the first token",
        )
        return row


def layer_rows(
    model: nn.Module, token_ids: np.ndarray, cfg: OutliersConfig, device: str | torch.device = "cpu"
) -> list[dict[str, Any]]:
    """One row per block: residual-stream statistics and the sink score on the first
    `cfg.n_sequences` sequences of `token_ids` [n_sequences, seq_len]."""
    ids = torch.as_tensor(np.asarray(token_ids)[: cfg.n_sequences], dtype=torch.long)
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(
            f"outliers: expected token ids [sequences, seq_len], got {tuple(ids.shape)}"
        )
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(len(blocks_of(model)))]
    sums = [_LayerSums() for _ in hooks]
    config: Any = model.config
    previous = config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        with torch.inference_mode(), ActivationCapture(model, hooks) as capture:
            for start in range(0, ids.shape[0], cfg.batch_size):
                batch = ids[start : start + cfg.batch_size].to(device)
                out = model(input_ids=batch, output_attentions=True, use_cache=False)
                attentions = out.attentions or ()
                if len(attentions) != len(hooks):
                    raise RuntimeError(
                        f"outliers: the model returned {len(attentions)} attention maps for "
                        f"{len(hooks)} blocks with output_attentions=True and eager attention"
                    )
                for i, hook in enumerate(hooks):
                    sums[i].add(capture.activations[hook], attentions[i])
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)  # type: ignore[operator]
    return [s.row(i, hook) for i, (s, hook) in enumerate(zip(sums, hooks, strict=True))]


def outlier_table(
    model: nn.Module, token_ids: np.ndarray, cfg: OutliersConfig, device: str | torch.device = "cpu"
) -> pl.DataFrame:
    """Matrix rows (by layer, in the family's matrix order), then layer rows."""
    rows = matrix_rows(model) + layer_rows(model, token_ids, cfg, device)
    return pl.DataFrame(rows, schema=SCHEMA)


def summarize(table: pl.DataFrame) -> dict[str, Any]:
    """The headline numbers: the worst matrix by input-column absmax ratio and per-layer maxima."""
    matrices = table.filter(pl.col("scope") == "matrix")
    layers = table.filter(pl.col("scope") == "layer")
    out: dict[str, Any] = {"n_matrices": matrices.height, "n_layers": layers.height}
    for col in ("col_absmax_ratio", "row_absmax_ratio", "weight_kurtosis"):
        worst = matrices.drop_nulls(col).sort(col, descending=True).head(1)
        if worst.height:
            out[f"max_{col}"] = {"value": round(worst[col][0], 3), "matrix": worst["name"][0]}
    for col in ("act_kurtosis", "dim_ratio", "first_token_norm_ratio", "sink_score"):
        worst = layers.drop_nulls(col).sort(col, descending=True).head(1)
        if worst.height:
            out[f"max_{col}"] = {"value": round(worst[col][0], 4), "layer": worst["layer"][0]}
    return out
