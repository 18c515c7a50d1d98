"""The fixture SAE's twin: the same config trained with fixture.sae.twin_seed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sae_audit import stages
from sae_audit.config import ConfigError
from sae_audit.fixture.sae import SAETrainConfig

from .test_fixture_sae import TINY_SAE

# corpus and model_dir are session fixtures (tests/conftest.py).


def test_twin_is_the_fixture_sae_with_the_twin_seed(
    model_dir: Path, corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    cfg = replace(TINY_SAE, seed=0, twin_seed=5)
    kw = {"model": model_dir, "train": corpus[0]}
    stages.fixture_sae_twin(sae=cfg.to_dict(), out=tmp_path / "twin", **kw)
    stages.fixture_sae(sae=replace(cfg, seed=5, twin_seed=None), out=tmp_path / "same", **kw)
    stages.fixture_sae(sae=cfg, out=tmp_path / "main", **kw)
    twin, same, main = (
        load_file(tmp_path / d / "sae_weights.safetensors") for d in ("twin", "same", "main")
    )
    assert all(twin[k].equal(same[k]) for k in twin)  # the same training, another seed
    assert not twin["W_dec"].equal(main["W_dec"])
    assert json.loads((tmp_path / "twin" / "metrics.json").read_text())["config"]["seed"] == 5


def test_no_twin_or_the_main_seed_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twin_seed is null"):
        stages.fixture_sae_twin(
            sae=replace(TINY_SAE, twin_seed=None), model=tmp_path, train=tmp_path, out=tmp_path
        )
    with pytest.raises(ConfigError, match=r"fixture\.sae\.twin_seed"):
        SAETrainConfig(seed=3, twin_seed=3)
    assert SAETrainConfig().twin().seed == SAETrainConfig().twin_seed != SAETrainConfig().seed
