"""The embedded fixture's tokenizer: a byte-level BPE trained on the fixture corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_audit.fixture.tokenizer import EOS_TOKEN, TokenizerConfig, train_tokenizer

# The corpus and tokenizer fixtures are session-wide (tests/conftest.py).


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


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: TokenizerConfig(vocab_size=100), "vocab_size"),
    ],
)
def test_config_validation_names_the_field(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()
