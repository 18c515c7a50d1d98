"""The bundled fixture: what the default config's fixture rules build, shipped in the package."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from sae_audit import config
from sae_audit.fixture.bundle import (
    ARTIFACTS,
    BUNDLE_DIR,
    INPUTS,
    check_rebuild,
    digest,
    mismatch,
    normalized,
    read_manifest,
    restore,
    section_configs,
)

from .conftest import ROOT, snakemake

DEFAULT_CONFIG = ROOT / "config" / "config.yaml"


@pytest.fixture(scope="module")
def configs() -> dict:
    return section_configs(config.load(DEFAULT_CONFIG)["fixture"])


def bundle_inputs(name: str, bundle_dir: Path = BUNDLE_DIR) -> dict[str, Path]:
    return {key: bundle_dir / rel for key, rel in INPUTS[name].items()}


def test_the_default_config_is_the_one_the_bundle_was_built_from(configs: dict) -> None:
    manifest = read_manifest()
    assert manifest is not None
    recorded = {name: record["config"] for name, record in manifest["artifacts"].items()}
    assert recorded == {name: normalized(cfg) for name, cfg in configs.items()}
    assert config.load(DEFAULT_CONFIG)["fixture"]["bundle"] is True


def test_each_bundled_artifact_stands_in_for_its_build(configs: dict) -> None:
    """Its recorded inputs are the bundle's own upstream artifacts, and its files have their
    recorded digests: the chain corpus -> tokenizer -> model -> SAEs holds."""
    for name in ARTIFACTS:
        assert mismatch(name, configs[name], bundle_inputs(name)) is None, name


def test_the_bundle_stays_small() -> None:
    """Every tracked file under 5 MB: the 5.3 MB model is stored gzipped."""
    sizes = {p: p.stat().st_size for p in BUNDLE_DIR.rglob("*") if p.is_file()}
    assert max(sizes.values()) < 5_000_000 and sum(sizes.values()) < 10_000_000
    assert (BUNDLE_DIR / "model" / "model.safetensors.gz").exists()


def test_a_gzipped_bundle_file_is_restored_unpacked(configs: dict, tmp_path: Path) -> None:
    """The restored model is the file the rule built (not its .gz), and transformers loads it."""
    from transformers import AutoModelForCausalLM

    inputs = bundle_inputs("model")
    out = tmp_path / "model"
    assert restore("model", configs["model"], inputs, {"model": out})
    assert (out / "model.safetensors").exists() and not list(out.rglob("*.gz"))
    assert digest(out) == digest(BUNDLE_DIR / "model")
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt_neox"


def test_restore_copies_only_what_this_config_and_these_inputs_build(
    configs: dict, tmp_path: Path
) -> None:
    train = BUNDLE_DIR / "corpus/train.txt"
    out = tmp_path / "tokenizer"
    assert restore("tokenizer", configs["tokenizer"], {"train": train}, {"tokenizer": out})
    assert digest(out) == digest(BUNDLE_DIR / "tokenizer")

    other = dataclasses.replace(configs["tokenizer"], vocab_size=1024)
    reason = mismatch("tokenizer", other, {"train": train})
    assert reason is not None and "vocab_size" in reason
    assert not restore("tokenizer", other, {"train": train}, {"tokenizer": tmp_path / "no"})
    assert not (tmp_path / "no").exists()

    edited = tmp_path / "train.txt"
    edited.write_bytes(train.read_bytes() + b"\n")
    reason = mismatch("tokenizer", configs["tokenizer"], {"train": edited})
    assert reason is not None and "input train" in reason

    damaged = tmp_path / "bundle"
    shutil.copytree(BUNDLE_DIR, damaged)
    weights = damaged / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    reason = mismatch("sae", configs["sae"], bundle_inputs("sae", damaged), damaged)
    assert reason is not None and "recorded digest" in reason


@pytest.mark.slow
def test_the_default_run_copies_the_fixture_from_the_bundle(tmp_path: Path) -> None:
    """The real fixture rules on the default config: every artifact is the bundled one,
    copied (the logs say so), and the planted control builds on it."""
    snakemake(
        tmp_path, DEFAULT_CONFIG, "--until", "fixture_sae", "fixture_sae_twin", "fixture_reparam"
    )
    fixture = tmp_path / "results" / "fixture"
    for rels in ARTIFACTS.values():
        for rel in rels:
            assert digest(fixture / rel) == digest(BUNDLE_DIR / rel), rel
    for rule in ("fixture_corpus", "fixture_tokenizer", "fixture_model", "fixture_sae"):
        assert "copied from the bundle" in (tmp_path / f"results/logs/{rule}.log").read_text()
    assert (fixture / "model-reparam" / "reparam.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SAE_AUDIT_REBUILD_BUNDLE") != "1",
    reason="opt-in (minutes of training): SAE_AUDIT_REBUILD_BUNDLE=1",
)
def test_rebuilding_from_the_recorded_config_reproduces_the_bundle_bit_for_bit() -> None:
    manifest = read_manifest()
    assert manifest is not None
    from sae_audit.fixture.model import torch_threads

    if torch_threads() != manifest["build"]["threads"]:
        pytest.skip(f"the bundle was trained on {manifest['build']['threads']} threads")
    assert check_rebuild(config.load(DEFAULT_CONFIG)["fixture"]) == []
