"""The compress stage: one variant's checkpoint from the base model, as the rule runs it
(the checkpoint format itself: test_checkpoints.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sae_audit import stages
from sae_audit.checkpoints import load_checkpoint, read_manifest
from sae_audit.files import InputError
from sae_audit.models import load_model, target_weights
from sae_audit.prune import prune_magnitude
from sae_audit.quantize import RTNSpec, fake_quantize


def test_compress_writes_the_variant_checkpoint(gpt_neox_dir, tmp_path):
    out = stages.compress(
        model={"source": str(gpt_neox_dir)},
        base=str(gpt_neox_dir),
        variant="rtn-int4",
        out=tmp_path / "q",
    )
    assert out == str(tmp_path / "q")
    manifest = read_manifest(out)
    assert manifest["variant"] == "rtn-int4" and manifest["method"]["bits"] == 4
    assert "matched_search" not in manifest
    model, fp = load_checkpoint(out), load_model(gpt_neox_dir)
    for (name, p), (_, p_fp) in zip(target_weights(model), target_weights(fp), strict=True):
        assert torch.allclose(p, fake_quantize(p_fp, RTNSpec(bits=4))), name
    assert not list(tmp_path.glob("*.tmp"))


def test_matched_pruning_takes_its_sparsity_from_the_search(gpt_neox_dir, tmp_path):
    search = {"target": "rtn-int4", "sparsity": 0.25, "trace": [], "n_sequences": 2}
    (tmp_path / "matched.json").write_text(json.dumps(search))
    out = stages.compress(
        model={"source": "local"},
        base=str(gpt_neox_dir),
        variant="prune-matched-rtn-int4",
        matched=[str(tmp_path / "matched.json")],
        out=tmp_path / "m",
    )
    manifest = read_manifest(out)
    assert manifest["variant"] == "prune-matched-rtn-int4"
    assert manifest["method"] == {"kind": "prune-matched", "sparsity": 0.25}
    assert manifest["matched_search"] == search
    model, fp = load_checkpoint(out), load_model(gpt_neox_dir)
    for (name, p), (_, p_fp) in zip(target_weights(model), target_weights(fp), strict=True):
        assert torch.equal(p, prune_magnitude(p_fp, 0.25)), name


def test_matched_pruning_without_a_usable_search_is_refused(gpt_neox_dir, tmp_path):
    base = str(gpt_neox_dir)
    with pytest.raises(ValueError, match="needs a sparsity"):
        stages.compress(
            model={"source": "local"},
            base=base,
            variant="prune-matched-rtn-int4",
            out=tmp_path / "a",
        )
    with pytest.raises(ValueError, match="at most one matched-search result"):
        stages.compress(
            model={"source": "local"},
            base=base,
            variant="prune-0.3",
            matched=["a.json", "b.json"],
            out=tmp_path / "b",
        )
    missing = tmp_path / "missing.json"
    with pytest.raises(InputError, match=r"missing\.json: no such file.*--forcerun match_sparsity"):
        stages.compress(
            model={"source": "local"}, base=base, variant="prune-matched-rtn-int4", matched=[str(missing)],
            out=tmp_path / "c",
        )  # fmt: skip
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))
