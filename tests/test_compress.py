"""The compress stage: one variant's checkpoint from the base model, as the rule runs it
(the checkpoint format itself: test_checkpoints.py)."""

from __future__ import annotations

import json

import numpy as np
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


# ---------------------------------------------------------------- shipped formats
def _calibration_shard(tmp_path, vocab: int = 64) -> str:
    from sae_audit.tokens import write_token_shard

    ids = np.random.default_rng(0).integers(4, vocab, size=(8, 16))
    path = tmp_path / "calibration.parquet"
    write_token_shard(path, ids, 0, {"seq_len": 16, "n_sequences": 8, "bos": None})
    return str(path)


def test_llmcompressor_variant_through_the_stage(gpt_neox_dir, tmp_path):
    entry = {"scheme": "W8A16", "method": "gptq", "group_size": 16}
    out = stages.compress(
        model={"source": "local"},
        base=str(gpt_neox_dir),
        variant="lc-w8",
        entry=entry,
        calibration=[_calibration_shard(tmp_path)],
        out=tmp_path / "lc",
    )
    method = read_manifest(out)["method"]
    assert method["kind"] == "llmcompressor" and method["entry"] == entry
    model, fp = load_checkpoint(out), load_model(gpt_neox_dir)
    for (name, p), (_, p_fp) in zip(target_weights(model), target_weights(fp), strict=True):
        assert not torch.equal(p, p_fp), name
        # int8: GPTQ moves each weight by a few grid steps at most (it compensates rounding
        # errors in the weights it has not quantized yet), far below the weights themselves
        assert (p - p_fp).abs().max() <= 0.05 * p_fp.abs().max(), name


def test_a_shipped_variant_without_its_entry_is_refused(gpt_neox_dir, tmp_path):
    with pytest.raises(ValueError, match="needs its config entry"):
        stages.compress(
            model={"source": "local"},
            base=str(gpt_neox_dir),
            variant="gguf-q8_0",
            out=tmp_path / "g",
        )
    assert not (tmp_path / "g").exists()


def test_gguf_variant_loads_the_dequantized_weights(gpt_neox_dir, tmp_path):
    out = stages.compress(
        model={"source": "local"},
        base=str(gpt_neox_dir),
        variant="gguf-q8",
        entry={"type": "Q8_0"},
        out=tmp_path / "g",
    )
    method = read_manifest(out)["method"]
    assert method["kind"] == "gguf" and (tmp_path / "g" / method["file"]).is_file()
    model, fp = load_checkpoint(out), load_model(gpt_neox_dir)
    blocks = {n for n, _ in target_weights(fp)}
    q = dict(model.named_parameters())
    for name, p in fp.named_parameters():
        assert torch.equal(p, q[name]) != (name in blocks), name


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_external_artifacts_of_the_base_model_load_as_their_variant(family, tmp_path):
    from sae_audit.gguf_checkpoint import write_gguf
    from tests.conftest import save_tiny_model

    gpt_neox_dir = save_tiny_model(family, tmp_path / "base", hidden=64)  # GGUF rows: 32s

    # a compressed-tensors directory and a GGUF file, as another team would hand them over
    made = stages.compress(
        model={"source": "local"},
        base=str(gpt_neox_dir),
        variant="lc-int8",
        entry={"scheme": "W8A8", "method": "rtn"},
        calibration=[_calibration_shard(tmp_path)],
        out=tmp_path / "made",
    )
    gguf_file = tmp_path / "prod.Q4_0.gguf"
    write_gguf(load_model(gpt_neox_dir), "Q4_0", gguf_file)
    fp = load_model(gpt_neox_dir)
    ids = torch.randint(4, 64, (2, 12))
    for key, source, fmt in [
        ("ct", str(tmp_path / "made" / "model"), "compressed-tensors"),
        ("gg", str(gguf_file), "gguf"),
    ]:
        out = stages.compress(
            model={"source": "local"},
            base=str(gpt_neox_dir),
            variant=f"ext-{key}",
            entry={"source": source, "format": "auto"},
            out=tmp_path / key,
        )
        method = read_manifest(out)["method"]
        assert method["kind"] == "external" and method["format"] == fmt
        ext = load_checkpoint(out)
        with torch.no_grad():
            assert not torch.equal(ext(ids).logits, fp(ids).logits), key
    # the compressed-tensors artifact loads as the variant made from it did
    with torch.no_grad():
        assert torch.equal(
            load_checkpoint(tmp_path / "ct")(ids).logits, load_checkpoint(made)(ids).logits
        )


def test_an_external_artifact_of_another_model_is_refused_naming_both(gpt_neox_dir, tmp_path):
    from sae_audit.gguf_checkpoint import write_gguf
    from tests.conftest import save_tiny_model

    other = save_tiny_model("gpt_neox", tmp_path / "other", layers=5)
    write_gguf(load_model(other), "Q8_0", tmp_path / "other.gguf")
    with pytest.raises(InputError) as e:
        stages.compress(
            model={"source": "local"},
            base=str(gpt_neox_dir),
            variant="ext-other",
            entry={"source": str(tmp_path / "other.gguf")},
            out=tmp_path / "x",
        )
    assert "other.gguf" in str(e.value) and str(gpt_neox_dir) in str(e.value)
    assert "num_hidden_layers 5 != base model's 3" in str(e.value)
    assert not (tmp_path / "x").exists()
