"""Hub-style models and pretrained-style SAEs, saved locally, through the real workflow.

Every supported family (GPT-NeoX, Gemma-2 with tied embeddings, Llama, GPT-2 with
Conv1D) is saved with `save_pretrained` plus a tokenizer; SAEs of each sae-lens
architecture (standard, JumpReLU, TopK) on different hook points are saved with
`save_model`. The workflow loads them exactly as it would a hub model and a
pretrained SAE, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from sae_audit.models import load_model
from sae_audit.shards import read_metadata

from .conftest import save_tiny_model, snakemake
from .test_families import make_sae

# (model family, {sae name: (architecture, hook)})
BASES: dict[str, dict[str, tuple[str, str]]] = {
    "gpt_neox": {
        "res1": ("standard", "blocks.1.hook_resid_post"),
        "mlp0": ("topk", "blocks.0.hook_mlp_out"),
    },
    "gemma2": {
        "res2": ("jumprelu", "blocks.2.hook_resid_post")
    },  # the last layer: before the final norm
    "llama": {"pre0": ("topk", "blocks.0.hook_resid_pre")},
    "gpt2": {"attn1": ("standard", "blocks.1.hook_attn_out")},
}
SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "a model that is compressed may still compute the same way, or it may not.",
    "features that fire rarely are the first to go when weights are rounded.",
]


def activations(model_dir: Path, hook: str):
    """Activations at a hook on random tokens: scales the SAE so that its features fire."""
    from sae_audit.models import ActivationCapture, resolve_hook

    model = load_model(model_dir)
    try:
        resolve_hook(model, hook)
    except ValueError:
        return None  # the tests of bad hooks want exactly that SAE
    ids = torch.randint(4, 60, (4, 32), generator=torch.Generator().manual_seed(0))
    with ActivationCapture(model, [hook]) as capture, torch.no_grad():
        model(input_ids=ids)
    return capture.activations[hook]


def write_config(root: Path, bases=BASES, d_in: int | None = None) -> Path:
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(SENTENCES[i % 3] + f" line {i}." for i in range(120)))
    models = {}
    for family, saes in bases.items():
        model_dir = save_tiny_model(family, root / "models" / family)
        specs = {}
        for name, (arch, hook) in saes.items():
            sae = make_sae(arch, d_in or 32, 48, hook, acts=activations(model_dir, hook))
            sae.save_model(root / "saes" / family / name)
            specs[name] = {"path": str(root / "saes" / family / name), "architecture": arch}
        models[family] = {
            "model": {"source": str(model_dir), "dtype": "float32"},
            "saes": specs,
            "tokens": {
                "source": "text",
                "paths": [str(corpus)],
                "seq_len": 32,
                "n_sequences": 16,
                "n_shards": 1,
            },
            "resources": {"threads": 1, "mem_mb": 1000},
        }
    config = {
        "models": models,
        "compression": {
            "rtn": {"bits": [3]},
            "prune": {"sparsities": [], "matched": {"targets": []}},
        },
        "stability": {"null_run": False},
        "encode": {"batch_size": 8, "device": "cpu"},
        "perplexity": {"sliding": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_workflow_runs_every_family_and_sae_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path)
    targets = [f"results/tables/{m}/perplexity.parquet" for m in BASES]
    targets += [
        f"results/tables/{m}/{s}/survival.parquet" for m, saes in BASES.items() for s in saes
    ]
    snakemake(tmp_path, config, *targets)
    results = tmp_path / "results"
    for family, saes in BASES.items():
        ppl = pl.read_parquet(results / f"tables/{family}/perplexity.parquet")
        assert set(ppl["variant"]) == {"fp", "fp-noise", "rtn-int3"}  # the noise null in bf16
        # One NLL shard per (variant, shard), shared by all of the model's SAEs.
        assert len(list((results / f"nll/{family}/fp").glob("*.parquet"))) == 1
        for name, (_arch, hook) in saes.items():
            meta = read_metadata(results / f"codes/{family}/fp/shard-000/{name}.parquet")
            assert (meta.model, meta.variant, meta.sae, meta.hook, meta.d_sae) == (
                family,
                "fp",
                name,
                hook,
                48,
            )
            summary = pl.read_parquet(results / f"tables/{family}/{name}/survival.parquet")
            assert summary["variant"].to_list() == ["rtn-int3", "fp-noise"]
            assert (summary["n_active"] > 0).all()
    # The compressed checkpoints never touch a tied embedding.
    fp = load_model(tmp_path / "models/gemma2")
    manifest = json.loads((results / "checkpoints/gemma2/rtn-int3/manifest.json").read_text())
    assert manifest["base"] == str(tmp_path / "models/gemma2")
    assert (
        fp.get_input_embeddings().weight.data_ptr() == fp.get_output_embeddings().weight.data_ptr()
    )


def test_sae_width_mismatch_fails_before_any_job(tmp_path):
    config = write_config(
        tmp_path, {"llama": {"res0": ("standard", "blocks.0.hook_resid_post")}}, d_in=16
    )
    proc = snakemake(tmp_path, config, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        "config key 'models.llama.saes.res0.path'" in out and "d_in=16" in out and "width 32" in out
    )
    assert not (tmp_path / "results").exists()


def test_unknown_sae_hook_fails_before_any_job(tmp_path):
    config = write_config(tmp_path, {"gpt2": {"z0": ("standard", "blocks.0.attn.hook_z")}})
    proc = snakemake(tmp_path, config, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "blocks.0.attn.hook_z" in out and "hook_resid_post" in out


def test_sae_hook_past_the_last_layer_fails_before_any_job(tmp_path):
    config = write_config(tmp_path, {"gpt_neox": {"r9": ("standard", "blocks.9.hook_resid_post")}})
    proc = snakemake(tmp_path, config, "-n", check=False)
    assert proc.returncode != 0
    assert "past the model's 3 layers" in proc.stdout + proc.stderr
