"""Magnitude pruning: the exact fraction of smallest weights, per matrix."""

from __future__ import annotations

import pytest
import torch

from sae_audit.prune import magnitude_mask, prune_magnitude


def test_magnitude_mask_prunes_exact_fraction_of_smallest():
    w = torch.tensor([[0.1, -5.0, 0.3], [-0.2, 4.0, 0.0]])
    keep = magnitude_mask(w, 0.5)
    assert keep.tolist() == [[False, True, True], [False, True, False]]
    assert torch.equal(prune_magnitude(w, 0.5), torch.tensor([[0.0, -5.0, 0.3], [0.0, 4.0, 0.0]]))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.175, 0.5, 0.9])
def test_magnitude_mask_count(sparsity):
    w = torch.randn(37, 23)
    keep = magnitude_mask(w, sparsity)
    assert (~keep).sum().item() == round(sparsity * w.numel())
    if sparsity > 0:
        assert w[~keep].abs().max() <= w[keep].abs().min()


def test_magnitude_mask_rejects_bad_sparsity():
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(torch.ones(2, 2), 1.0)
