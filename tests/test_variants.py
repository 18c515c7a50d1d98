"""Variant names: parsed into what they compress, and written back."""

from __future__ import annotations

import pytest

from sae_audit.variants import parse_variant, prune_name, rtn_name


def test_variant_names_round_trip():
    assert parse_variant(rtn_name(6)).bits == 6
    v = parse_variant(rtn_name(4, 128, symmetric=False))
    assert (v.bits, v.group_size, v.symmetric) == (4, 128, False)
    assert parse_variant(prune_name(0.175)).sparsity == 0.175
    assert parse_variant("prune-matched-rtn-int6").target == "rtn-int6"
    assert parse_variant("fp").kind == "fp"
    for bad in ("rtn-int1", "prune-1.5", "int6", "prune-matched-fp"):
        with pytest.raises(ValueError):
            parse_variant(bad)
