"""The embedded fixture's model: a small GPT-NeoX trained on the fixture corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae_audit.fixture.model import ModelTrainConfig, heldout_targets, train_model

# corpus, tokenizer_dir and model_dir (trained with TINY_MODEL) are session fixtures
# in tests/conftest.py, shared with test_fixture_sae.py.

TINY_MODEL = ModelTrainConfig(
    n_layer=2, d_model=32, n_head=2, d_mlp=64, context=32, batch_size=8, max_steps=60
)


def test_tiny_model_trains_saves_and_loads(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["steps"] > 0 and metrics["n_train_tokens"] > 0
    assert math.isfinite(metrics["heldout_perplexity"]) and metrics["heldout_perplexity"] > 1
    assert math.isfinite(metrics["unigram_perplexity"]) and metrics["unigram_perplexity"] > 1

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "gpt_neox"
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 32
    assert cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert cfg.bos_token_id == cfg.eos_token_id == tok.eos_token_id
    # Untied: the unembedding is its own tensor, as in Pythia.
    unembed, embed = model.lm_head.weight, model.gpt_neox.embed_in.weight  # type: ignore[union-attr]
    assert unembed.data_ptr() != embed.data_ptr()  # type: ignore[operator]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok("Return the value.")["input_ids"]])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_hidden_state_is_block_output(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        captured["out"] = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]

    block: torch.nn.Module = model.gpt_neox.layers[0]  # type: ignore[index]
    block.register_forward_hook(grab)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], captured["out"])


def test_heldout_targets_skip_first_token_of_each_window() -> None:
    tokens = torch.arange(10)
    assert heldout_targets(tokens, 4).tolist() == [1, 2, 3, 5, 6, 7, 9]
    assert heldout_targets(torch.arange(9), 4).tolist() == [1, 2, 3, 5, 6, 7]


def test_fixture_model_is_a_function_of_config_and_seed(
    model_dir: Path, corpus: tuple[Path, Path, dict], tokenizer_dir: Path, tmp_path: Path
) -> None:
    """A second build of the same config is the same model, bit for bit (no wall clock)."""
    from safetensors.torch import load_file

    metrics = train_model(TINY_MODEL, tokenizer_dir, corpus[0], corpus[1], tmp_path / "again")
    first = load_file(model_dir / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert metrics["steps"] == TINY_MODEL.max_steps
    saved = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["heldout_perplexity"] == saved["heldout_perplexity"]


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: ModelTrainConfig(n_layer=0), "n_layer"),
        (lambda: ModelTrainConfig(d_model=130), "d_model"),
        (lambda: ModelTrainConfig(lr=0.0), "lr"),
        (lambda: ModelTrainConfig(train_seconds=-1.0), "train_seconds"),
        (lambda: ModelTrainConfig(context=1), "context"),
    ],
)
def test_config_validation_names_the_field(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()
