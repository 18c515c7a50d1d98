"""Protect a watchlist of SAE features within a size budget: one quantization level per matrix.

A forecast gives, for each level k, compressible block matrix m and watched feature f, the
variance `variance[k, m, f]` that quantizing m at level k adds to f's activation (noise from
different matrices adds), and f's FP activation variance `fp_variance[f]`. A feature is
predicted to survive when its forecast Pearson r = sqrt(fp / (fp + sum_m variance[k_m, m, f]))
is at least `survived_r`. Choosing one level per matrix to keep as many watched features as
possible within a size budget is a multiple-choice knapsack with a covering twist;
`plan_protection` solves it exactly as a MILP (HiGHS through scipy) and falls back to a greedy
with a stated optimality gap when the solver fails or runs out of time. The big-M relaxation is
weak: 24 matrices x 4 levels x 60 features solve to optimality in about 1 s, but with 300
marginal features HiGHS still had a gap of ~27 features after 10 s (245 kept, bound 272; the
greedy kept 242), so read `Plan.gap` before trusting a large plan as optimal.

A plan is then made real in each format the audit measures:

- `protected_state` / `apply_protected`: our own checkpoint payload (integer codes plus float32
  scales per quantized matrix, like `checkpoints.compress_state` for RTN; sizes count the scales
  as fp16, as the shipped formats store them), on compressed-tensors' full-range symmetric
  grid, so the variant is bit-identical to what llm-compressor's round-to-nearest produces;
- `compressed_tensors_config` / `llmcompressor_recipe`: the same plan as a compressed-tensors
  QuantizationConfig and as an llm-compressor recipe (weight-only QuantizationModifier);
- `gguf_tensor_types`: `llama-quantize --tensor-type` arguments, and `gguf_types` the same map
  for `gguf_checkpoint.write_gguf(..., tensor_types=...)`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
from torch import nn

from .files import InputError
from .models import as_out_in, from_out_in, target_weights
from .quantize import QuantizedTensor, RTNSpec, quantize_rtn
from .table_docs import polars_schema

if TYPE_CHECKING:
    from .forecast import Forecast

log = logging.getLogger(__name__)

SCALE_BITS = 16  # one fp16 scale per (row, group), as compressed-tensors and GGUF store them
UNQUANTIZED_BITS = 16  # an unquantized matrix is counted as fp16, the deployed dtype

# Weights of the MILP's secondary objectives. Both terms are normalized to [0, 1], so together
# they stay below 0.5 and can never outweigh one survived feature: the primary objective (the
# survived count) is optimized exactly, and the bound on it can be read off the dual bound.
_NOISE_WEIGHT = 0.49
_SIZE_WEIGHT = 0.01
_SECONDARY_MAX = _NOISE_WEIGHT + _SIZE_WEIGHT

# Level bits -> the GGUF type with that many bits per code (all symmetric, block 32).
_GGUF_TYPE_OF_BITS: dict[int | None, str] = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0", None: "F16"}


@dataclass(frozen=True)
class Level:
    """One quantization level a matrix can be given.

    `bits` None leaves the matrix unquantized (listed in compressed-tensors' `ignore`, counted
    as fp16). Otherwise symmetric integer quantization on compressed-tensors' full-range grid
    (`RTNSpec(bits, symmetric=True, group_size, full_range=True)`), per output channel when
    `group_size` is None, else in groups of `group_size` input columns.
    """

    name: str
    bits: int | None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits is None:
            if self.group_size is not None:
                raise ValueError(f"level {self.name!r}: an unquantized level has no group_size")
            return
        if not 2 <= self.bits <= 8:
            raise ValueError(f"level {self.name!r}: bits must be in 2..8 or None, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(
                f"level {self.name!r}: group_size must be a positive integer or None, "
                f"got {self.group_size}"
            )

    @property
    def spec(self) -> RTNSpec | None:
        """The RTN spec that reproduces compressed-tensors' quantizer; None when unquantized."""
        if self.bits is None:
            return None
        return RTNSpec(bits=self.bits, symmetric=True, group_size=self.group_size, full_range=True)

    @classmethod
    def from_entry(cls, level: Mapping[str, Any]) -> Level:
        """A level of a compression.protect entry, named int4, int8-g32 or fp16
        (unquantized)."""
        bits, group = level["bits"], level.get("group_size")
        if bits is None:
            return cls("fp16", None, None)
        return cls(f"int{bits}" + (f"-g{group}" if group else ""), int(bits), group)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Level:
        return cls(name=str(d["name"]), bits=d.get("bits"), group_size=d.get("group_size"))


def storage_bits(level: Level, shape: tuple[int, int]) -> int:
    """Bits a [out, in] matrix takes at `level`: codes plus one fp16 scale per row and group.

    Unquantized: 16 bits per weight. Groups are counted as `quantize_rtn` makes them
    (ceil(in / group_size), a group never wider than the row).
    """
    out, cols = int(shape[0]), int(shape[1])
    if level.bits is None:
        return UNQUANTIZED_BITS * out * cols
    group = cols if level.group_size is None else min(level.group_size, cols)
    n_groups = -(-cols // group)
    return level.bits * out * cols + SCALE_BITS * out * n_groups


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{param name: (out, in)} of every compressible matrix, in `target_weights` order.

    The `shapes` argument of `plan_protection` and `plan_table`, in the order the forecast's
    module axis must follow.
    """
    return {
        name: (int(s[0]), int(s[1]))
        for name, p in target_weights(model)
        for s in [as_out_in(p.data, model).shape]
    }


@dataclass
class Plan:
    """One level per compressible matrix, and what the forecast predicts of it.

    `predicted_r[f]` is the forecast Pearson r of watched feature f under the plan (0 for a
    feature with no FP variance, which cannot survive); `predicted_survived` counts those at or
    above `survived_r`. `bits_per_weight` is over the compressible matrices (codes and scales);
    `n_bytes` adds `base`, the bytes of everything else. `gap` bounds how many more features an
    optimal plan could keep: 0 when the MILP proved optimality, else the distance to the best
    bound known (the MILP's dual bound or the LP relaxation's).
    """

    modules: list[str]
    levels: list[Level]
    choice: list[int]
    n_watch: int
    predicted_survived: int
    predicted_r: np.ndarray
    bits_per_weight: float
    n_bytes: int
    budget: str
    solver: str
    gap: float
    survived_r: float = 0.9
    base: int = 0

    def level_of(self, module: str) -> Level:
        return self.levels[self.choice[self.modules.index(module)]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (the checkpoint manifest's method.plan)."""
        return {
            "modules": list(self.modules),
            "levels": [lv.to_dict() for lv in self.levels],
            "choice": [int(c) for c in self.choice],
            "n_watch": int(self.n_watch),
            "predicted_survived": int(self.predicted_survived),
            "predicted_r": [float(r) for r in self.predicted_r],
            "bits_per_weight": float(self.bits_per_weight),
            "n_bytes": int(self.n_bytes),
            "budget": self.budget,
            "solver": self.solver,
            "gap": float(self.gap),
            "survived_r": float(self.survived_r),
            "base": int(self.base),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls(
            modules=[str(m) for m in d["modules"]],
            levels=[Level.from_dict(lv) for lv in d["levels"]],
            choice=[int(c) for c in d["choice"]],
            n_watch=int(d["n_watch"]),
            predicted_survived=int(d["predicted_survived"]),
            predicted_r=np.asarray(d["predicted_r"], dtype=np.float64),
            bits_per_weight=float(d["bits_per_weight"]),
            n_bytes=int(d["n_bytes"]),
            budget=str(d["budget"]),
            solver=str(d["solver"]),
            gap=float(d["gap"]),
            survived_r=float(d.get("survived_r", 0.9)),
            base=int(d.get("base", 0)),
        )


# ---------------------------------------------------------------- the optimization


@dataclass
class _Problem:
    """The instance in the solver's units: noise relative to FP variance, costs in bits."""

    rel: np.ndarray  # [K, M, F] variance / fp_variance (0 where fp_variance is 0)
    cap: float  # relative noise a feature may take and survive: 1/r^2 - 1
    valid: np.ndarray  # [F] bool: fp_variance > 0
    cost: np.ndarray  # [M, K] int64 bits
    budget_bits: int
    noise_scale: float  # normalizes the summed relative noise to [0, 1]
    size_scale: float  # normalizes the size to [0, 1]

    @property
    def survivable(self) -> np.ndarray:
        """Features that survive with every matrix at its least noisy level."""
        best = self.rel.min(axis=0).sum(axis=0)
        return self.valid & (best <= self.cap)

    def noise(self, choice: np.ndarray) -> np.ndarray:
        m = np.arange(self.rel.shape[1])
        return self.rel[choice, m, :].sum(axis=0)

    def score(self, choice: np.ndarray) -> tuple[int, float, int]:
        """(survived, normalized noise, bits) of a choice: what the solvers rank by."""
        noise = self.noise(choice)
        survived = int((self.valid & (noise <= self.cap)).sum())
        bits = int(self.cost[np.arange(len(choice)), choice].sum())
        return survived, float(noise[self.valid].sum() / self.noise_scale), bits


def _milp_model(p: _Problem) -> tuple[np.ndarray, Any, Any]:
    """c, constraints, bounds of the MILP (variables x[m, k] row-major, then y[f])."""
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.sparse import coo_matrix, csr_matrix, hstack, vstack

    n_levels, n_modules, n_feat = p.rel.shape
    n_x = n_modules * n_levels
    rel_x = p.rel.transpose(1, 0, 2).reshape(n_x, n_feat)  # [m*K + k, f]
    worst = p.rel.max(axis=0).sum(axis=0)
    always = p.valid & (worst <= p.cap)
    never = ~p.survivable
    free = ~always & ~never
    y_lo = always.astype(float)
    y_hi = (~never).astype(float)

    c = np.zeros(n_x + n_feat)
    c[n_x:] = -1.0
    noise_coef = np.where(p.valid[None, :], rel_x, 0.0).sum(axis=1)
    c[:n_x] += _NOISE_WEIGHT * noise_coef / p.noise_scale
    c[:n_x] += _SIZE_WEIGHT * p.cost.reshape(n_x) / p.size_scale

    rows = [
        hstack(
            [
                coo_matrix(np.kron(np.eye(n_modules), np.ones((1, n_levels)))),
                csr_matrix((n_modules, n_feat)),
            ]
        )
    ]
    lb = [np.ones(n_modules)]
    ub = [np.ones(n_modules)]
    n_weights = p.size_scale  # bits/weight units keep the budget row well scaled
    rows.append(hstack([csr_matrix(p.cost.reshape(1, n_x) / n_weights), csr_matrix((1, n_feat))]))
    lb.append(np.array([-np.inf]))
    ub.append(np.array([p.budget_bits / n_weights]))
    idx = np.flatnonzero(free)
    if len(idx):
        # Each row: sum_{m,k} a[k,m,f] x[m,k] + big_f y_f <= slack_f + big_f, tightened twice
        # (both exact for 0/1 x): noise is counted above each matrix's least noisy level (the
        # x of a matrix sum to 1), and a coefficient above the slack, which alone kills the
        # feature, is cut to just above it. Both shrink big_f and so tighten the relaxation.
        rel = p.rel[:, :, idx]  # [K, M, F_free]
        lowest = rel.min(axis=0)  # [M, F_free]
        slack = p.cap - lowest.sum(axis=0)  # >= 0: the feature is survivable
        over = slack + np.maximum(1e-9, 1e-6 * slack)
        a = np.minimum(rel - lowest[None], over[None, None, :])
        big = a.max(axis=0).sum(axis=0) - slack  # > 0: the feature can be lost
        y_block = coo_matrix((big, (np.arange(len(idx)), idx)), shape=(len(idx), n_feat))
        a_x = a.transpose(1, 0, 2).reshape(n_x, len(idx))
        rows.append(hstack([csr_matrix(a_x.T), y_block]))
        lb.append(np.full(len(idx), -np.inf))
        ub.append(slack + big)
    a = vstack(rows).tocsr()
    # scipy's stubs type lb/ub as float; arrays are what it documents and takes
    row_lo: Any = np.concatenate(lb)
    row_hi: Any = np.concatenate(ub)
    var_lo: Any = np.concatenate([np.zeros(n_x), y_lo])
    var_hi: Any = np.concatenate([np.ones(n_x), y_hi])
    constraints = LinearConstraint(a, row_lo, row_hi)
    bounds = Bounds(var_lo, var_hi)
    return c, constraints, bounds


def _bound_to_features(bound: float, p: _Problem) -> int:
    """An upper bound on the survived count from a bound on the (maximized) objective.

    The objective is survived minus secondaries in [0, _SECONDARY_MAX) with _SECONDARY_MAX <
    1, so survived <= bound + _SECONDARY_MAX, and survived is an integer.
    """
    return min(int(p.survivable.sum()), math.floor(bound + _SECONDARY_MAX + 1e-9))


def _rank(p: _Problem, choice: np.ndarray) -> tuple[int, float, int]:
    """Sort key of a choice, larger is better: more survived, then less noise, then fewer bits."""
    survived, noise, bits = p.score(choice)
    return survived, -noise, -bits


def _solve_milp(p: _Problem, time_limit_s: float) -> tuple[np.ndarray | None, int | None, str]:
    """(choice or None, upper bound on survived or None, solver message)."""
    from scipy.optimize import milp

    c, constraints, bounds = _milp_model(p)
    n_levels, n_modules, _ = p.rel.shape
    res = milp(
        c,
        integrality=np.ones_like(c),
        bounds=bounds,
        constraints=constraints,
        # a relative gap small enough that "optimal" is exact in the survived count
        options={
            "time_limit": float(time_limit_s),
            "disp": False,
            "mip_rel_gap": min(1e-4, 0.25 / (p.rel.shape[2] + 1)),
        },
    )
    dual = getattr(res, "mip_dual_bound", None)
    upper = None
    if dual is not None and np.isfinite(dual):
        upper = _bound_to_features(-float(dual), p)
    if res.x is None:
        return None, upper, str(res.message)
    x = res.x[: n_modules * n_levels].reshape(n_modules, n_levels)
    choice = x.argmax(axis=1)
    if not np.allclose(x.max(axis=1), 1.0, atol=1e-5):
        return None, upper, f"non-integral solution ({res.message})"
    if int(p.cost[np.arange(n_modules), choice].sum()) > p.budget_bits:
        return None, upper, f"solution over budget after rounding ({res.message})"
    if res.status == 0 and upper is None:
        upper = p.score(choice)[0]
    return choice, upper, str(res.message)


def _lp_bound(p: _Problem) -> int:
    """Upper bound on the survived count from the LP relaxation (for the greedy's gap)."""
    from scipy.optimize import milp

    c, constraints, bounds = _milp_model(p)
    res = milp(c, integrality=np.zeros_like(c), bounds=bounds, constraints=constraints)
    if res.status != 0 or res.fun is None:
        return int(p.survivable.sum())
    return _bound_to_features(-float(res.fun), p)


_PERSPECTIVE_MAX_VARS = 60_000


def _perspective_bound(p: _Problem, time_limit_s: float) -> int | None:
    """A tighter upper bound on the survived count, from an extended LP; None when too big.

    z[f, m, k] stands for x[m, k] * y_f: sum_k z[f, m, k] = y_f, z[f, m, k] <= x[m, k] and
    sum_{m,k} a[k, m, f] z[f, m, k] <= slack_f * y_f. Exact for 0/1 values, and its relaxation
    makes a fractionally kept feature pay for its share of the protection, which the big-M
    rows do not: on the tests' random 24 x 4 x 60 instance (optimum 54) it bounds 56 where the
    big-M LP says 58; with 300 features 275 against 287 (10 s here, where HiGHS's own dual
    bound had reached 272). It has one variable per (feature, matrix, level), so it is only
    built up to _PERSPECTIVE_MAX_VARS of them; it maximizes the survived count alone.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix, csr_matrix, eye, hstack, kron, vstack

    n_levels, n_modules, _ = p.rel.shape
    lowest = p.rel.min(axis=0)
    slack = p.cap - lowest.sum(axis=0)
    worst = (p.rel - lowest[None]).max(axis=0).sum(axis=0)
    survivable = p.valid & (slack >= 0)
    n_always = int((survivable & (worst <= slack)).sum())
    idx = np.flatnonzero(survivable & (worst > slack))
    n_f, n_x = len(idx), n_modules * n_levels
    n_z = n_f * n_x
    if n_f == 0:
        return n_always
    if n_z > _PERSPECTIVE_MAX_VARS:
        return None
    over = slack[idx] + np.maximum(1e-9, 1e-6 * slack[idx])
    a = np.minimum(p.rel[:, :, idx] - lowest[None, :, idx], over[None, None, :])  # [K, M, F]
    a_z = a.transpose(2, 1, 0).reshape(n_f, n_x)  # [f, m*K + k]
    rows = [
        hstack([kron(eye(n_modules), np.ones((1, n_levels))), csr_matrix((n_modules, n_f + n_z))]),
        hstack([csr_matrix(p.cost.reshape(1, n_x) / p.size_scale), csr_matrix((1, n_f + n_z))]),
        hstack(
            [
                csr_matrix((n_f * n_modules, n_x)),
                kron(eye(n_f), -np.ones((n_modules, 1))),
                kron(eye(n_f * n_modules), np.ones((1, n_levels))),
            ]
        ),
        hstack([-kron(np.ones((n_f, 1)), eye(n_x)), csr_matrix((n_z, n_f)), eye(n_z)]),
        hstack(
            [
                csr_matrix((n_f, n_x)),
                coo_matrix((-slack[idx], (np.arange(n_f), np.arange(n_f))), shape=(n_f, n_f)),
                coo_matrix(
                    (
                        a_z.reshape(-1),
                        (np.repeat(np.arange(n_f), n_x), np.arange(n_z)),
                    ),
                    shape=(n_f, n_z),
                ),
            ]
        ),
    ]
    lo: Any = np.concatenate(
        [
            np.ones(n_modules),
            [-np.inf],
            np.zeros(n_f * n_modules),
            np.full(n_z, -np.inf),
            np.full(n_f, -np.inf),
        ]
    )
    hi: Any = np.concatenate(
        [
            np.ones(n_modules),
            [p.budget_bits / p.size_scale],
            np.zeros(n_f * n_modules),
            np.zeros(n_z),
            np.zeros(n_f),
        ]
    )
    c = np.zeros(n_x + n_f + n_z)
    c[n_x : n_x + n_f] = -1.0
    res = milp(
        c,
        integrality=np.zeros_like(c),
        bounds=Bounds(0, 1),
        constraints=LinearConstraint(vstack(rows).tocsr(), lo, hi),
        options={"time_limit": float(time_limit_s), "disp": False},
    )
    if res.status != 0 or res.fun is None:
        return None
    return n_always + math.floor(-float(res.fun) + 1e-6)


def _greedy(p: _Problem) -> np.ndarray:
    """Start at the cheapest level everywhere; repeatedly take the upgrade with the best gain
    per extra bit that fits: survived features first, else the MILP's secondary objective
    (normalized noise reduction net of the size it costs).

    Deterministic: ties go to the lowest (module, level) index. Upgrades that would lose a
    survived feature are not taken.
    """
    n_levels, n_modules, _ = p.rel.shape
    m_idx = np.arange(n_modules)
    choice = np.argmin(p.cost, axis=1)  # first cheapest level
    noise = p.noise(choice)
    bits = int(p.cost[m_idx, choice].sum())
    for _ in range(n_modules * n_levels):
        survived = int((p.valid & (noise <= p.cap)).sum())
        total = float(noise[p.valid].sum())
        delta = p.rel - p.rel[choice, m_idx, :][None, :, :]  # [K, M, F]
        new_noise = noise[None, None, :] + delta
        d_surv = (p.valid & (new_noise <= p.cap)).sum(axis=2) - survived  # [K, M]
        d_noise = (total - new_noise[:, :, p.valid].sum(axis=2)) / p.noise_scale
        d_bits = (p.cost.T - p.cost[m_idx, choice][None, :]).astype(np.float64)
        # the MILP's secondary objective: noise reduction net of the size it costs
        d_secondary = _NOISE_WEIGHT * d_noise - _SIZE_WEIGHT * d_bits / p.size_scale
        ok = (d_bits >= 0) & (bits + d_bits <= p.budget_bits) & (d_surv >= 0)
        ok &= (d_surv > 0) | (d_secondary > 1e-15)
        ok[choice, m_idx] = False
        if not ok.any():
            break
        per_bit = np.maximum(d_bits, 0.5)  # an equal-cost improvement comes first
        if (ok & (d_surv > 0)).any():
            primary = np.where(ok & (d_surv > 0), d_surv / per_bit, -np.inf)
            best = primary.max()
            tie = ok & np.isclose(primary, best, rtol=1e-12, atol=0)
            key = np.where(tie, d_secondary / per_bit, -np.inf)
        else:
            key = np.where(ok, d_secondary / per_bit, -np.inf)
        # first maximum in (module, level) order
        flat = key.T.reshape(-1)
        j = int(np.argmax(flat))
        m, k = divmod(j, n_levels)
        bits += int(p.cost[m, k] - p.cost[m, choice[m]])
        noise = noise + p.rel[k, m, :] - p.rel[choice[m], m, :]
        choice[m] = k
    return choice


def plan_protection(
    variance: np.ndarray,
    fp_variance: np.ndarray,
    shapes: Mapping[str, tuple[int, int]],
    levels: Sequence[Level],
    *,
    survived_r: float = 0.9,
    budget_bits_per_weight: float | None = None,
    budget_bytes: int | None = None,
    base: int = 0,
    time_limit_s: float = 30,
    solver: str = "milp",
) -> Plan:
    """Choose one level per matrix to keep the most watched features within a size budget.

    `variance` is [n_levels, n_modules, n_watch] (the forecast), `fp_variance` [n_watch],
    `shapes` {param name: (out, in)} in the forecast's module order (`module_shapes(model)`),
    `levels` the forecast's level axis. Exactly one budget: `budget_bits_per_weight` over the
    compressible matrices, or `budget_bytes` for the whole checkpoint, of which `base` bytes
    (embeddings, norms, head) are not the plan's to choose.

    The MILP (scipy's HiGHS) maximizes the survived count, then, with weights too small to
    trade away a feature, 0.49 x the total watchlist noise (relative to each feature's FP
    variance, normalized by its worst case) and 0.01 x the size (normalized by the largest):
    spare budget buys an upgrade only while it lowers the watchlist noise by more than about
    0.13% of its worst case per bit/weight, so a plan does not fill the budget for nothing.

    `solver="greedy"` skips the MILP (for comparison). If the MILP fails or stops at
    `time_limit_s`, the greedy runs and the better of the two plans is kept, with `gap` the
    distance to the best bound known: the MILP's dual bound, its LP relaxation's, or (up to
    60 000 extra variables) a tighter extended LP's (`_perspective_bound`), each LP also
    limited to `time_limit_s`. Deterministic, except that a MILP stopped by its time limit may
    return a different incumbent on a faster or busier machine.
    """
    if (budget_bits_per_weight is None) == (budget_bytes is None):
        raise ValueError("give exactly one of budget_bits_per_weight and budget_bytes")
    if solver not in ("milp", "greedy"):
        raise ValueError(f"solver must be 'milp' or 'greedy', got {solver!r}")
    variance = np.asarray(variance, dtype=np.float64)
    fp_variance = np.asarray(fp_variance, dtype=np.float64)
    levels = list(levels)
    modules = list(shapes)
    if variance.ndim != 3 or variance.shape[:2] != (len(levels), len(modules)):
        raise ValueError(
            f"variance must be [n_levels={len(levels)}, n_modules={len(modules)}, n_watch], "
            f"got shape {variance.shape}"
        )
    if fp_variance.shape != (variance.shape[2],):
        raise ValueError(
            f"fp_variance must be [n_watch={variance.shape[2]}], got shape {fp_variance.shape}"
        )
    if not (np.isfinite(variance).all() and (variance >= 0).all()):
        raise ValueError("variance must be finite and non-negative")
    if not (np.isfinite(fp_variance).all() and (fp_variance >= 0).all()):
        raise ValueError("fp_variance must be finite and non-negative")
    if not 0 < survived_r <= 1:
        raise ValueError(f"survived_r must be in (0, 1], got {survived_r}")
    if len({lv.name for lv in levels}) != len(levels):
        raise ValueError(f"level names must be unique: {[lv.name for lv in levels]}")

    cost = np.array(
        [[storage_bits(lv, shapes[m]) for lv in levels] for m in modules], dtype=np.int64
    )
    n_params = int(sum(int(shapes[m][0]) * int(shapes[m][1]) for m in modules))
    min_bits = int(cost.min(axis=1).sum())
    if budget_bits_per_weight is not None:
        budget = f"{budget_bits_per_weight:g} bits/weight"
        budget_bits = math.floor(budget_bits_per_weight * n_params + 1e-6)
        if budget_bits < min_bits:
            raise InputError(
                f"budget of {budget_bits_per_weight:g} bits/weight cannot hold the cheapest level "
                f"of every matrix: that needs at least {min_bits / n_params:.6g} bits/weight "
                f"({min_bits} bits over {n_params} weights)"
            )
    else:
        assert budget_bytes is not None
        budget = f"{budget_bytes} bytes"
        budget_bits = (int(budget_bytes) - int(base)) * 8
        if budget_bits < min_bits:
            need = int(base) + -(-min_bits // 8)
            raise InputError(
                f"budget of {budget_bytes} bytes cannot hold the cheapest level of every matrix "
                f"plus the {base} base bytes: that needs at least {need} bytes"
            )

    valid = fp_variance > 0
    safe_fp = np.where(valid, fp_variance, 1.0)
    rel = np.where(valid[None, None, :], variance / safe_fp[None, None, :], 0.0)
    worst = rel.max(axis=0).sum(axis=0)
    p = _Problem(
        rel=rel,
        cap=1.0 / survived_r**2 - 1.0,
        valid=valid,
        cost=cost,
        budget_bits=budget_bits,
        noise_scale=max(float(worst[valid].sum()), 1e-300),
        size_scale=float(max(int(cost.max(axis=1).sum()), 1)),
    )

    start = time.perf_counter()
    choice: np.ndarray | None = None
    upper: int | None = None
    used = solver
    message = ""
    if solver == "milp":
        choice, upper, message = _solve_milp(p, time_limit_s)
    milp_s = time.perf_counter() - start
    if choice is None or upper is None or upper > p.score(choice)[0]:
        if solver == "milp":
            log.warning("MILP did not prove optimality (%s): running the greedy", message)
        greedy = _greedy(p)
        bounds = [_lp_bound(p), _perspective_bound(p, time_limit_s), upper]
        upper = min(b for b in bounds if b is not None)
        if choice is None or _rank(p, greedy) > _rank(p, choice):
            choice, used = greedy, "greedy"
    assert choice is not None and upper is not None
    survived, _, bits = p.score(choice)
    gap = float(max(0, upper - survived))
    log.info(
        "protection plan (%s, %.2fs MILP): %d of %d watched features predicted to survive "
        "at %.4g bits/weight, gap %g",
        used, milp_s, survived, len(fp_variance), bits / n_params, gap,
    )  # fmt: skip
    noise = (variance[choice, np.arange(len(modules)), :]).sum(axis=0)
    r = predicted_r(fp_variance, noise)
    return Plan(
        modules=modules,
        levels=levels,
        choice=[int(c) for c in choice],
        n_watch=len(fp_variance),
        predicted_survived=int((r >= survived_r).sum()),
        predicted_r=r,
        bits_per_weight=bits / n_params,
        n_bytes=int(base) + -(-bits // 8),
        budget=budget,
        solver=used,
        gap=gap,
        survived_r=float(survived_r),
        base=int(base),
    )


def predicted_r(fp_variance: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Forecast Pearson r = sqrt(fp / (fp + noise)); 0 for a feature with no FP variance."""
    fp = np.asarray(fp_variance, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(fp / (fp + noise))
    return np.where(fp > 0, r, 0.0)


# ---------------------------------------------------------------- tables


# The plan table's columns (plan.parquet in a protect directory).
PLAN_SCHEMA = pl.Schema(
    {
        "module": pl.String,  # the block matrix's parameter name
        "level": pl.String,  # the level chosen (Level.name)
        "bits": pl.Int32,  # bits per code; null = unquantized
        "group_size": pl.Int32,  # null = per output channel
        "n_params": pl.Int64,  # out x in
        "storage_bits": pl.Int64,  # codes + one fp16 scale per row and group
    }
)


def plan_table(plan: Plan, shapes: Mapping[str, tuple[int, int]]) -> pl.DataFrame:
    """One row per compressible matrix: its level, bits (null: unquantized), group size (null:
    per output channel), weights and storage in bits (codes plus fp16 scales)."""
    missing = [m for m in plan.modules if m not in shapes]
    if missing:
        raise ValueError(f"shapes lacks planned modules: {missing[:5]}")
    rows = [(m, plan.levels[k], shapes[m]) for m, k in zip(plan.modules, plan.choice, strict=True)]
    return pl.DataFrame(
        {
            "module": [m for m, _, _ in rows],
            "level": [lv.name for _, lv, _ in rows],
            "bits": [lv.bits for _, lv, _ in rows],
            "group_size": [lv.group_size for _, lv, _ in rows],
            "n_params": [int(s[0]) * int(s[1]) for _, _, s in rows],
            "storage_bits": [storage_bits(lv, s) for _, lv, s in rows],
        },
        schema=PLAN_SCHEMA,
    )


# ---------------------------------------------------------------- our own checkpoint


def _check_modules(plan: Plan, model: nn.Module) -> None:
    names = [name for name, _ in target_weights(model)]
    if names != plan.modules:
        raise ValueError(
            "the plan's modules are not this model's compressible matrices "
            f"(plan: {plan.modules[:3]}..., model: {names[:3]}...)"
        )


def protected_state(model: nn.Module, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The safetensors payload and method record of the protected variant of a float32 model.

    Per quantized matrix `<name>.codes` and `<name>.scale` (as `compress_state` stores RTN);
    an unquantized matrix stores nothing and keeps the base weight on load.
    """
    _check_modules(plan, model)
    payload: dict[str, torch.Tensor] = {}
    for name, param in target_weights(model):
        spec = plan.level_of(name).spec
        if spec is None:
            continue
        q = quantize_rtn(as_out_in(param.data, model), spec)
        payload[f"{name}.codes"] = q.codes
        payload[f"{name}.scale"] = q.scale
    return payload, {"kind": "protect", "plan": plan.to_dict()}


def apply_protected(
    model: nn.Module, payload: Mapping[str, torch.Tensor], method: Mapping[str, Any]
) -> nn.Module:
    """Write the plan's dequantized matrices into `model` in place (float32 math, then run
    dtype); unquantized matrices keep the model's own weights."""
    plan = Plan.from_dict(method["plan"])
    _check_modules(plan, model)
    for name, param in target_weights(model):
        level = plan.level_of(name)
        if level.bits is None:
            continue
        cols = as_out_in(param.data, model).shape[1]
        q = QuantizedTensor(
            codes=payload[f"{name}.codes"],
            scale=payload[f"{name}.scale"],
            zero=None,
            group_size=cols if level.group_size is None else min(level.group_size, cols),
        )
        dense = from_out_in(q.dequantize(), model)
        with torch.no_grad():
            param.data.copy_(dense.to(device=param.device, dtype=param.dtype))
    return model


# ---------------------------------------------------------------- shipped formats


def _module_name(param_name: str) -> str:
    return param_name.removesuffix(".weight")


def compressed_tensors_config(plan: Plan) -> dict[str, Any]:
    """The plan as a compressed-tensors QuantizationConfig (JSON), validated by compressed-tensors.

    One config group per quantized level in use, targeting its modules by exact name;
    unquantized modules and "lm_head" are in `ignore`. Weight-only, symmetric int, strategy
    "channel" or "group". Only nn.Linear modules are quantized by compressed-tensors, so a
    GPT-2 (Conv1D) plan configures nothing there. Group sizes should divide the input widths
    for the result to match `apply_protected` exactly.
    """
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, Any] = {}
    for k, level in enumerate(plan.levels):
        targets = [
            _module_name(m) for m, c in zip(plan.modules, plan.choice, strict=True) if c == k
        ]
        if level.bits is None or not targets:
            continue
        weights: dict[str, Any] = {
            "num_bits": level.bits,
            "type": "int",
            "symmetric": True,
            "strategy": "channel" if level.group_size is None else "group",
        }
        if level.group_size is not None:
            weights["group_size"] = level.group_size
        groups[f"group_{len(groups)}"] = {"targets": targets, "weights": weights}
    ignore = [
        _module_name(m) for m, c in zip(plan.modules, plan.choice, strict=True)
        if plan.levels[c].bits is None
    ] + ["lm_head"]  # fmt: skip
    config = {"quant_method": "compressed-tensors", "config_groups": groups, "ignore": ignore}
    QuantizationConfig.model_validate(config)  # raises pydantic's ValidationError
    return config


def llmcompressor_recipe(plan: Plan) -> str:
    """The plan as an llm-compressor recipe (YAML): one weight-only QuantizationModifier.

    Layout `<name>_stage: <name>_modifiers: QuantizationModifier: {config_groups, ignore}`, as
    llm-compressor's `Recipe.from_dict` parses it; checked by parsing it back with
    `Recipe.create_instance`. Round-to-nearest with the min-max observer, i.e. the same codes
    as `protected_state`.
    """
    import yaml

    config = compressed_tensors_config(plan)
    if not config["config_groups"]:
        raise ValueError("the plan quantizes no module: there is no recipe to run")
    text = yaml.safe_dump(
        {
            "quant_stage": {
                "quant_modifiers": {
                    "QuantizationModifier": {
                        "config_groups": config["config_groups"],
                        "ignore": config["ignore"],
                    }
                }
            }
        },
        sort_keys=False,
    )
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(text)
    if len(recipe.modifiers) != 1 or not isinstance(recipe.modifiers[0], QuantizationModifier):
        raise ValueError(f"llm-compressor parsed the recipe as {recipe.modifiers}")
    return text


def gguf_types(plan: Plan) -> dict[str, str]:
    """{HF param name: GGUF type name} for `gguf_checkpoint.write_gguf(tensor_types=...)`.

    4 bits -> Q4_0, 5 -> Q5_0, 8 -> Q8_0, unquantized -> F16. GGUF's legacy quants are
    symmetric in blocks of 32 with llama.cpp's own rounding (scale from the signed maximum over
    -2^(b-1)), so only a 32-group level at those widths has a close GGUF counterpart; other
    group sizes and per-channel levels are mapped by bits alone, and the GGUF variant is a
    different (if equally sized per code) quantizer from the compressed-tensors one.
    """
    out = {}
    for m, k in zip(plan.modules, plan.choice, strict=True):
        bits = plan.levels[k].bits
        if bits not in _GGUF_TYPE_OF_BITS:
            raise ValueError(
                f"{m}: level {plan.levels[k].name!r} has {bits} bits, which no writable GGUF "
                f"type has (available: {sorted(b for b in _GGUF_TYPE_OF_BITS if b)} bits or "
                "unquantized)"
            )
        out[m] = _GGUF_TYPE_OF_BITS[bits]
    return out


def gguf_tensor_types(plan: Plan, model: nn.Module) -> list[str]:
    """`<gguf tensor name>=<type>` per compressible matrix, for `llama-quantize --tensor-type`
    (one argument each) or `--tensor-type-file` (the lines of a file).

    llama.cpp lower-cases the name, compiles it as a regex and takes the first one that
    `std::regex_search` finds in a tensor's name; the type is matched case-insensitively
    against ggml's type names. Each line here is checked to match its own tensor and no other
    of the model. Overrides only apply when the main type given to llama-quantize is a
    quantized one (e.g. Q8_0; older builds also ignore them under --pure), and the input GGUF
    must be F32/F16/BF16. Tensors not listed (token_embd, output, norms) follow llama-quantize's
    own rules, unlike `write_gguf`, which keeps them F32: pass --output-tensor-type and
    --token-embedding-type to pin them. Syntax from llama.cpp tools/quantize (README and
    quantize.cpp's parse_tensor_type) and src/llama-quant.cpp (regex_search, first match).
    See `gguf_types` for how levels map to types.
    """
    from .gguf_checkpoint import _model_type, _name_map

    _check_modules(plan, model)
    names = _name_map(model, _model_type(model))
    all_names = list(names.values())
    lines = []
    for hf_name, gguf_type in gguf_types(plan).items():
        gguf_name = names[hf_name]
        hits = [n for n in all_names if re.search(gguf_name.lower(), n)]
        if hits != [gguf_name]:
            raise ValueError(f"{gguf_name}: as a llama.cpp pattern it matches {hits}")
        lines.append(f"{gguf_name}={gguf_type.lower()}")
    return lines


# ---------------------------------------------------------------- predicted against achieved
def built_bits_per_weight(
    checkpoint: Path, plan: Plan, shapes: Mapping[str, Sequence[int]]
) -> float:
    """Average storage bits per block-matrix weight of a built protect- checkpoint, from
    what it stores: per quantized matrix its codes at the level's bits and one fp16 per
    scale; an unquantized matrix (nothing stored; its (out, in) from `shapes`) 16 bits per
    weight. Refuses a checkpoint
    whose stored matrices disagree with the plan."""
    from .checkpoints import read_manifest, read_payload

    method = read_manifest(checkpoint)["method"]
    if method.get("kind") != "protect" or Plan.from_dict(method["plan"]).choice != plan.choice:
        raise InputError(
            f"{checkpoint}: not the checkpoint of this plan (its manifest's method differs); "
            "re-run snakemake to rebuild it"
        )
    payload = read_payload(checkpoint)
    total = weights = 0
    for module in plan.modules:
        level = plan.level_of(module)
        codes = payload.get(f"{module}.codes")
        if (codes is None) != (level.bits is None):
            raise InputError(
                f"{checkpoint}: matrix {module} is stored {'without' if codes is None else 'with'}"
                f" codes but planned at {level.name}; re-run snakemake to rebuild it"
            )
        if codes is None:
            n = int(shapes[module][0]) * int(shapes[module][1])
            total, weights = total + 16 * n, weights + n
            continue
        n = codes.numel()
        total += int(level.bits or 0) * n + 16 * payload[f"{module}.scale"].numel()
        weights += n
    return total / weights


def outcome_table(
    plans: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    checkpoints: Mapping[str, Path],
    features: pl.DataFrame,
) -> pl.DataFrame:
    """Per protect- variant: what its plan predicted (watchlist survival, size) against
    what the built variant achieved in the audit (its measured classes in `features`, the
    bits its checkpoint stores), beside the plain base's forecast. `plans` are the
    plan.json, `records` the protect.json of each variant's protect job."""
    rows = []
    for variant, plan_dict in plans.items():
        plan = Plan.from_dict(plan_dict)
        record = records[variant]
        watch = [int(f) for f in record["watchlist"]["ids"]]
        measured = features.filter((pl.col("variant") == variant) & pl.col("feature").is_in(watch))
        if measured.height != len(watch):
            raise InputError(
                f"features table: {measured.height} of the {len(watch)} watched features have "
                f"a row for {variant}; re-run snakemake (rule survival)"
            )
        n = max(len(watch), 1)
        protected = [
            f"{m}={plan.levels[c].name}"
            for m, c in zip(plan.modules, plan.choice, strict=True)
            if c != 0  # the first level is the base every matrix starts at
        ]
        rows.append(
            {
                "variant": variant,
                "watchlist": str(record["watchlist"]["source"]),
                "n_watch": len(watch),
                "budget": str(record["budget"]),
                "n_protected": len(protected),
                "protected": ", ".join(protected),
                "predicted_watch_survived_pct": 100.0 * record["predicted_survived"] / n,
                "achieved_watch_survived_pct": 100.0
                * int((measured["class"] == "survived").sum())
                / n,
                "base_predicted_watch_survived_pct": 100.0 * record["base_predicted_survived"] / n,
                "predicted_bits_per_weight": float(record["bits_per_weight"]),
                "built_bits_per_weight": built_bits_per_weight(
                    checkpoints[variant], plan, record["shapes"]
                ),
                "base_bits_per_weight": float(record["base_bits_per_weight"]),
                "solver": str(record["solver"]),
                "gap": float(record["gap"]),
            }
        )
    return pl.DataFrame(rows, schema=polars_schema("protect"))


# ---------------------------------------------------------------- from the forecast
def plan_for_watchlist(
    forecast: Forecast,
    shapes: Mapping[str, tuple[int, int]],
    levels: Sequence[Level],
    watch: Sequence[int],
    *,
    survived_r: float,
    budget: Mapping[str, Any],
) -> tuple[Plan, dict[str, Any]]:
    """The plan for the watched features from a forecast of every quantized level (its
    schemes named like the levels), and the record of what it predicts beside the plain
    base (every matrix at levels[0]) for protect.json.

    `budget` is a compression.protect entry's: {bits_per_weight} or {bytes}.
    """
    source = {s: i for i, s in enumerate(forecast.sources)}
    row = {name: i for i, name in enumerate(forecast.schemes)}
    # [level, matrix, watched feature]: an unquantized level adds no noise, and a matrix
    # past the SAE's hook has no source row (nothing it does reaches the SAE)
    variance = np.zeros((len(levels), len(shapes), len(watch)))
    for k, level in enumerate(levels):
        for m, matrix in enumerate(shapes):
            if level.spec is not None and matrix in source:
                variance[k, m] = forecast.variance[row[level.name], source[matrix]][list(watch)]
    fp_variance = forecast.fp_variance[list(watch)]
    plan = plan_protection(
        variance, fp_variance, shapes, levels, survived_r=survived_r,
        budget_bits_per_weight=budget.get("bits_per_weight"), budget_bytes=budget.get("bytes"),
    )  # fmt: skip
    base_r = predicted_r(fp_variance, variance[0].sum(axis=0))
    n_weights = sum(o * i for o, i in shapes.values())
    record = {
        "budget": plan.budget,
        "survived_r": survived_r,
        "predicted_survived": plan.predicted_survived,
        "bits_per_weight": plan.bits_per_weight,
        "base_predicted_survived": int((base_r >= survived_r).sum()),
        "base_bits_per_weight": sum(storage_bits(levels[0], sh) for sh in shapes.values())
        / n_weights,
        "solver": plan.solver,
        "gap": plan.gap,
        "forecast_tokens": forecast.n_tokens,
        "shapes": {m: list(sh) for m, sh in shapes.items()},
    }
    return plan, record
