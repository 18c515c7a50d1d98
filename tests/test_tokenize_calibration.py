"""The tokenize_calibration stage: llm-compressor's calibration set, other text than the
evaluation's, refused when it shares a window with it."""

from __future__ import annotations

import pytest

from sae_audit.stages import tokenize, tokenize_calibration
from sae_audit.tokens import load_token_ids

SET = {"seq_len": 32, "n_sequences": 8}


def evaluation(corpus, tokenizer_dir, tmp_path) -> list[str]:
    out = [str(tmp_path / "eval" / f"shard-{i}.parquet") for i in range(2)]
    tokenize(
        tokenizer=str(tokenizer_dir),
        text=[str(corpus[1])],
        tokens={"source": "fixture", **SET, "n_shards": 2},
        out=out,
    )
    return out


def test_fixture_training_text_calibrates(corpus, tokenizer_dir, tmp_path):
    tokens = evaluation(corpus, tokenizer_dir, tmp_path)
    out = tmp_path / "calibration.parquet"
    info = tokenize_calibration(
        calibration={"source": "fixture", **SET, "n_shards": 1},
        tokenizer=str(tokenizer_dir),
        text=[str(corpus[0])],
        tokens=tokens,
        out=str(out),
    )
    ids = load_token_ids([out])
    assert info["n_tokens"] == ids.size == 8 * 32
    assert ids.shape == (8, 32)


def test_calibrating_on_the_evaluation_text_is_refused(corpus, tokenizer_dir, tmp_path):
    tokens = evaluation(corpus, tokenizer_dir, tmp_path)
    out = tmp_path / "calibration.parquet"
    with pytest.raises(ValueError, match="also occur in the evaluation token set"):
        tokenize_calibration(
            calibration={"source": "text", **SET, "n_shards": 1},
            tokenizer=str(tokenizer_dir),
            text=[str(corpus[1])],  # the held-out text the evaluation reads
            tokens=tokens,
            out=str(out),
        )
    assert not out.exists()
