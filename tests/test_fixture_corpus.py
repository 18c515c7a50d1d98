"""The embedded fixture's corpus: standard-library docstrings split into train and held-out text."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_audit.fixture.corpus import (
    CorpusConfig,
    build_corpus,
    clean_docstring,
    read_documents,
    write_documents,
)

SMALL_CORPUS = CorpusConfig(seed=1, max_chars=150_000, heldout_fraction=0.1)


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


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: CorpusConfig(max_chars=10), "max_chars"),
        (lambda: CorpusConfig(heldout_fraction=0.0), "heldout_fraction"),
        (lambda: CorpusConfig(heldout_fraction=0.7), "heldout_fraction"),
    ],
)
def test_config_validation_names_the_field(factory, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        factory()
