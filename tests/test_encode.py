"""Encoding one token shard: per-token NLL and every SAE's codes from one forward pass
(each model family and SAE architecture against a dense encode: test_families.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from sae_audit import encode
from sae_audit.encode import (
    EncodeConfig,
    EncodeTarget,
    NonFiniteError,
    batch_nll,
    encode_shard_multi,
    target_nll,
    token_nll,
)
from sae_audit.fp_stats import fp_feature_stats
from sae_audit.models import ActivationCapture, load_model
from sae_audit.sae_quality import variant_quality
from sae_audit.saes import SaeInput
from sae_audit.shards import (
    Expected,
    read_metadata,
    read_nll_shard,
    read_quality,
    write_token_shard,
)

from .test_families import SAE_CLASSES, make_sae


def test_token_nll_is_the_cross_entropy_of_the_next_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    nll = token_nll(logits, ids)
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none"
    ).view(2, 4)
    torch.testing.assert_close(nll, expected)
    # Low-precision logits are scored in float32.
    assert token_nll(logits.bfloat16(), ids).dtype == torch.float32


def test_one_pass_writes_a_shard_per_sae_and_the_nll(gpt_neox_dir, tmp_path):
    model = load_model(gpt_neox_dir)
    n_seq, seq_len, first = 3, 6, 2
    ids = torch.randint(4, 64, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    tokens = tmp_path / "tokens.parquet"
    write_token_shard(tokens, ids.numpy(), first, {"seq_len": seq_len})
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_mlp_out"}
    widths = {"a": 40, "b": 24}
    targets = [
        EncodeTarget(
            make_sae("standard", 32, widths[name], hook, seed=i),
            hook,
            tmp_path / f"{name}.parquet",
            name,
            config_hash="hash-b" if name == "b" else None,
        )
        for i, (name, hook) in enumerate(hooks.items())
    ]
    meta = {"model": "tiny", "variant": "fp", "config_hash": "hash"}
    info = encode_shard_multi(
        model,
        targets,
        tokens,
        tmp_path / "nll.parquet",
        meta,
        EncodeConfig(batch_size=2, device="cpu"),
        torch.device("cpu"),
    )
    start, n_tokens = first * seq_len, n_seq * seq_len
    assert info["n_tokens"] == n_tokens
    for name, hook in hooks.items():
        shard = read_metadata(tmp_path / f"{name}.parquet")
        assert (shard.model, shard.variant, shard.sae, shard.hook) == ("tiny", "fp", name, hook)
        assert shard.d_sae == widths[name]
        assert (shard.token_start, shard.token_stop) == (start, start + n_tokens)
        assert shard.config_hash == ("hash-b" if name == "b" else "hash")
        assert info["n_codes"][name] == pq.read_metadata(tmp_path / f"{name}.parquet").num_rows
    # Every token but each sequence's first, scored by the same forward pass.
    token, nll = read_nll_shard(tmp_path / "nll.parquet", "fp")
    positions = start + np.arange(n_seq)[:, None] * seq_len + np.arange(1, seq_len)
    np.testing.assert_array_equal(token, positions.ravel())
    with torch.no_grad():
        expected = batch_nll(model, ids).double().numpy().ravel()
    np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-6)


def _log_softmax_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss as it was computed before chunking: a whole float32 log-softmax, gathered."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [3, None])  # None: the real CPU chunk size
def test_target_nll_is_log_softmax_gathered_bit_for_bit(monkeypatch, dtype, chunk_rows):
    g = torch.Generator().manual_seed(1)
    vocab = 11 if chunk_rows else 50304
    if chunk_rows:  # 10 rows in chunks of 3: the last chunk is partial
        monkeypatch.setitem(encode._NLL_CHUNK_BYTES, "cpu", chunk_rows * vocab * 4)
    logits = (torch.randn(2, 5 if chunk_rows else 120, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, logits.shape[:-1], generator=g)
    nll = target_nll(logits, targets)
    assert nll.dtype == torch.float32 and nll.shape == targets.shape
    assert torch.equal(nll, _log_softmax_nll(logits, targets))
    # Non-contiguous logits (every other position) are scored the same.
    assert torch.equal(
        target_nll(logits[:, ::2], targets[:, ::2]), _log_softmax_nll(logits, targets)[:, ::2]
    )
    # token_nll scores the next token without slicing the logits: same numbers as slicing.
    assert torch.equal(token_nll(logits, targets), _log_softmax_nll(logits[:, :-1], targets[:, 1:]))


def _tiny_run(gpt_neox_dir, tmp_path, n_seq=5, seq_len=6, first=2):
    model = load_model(gpt_neox_dir)
    ids = torch.randint(4, 64, (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
    tokens = tmp_path / "tokens.parquet"
    write_token_shard(tokens, ids.numpy(), first, {"seq_len": seq_len})
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad(), ActivationCapture(model, [hook]) as capture:
        model(input_ids=ids)
    # Scaled to these activations, so codes are sparse but not all zero.
    sae = make_sae("standard", 32, 40, hook, acts=capture.activations[hook], seed=3)
    return model, ids, tokens, hook, sae


def test_codes_and_nll_are_the_dense_encode_bit_for_bit(gpt_neox_dir, tmp_path):
    """The shard holds exactly the nonzeros of the dense SAE codes, in (token, feature)
    order, and the NLL exactly the log-softmax loss: what encode wrote before it took the
    nonzeros from the flat codes and scored the logits a chunk at a time."""
    n_seq, seq_len, first, batch_size = 5, 6, 2, 2  # the last batch is partial
    model, ids, tokens, hook, sae = _tiny_run(gpt_neox_dir, tmp_path, n_seq, seq_len, first)
    encode_shard_multi(
        model,
        [EncodeTarget(sae, hook, tmp_path / "codes.parquet", "sae")],
        tokens,
        tmp_path / "nll.parquet",
        {"model": "tiny", "variant": "fp", "config_hash": "hash"},
        EncodeConfig(batch_size=batch_size, device="cpu"),
        torch.device("cpu"),
    )
    expected_codes: list[tuple[np.ndarray, ...]] = []
    expected_nll = []
    with torch.no_grad():
        for lo in range(0, n_seq, batch_size):
            batch = ids[lo : lo + batch_size]
            with ActivationCapture(model, [hook]) as capture:
                logits = model(input_ids=batch).logits
            expected_nll.append(_log_softmax_nll(logits[:, :-1], batch[:, 1:]).double().ravel())
            codes = sae.encode(capture.activations[hook].reshape(-1, 32))
            rows, features = torch.nonzero(codes != 0, as_tuple=True)
            base = (first + lo) * seq_len
            expected_codes.append(
                ((rows + base).numpy(), features.int().numpy(), codes[rows, features].numpy())
            )
    table = pq.read_table(tmp_path / "codes.parquet")
    token, feature, value = (np.concatenate(c) for c in zip(*expected_codes, strict=True))
    assert 0 < len(token) < n_seq * seq_len * 40  # sparse, but not silent
    np.testing.assert_array_equal(table["token"].to_numpy(), token)
    np.testing.assert_array_equal(table["feature"].to_numpy(), feature)
    np.testing.assert_array_equal(table["value"].to_numpy(), value)
    _, nll = read_nll_shard(tmp_path / "nll.parquet", "fp")
    np.testing.assert_array_equal(nll, torch.cat(expected_nll).numpy())


def test_non_finite_codes_name_their_token_and_leave_no_shard(gpt_neox_dir, tmp_path, monkeypatch):
    n_seq, seq_len, first, batch_size = 4, 6, 2, 2
    model, _, tokens, hook, sae = _tiny_run(gpt_neox_dir, tmp_path, n_seq, seq_len, first)
    real_encode = sae.encode
    batches = 0

    def encode_with_inf(acts: torch.Tensor) -> torch.Tensor:
        nonlocal batches
        codes = real_encode(acts)
        batches += 1
        if batches == 2:  # the second batch's row 3 (its first row of codes stays zero)
            codes[3, 5] = torch.inf
        return codes

    monkeypatch.setattr(sae, "encode", encode_with_inf)
    with pytest.raises(NonFiniteError, match=f"non-finite at token {(first + 2) * seq_len + 3};"):
        encode_shard_multi(
            model,
            [EncodeTarget(sae, hook, tmp_path / "codes.parquet", "sae")],
            tokens,
            tmp_path / "nll.parquet",
            {"model": "tiny", "variant": "fp", "config_hash": "hash"},
            EncodeConfig(batch_size=batch_size, device="cpu"),
            torch.device("cpu"),
        )
    assert not (tmp_path / "codes.parquet").exists()
    assert not (tmp_path / "nll.parquet").exists()


def _encode_one(model, sae, hook, tokens, tmp_path, special_ids=(), sae_in=None):
    encode_shard_multi(
        model,
        [EncodeTarget(sae, hook, tmp_path / "codes.parquet", "sae", input=sae_in)],
        tokens,
        tmp_path / "nll.parquet",
        {"model": "tiny", "variant": "fp", "config_hash": "hash"},
        EncodeConfig(batch_size=2, device="cpu", exclude_special_positions=bool(special_ids)),
        torch.device("cpu"),
        special_ids,
    )
    return pq.read_table(tmp_path / "codes.parquet")


def test_the_footer_holds_the_sae_quality_of_what_was_encoded(gpt_neox_dir, tmp_path):
    """Explained variance, MSE, L0 and dead fraction from the footer's sums equal those
    computed directly from the dense activations and sae-lens's own reconstruction."""
    n_seq, seq_len, first = 5, 6, 2
    model, ids, tokens, hook, sae = _tiny_run(gpt_neox_dir, tmp_path, n_seq, seq_len, first)
    table = _encode_one(model, sae, hook, tokens, tmp_path)
    record = read_quality(tmp_path / "codes.parquet")
    row = variant_quality([tmp_path / "codes.parquet"], "fp", Expected())
    with torch.no_grad(), ActivationCapture(model, [hook]) as capture:
        model(input_ids=ids)
    x = capture.activations[hook].reshape(-1, 32).double()
    with torch.no_grad():
        codes = sae.encode(x.float())
        error = (sae.decode(codes).double() - x).square().sum()
    variance = (x - x.mean(dim=0)).square().sum()
    assert record["n"] == row["n_positions"] == n_seq * seq_len
    # Batch by batch in float32 against all at once: equal to rounding.
    assert row["explained_variance"] == pytest.approx(float(1 - error / variance), rel=1e-6)
    assert row["mse"] == pytest.approx(float(error) / x.numel(), rel=1e-6)
    assert row["l0"] == pytest.approx(table.num_rows / (n_seq * seq_len))
    fired = (codes > 0).any(dim=0)
    assert row["dead_fraction"] == pytest.approx(1 - fired.double().mean().item())
    assert 0 < row["dead_fraction"] < 1 or fired.all()


@pytest.mark.parametrize("arch", list(SAE_CLASSES))
def test_sparse_decode_is_sae_lens_decode(arch):
    """The reconstruction of the quality sums, from the codes' nonzeros, is sae-lens's own
    decode of the dense codes, for every architecture."""
    sae = make_sae(arch, 32, 48, "blocks.1.hook_resid_post", seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        codes = sae.encode(torch.randn(20, 32, generator=torch.Generator().manual_seed(2)))
        flat = codes.reshape(-1)
        nonzero = torch.nonzero(flat).squeeze(1)
        assert 0 < nonzero.numel() < codes.numel()
        got = encode.sparse_decode(sae, codes, nonzero, flat[nonzero])
        torch.testing.assert_close(got, sae.decode(codes), rtol=1e-5, atol=1e-5)


def test_special_positions_are_excluded_and_recorded(gpt_neox_dir, tmp_path):
    n_seq, seq_len, first = 5, 6, 2
    model, ids, tokens, hook, sae = _tiny_run(gpt_neox_dir, tmp_path, n_seq, seq_len, first)
    # Two "special" ids that occur in the shard (the first token of every sequence, and
    # one more), so some batches lose rows in the middle too.
    special = {int(ids[0, 0]), int(ids[3, 4])}
    table = _encode_one(model, sae, hook, tokens, tmp_path, special_ids=special)
    meta = read_metadata(tmp_path / "codes.parquet")
    start = first * seq_len
    expected = [start + i for i, t in enumerate(ids.reshape(-1).tolist()) if t in special]
    assert list(meta.excluded) == expected and meta.n_positions == n_seq * seq_len - len(expected)
    token = table["token"].to_numpy()
    assert not np.isin(token, expected).any()
    # The kept positions hold exactly what the unexcluded run wrote there.
    (tmp_path / "full").mkdir()
    full = _encode_one(model, sae, hook, tokens, tmp_path / "full")
    keep = ~np.isin(full["token"].to_numpy(), expected)
    np.testing.assert_array_equal(token, full["token"].to_numpy()[keep])
    # (fewer rows per SAE matmul: equal to float32 rounding)
    np.testing.assert_allclose(
        table["value"].to_numpy(), full["value"].to_numpy()[keep], rtol=1e-5, atol=1e-6
    )
    assert read_quality(tmp_path / "codes.parquet")["n"] == meta.n_positions
    # Every statistic counts only the kept positions.
    stats = fp_feature_stats([tmp_path / "codes.parquet"])
    assert stats["n_tokens"][0] == meta.n_positions
    # The NLL shard still scores every token.
    nll_token, _ = read_nll_shard(tmp_path / "nll.parquet", "fp")
    assert nll_token.size == n_seq * (seq_len - 1)


def test_a_centering_sae_encodes_the_mean_free_activation(gpt_neox_dir, tmp_path):
    model, ids, tokens, hook, sae = _tiny_run(gpt_neox_dir, tmp_path)
    sae_in = SaeInput(hook, center=True, normalize_activations="none", prepend_bos=None,
                      tokens_bos=False)  # fmt: skip
    table = _encode_one(model, sae, hook, tokens, tmp_path, sae_in=sae_in)
    with torch.no_grad(), ActivationCapture(model, [hook]) as capture:
        model(input_ids=ids)
    x = capture.activations[hook].reshape(-1, 32)
    with torch.no_grad():
        codes = sae.encode(x - x.mean(dim=-1, keepdim=True))
    assert table.num_rows == int((codes != 0).sum()) and table.num_rows > 0
    np.testing.assert_allclose(
        table["value"].to_numpy(), codes[codes != 0].numpy(), rtol=1e-5, atol=1e-6
    )
    assert read_quality(tmp_path / "codes.parquet")["centered"] is True
