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


def test_noise_null_is_a_variant_of_its_own_beside_the_null_run():
    from sae_audit import config as audit_config
    from sae_audit.figures import variant_order

    assert parse_variant("fp-noise").kind == "noise"
    with pytest.raises(ValueError, match="compressed target"):
        parse_variant("prune-matched-fp-noise")
    cfg = audit_config.validate(
        {"models": {"m": {"model": {"source": "fixture"}, "saes": {"r": {"source": "fixture"}},
                          "tokens": {"source": "fixture", "seq_len": 8, "n_sequences": 4,
                                     "n_shards": 1}}}}
    )  # fmt: skip
    names = audit_config.variant_names(cfg)
    assert names[-2:] == ["fp-null", "fp-noise"]  # stability.noise_null defaults to true
    cfg["stability"]["noise_null"] = False
    assert "fp-noise" not in audit_config.variant_names(cfg)
    # tables and figures: the noise null right after the null run, before unknown names
    shuffled = ["fp-noise", "weird", "fp-null", "prune-0.3", "rtn-int4", "fp"]
    assert variant_order(shuffled) == [
        "fp",
        "rtn-int4",
        "prune-0.3",
        "fp-null",
        "fp-noise",
        "weird",
    ]


def test_protected_variants_parse_and_sit_after_matched_pruning():
    from sae_audit import config as audit_config
    from sae_audit.figures import variant_order
    from sae_audit.variants import protect_name

    v = parse_variant(protect_name("watch-int4"))
    assert (v.kind, v.key, v.bits) == ("protect", "watch-int4", None)
    with pytest.raises(ValueError, match="protect-<key>"):
        parse_variant("protect-")
    cfg = audit_config.validate(
        {"models": {"m": {"model": {"source": "fixture"}, "saes": {"r": {"source": "fixture"}},
                          "tokens": {"source": "fixture", "seq_len": 8, "n_sequences": 4,
                                     "n_shards": 1}}},
         "compression": {"rtn": {"bits": [4]}, "prune": {"matched": {"targets": ["rtn-int4"]}},
                         "protect": {"w": {"levels": [{"bits": 4}, {"bits": 8}],
                                           "budget": {"bits_per_weight": 5.0}}}}}
    )  # fmt: skip
    names = audit_config.variant_names(cfg)
    assert names[:3] == ["rtn-int4", "prune-matched-rtn-int4", "protect-w"]
    assert audit_config.protect_entry(cfg, "protect-w")["budget"] == {"bits_per_weight": 5.0}
    assert audit_config.protect_entry(cfg, "rtn-int4") is None
    assert audit_config.protect_sae(cfg, "m", "w") == "r"
    assert variant_order(["fp-null", "protect-w", "prune-matched-rtn-int4", "rtn-int4"]) == [
        "rtn-int4", "prune-matched-rtn-int4", "protect-w", "fp-null",
    ]  # fmt: skip
