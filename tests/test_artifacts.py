"""External artifacts: their format, and whether they were made from the base model."""

from __future__ import annotations

import json

import pytest

from sae_audit.artifacts import (
    ModelShape,
    artifact_shape,
    check_matches,
    gguf_shape,
    resolve_format,
)
from sae_audit.files import InputError
from sae_audit.gguf_checkpoint import write_gguf
from sae_audit.models import load_model
from tests.conftest import save_tiny_model


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    # wider than its vocabulary (64): the header's vocabulary is token_embd's second
    # dimension, not its larger one
    return save_tiny_model("gpt_neox", tmp_path_factory.mktemp("a") / "m", hidden=128, layers=2)


def test_gguf_header_gives_the_shape_of_the_model_written(neox, tmp_path):
    model = load_model(neox)
    path = tmp_path / "m.gguf"
    write_gguf(model, "Q8_0", path)
    assert resolve_format(path) == "gguf"
    shape = gguf_shape(path)
    assert shape == ModelShape("gpt_neox", 128, 2, 64) and model.config.vocab_size == 64
    assert artifact_shape(path, "gguf") == shape
    # a .bin name still reads as GGUF from its magic bytes
    renamed = path.rename(tmp_path / "m.bin")
    assert resolve_format(renamed) == "gguf"


def test_compressed_tensors_directory_needs_a_quantization_config(neox, tmp_path):
    assert resolve_format(neox) == "compressed-tensors"
    with pytest.raises(InputError, match="no quantization_config"):
        artifact_shape(neox, "compressed-tensors")
    config = json.loads((neox / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (neox / "config.json").write_text(json.dumps(config))
    try:
        assert artifact_shape(neox, "compressed-tensors") == ModelShape.from_hf_config(config)
    finally:
        del config["quantization_config"]
        (neox / "config.json").write_text(json.dumps(config))


def test_neither_a_gguf_file_nor_a_directory_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match=r"not a \.gguf file or a model directory"):
        resolve_format(tmp_path / "x.txt")


def test_a_mismatch_names_both_values_and_both_models():
    artifact = ModelShape("llama", 64, 6, 32000)
    base = ModelShape("gpt_neox", 64, 4, None)
    with pytest.raises(InputError) as e:
        check_matches(artifact, base, "'/m/x.gguf'", "the fixture model")
    message = str(e.value)
    assert "'/m/x.gguf'" in message and "the fixture model" in message
    assert "model_type 'llama' != base model's 'gpt_neox'" in message
    assert "num_hidden_layers 6 != base model's 4" in message
    assert "hidden_size" not in message and "vocab_size" not in message  # equal / unknown
    check_matches(ModelShape("gpt_neox", 64, 4, 7), base, "a", "b")  # unknown vocab: fine
