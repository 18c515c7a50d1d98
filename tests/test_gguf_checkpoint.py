"""GGUF write/read against the real gguf package and real tiny transformers models.

The layout checks use index tables built here row by row (not the module's reshapes),
and transformers' own GGUF loader reads our Llama files, so a wrong reorder fails
even where a write-then-read round trip would undo its own mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from sae_audit.files import InputError
from sae_audit.gguf_checkpoint import (
    WRITABLE_TYPES,
    dequantize_q4_0,
    dequantize_q8_0,
    gguf_info,
    load_gguf_into,
    read_gguf_state,
    write_gguf,
)
from sae_audit.models import load_model, target_weights

from .conftest import save_tiny_model, tiny_config

QT = gguf.GGMLQuantizationType
FAMILIES = ("gpt_neox", "llama")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., nn.Module]:
    """A loaded tiny model of a family and size, saved with save_tiny_model once per module.

    Every call returns a fresh load, so tests may modify the model they get.
    """
    root = tmp_path_factory.mktemp("gguf_models")
    saved: dict[tuple, Path] = {}

    def make(family: str, hidden: int = 32, layers: int = 3, vocab: int = 64, seed: int = 0):
        key = (family, hidden, layers, vocab, seed)
        if key not in saved:
            saved[key] = save_tiny_model(
                family, root / "-".join(map(str, key)), vocab, hidden, layers, seed=seed
            )
        return randomize_vectors(load_model(saved[key]), seed)

    return make


def randomize_vectors(model: nn.Module, seed: int) -> nn.Module:
    """Random biases and norm weights: initialized to 0 and 1 they would hide a bias reorder."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                noise = torch.randn(param.shape, generator=gen) * 0.1
                param.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


def tiny_from_config(family: str, **overrides: Any) -> Any:
    """A tiny model of a family conftest has no saver for (mistral, qwen2), or a variant."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    torch.manual_seed(0)
    if family in ("mistral", "qwen2"):
        cls = MistralConfig if family == "mistral" else Qwen2Config
        config = cls(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    else:
        config = tiny_config(family, 64, 32, 2)
    for key, value in overrides.items():
        setattr(config, key, value)
    return randomize_vectors(AutoModelForCausalLM.from_config(config).eval(), 0)


def raw_tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def field(path: Path, key: str) -> Any:
    f = gguf.GGUFReader(path).get_field(key)
    return None if f is None else f.contents()


def forward(model: nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- llama.cpp's row orders, by hand


def neox_qkv_rows(n_head: int, head_dim: int) -> np.ndarray:
    """gguf_row[r] for each HF row r of GPT-NeoX's fused qkv.

    HF stores, per head h, q_h, k_h, v_h (head_dim rows each); llama.cpp all q heads,
    then all k heads, then all v heads.
    """
    rows = []
    for h in range(n_head):
        for part in range(3):  # q, k, v
            for i in range(head_dim):
                rows.append(part * n_head * head_dim + h * head_dim + i)
    return np.array(rows)


def llama_rope_rows(n_head: int, head_dim: int) -> np.ndarray:
    """gguf_row[r] for each HF row r of q_proj/k_proj: per head, HF row i of the first half
    goes to 2i and row i of the second half to 2i + 1 (rotate-half -> adjacent pairs)."""
    rows = []
    half = head_dim // 2
    for h in range(n_head):
        for i in range(head_dim):
            rows.append(h * head_dim + (2 * i if i < half else 2 * (i - half) + 1))
    return np.array(rows)


def gguf_row_order(model: nn.Module, name: str) -> np.ndarray | None:
    """gguf_row[r] for an HF tensor llama.cpp's converter reorders; None when it keeps rows."""
    config: Any = model.config
    n_head = config.num_attention_heads
    if config.model_type == "gpt_neox" and ".query_key_value." in name:
        return neox_qkv_rows(n_head, config.hidden_size // n_head)
    if config.model_type in ("llama", "mistral"):
        head_dim = config.head_dim
        if ".q_proj." in name:
            return llama_rope_rows(n_head, head_dim)
        if ".k_proj." in name:
            return llama_rope_rows(config.num_key_value_heads, head_dim)
    return None


# ---------------------------------------------------------------- F32 round trip and layout


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_is_exact(tiny, tmp_path, family):
    model = tiny(family)
    path = tmp_path / "m.gguf"
    info = write_gguf(model, "F32", path)
    assert info["arch"] == {"gpt_neox": "gptneox", "llama": "llama"}[family]
    assert info["n_quantized"] == len(list(target_weights(model)))
    assert info["file_size"] == path.stat().st_size > 0
    assert not path.with_name("m.gguf.tmp").exists()

    state = read_gguf_state(path, model)
    ref = model.state_dict()
    assert set(state) == set(ref)
    for name, tensor in ref.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor), name

    names = set(raw_tensors(path))
    assert {"token_embd.weight", "output_norm.weight", "output.weight"} <= names
    if family == "gpt_neox":
        assert {"blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias", "blk.2.ffn_down.weight"} <= names
        assert field(path, "gptneox.rope.dimension_count") == 2  # 0.25 * head_dim 8
        assert field(path, "gptneox.use_parallel_residual") is True
        assert field(path, "gptneox.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    else:
        assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_gate.weight"} <= names
        assert field(path, "llama.attention.head_count_kv") == 2
        assert field(path, "llama.rope.dimension_count") == 8
        assert field(path, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    arch = info["arch"]
    assert field(path, "general.architecture") == arch
    assert field(path, f"{arch}.block_count") == 3
    assert field(path, f"{arch}.embedding_length") == 32
    assert field(path, f"{arch}.attention.head_count") == 4
    assert field(path, f"{arch}.context_length") == 128
    assert field(path, f"{arch}.feed_forward_length") == model.config.intermediate_size
    assert field(path, f"{arch}.rope.freq_base") == pytest.approx(10000.0)
    assert field(path, "general.file_type") == gguf.LlamaFileType.ALL_F32


@pytest.mark.parametrize("family", [*FAMILIES, "mistral", "qwen2"])
def test_written_rows_are_in_llama_cpp_order(tiny, tmp_path, family):
    """Each stored tensor equals the HF tensor with rows in the order llama.cpp expects."""
    model: Any = tiny(family) if family in FAMILIES else tiny_from_config(family)
    path = tmp_path / "m.gguf"
    write_gguf(model, "F32", path)
    raw = raw_tensors(path)
    tmap = gguf.get_tensor_name_map(
        {"gpt_neox": gguf.MODEL_ARCH.GPTNEOX, "qwen2": gguf.MODEL_ARCH.QWEN2}.get(
            family, gguf.MODEL_ARCH.LLAMA
        ),
        model.config.num_hidden_layers,
    )
    reordered = 0
    for name, tensor in model.state_dict().items():
        gguf_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        stored = np.asarray(raw[gguf_name].data)
        hf = tensor.numpy()
        order = gguf_row_order(model, name)
        if order is not None:
            reordered += 1
            assert not np.array_equal(stored, hf), name  # the reorder is not the identity
            assert np.array_equal(stored[order], hf), name
        else:
            assert np.array_equal(stored, hf), name
    n_layers = model.config.num_hidden_layers
    expected = {
        "gpt_neox": 2 * n_layers,  # qkv weight and bias
        "llama": 2 * n_layers,  # q and k
        "mistral": 2 * n_layers,
        "qwen2": 0,  # llama.cpp runs qwen2 with NeoX rope: no reorder
    }[family]
    assert reordered == expected
    assert field(path, "general.architecture") == {"qwen2": "qwen2", "gpt_neox": "gptneox"}.get(
        family, "llama"
    )
    state = read_gguf_state(path, model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("quant_type", ["F32", "Q4_0"])
def test_transformers_gguf_loader_agrees_on_llama(tiny, tmp_path, quant_type):
    """transformers' own llama GGUF reader (its own un-permute) gets the same weights as ours."""
    from transformers import AutoModelForCausalLM

    model = tiny("llama")
    write_gguf(model, quant_type, tmp_path / "m.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").state_dict()
    ours = read_gguf_state(tmp_path / "m.gguf", model)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor.float()), name
    if quant_type == "F32":
        assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- our Q8_0 / Q4_0 decoders


def hard_rows(rng: np.random.Generator, n_rows: int, width: int) -> np.ndarray:
    """Random rows plus the awkward ones: all zeros, one huge outlier, tiny values, +-ties."""
    x = rng.standard_normal((n_rows, width)).astype(np.float32)
    x[0] = 0.0
    x[1, 5] = 1e4  # a block dominated by one outlier
    x[2] *= 1e-6
    x[3, :] = -1.0
    x[3, 7] = 1.0  # positive value equal to -max: hits Q4_0's clipped end
    return x


@pytest.mark.parametrize(
    ("qtype", "ours"), [(QT.Q8_0, dequantize_q8_0), (QT.Q4_0, dequantize_q4_0)]
)
@pytest.mark.parametrize("shape", [(4, 32), (6, 64), (4, 3, 96), (5, 256)])
def test_our_decoder_is_bit_equal_to_gguf(qtype, ours, shape):
    rng = np.random.default_rng(sum(shape))
    x = hard_rows(rng, int(np.prod(shape[:-1])), shape[-1]).reshape(shape)
    raw = gguf.quants.quantize(x, qtype)
    assert raw.dtype == np.uint8
    got = ours(raw, shape)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.array_equal(got, gguf.quants.dequantize(raw, qtype))
    assert not np.array_equal(got, x)  # it really is quantized


@pytest.mark.parametrize(
    ("qtype", "ours"), [(QT.Q8_0, dequantize_q8_0), (QT.Q4_0, dequantize_q4_0)]
)
def test_our_decoder_on_arbitrary_block_bytes(qtype, ours):
    """Every quant byte pattern and scales of both signs, not just what gguf's encoder emits."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(64, 4 * nbytes), dtype=np.uint8)
    scales = (rng.standard_normal((64, 4)) * 0.01).astype(np.float16)
    scales[0, 0] = 0.0
    blocks = raw.reshape(64, 4, nbytes)
    blocks[..., :2] = scales.view(np.uint8).reshape(64, 4, 2)
    got = ours(raw, (64, 4 * block))
    assert np.array_equal(got, gguf.quants.dequantize(raw, qtype))


def test_q4_0_nibble_order_known_answer():
    # d = 1; byte j = (high nibble 15, low nibble j): values j - 8 then 16 times 15 - 8 = 7.
    raw = np.concatenate(
        [np.array([1.0], dtype=np.float16).view(np.uint8), (np.arange(16) | 0xF0).astype(np.uint8)]
    )
    assert dequantize_q4_0(raw, (32,)).tolist() == [float(j - 8) for j in range(16)] + [7.0] * 16
    raw8 = np.concatenate(
        [
            np.array([0.5], dtype=np.float16).view(np.uint8),
            np.arange(-16, 16, dtype=np.int8).view(np.uint8),
        ]
    )
    assert dequantize_q8_0(raw8, (1, 32)).tolist() == [[0.5 * v for v in range(-16, 16)]]


def test_decoder_rejects_wrong_sizes():
    raw = gguf.quants.quantize(np.ones((2, 64), np.float32), QT.Q8_0)
    with pytest.raises(ValueError, match="multiple of 32"):
        dequantize_q8_0(raw, (2, 48))
    with pytest.raises(ValueError, match="bytes"):
        dequantize_q8_0(raw, (4, 64))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_q4_0(raw.view(np.int8), (2, 64))


# ---------------------------------------------------------------- quantized files


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_and_q4_0_files_error_as_the_format_says(tiny, tmp_path, family):
    model = tiny(family)
    ref = model.state_dict()
    targets = {name for name, _ in target_weights(model)}
    assert all(ref[n].shape[-1] % 32 == 0 for n in targets)  # every row holds whole blocks
    worst: dict[str, dict[str, float]] = {}
    for quant_type in ("Q8_0", "Q4_0"):
        path = tmp_path / f"{quant_type}.gguf"
        write_gguf(model, quant_type, path)
        info = gguf_info(path)
        assert info["tensor_types"] == {quant_type: len(targets), "F32": len(ref) - len(targets)}
        assert info["file_type_name"] == f"MOSTLY_{quant_type}"
        state = read_gguf_state(path, model)
        worst[quant_type] = {}
        for name, tensor in ref.items():
            if name not in targets:
                assert torch.equal(state[name], tensor), name
                continue
            # Blocks run along rows in both layouts (the reorders only move whole rows).
            w = tensor.reshape(-1, 32)
            err = (state[name].reshape(-1, 32) - w).abs()
            absmax = w.abs().amax(dim=1, keepdim=True)
            if quant_type == "Q8_0":
                step = absmax / 127  # stored as f16: relative error 2^-11 on up to 127 steps
                assert torch.all(err <= step * (0.5 + 127 / 2048) + 1e-12), name
                assert (err / step.clamp_min(1e-30)).max() > 0.4, name  # 8-bit, not finer
            else:
                step = absmax / 8  # d = -max/8: the far end clips to 7d, one step off
                assert torch.all(err <= step * (1 + 8 / 2048) + 1e-12), name
            worst[quant_type][name] = float(err.max())
            assert worst[quant_type][name] > 0, name
    for name in targets:
        assert worst["Q4_0"][name] > worst["Q8_0"][name], name


@pytest.mark.parametrize("quant_type", [t for t in WRITABLE_TYPES if t not in ("F32", "Q8_0")])
def test_other_writable_types_read_back_close(tiny, tmp_path, quant_type):
    model = tiny("llama")
    write_gguf(model, quant_type, tmp_path / "m.gguf")
    state = read_gguf_state(tmp_path / "m.gguf", model)
    for name, tensor in target_weights(model):
        diff = (state[name] - tensor.detach()).abs().max()
        assert 0 < diff < 0.1 * tensor.detach().abs().max(), name
    assert gguf_info(tmp_path / "m.gguf")["tensor_types"][quant_type] == len(
        list(target_weights(model))
    )


def rewrite(
    src: Path, dst: Path, replace: Callable[[str, Any], tuple[np.ndarray, QT] | None]
) -> None:
    """Copy a GGUF's metadata and tensors, letting `replace` swap (bytes, type) or drop a tensor.

    `replace(name, reader_tensor)` returns the new (array, type), the tensor's own, or
    None to leave it out.
    """
    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()  # type: ignore[union-attr]
    writer = gguf.GGUFWriter(dst, arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub)
    for t in reader.tensors:
        new = replace(t.name, t)
        if new is not None:
            data, ttype = new
            writer.add_tensor(t.name, np.array(data), raw_dtype=ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Offsets of the f16 super-block scales (d, dmin) in each K-quant block (ggml-common.h).
K_QUANT_F16 = {
    QT.Q6_K: (208,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q3_K: (108,),
    QT.Q2_K: (80, 82),
}


def random_k_quant(rng: np.random.Generator, shape: tuple[int, ...], qtype: QT) -> np.ndarray:
    """Valid random K-quant bytes for a [rows, cols] matrix: random quants and sub-scales,
    finite f16 super-block scales (gguf cannot encode K-quants; llama.cpp is not here)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for offset in K_QUANT_F16[qtype]:
        d = (rng.uniform(1e-4, 1e-2, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        raw[:, offset : offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(*shape[:-1], shape[-1] // block * nbytes)


@pytest.mark.parametrize(
    ("family", "qtype_name"),
    [("gpt_neox", "Q6_K"), ("llama", "Q4_K"), ("llama", "Q5_K"), ("gpt_neox", "Q3_K")],
)
def test_k_quant_blocks_read_back_through_the_reorder(tiny, tmp_path, family, qtype_name):
    qtype = QT[qtype_name]
    model = tiny(family, hidden=256, layers=1)
    ref = model.state_dict()
    targets = {name for name, _ in target_weights(model)}
    write_gguf(model, "F32", tmp_path / "f32.gguf")
    tmap = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.GPTNEOX if family == "gpt_neox" else gguf.MODEL_ARCH.LLAMA, 1
    )
    to_hf = {tmap.get_name(n, try_suffixes=(".weight",)): n for n in targets}
    rng = np.random.default_rng(0)
    written: dict[str, np.ndarray] = {}

    def k_quant(name: str, t: Any) -> tuple[np.ndarray, QT]:
        if name in to_hf:
            rows, cols = (int(s) for s in reversed(t.shape.tolist()))
            written[to_hf[name]] = random_k_quant(rng, (rows, cols), qtype)
            return written[to_hf[name]], qtype
        return np.asarray(t.data), QT(int(t.tensor_type))

    rewrite(tmp_path / "f32.gguf", tmp_path / "k.gguf", k_quant)
    assert gguf_info(tmp_path / "k.gguf")["tensor_types"][qtype.name] == len(targets)

    state = read_gguf_state(tmp_path / "k.gguf", model)
    for name, tensor in ref.items():
        if name not in targets:
            assert torch.equal(state[name], tensor), name
            continue
        in_gguf_order = gguf.quants.dequantize(written[name], qtype)
        order = gguf_row_order(model, name)
        expected = in_gguf_order[order] if order is not None else in_gguf_order
        assert state[name].shape == tensor.shape
        assert np.array_equal(state[name].numpy(), expected), name
        assert np.isfinite(expected).all() and np.abs(expected).max() > 0


# ---------------------------------------------------------------- mismatches and missing tensors


@pytest.mark.parametrize(
    ("writer_kwargs", "reader_kwargs", "wants"),
    [
        ({"layers": 3}, {"layers": 2}, ["block_count 3", "num_hidden_layers 2"]),
        ({"hidden": 32}, {"hidden": 64}, ["embedding_length 32", "hidden_size 64"]),
        ({"vocab": 64}, {"vocab": 80}, ["token_embd rows 64", "vocab_size 80"]),
        ({"hidden": 64}, {"layers": 2}, ["block_count 3", "embedding_length 64", "hidden_size 32"]),
    ],
)
def test_mismatched_gguf_names_file_and_both_values(
    tiny, tmp_path, writer_kwargs, reader_kwargs, wants
):
    path = tmp_path / "other.gguf"
    write_gguf(tiny("gpt_neox", **writer_kwargs), "Q8_0", path)
    base = tiny("gpt_neox", **reader_kwargs)
    with pytest.raises(InputError) as err:
        read_gguf_state(path, base)
    message = str(err.value)
    assert str(path) in message
    for want in wants:
        assert want in message
    before = forward(base)
    with pytest.raises(InputError):
        load_gguf_into(base, path)
    assert torch.equal(forward(base), before)  # nothing half-loaded


def test_gguf_of_another_family_is_refused(tiny, tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(tiny("llama"), "F32", path)
    with pytest.raises(InputError, match=r"llama\.gguf: architecture 'llama' != .*'gptneox'"):
        read_gguf_state(path, tiny("gpt_neox"))


def test_unreadable_and_missing_files(tiny, tmp_path):
    model = tiny("llama")
    with pytest.raises(InputError, match="no such GGUF file"):
        read_gguf_state(tmp_path / "absent.gguf", model)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match=r"junk\.gguf: cannot be read"):
        read_gguf_state(tmp_path / "junk.gguf", model)


def test_missing_block_matrix_is_refused_by_load(tiny, tmp_path):
    model = tiny("llama")
    write_gguf(model, "Q8_0", tmp_path / "full.gguf")

    def drop_q(name: str, t: Any) -> tuple[np.ndarray, QT] | None:
        if name == "blk.1.attn_q.weight":
            return None
        return np.asarray(t.data), QT(int(t.tensor_type))

    rewrite(tmp_path / "full.gguf", tmp_path / "partial.gguf", drop_q)
    state = read_gguf_state(tmp_path / "partial.gguf", model)
    assert "model.layers.1.self_attn.q_proj.weight" not in state
    assert len(state) == len(model.state_dict()) - 1
    with pytest.raises(
        InputError,
        match=r"partial\.gguf: lacks 1 .*1 of them block matrices.*layers\.1\.self_attn\.q_proj",
    ):
        load_gguf_into(model, tmp_path / "partial.gguf")


# ---------------------------------------------------------------- loading into a model


@pytest.mark.parametrize("family", FAMILIES)
def test_load_gguf_into_sets_the_forward(tiny, tmp_path, family):
    fp = tiny(family)
    fp_logits = forward(fp)
    write_gguf(fp, "F32", tmp_path / "f32.gguf")
    write_gguf(fp, "Q4_0", tmp_path / "q4.gguf")

    other = tiny(family, seed=1)  # different weights, so a no-op load cannot pass
    assert not torch.equal(forward(other), fp_logits)
    assert load_gguf_into(other, tmp_path / "f32.gguf") is other
    assert torch.equal(forward(other), fp_logits)

    load_gguf_into(other, tmp_path / "q4.gguf")
    q4_logits = forward(other)
    assert not torch.equal(q4_logits, fp_logits)
    assert (q4_logits - fp_logits).abs().max() < fp_logits.abs().max()  # damaged, not garbage


def test_load_casts_to_the_parameter_dtype(tiny, tmp_path):
    fp = tiny("gpt_neox")
    write_gguf(fp, "Q8_0", tmp_path / "m.gguf")
    half = tiny("gpt_neox", seed=1).to(torch.bfloat16)
    load_gguf_into(half, tmp_path / "m.gguf")
    state = read_gguf_state(tmp_path / "m.gguf", fp)
    for name, param in half.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, state[name].to(torch.bfloat16)), name


def test_tied_output_head(tmp_path):
    model = tiny_from_config("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    write_gguf(model, "Q8_0", tmp_path / "tied.gguf")
    assert "output.weight" not in raw_tensors(tmp_path / "tied.gguf")
    state = read_gguf_state(tmp_path / "tied.gguf", model)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    logits = forward(model)
    load_gguf_into(model, tmp_path / "tied.gguf")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(forward(model), logits)


# ---------------------------------------------------------------- what write_gguf refuses


def test_rows_not_a_multiple_of_the_block_are_refused(tiny, tmp_path):
    model = tiny("gpt_neox", hidden=48)
    path = tmp_path / "m.gguf"
    with pytest.raises(
        ValueError,
        match=r"query_key_value\.weight \(blk\.0\.attn_qkv\.weight\): shape \(144, 48\).*Q4_0 block size 32",
    ):
        write_gguf(model, "Q4_0", path)
    assert not path.exists() and not path.with_name("m.gguf.tmp").exists()
    write_gguf(model, "F16", path)  # block size 1: any width
    assert gguf_info(path)["tensor_types"] == {"F16": 12, "F32": 28}


def test_unsupported_family_and_type(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*gpt_neox.*llama"):
        write_gguf(tiny("gpt2"), "Q8_0", tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"'Q4_K'.*Q8_0"):
        write_gguf(tiny("llama"), "Q4_K", tmp_path / "m.gguf")
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32"} <= set(WRITABLE_TYPES)
