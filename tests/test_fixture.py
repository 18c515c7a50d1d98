"""Fast tests of the embedded fixture: corpus, tokenizer, tiny LM and tiny SAE."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sae_audit.fixture.corpus import (
    CorpusConfig,
    build_corpus,
    clean_docstring,
    read_documents,
    write_documents,
)
from sae_audit.fixture.model import ModelTrainConfig, heldout_targets, train_model
from sae_audit.fixture.sae import SAETrainConfig, hook_name, train_sae
from sae_audit.fixture.tokenizer import EOS_TOKEN, TokenizerConfig, train_tokenizer

SMALL_CORPUS = CorpusConfig(seed=1, max_chars=150_000, heldout_fraction=0.1)
TINY_MODEL = ModelTrainConfig(
    n_layer=2, d_model=32, n_head=2, d_mlp=64, context=32, batch_size=8, max_steps=60
)
TINY_SAE = SAETrainConfig(
    layer=0,
    d_sae=64,
    max_steps=80,
    n_activation_tokens=4096,
    n_eval_tokens=1024,
    batch_size=512,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    stats = build_corpus(SMALL_CORPUS, root / "train.txt", root / "heldout.txt")
    return root / "train.txt", root / "heldout.txt", stats


@pytest.fixture(scope="module")
def tokenizer_dir(
    corpus: tuple[Path, Path, dict], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TokenizerConfig(vocab_size=512), corpus[0], out)
    return out


@pytest.fixture(scope="module")
def model_dir(
    corpus: tuple[Path, Path, dict], tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("model")
    train_model(TINY_MODEL, tokenizer_dir, corpus[0], corpus[1], out)
    return out


def test_corpus_is_deterministic_and_split_by_fraction(
    corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    train, heldout, stats = corpus
    again = build_corpus(SMALL_CORPUS, tmp_path / "train.txt", tmp_path / "heldout.txt")
    assert again == stats
    assert (tmp_path / "train.txt").read_bytes() == train.read_bytes()
    assert (tmp_path / "heldout.txt").read_bytes() == heldout.read_bytes()

    train_docs, heldout_docs = read_documents(train), read_documents(heldout)
    assert len(train_docs) + len(heldout_docs) == stats["n_docs"]
    assert sum(map(len, train_docs)) + sum(map(len, heldout_docs)) == stats["chars"]
    assert stats["chars"] <= SMALL_CORPUS.max_chars
    assert not set(train_docs) & set(heldout_docs)
    # The held-out share misses the target by at most one document.
    longest = max(map(len, heldout_docs))
    assert abs(stats["heldout_chars"] - 0.1 * stats["chars"]) <= longest

    other_seed = build_corpus(
        CorpusConfig(seed=2, max_chars=150_000), tmp_path / "t2.txt", tmp_path / "h2.txt"
    )
    assert other_seed["n_docs"] > 0
    assert (tmp_path / "h2.txt").read_bytes() != heldout.read_bytes()


def test_documents_round_trip_through_file(tmp_path: Path) -> None:
    raw = "    First line.\n\n\n\n    Indented   \n        more\n"
    doc = clean_docstring(raw)
    assert doc == "First line.\n\nIndented\n    more"
    write_documents([doc, "second doc"], tmp_path / "d.txt")
    assert read_documents(tmp_path / "d.txt") == [doc, "second doc"]


def test_tokenizer_round_trips_and_loads(
    corpus: tuple[Path, Path, dict], tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 512
    assert tok.eos_token == tok.bos_token == EOS_TOKEN
    text = 'def f(x):\n    """Return x  squared, naïvely — ∑ 🙂."""\n\n\treturn x ** 2\n'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token_id not in ids

    train_tokenizer(TokenizerConfig(vocab_size=512), corpus[0], tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json"
    ).read_bytes()


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


def test_tiny_sae_saves_in_sae_lens_format(
    model_dir: Path, corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    from sae_lens import SAE

    metrics = train_sae(TINY_SAE, model_dir, corpus[0], tmp_path / "sae", model_name="tiny")
    assert (tmp_path / "sae" / "cfg.json").exists()
    assert (tmp_path / "sae" / "sae_weights.safetensors").exists()
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == hook_name(0) == "blocks.0.hook_resid_post"
    assert sae.cfg.metadata.model_name == "tiny"
    assert sae.cfg.metadata.context_size == TINY_MODEL.context
    assert sae.cfg.normalize_activations == "none"
    saved = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] > 0
    assert math.isfinite(saved["explained_variance"]) and saved["explained_variance"] > 0
    assert 0 <= saved["l0"] <= 64 and 0 <= saved["n_dead_features"] <= 64


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


def test_fixture_sae_is_a_function_of_config_and_seed(
    model_dir: Path, corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """Two builds of the same SAE config are the same SAE, bit for bit (no wall clock)."""
    from safetensors.torch import load_file

    runs = [train_sae(TINY_SAE, model_dir, corpus[0], tmp_path / f"sae{i}") for i in range(2)]
    first, second = (load_file(tmp_path / f"sae{i}" / "sae_weights.safetensors") for i in range(2))
    assert first.keys() == second.keys() >= {"W_enc", "W_dec", "b_enc", "b_dec"}
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert runs[0]["steps"] == runs[1]["steps"] == TINY_SAE.max_steps
    assert runs[0]["explained_variance"] == runs[1]["explained_variance"]


def test_training_past_the_wall_clock_cap_fails_naming_the_key(
    model_dir: Path, corpus: tuple[Path, Path, dict], tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Out of time is an error that names the key and the fix, never a shorter training."""
    cap = 1e-9  # already spent before the first step
    with pytest.raises(
        TimeoutError, match=r"fixture\.model\.train_seconds.*fixture\.model\.max_steps"
    ):
        train_model(
            replace(TINY_MODEL, train_seconds=cap), tokenizer_dir, corpus[0], corpus[1], tmp_path
        )
    with pytest.raises(TimeoutError, match=r"raise fixture\.sae\.train_seconds or lower"):
        train_sae(replace(TINY_SAE, train_seconds=cap), model_dir, corpus[0], tmp_path / "sae")
    assert not (tmp_path / "sae" / "sae_weights.safetensors").exists()


def test_sae_rejects_final_layer(
    model_dir: Path, corpus: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    cfg = SAETrainConfig(layer=1, d_sae=64, train_seconds=1.0)
    with pytest.raises(ValueError, match="layer"):
        train_sae(cfg, model_dir, corpus[0], tmp_path / "sae")


def test_folded_scale_reproduces_scaled_training() -> None:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=32))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, scale = torch.randn(64, 16) * 7.0, 0.3
    feats_scaled = sae.encode(x * scale)
    recon_scaled = sae.decode(feats_scaled) / scale
    sae.fold_activation_norm_scaling_factor(scale)
    torch.testing.assert_close(sae.encode(x), feats_scaled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.decode(sae.encode(x)), recon_scaled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: CorpusConfig(max_chars=10), "max_chars"),
        (lambda: CorpusConfig(heldout_fraction=0.0), "heldout_fraction"),
        (lambda: CorpusConfig(heldout_fraction=0.7), "heldout_fraction"),
        (lambda: TokenizerConfig(vocab_size=100), "vocab_size"),
        (lambda: ModelTrainConfig(n_layer=0), "n_layer"),
        (lambda: ModelTrainConfig(d_model=130), "d_model"),
        (lambda: ModelTrainConfig(lr=0.0), "lr"),
        (lambda: ModelTrainConfig(train_seconds=-1.0), "train_seconds"),
        (lambda: ModelTrainConfig(context=1), "context"),
        (lambda: SAETrainConfig(layer=-1), "layer"),
        (lambda: SAETrainConfig(d_sae=0), "d_sae"),
        (lambda: SAETrainConfig(l1_coefficient=-1.0), "l1_coefficient"),
        (lambda: SAETrainConfig(batch_size=0), "batch_size"),
        (lambda: SAETrainConfig(train_seconds=0.0), "train_seconds"),
    ],
)
def test_config_validation_names_the_field(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()
