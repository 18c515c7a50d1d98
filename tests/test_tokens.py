"""Token sets: every document source, the joined-stream tokenization, shard layout, errors
(the tokenize stage: test_tokenize.py).

The tokenizer is real: a byte-level BPE trained here on a few sentences, wrapped
in PreTrainedTokenizerFast with a BOS token (added only with add_special_tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_audit import tokens as tokens_mod
from sae_audit.shards import read_token_shard
from sae_audit.tokens import (
    TokenSetConfig,
    build_token_set,
    load_documents,
    load_token_ids,
    shard_bounds,
    tokenize_joined,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A sparse autoencoder reads the residual stream of a language model.",
    "Quantization rounds every weight to a small grid of values.",
    "Pruning sets the smallest weights to zero, one matrix at a time.",
    "Features that survive compression fire on the same tokens as before.",
    " = Valkyria Chronicles III = ",
    "Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role-playing game.",
]
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A sparse autoencoder reads the residual stream.\nIt has many features.",
    "Quantization rounds every weight to a small grid.",
    "Pruning sets the smallest weights to zero.",
    "Features that survive compression fire on the same tokens.",
]


def _train_tokenizer(with_bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|bos|>", "<|eos|>"] if with_bos else ["<|eos|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4 + ["\n\n".join(SENTENCES)], trainer=trainer)
    if with_bos:
        bos_id = tok.token_to_id("<|bos|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", bos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep load_dataset's Arrow cache in the test's directory, and stay offline."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path / "hf-cache"


def write_text(path: Path, docs: list[str], sep: str = "\n\n") -> Path:
    path.write_text(sep.join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def hf_dir(root: Path, train: list[str], test: list[str] | None = None) -> Path:
    """A local dataset directory laid out like a hub dataset repo (data/<split>-*.parquet)."""
    write_parquet(root / "data" / "train-00000-of-00001.parquet", {"text": train})
    if test is not None:
        write_parquet(root / "data" / "test-00000-of-00001.parquet", {"text": test})
    return root


def paragraphs(docs: list[str]) -> list[str]:
    return [p for d in docs for p in d.split("\n\n")]


# ---------------------------------------------------------------- documents per source
def test_text_paragraphs_and_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nsecond line\n\n\n  \n\nthird para  \n\n", encoding="utf-8")
    assert load_documents({"source": "text"}, [str(path)]) == [
        "first para\nsecond line",
        "third para",
    ]
    assert load_documents({"source": "text", "line_documents": True}, [str(path)]) == [
        "first para",
        "second line",
        "third para",
    ]
    # the fixture's held-out text is a local text file too, read the same way
    assert load_documents({"source": "fixture"}, [str(path)]) == load_documents(
        {"source": "text"}, [str(path)]
    )
    # documents of several files, in order
    other = write_text(tmp_path / "b.txt", ["fourth"])
    docs = load_documents({"source": "text"}, [str(path), str(other)])
    assert docs[-1] == "fourth" and len(docs) == 3


def test_strip_and_drop_empty(tmp_path):
    rows = [{"text": " = Title = \n"}, {"text": ""}, {"text": " \n"}, {"text": " body\n"}]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    assert load_documents({"source": "jsonl"}, [str(path)]) == ["= Title =", "body"]
    raw = load_documents({"source": "jsonl", "strip": False}, [str(path)])
    assert raw == [" = Title = \n", " body\n"]
    everything = load_documents(
        {"source": "jsonl", "strip": False, "drop_empty": False}, [str(path)]
    )
    assert everything == [r["text"] for r in rows]
    # line_documents splits rows into lines as well
    lines = load_documents({"source": "jsonl", "line_documents": True}, [str(path)])
    assert lines == ["= Title =", "body"]


def test_jsonl_parquet_hf_rows(tmp_path, hf_cache):
    rows = [{"id": i, "body": d} for i, d in enumerate(DOCS)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_documents({"source": "jsonl", "text_column": "body"}, [str(jsonl)]) == DOCS

    parquet = write_parquet(tmp_path / "d.parquet", {"id": list(range(5)), "body": DOCS})
    assert load_documents({"source": "parquet", "text_column": "body"}, [str(parquet)]) == DOCS

    root = hf_dir(tmp_path / "ds", DOCS, test=["held out"])
    spec = {"source": "hf", "dataset": {"path": str(root), "name": None, "split": "train"}}
    assert load_documents(spec, []) == DOCS
    spec["dataset"]["split"] = "test"
    assert load_documents(spec, []) == ["held out"]
    spec["dataset"]["split"] = "train[:2]"
    assert load_documents(spec, []) == DOCS[:2]
    assert any(hf_cache.iterdir()), "load_dataset should have used the configured cache"


def test_hf_reference_study_settings(tmp_path, hf_cache):
    """WikiText-2 raw rows: one line per row with a trailing newline, blank rows between."""
    rows = [" = Title = \n", "", " First paragraph .\n", "", " = = Section = = \n", ""]
    root = hf_dir(tmp_path / "wikitext", rows)
    spec = {"source": "hf", "dataset": {"path": str(root)}, "drop_empty": True}
    docs = load_documents(spec, [])
    assert docs == ["= Title =", "First paragraph .", "= = Section = ="]
    raw = load_documents({**spec, "strip": False}, [])
    assert raw == [r for r in rows if r.strip()]


# ---------------------------------------------------------------- identical tokens across sources
def test_identical_shards_across_sources(tmp_path, tokenizer, hf_cache):
    docs = DOCS * 12
    cfg = TokenSetConfig(seq_len=16, n_sequences=10, n_shards=3)
    text = write_text(tmp_path / "d.txt", docs)
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    parquet = write_parquet(tmp_path / "d.parquet", {"text": docs})
    root = hf_dir(tmp_path / "ds", docs)
    sources = {
        "text": ({"source": "text"}, [str(text)]),
        "jsonl": ({"source": "jsonl"}, [str(jsonl)]),
        "parquet": ({"source": "parquet"}, [str(parquet)]),
        "hf": ({"source": "hf", "dataset": {"path": str(root)}}, []),
    }
    got = {}
    for name, (spec, paths) in sources.items():
        out = [tmp_path / name / f"shard-{i}.parquet" for i in range(cfg.n_shards)]
        documents = load_documents(spec, paths)
        build_token_set(documents, tokenizer, cfg, out)
        got[name] = load_token_ids(out)
    # the text source splits the one multi-paragraph document; the joined text is the same
    assert load_documents(*sources["text"]) == paragraphs(docs)
    assert load_documents(*sources["jsonl"]) == docs
    for name in ("jsonl", "parquet", "hf"):
        np.testing.assert_array_equal(got[name], got["text"], err_msg=name)
    expected = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"][:160]
    np.testing.assert_array_equal(got["text"].ravel(), expected)


# ---------------------------------------------------------------- token set layout
def test_shard_layout_contiguous(tmp_path, tokenizer):
    docs = DOCS * 10
    cfg = TokenSetConfig(seq_len=8, n_sequences=10, n_shards=3)
    out = [tmp_path / f"shard-{i}.parquet" for i in range(3)]
    info = build_token_set(docs, tokenizer, cfg, out)
    stream = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    bounds = shard_bounds(10, 3)
    assert bounds == [(0, 3), (3, 7), (7, 10)]
    for (start, stop), path in zip(bounds, out, strict=True):
        seq, ids, meta = read_token_shard(path)
        assert seq.tolist() == list(range(start, stop))
        assert ids.shape == (stop - start, 8)
        assert meta == {"seq_len": 8, "n_sequences": 10, "bos": None}
        np.testing.assert_array_equal(ids.ravel(), stream[start * 8 : stop * 8])
    assert info["n_tokens"] == 80 and info["n_documents"] == len(docs)
    assert info["text_complete"] is True and info["n_text_tokens"] == len(stream)


def test_bos_prepended(tmp_path, tokenizer):
    cfg = TokenSetConfig(seq_len=8, n_sequences=6, n_shards=2, bos=True)
    out = [tmp_path / f"shard-{i}.parquet" for i in range(2)]
    info = build_token_set(DOCS * 4, tokenizer, cfg, out)
    ids = load_token_ids(out)
    bos = tokenizer.bos_token_id
    assert info["bos"] == bos and ids.shape == (6, 8)
    assert (ids[:, 0] == bos).all()
    stream = tokenizer("\n\n".join(DOCS * 4), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids[:, 1:].ravel(), stream[: 6 * 7])
    assert read_token_shard(out[1])[2]["bos"] == bos


def test_add_special_tokens(tmp_path, tokenizer):
    docs = DOCS * 4
    stream = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    for flag, first in ((False, stream[0]), (True, bos)):
        out = [tmp_path / str(flag) / "shard-0.parquet"]
        cfg = TokenSetConfig(seq_len=8, n_sequences=4, n_shards=1, add_special_tokens=flag)
        build_token_set(docs, tokenizer, cfg, out)
        ids = load_token_ids(out)
        assert ids[0, 0] == first
        if flag:
            np.testing.assert_array_equal(ids.ravel()[1:], stream[:31])
        else:
            assert bos not in ids


def test_join_string(tmp_path, tokenizer):
    cfg = TokenSetConfig(seq_len=8, n_sequences=4, n_shards=1, join=" | ")
    out = [tmp_path / "shard-0.parquet"]
    build_token_set(DOCS, tokenizer, cfg, out)
    expected = tokenizer(" | ".join(DOCS), add_special_tokens=False)["input_ids"][:32]
    np.testing.assert_array_equal(load_token_ids(out).ravel(), expected)


def test_prefix_tokenization_matches_full_text(tokenizer, monkeypatch):
    """Only a prefix of the joined text is tokenized, with the full text's ids; it grows if short."""
    docs = [f"{s} Number {i}." for i in range(400) for s in SENTENCES[:3]]
    full = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    ids, complete = tokenize_joined(docs, tokenizer, "\n\n", False, 200)
    assert not complete and 200 + 1024 <= len(ids) < len(full)
    assert ids[:200] == full[:200]
    # a first guess far too small: the prefix grows until it is long enough
    monkeypatch.setattr(tokens_mod, "_FIRST_CHARS_PER_TOKEN", 0.01)
    ids, complete = tokenize_joined(docs, tokenizer, "\n\n", False, 2000)
    assert not complete and len(ids) >= 3000 and ids[:2000] == full[:2000]
    # asking for more than the text holds tokenizes all of it
    ids, complete = tokenize_joined(docs, tokenizer, "\n\n", False, len(full) + 1)
    assert complete and ids == full


# ---------------------------------------------------------------- errors name the key
def test_errors_name_the_key(tmp_path, tokenizer, hf_cache):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"tokens\.text_column='text'.*\['body', 'id'\]"):
        load_documents({"source": "jsonl"}, [str(jsonl)])
    parquet = write_parquet(tmp_path / "d.parquet", {"body": ["x"], "id": [1]})
    with pytest.raises(ValueError, match=r"tokens\.text_column='text'.*\['body', 'id'\]"):
        load_documents({"source": "parquet"}, [str(parquet)])
    root = hf_dir(tmp_path / "ds", ["x"])
    with pytest.raises(ValueError, match=r"tokens\.text_column='body'.*\['text'\]"):
        load_documents({"source": "hf", "dataset": {"path": str(root)}, "text_column": "body"}, [])
    bad = write_jsonl(tmp_path / "n.jsonl", [{"n": 3}])
    with pytest.raises(ValueError, match=r"tokens\.text_column='n'.*int"):
        load_documents({"source": "jsonl", "text_column": "n"}, [str(bad)])
    for source in ("text", "jsonl", "parquet", "fixture"):
        with pytest.raises(ValueError, match=r"tokens\.paths: no input files"):
            load_documents({"source": source}, [])
    with pytest.raises(ValueError, match=r"tokens\.paths is not used"):
        load_documents({"source": "hf", "dataset": {"path": str(root)}}, [str(jsonl)])
    with pytest.raises(ValueError, match=r"tokens\.dataset\.path"):
        load_documents({"source": "hf"}, [])
    with pytest.raises(ValueError, match=r"tokens\.source': 'csv' is not one of"):
        load_documents({"source": "csv"}, [str(jsonl)])
    with pytest.raises(FileNotFoundError, match=r"tokens\.paths"):
        load_documents({"source": "text"}, [str(tmp_path / "missing.txt")])

    out = [tmp_path / "shard-0.parquet"]
    with pytest.raises(ValueError, match=r"tokens\.n_sequences=100"):
        build_token_set(
            DOCS, tokenizer, TokenSetConfig(seq_len=8, n_sequences=100, n_shards=1), out
        )
    no_bos = _train_tokenizer(with_bos=False)
    assert no_bos.bos_token_id is None
    with pytest.raises(ValueError, match=r"tokens\.bos"):
        build_token_set(
            DOCS, no_bos, TokenSetConfig(seq_len=8, n_sequences=2, n_shards=1, bos=True), out
        )
    assert not out[0].exists()
