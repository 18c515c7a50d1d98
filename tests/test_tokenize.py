"""The tokenize stage: token shards from the configured documents, as the rule runs it
(the document sources and the token set layout: test_tokens.py)."""

from __future__ import annotations

import numpy as np

from sae_audit.stages import tokenize
from sae_audit.tokens import load_token_ids

from . import test_tokens
from .test_tokens import DOCS, hf_dir, paragraphs, write_text

# test_tokens.py's fixtures: a BPE tokenizer saved to a directory, and an offline HF cache.
tokenizer = test_tokens.tokenizer
tokenizer_dir = test_tokens.tokenizer_dir
hf_cache = test_tokens.hf_cache


def test_stage_tokenize_fixture_and_hf(tmp_path, tokenizer_dir, hf_cache):
    docs = DOCS * 10
    text = write_text(tmp_path / "heldout.txt", docs, sep="\n\n\n")
    root = hf_dir(tmp_path / "ds", paragraphs(docs))
    params = {"seq_len": 16, "n_sequences": 6, "n_shards": 2, "bos": True}
    out_a = [str(tmp_path / "a" / f"shard-{i}.parquet") for i in range(2)]
    out_b = [str(tmp_path / "b" / f"shard-{i}.parquet") for i in range(2)]
    info = tokenize(
        tokenizer=str(tokenizer_dir),
        text=[str(text)],
        tokens={"source": "fixture", **params},
        out=out_a,
    )
    hf = {"source": "hf", "dataset": {"path": str(root), "name": None, "split": "train"}}
    tokenize(tokenizer=str(tokenizer_dir), text=[], tokens={**hf, **params}, out=out_b)
    assert info["n_tokens"] == 96
    np.testing.assert_array_equal(load_token_ids(out_a), load_token_ids(out_b))
