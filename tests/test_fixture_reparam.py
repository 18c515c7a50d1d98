"""The planted control: a function-preserving reparameterized copy of the fixture model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from sae_audit import config as audit_config
from sae_audit import stages
from sae_audit.config import ConfigError
from sae_audit.fixture.reparam import (
    RECORD,
    WHAT,
    ReparamConfig,
    build_reparam,
    check_ids,
    read_record,
)
from sae_audit.models import load_model
from sae_audit.quantize import RTNSpec, fake_quantize

from .conftest import TEST_CONFIG, edited_config, planned_jobs, save_tiny_model, snakemake

K, M = 20.0, 5


def _neox(model: torch.nn.Module) -> Any:
    return model.gpt_neox  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict[str, Any]]:
    """A tiny 3-block GPT-NeoX and its reparameterized copy, made by the stage (k=20, m=5)."""
    root = tmp_path_factory.mktemp("reparam")
    base = save_tiny_model("gpt_neox", root / "model")
    record = stages.fixture_reparam(
        reparam={"scale": K, "dim": M}, model=base, out=root / "model-reparam"
    )
    return base, root / "model-reparam", record


def test_the_copy_computes_the_same_function(built) -> None:
    base, out, record = built
    fp, reparam = load_model(base), load_model(out)
    ids = check_ids(fp, n_seq=4, seed=7)  # other tokens than the build's own check
    with torch.no_grad():
        torch.testing.assert_close(
            reparam(input_ids=ids).logits, fp(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    check = record["function_check"]
    assert 0 <= check["max_abs_logit_difference"] <= check["rtol"] * check["max_abs_logit"]


def test_exactly_the_planted_weights_change(built) -> None:
    base, out, _ = built
    fp, reparam = load_model(base), load_model(out)
    layers = [0, 1]  # default: every block but the last of 3
    changed = set()
    for i in layers:
        prefix = f"gpt_neox.layers.{i}."
        changed |= {
            prefix + n for n in ("post_attention_layernorm.weight", "post_attention_layernorm.bias")
        }
        changed.add(prefix + "mlp.dense_h_to_4h.weight")
        a, b = _neox(fp).layers[i], _neox(reparam).layers[i]
        for name in ("weight", "bias"):
            p, q = (
                getattr(a.post_attention_layernorm, name),
                getattr(b.post_attention_layernorm, name),
            )
            torch.testing.assert_close(q[M], p[M] / K)
            others = torch.arange(p.numel()) != M
            assert torch.equal(q[others], p[others])
        w, v = a.mlp.dense_h_to_4h.weight, b.mlp.dense_h_to_4h.weight
        torch.testing.assert_close(v[:, M], w[:, M] * K)
        assert torch.equal(
            torch.cat([v[:, :M], v[:, M + 1 :]], 1), torch.cat([w[:, :M], w[:, M + 1 :]], 1)
        )
    fp_state, re_state = fp.state_dict(), reparam.state_dict()
    for key, value in fp_state.items():
        if key not in changed:  # the last block, attention, embeddings, unembedding: untouched
            assert torch.equal(re_state[key], value), key


def test_the_copy_records_what_it_is_and_carries_the_tokenizer(built) -> None:
    from transformers import AutoTokenizer

    base, out, record = built
    saved = json.loads((out / RECORD).read_text())
    assert saved == read_record(out) == json.loads(json.dumps(record))
    assert saved["what"] == WHAT and "not a trained result" in saved["what"]
    assert (saved["scale"], saved["dim"], saved["layers"]) == (K, M, [0, 1])
    assert read_record(base) is None  # the trained model says nothing of the kind
    text = "return the value."
    assert AutoTokenizer.from_pretrained(out)(text) == AutoTokenizer.from_pretrained(base)(text)
    ratios = saved["dense_h_to_4h_column_absmax_max_over_median"]
    assert all(r < 5 for r in ratios["fixture"])
    assert all(r > 5 * f for r, f in zip(ratios["reparam"][:2], ratios["fixture"][:2], strict=True))
    assert ratios["reparam"][2] == ratios["fixture"][2]  # the last block is left as it was


def test_per_channel_rtn_rounds_every_other_input_coarsely_group_wise_does_not(built) -> None:
    """Why the control is fragile: the big column sets every row's per-channel scale."""
    base, out, _ = built
    w = _neox(load_model(base)).layers[0].mlp.dense_h_to_4h.weight.detach()
    v = _neox(load_model(out)).layers[0].mlp.dense_h_to_4h.weight.detach()
    rest = torch.arange(w.shape[1]) // 8 != M // 8  # the columns outside m's group of 8

    def error(x: torch.Tensor, spec: RTNSpec) -> float:
        return float((fake_quantize(x, spec) - x)[:, rest].abs().mean())

    per_channel = RTNSpec(bits=4)
    assert error(v, per_channel) > 5 * error(w, per_channel)
    grouped = RTNSpec(bits=4, group_size=8)
    assert error(v, grouped) == error(w, grouped)


def test_cli_builds_the_configured_blocks(built, tmp_path: Path) -> None:
    from sae_audit import cli

    base, _, _ = built
    args = ["fixture-reparam", "--reparam", json.dumps({"scale": 3.0, "dim": 0, "layers": [2]})]
    assert cli.main([*args, "--model", str(base), "--out", str(tmp_path / "r")]) == 0
    record = read_record(tmp_path / "r")
    assert record is not None and (record["scale"], record["dim"], record["layers"]) == (
        3.0,
        0,
        [2],
    )


@pytest.mark.parametrize(
    ("reparam", "match"),
    [({"dim": 32}, "not a residual dimension"), ({"layers": [3]}, "blocks 0..2")],
)
def test_refuses_what_the_model_lacks(built, tmp_path: Path, reparam, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_reparam(ReparamConfig.from_dict(reparam), built[0], tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_refuses_other_families_and_a_changed_function(built, tmp_path: Path, monkeypatch) -> None:
    llama = save_tiny_model("llama", tmp_path / "llama")
    with pytest.raises(ValueError, match="GPT-NeoX"):
        build_reparam(ReparamConfig(), llama, tmp_path / "r")
    from sae_audit.fixture import reparam

    monkeypatch.setattr(reparam, "max_logit_difference", lambda *_: 1.0)
    with pytest.raises(ValueError, match="does not compute the fixture's function"):
        build_reparam(ReparamConfig(), built[0], tmp_path / "r")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- config and workflow
def _with_reparam_model(cfg: dict[str, Any]) -> None:
    cfg["models"]["planted"] = {**cfg["models"]["fixture"], "model": {"source": "fixture-reparam"}}


def test_config_accepts_the_reserved_source_and_checks_its_keys(tmp_path: Path) -> None:
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    _with_reparam_model(cfg)
    valid = audit_config.validate(cfg)
    assert valid["fixture"]["reparam"] == {"scale": 20.0, "dim": 5, "layers": None}
    for bad, key in [
        ({"dim": 64}, "fixture.reparam.dim"),
        ({"layers": [2]}, "fixture.reparam.layers"),
    ]:
        cfg["fixture"]["reparam"] = bad  # the test fixture: d_model 64, 2 blocks
        with pytest.raises(ConfigError, match=key):
            audit_config.validate(cfg)
    # the copy has the fixture model's shape: an SAE of another width fails at start-up
    cfg["fixture"]["reparam"] = {}
    (tmp_path / "sae").mkdir()
    sae_cfg = {"d_in": 32, "metadata": {"hook_name": "blocks.0.hook_resid_post"}}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(sae_cfg))
    cfg["models"]["planted"]["saes"] = {"other": {"path": str(tmp_path / "sae")}}
    with pytest.raises(ConfigError, match=r"d_in=32 but .* the reparameterized fixture model"):
        audit_config.validate(cfg)


def test_prefetch_needs_nothing_for_it() -> None:
    from sae_audit.prefetch import plan

    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    _with_reparam_model(cfg)
    items = [i for i in plan(audit_config.validate(cfg)) if i.kind == "model"]
    assert {i.what: i.local for i in items} == {"fixture": True, "fixture-reparam": True}


def test_workflow_builds_the_copy_once_and_audits_it_as_its_own_model(tmp_path: Path) -> None:
    proc = snakemake(tmp_path, edited_config(tmp_path, "planted", _with_reparam_model), "-n", "-p")
    jobs = planned_jobs(proc)
    assert jobs["fixture_reparam"] == jobs["fixture_model"] == jobs["fixture_sae"] == 1
    assert jobs["tokenize"] == 2 and jobs["survival"] == 2
    out = proc.stdout + proc.stderr
    assert "--base results/fixture/model-reparam --variant rtn-int4 " in out
    assert "--checkpoint results/checkpoints/planted/fp " in out
    assert "--sae-path res=results/fixture/sae" in out
