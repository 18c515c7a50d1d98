"""Magnitude pruning: the exact fraction of smallest weights, per matrix."""

from __future__ import annotations

import pytest
import torch

from sae_audit.prune import (
    magnitude_mask,
    magnitude_ranks,
    mask_from_ranks,
    prune_magnitude,
    pruned_count,
)


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
    with pytest.raises(ValueError, match="sparsity"):
        mask_from_ranks(magnitude_ranks(torch.ones(2, 2)), -0.1)
    with pytest.raises(ValueError, match="sparsity"):
        pruned_count(4, 1.0)


def weights_with_ties(seed: int) -> dict[str, torch.Tensor]:
    """Random matrices, some with heavy ties: few distinct magnitudes, both signs, zeros,
    -0.0, and bfloat16 (whose |w| ties more after rounding)."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(64, 48, generator=gen)
    few_levels = torch.randint(-3, 4, (33, 17), generator=gen).to(torch.float32) * 0.25
    few_levels[0, :5] = -0.0
    return {
        "normal": normal,
        "few_levels": few_levels,
        "constant": torch.full((9, 11), -0.5),
        "bfloat16": torch.randn(40, 24, generator=gen).to(torch.bfloat16),
        "vector": torch.randn(101, generator=gen),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_from_ranks_equals_magnitude_mask_at_every_sparsity(seed):
    """Sorted once, the mask at any sparsity is magnitude_mask's, ties broken the same."""
    sparsities = [0.0, 1e-9, 0.001, 0.1, 0.25, 1 / 3, 0.5, 0.77, 0.9, 0.999, 1 - 1e-12]
    for name, w in weights_with_ties(seed).items():
        ranks = magnitude_ranks(w)
        assert ranks.shape == w.shape and ranks.dtype == torch.int32
        assert sorted(ranks.reshape(-1).tolist()) == list(range(w.numel()))  # a permutation
        for sparsity in sparsities:
            fast = mask_from_ranks(ranks, sparsity)
            assert torch.equal(fast, magnitude_mask(w, sparsity)), (name, sparsity)
            assert (~fast).sum().item() == pruned_count(w.numel(), sparsity)


def test_mask_from_ranks_on_random_sparsities():
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-20, 21, (50, 30), generator=gen).to(torch.float32) / 8  # many ties
    ranks = magnitude_ranks(w)
    for sparsity in torch.rand(200, generator=gen).tolist():
        assert torch.equal(mask_from_ranks(ranks, sparsity), magnitude_mask(w, sparsity))
