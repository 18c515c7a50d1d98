"""Unstructured per-tensor magnitude pruning."""

from __future__ import annotations

import torch


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the `sparsity` fraction of smallest-|w| entries.

    The count pruned is round(sparsity * numel), the same fraction in every tensor;
    ties at the threshold are broken by position (a stable sort), so exactly that
    many entries are pruned.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = weight.detach().reshape(-1).abs().to(torch.float32)
    n_prune = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=weight.device)
    if n_prune:
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    return keep.view_as(weight)


def prune_magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Pruned copy of `weight` in its own dtype."""
    return weight * magnitude_mask(weight, sparsity).to(weight.dtype)
