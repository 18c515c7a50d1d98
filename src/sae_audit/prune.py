"""Unstructured per-tensor magnitude pruning."""

from __future__ import annotations

import torch


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of `numel` entries pruning at `sparsity` zeroes: round(sparsity * numel)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return round(sparsity * numel)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the `sparsity` fraction of smallest-|w| entries.

    The count pruned is round(sparsity * numel), the same fraction in every tensor;
    ties at the threshold are broken by position (a stable sort), so exactly that
    many entries are pruned.
    """
    flat = weight.detach().reshape(-1).abs().to(torch.float32)
    n_prune = pruned_count(flat.numel(), sparsity)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=weight.device)
    if n_prune:
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    return keep.view_as(weight)


def magnitude_ranks(weight: torch.Tensor) -> torch.Tensor:
    """Each entry's position in the stable ascending sort of |w| that `magnitude_mask` does.

    Sort once, then `mask_from_ranks(ranks, s)` gives `magnitude_mask(weight, s)` at any
    sparsity with one comparison, ties broken by position as there. int32 where it
    fits: the ranks then take as much memory as a float32 copy of the weight.
    """
    flat = weight.detach().reshape(-1).abs().to(torch.float32)
    n = flat.numel()
    dtype = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
    order = torch.sort(flat, stable=True).indices
    ranks = torch.empty(n, dtype=dtype, device=weight.device)
    ranks[order] = torch.arange(n, dtype=dtype, device=weight.device)
    return ranks.view_as(weight)


def mask_from_ranks(ranks: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`magnitude_mask` at `sparsity` from the weight's `magnitude_ranks`: the
    round(sparsity * numel) lowest ranks are pruned."""
    return ranks >= pruned_count(ranks.numel(), sparsity)


def prune_magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned copy of `weight` in its own dtype."""
    return weight * magnitude_mask(weight, sparsity).to(weight.dtype)
