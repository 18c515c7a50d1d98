"""Every supported model family and every SAE architecture through the hub model's code path.

Tiny random-weight GPT-NeoX, Gemma-2, Llama and GPT-2 models are built from configs,
saved with a tokenizer like a hub checkpoint, and loaded with sae_audit.models (the
tokenizer with sae_audit.tokens); tiny sae-lens SAEs of each architecture are saved
in sae-lens's format and loaded with sae_audit.saes. Compression, hook mapping and
encoding are then checked per family.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sae_audit.checkpoints import load_checkpoint, write_checkpoint
from sae_audit.encode import EncodeConfig, EncodeTarget, encode_shard_multi
from sae_audit.models import (
    FAMILIES,
    ActivationCapture,
    blocks_of,
    family_of,
    hooked_width,
    load_model,
    resolve_hook,
    target_weights,
)
from sae_audit.prune import prune_magnitude
from sae_audit.quantize import RTNSpec, fake_quantize
from sae_audit.saes import check_compatible, load_sae
from sae_audit.shards import write_token_shard
from sae_audit.tokens import load_tokenizer

from .conftest import TINY_FAMILIES, save_tiny_model

VOCAB, HIDDEN, LAYERS = 64, 32, 3

# Per block: exactly the attention and MLP matrices (nothing else) that get compressed.
EXPECTED_MATRICES = {
    "gpt_neox": (
        "attention.query_key_value",
        "attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ),
    "gemma2": (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
EXPECTED_MATRICES["llama"] = EXPECTED_MATRICES["gemma2"]
BLOCKS = {
    "gpt_neox": "gpt_neox.layers",
    "gemma2": "model.layers",
    "llama": "model.layers",
    "gpt2": "transformer.h",
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        f: save_tiny_model(f, root / f, vocab_size=VOCAB, hidden=HIDDEN, layers=LAYERS)
        for f in TINY_FAMILIES
    }


@pytest.fixture(scope="module")
def fp_model(tiny_dirs):
    """load_model(dir) of a family, loaded once per module (tests only read it)."""
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = load_model(tiny_dirs[family])
        return cache[family]

    return get


def token_batch(n: int = 2, t: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, t), generator=g)


def fq_expected(weight: torch.Tensor, spec: RTNSpec, conv1d: bool) -> torch.Tensor:
    """Fake-quantized weight per OUTPUT channel: Conv1D stores [in, out], so quantize .t()."""
    w = weight.detach().float()
    return fake_quantize(w.t(), spec).t() if conv1d else fake_quantize(w, spec)


# ---------------------------------------------------------------- 1. loading
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_and_tokenizer_load_like_a_hub_checkpoint(tiny_dirs, family):
    model = load_model(tiny_dirs[family])
    assert model.config.model_type == family and not model.training
    assert family_of(model) is FAMILIES[family]
    assert len(blocks_of(model)) == LAYERS
    assert hooked_width(model, "blocks.0.hook_resid_post") == HIDDEN
    tok = load_tokenizer(tiny_dirs[family])
    assert tok.bos_token_id == 0 and tok.bos_token == "<bos>"
    ids = tok("the cat, sat.\n\nAnd ran!", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("the cat, sat.\n\nAnd ran!") and max(ids) < VOCAB
    assert tok.decode(ids) == "the cat, sat.\n\nand ran!"
    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), VOCAB) and torch.isfinite(logits).all()
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (family in ("gemma2", "gpt2"))


def test_save_tiny_model_sizes(tmp_path):
    model = load_model(save_tiny_model("llama", tmp_path / "m", vocab_size=80, hidden=16, layers=2))
    assert (model.config.vocab_size, model.config.hidden_size) == (80, 16)
    assert len(blocks_of(model)) == 2
    assert len(load_tokenizer(tmp_path / "m")) == 80


# ---------------------------------------------------------------- 2. target weights
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_target_weights_are_exactly_the_block_matrices(fp_model, family):
    model = fp_model(family)
    names = [n for n, _ in target_weights(model)]
    blocks = BLOCKS[family]
    expected = [
        f"{blocks}.{i}.{m}.weight" for i in range(LAYERS) for m in EXPECTED_MATRICES[family]
    ]
    assert names == expected
    params = dict(model.named_parameters(remove_duplicate=False))
    embeddings = {
        id(model.get_input_embeddings().weight),
        id(model.get_output_embeddings().weight),
    }
    for name, p in target_weights(model):
        assert p is params[name] and p.dim() == 2 and id(p) not in embeddings
        assert "norm" not in name and "ln" not in name.split(".")[-2]
    # Every 2-D parameter inside a block is targeted; nothing outside the blocks is.
    block_matrices = [n for n, p in params.items() if p.dim() == 2 and n.startswith(blocks + ".")]
    assert sorted(block_matrices) == sorted(names)
    conv1d = family == "gpt2"
    assert FAMILIES[family].conv1d == conv1d
    if conv1d:  # Conv1D: [in, out]
        c_fc = model.get_parameter(f"{blocks}.0.mlp.c_fc.weight")
        assert c_fc.shape == (HIDDEN, 4 * HIDDEN)


# ---------------------------------------------------------------- 3. hook mapping
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hooks_match_hidden_states_and_sum_to_the_residual(fp_model, family):
    model = fp_model(family)
    ids = token_batch()
    points = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
    hooks = [f"blocks.{layer}.{p}" for layer in range(LAYERS) for p in points]
    with ActivationCapture(model, hooks) as cap:
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == LAYERS + 1
    for layer in range(LAYERS):
        check_layer_hooks(model, family, layer, cap.activations, hidden, ids.shape)


def check_layer_hooks(model, family, layer, acts, hidden, shape):
    pre, post, attn, mlp = (
        acts[f"blocks.{layer}.{p}"]
        for p in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
    )
    for act in (pre, post, attn, mlp):
        assert act.shape == (*shape, HIDDEN)
    assert torch.equal(pre, hidden[layer])
    if layer < LAYERS - 1:
        assert torch.equal(post, hidden[layer + 1])
    else:
        # HF applies the final norm to the last hidden state; the hook reads the block
        # output before it (TransformerLens's blocks.L.hook_resid_post).
        assert not torch.allclose(post, hidden[layer + 1])
        final_norm = model.get_submodule(FAMILIES[family].final_norm)
        torch.testing.assert_close(final_norm(post), hidden[layer + 1])
    # What attention and MLP add to the residual stream is all there is: GPT-2 and
    # Llama (sequential), GPT-NeoX (parallel: both read resid_pre) and Gemma-2 (whose
    # attn_out / mlp_out are read after its post-sublayer norms, as in TransformerLens).
    torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=1e-5)


def test_gemma2_sublayer_outputs_are_read_after_the_post_norms(fp_model):
    model = fp_model("gemma2")
    block = blocks_of(model)[1]
    raw: dict[str, torch.Tensor] = {}
    handles = [
        block.self_attn.register_forward_hook(lambda m, a, o: raw.__setitem__("attn", o[0])),
        block.mlp.register_forward_hook(lambda m, a, o: raw.__setitem__("mlp", o)),
    ]
    with ActivationCapture(model, ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]) as cap:
        model(input_ids=token_batch())
    for h in handles:
        h.remove()
    attn, mlp = cap.activations["blocks.1.hook_attn_out"], cap.activations["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(attn, block.post_attention_layernorm(raw["attn"]))
    torch.testing.assert_close(mlp, block.post_feedforward_layernorm(raw["mlp"]))
    assert not torch.allclose(attn, raw["attn"]) and not torch.allclose(mlp, raw["mlp"])


# ---------------------------------------------------------------- 4-5. compression
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("variant", ["rtn-int4", "prune-0.3"])
def test_compressed_checkpoint_per_family(tiny_dirs, tmp_path, family, variant):
    ckpt = write_checkpoint(tiny_dirs[family], variant, tmp_path / variant)
    model, fp = load_checkpoint(ckpt), load_model(tiny_dirs[family])
    conv1d = FAMILIES[family].conv1d
    names = {n for n, _ in target_weights(fp)}
    for name in names:
        w, c = fp.get_parameter(name), model.get_parameter(name)
        if variant == "rtn-int4":
            expected = fq_expected(w, RTNSpec(bits=4), conv1d)
            assert torch.equal(c, expected), name
            assert not torch.equal(c, w), name
            if conv1d:  # per output channel = per column of [in, out], not per row
                assert not torch.allclose(c, fake_quantize(w, RTNSpec(bits=4)))
                torch.testing.assert_close(c.abs().amax(dim=0), w.abs().amax(dim=0))
        else:
            assert torch.equal(c, prune_magnitude(w, 0.3)), name
            assert (c == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    fp_state, state = fp.state_dict(), model.state_dict()
    assert fp_state.keys() == state.keys()
    for key, value in fp_state.items():
        if key not in names:  # embeddings, unembedding, norms, biases: bit-identical
            assert torch.equal(state[key], value), key
    # The (tied, for Gemma-2 and GPT-2) embedding and unembedding never change.
    assert torch.equal(model.get_input_embeddings().weight, fp.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, fp.get_output_embeddings().weight)
    if family in ("gemma2", "gpt2"):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    logits = model(input_ids=token_batch()).logits
    assert torch.isfinite(logits).all()


def test_gpt2_group_wise_quantization_groups_along_the_input_axis(tiny_dirs, tmp_path):
    ckpt = write_checkpoint(tiny_dirs["gpt2"], "rtn-int4-g16", tmp_path / "g")
    model, fp = load_checkpoint(ckpt), load_model(tiny_dirs["gpt2"])
    spec = RTNSpec(bits=4, group_size=16)
    for (name, c), (_, w) in zip(target_weights(model), target_weights(fp), strict=True):
        assert torch.equal(c, fq_expected(w, spec, conv1d=True)), name


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bfloat16_checkpoint_quantizes_in_float32_then_casts(tiny_dirs, tmp_path, family):
    ckpt = write_checkpoint(tiny_dirs[family], "rtn-int4", tmp_path / "q")
    model = load_checkpoint(ckpt, dtype="bfloat16")
    fp = load_model(tiny_dirs[family])  # float32
    names = {n for n, _ in target_weights(fp)}
    conv1d = FAMILIES[family].conv1d
    state = model.state_dict()
    for key, value in fp.state_dict().items():
        got = state[key]
        if key in names:
            expected = fq_expected(value, RTNSpec(bits=4), conv1d).to(torch.bfloat16)
        else:
            expected = value.to(got.dtype)
        assert got.dtype == (torch.bfloat16 if value.is_floating_point() else value.dtype)
        assert torch.equal(got, expected), key


# ---------------------------------------------------------------- 6. SAEs
SAE_CLASSES = {"standard": "StandardSAE", "jumprelu": "JumpReLUSAE", "topk": "TopKSAE"}
TOPK_K = 4


def make_sae(arch: str, d_in: int, d_sae: int, hook_name: str, acts=None, seed: int = 0):
    """An SAE of `arch`; given activations, its encoder is scaled so that pre-activations
    have unit spread on them and thresholds/biases make the codes sparse but nonzero."""
    import sae_lens

    torch.manual_seed(seed)
    cfg_cls = getattr(sae_lens, f"{SAE_CLASSES[arch]}Config")
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, **({"k": TOPK_K} if arch == "topk" else {}))
    cfg.metadata.hook_name = hook_name
    sae = getattr(sae_lens, SAE_CLASSES[arch])(cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, 1.0 / d_in**0.5)
        sae.b_dec.zero_()
        if acts is not None:
            sae.W_enc.div_((acts.reshape(-1, d_in) @ sae.W_enc).std())
        sae.W_dec.copy_(sae.W_enc.t())
        if arch == "standard":
            sae.b_enc.fill_(-0.5)
        elif arch == "jumprelu":
            sae.b_enc.zero_()
            sae.threshold.fill_(0.5)
        else:
            sae.b_enc.zero_()
    return sae


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("arch", list(SAE_CLASSES))
def test_encode_shard_matches_dense_sae_encode(fp_model, tmp_path, family, arch):
    model = fp_model(family)
    hook = "blocks.1.hook_resid_post"
    n_seq, seq_len, batch_size = 4, 8, 2
    ids = token_batch(n_seq, seq_len, seed=1)
    with ActivationCapture(model, [hook]) as cap:
        model(input_ids=ids)
    made = make_sae(arch, HIDDEN, 64, hook, acts=cap.activations[hook])
    made.save_model(tmp_path / "sae")
    sae = load_sae({"path": str(tmp_path / "sae"), "architecture": arch})
    assert check_compatible(model, sae) == hook

    shard = tmp_path / "tokens" / "shard-0.parquet"
    first = 3  # a shard that does not start at sequence 0: global token positions
    write_token_shard(shard, ids.numpy(), first, {"seq_len": seq_len})
    meta = {"model": family, "variant": "fp", "config_hash": "x"}
    codes_path, nll_path = tmp_path / "codes.parquet", tmp_path / "nll.parquet"
    info = encode_shard_multi(
        model,
        [EncodeTarget(sae, hook, codes_path, sae_name="sae")],
        shard,
        nll_path,
        meta,
        EncodeConfig(batch_size=batch_size, device="cpu"),
        torch.device("cpu"),
    )
    table = pq.read_table(codes_path)
    token = table.column("token").to_numpy()
    feature = table.column("feature").to_numpy()
    value = table.column("value").to_numpy()
    n_tokens = n_seq * seq_len
    assert info["n_tokens"] == n_tokens and info["n_codes"] == {"sae": len(token)}
    assert (value != 0).all()
    start = first * seq_len
    assert token.min() >= start and token.max() < start + n_tokens
    assert np.all(np.diff(token * 64 + feature) > 0)  # sorted by (token, feature), unique
    dense = torch.zeros(n_tokens, 64)
    dense[torch.from_numpy(token - start), torch.from_numpy(feature).long()] = torch.from_numpy(
        value
    )

    expected = []
    for lo in range(0, n_seq, batch_size):
        with ActivationCapture(model, [hook]) as cap:
            model(input_ids=ids[lo : lo + batch_size])
        expected.append(sae.encode(cap.activations[hook].reshape(-1, HIDDEN)))
    expected = torch.cat(expected)
    torch.testing.assert_close(dense, expected, atol=1e-6, rtol=1e-6)

    active = (dense != 0).sum(dim=1)
    assert 0 < (dense != 0).float().mean() < 0.75  # sparse, but not silent
    if arch == "topk":
        assert (active <= TOPK_K).all() and (active > 0).all()


# ---------------------------------------------------------------- 7. clear errors
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_sae_width_mismatch_is_a_clear_error(fp_model, family):
    model = fp_model(family)
    sae = make_sae("standard", 16, 32, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=r"d_in=16.*width 32"):
        check_compatible(model, sae)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_unknown_hook_lists_the_supported_names(fp_model, family):
    model = fp_model(family)
    for hook in ("blocks.0.hook_q", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post", "hook_embed"):
        with pytest.raises(ValueError) as err:
            resolve_hook(model, hook)
        message = str(err.value)
        assert repr(hook) in message
        for name in ("hook_resid_post", "hook_resid_pre", "hook_mlp_out", "hook_attn_out"):
            assert name in message
        with pytest.raises(ValueError, match="unsupported SAE hook"):
            check_compatible(model, make_sae("standard", HIDDEN, 32, hook))
    with pytest.raises(ValueError, match="layer 3, but the model has 3"):
        resolve_hook(model, "blocks.3.hook_resid_post")


def test_sae_without_hook_name_is_a_clear_error(fp_model):
    model = fp_model("llama")
    with pytest.raises(ValueError, match="hook_name is empty"):
        check_compatible(model, make_sae("standard", HIDDEN, 32, ""))


# ---------------------------------------------------------------- 8. attention implementation
def test_gemma2_loads_eager_unless_overridden(tiny_dirs):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    eager = load_model(tiny_dirs["gemma2"])
    assert eager.config._attn_implementation == "eager"
    # The caller's choice is passed through, not replaced by the family default: a
    # registered implementation (here eager under another name) is what the model runs.
    AttentionInterface.register("sae_audit_test_eager", eager_attention_forward)
    AttentionMaskInterface.register("sae_audit_test_eager", eager_mask)
    model = load_model(tiny_dirs["gemma2"], attn_implementation="sae_audit_test_eager")
    assert model.config._attn_implementation == "sae_audit_test_eager"
    ids = token_batch()
    torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits)
    # Families without a default keep transformers' own choice.
    assert load_model(tiny_dirs["llama"]).config._attn_implementation == "sdpa"
