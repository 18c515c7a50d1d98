import pytest
import torch

from sae_audit.quantize import RTNSpec, fake_quantize, quantize_rtn


def test_rtn_known_answer_4bit_per_channel():
    # Row 0: max|w| = 7 -> scale 1, codes are the rounded values.
    # Row 1: max|w| = 1.4 -> scale 0.2; -1.4 -> -7, 0.31 -> round(1.55) = 2, 0.05 -> round(0.25) = 0.
    w = torch.tensor([[7.0, -3.4, 0.5, 2.6], [-1.4, 0.31, 0.05, 1.0]])
    q = quantize_rtn(w, RTNSpec(bits=4))
    assert q.codes.tolist() == [[7, -3, 0, 3], [-7, 2, 0, 5]]
    assert torch.allclose(q.scale.squeeze(1), torch.tensor([1.0, 0.2]))
    assert torch.allclose(
        q.dequantize(), torch.tensor([[7.0, -3.0, 0.0, 3.0], [-1.4, 0.4, 0.0, 1.0]])
    )


@pytest.mark.parametrize("bits", range(2, 9))
def test_rtn_codes_in_range_and_error_within_half_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 40) * torch.rand(16, 1) * 3
    spec = RTNSpec(bits=bits)
    q = quantize_rtn(w, spec)
    assert q.codes.min() >= spec.qmin and q.codes.max() <= spec.qmax
    # The largest magnitude of each row maps to exactly +-qmax.
    assert torch.equal(q.codes.abs().amax(dim=1), torch.full((16,), spec.qmax, dtype=q.codes.dtype))
    err = (q.dequantize() - w).abs()
    assert torch.all(err <= q.scale / 2 + 1e-6)


def test_rtn_zero_rows_and_negative_extremes():
    w = torch.tensor([[0.0, 0.0, 0.0], [-8.0, 1.0, 2.0]])
    q = quantize_rtn(w, RTNSpec(bits=4))
    assert q.codes[0].tolist() == [0, 0, 0]
    assert torch.equal(q.dequantize()[0], torch.zeros(3))
    # The negative extreme -8 has |w| = max, so it maps to -qmax = -7, never the unused -8 code.
    assert q.codes[1, 0].item() == -7
    assert q.dequantize()[1, 0].item() == pytest.approx(-8.0)


def test_rtn_group_wise_uses_one_scale_per_group():
    w = torch.tensor([[1.0, -2.0, 100.0, 50.0, 3.0]])
    q = quantize_rtn(w, RTNSpec(bits=8, group_size=2))
    assert q.scale.shape == (1, 3)
    assert torch.allclose(q.scale[0], torch.tensor([2.0, 100.0, 3.0]) / 127)
    # Per-group scales keep the small entries accurate where a per-row scale would not.
    per_row = fake_quantize(w, RTNSpec(bits=8))
    grouped = q.dequantize()
    assert (grouped - w).abs()[0, :2].max() < (per_row - w).abs()[0, :2].max()


def test_rtn_asymmetric_range_and_exact_zero():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 5.0, 2.5]])
    spec = RTNSpec(bits=3, symmetric=False)
    q = quantize_rtn(w, spec)
    assert q.codes.min() >= 0 and q.codes.max() <= 7
    deq = q.dequantize()
    assert deq[0, 0] == 0 and deq[1, 1] == 0
    assert torch.all((deq - w).abs() <= q.scale / 2 + 1e-6)


def test_rtn_rejects_bad_spec():
    with pytest.raises(ValueError, match="bits"):
        RTNSpec(bits=1)
    with pytest.raises(ValueError, match="group_size"):
        RTNSpec(bits=4, group_size=0)


def test_rtn_computes_in_float32_for_bf16_weights():
    w = torch.randn(4, 8).to(torch.bfloat16)
    q = quantize_rtn(w, RTNSpec(bits=6))
    assert q.scale.dtype == torch.float32
    assert q.dequantize().dtype == torch.float32


# --- full-range (compressed-tensors / GPTQ) grid, cross-checked against compressed-tensors ---


def test_full_range_known_answer_int4():
    # absmax 7.5 -> scale 7.5 / 7.5 = 1. +7.5 rounds (half to even) to 8 and is clipped to 7;
    # -7.5 rounds to -8, the 16th level the narrow grid never uses.
    w = torch.tensor([[7.5, -7.5, 3.2, -0.4, 0.0]])
    q = quantize_rtn(w, RTNSpec(bits=4, full_range=True))
    assert q.scale.tolist() == [[1.0]]
    assert q.codes.tolist() == [[7, -8, 3, 0, 0]]
    assert q.dequantize().tolist() == [[7.0, -8.0, 3.0, 0.0, 0.0]]
    # The default (narrow) grid on the same row: scale 7.5 / 7, codes within +-7.
    narrow = quantize_rtn(w, RTNSpec(bits=4))
    assert narrow.codes.tolist() == [[7, -7, 3, 0, 0]]


def test_full_range_rejected_for_asymmetric():
    with pytest.raises(ValueError, match="full_range"):
        RTNSpec(bits=4, symmetric=False, full_range=True)
    assert RTNSpec(bits=4).full_range is False


@pytest.mark.parametrize("bits", range(2, 9))
def test_full_range_codes_in_range_and_error_within_half_step(bits):
    torch.manual_seed(100 + bits)
    w = torch.randn(16, 40) * torch.rand(16, 1) * 3
    spec = RTNSpec(bits=bits, full_range=True)
    q = quantize_rtn(w, spec)
    assert q.codes.min() >= spec.qmin and q.codes.max() <= spec.qmax
    # Clipping the positive absmax (7.5 steps -> 7) still costs at most half a step.
    assert torch.all((q.dequantize() - w).abs() <= q.scale / 2 + 1e-6)


def _weights(seed: int, rows: int = 64, cols: int = 256) -> torch.Tensor:
    """Random float32 weights with per-row scales, outliers, an all-zero row and group."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 0.1
    outliers = torch.rand(rows, cols, generator=gen) < 0.005
    w[outliers] *= 30
    w[3] = 0.0
    w[5, :32] = 0.0
    return w


def _ct_fake_quantize(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors' own QDQ: calculate_qparams on per-(row, group) min/max, then its
    fake_quantize (and quantize, for the integer codes). Returns (fq, codes, scale, zero_point),
    scale and zero point shaped [rows, groups]."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_q
    from compressed_tensors.quantization.utils import calculate_qparams

    if group_size is None:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        args = QuantizationArgs(
            num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group_size
        )
        n_groups = -(-w.shape[1] // group_size)
        pad = n_groups * group_size - w.shape[1]
        grouped = torch.nn.functional.pad(w, (0, pad)).view(w.shape[0], n_groups, group_size)
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale, zero_point = calculate_qparams(lo, hi, args)
    fq = ct_fq(w, scale, zero_point, args)
    codes = ct_q(w, scale, zero_point, args)
    return fq, codes, scale.view(w.shape[0], -1), zero_point.view(w.shape[0], -1)


def _nonzero_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    g = w.shape[1] if group_size is None else group_size
    return w.view(w.shape[0], -1, g).abs().amax(dim=-1) > 0


@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_full_range_matches_compressed_tensors_exactly(bits, group_size):
    w = _weights(seed=bits * 1000 + (group_size or 0))
    ct_fq, ct_codes, ct_scale, _ = _ct_fake_quantize(w, bits, True, group_size)
    spec = RTNSpec(bits=bits, group_size=group_size, full_range=True)
    q = quantize_rtn(w, spec)
    assert torch.equal(fake_quantize(w, spec), ct_fq)
    assert torch.equal(q.codes.to(torch.float32), ct_codes)
    # Scales are bit-identical too, except all-zero groups (compressed-tensors: float32 eps, here 1).
    nz = _nonzero_groups(w, group_size)
    assert not nz.all()
    assert torch.equal(q.scale[nz], ct_scale[nz])
    assert torch.equal(fake_quantize(w, spec)[3], torch.zeros(w.shape[1]))
    # int4/int8 full range uses the 2^b-th level -2^(b-1) and never exceeds 2^(b-1) - 1.
    assert (q.codes == spec.qmin).any()
    assert q.codes.max().item() == spec.qmax


def test_full_range_group_not_dividing_the_row():
    w = _weights(seed=7, cols=200)  # group 48: 4 full groups and one of 8 columns
    spec = RTNSpec(bits=4, group_size=48, full_range=True)
    ours = fake_quantize(w, spec)
    try:
        ct_fq, _, _, _ = _ct_fake_quantize(w, 4, True, 48)
    except ValueError as e:  # compressed-tensors 0.19: "tensor column shape must be divisble"
        # Our convention for the ragged last group (zero padding, which changes no absmax)
        # against compressed-tensors on the explicitly zero-padded weight.
        padded = torch.nn.functional.pad(w, (0, 240 - 200))
        ct_padded, _, _, _ = _ct_fake_quantize(padded, 4, True, 48)
        assert torch.equal(ours, ct_padded[:, :200])
        pytest.skip(f"compressed-tensors rejects a group size that does not divide the row: {e}")
    assert torch.equal(ours, ct_fq)


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [4, 8])
def test_narrow_default_differs_from_compressed_tensors(bits, group_size):
    w = _weights(seed=bits + 3 * (group_size or 1))
    ct_fq, _, _, _ = _ct_fake_quantize(w, bits, True, group_size)
    ours = fake_quantize(w, RTNSpec(bits=bits, group_size=group_size))
    assert (ours != ct_fq).sum().item() > 0
    # The narrow formula, written out: scale = absmax / (2^(b-1) - 1) (int4: /7), codes +-7.
    qmax = 2 ** (bits - 1) - 1
    g = w.shape[1] if group_size is None else group_size
    grouped = w.view(w.shape[0], -1, g)
    scale = grouped.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    expected = (torch.clamp(torch.round(grouped / scale), -qmax, qmax) * scale).view_as(w)
    assert torch.equal(ours, expected)


def test_asymmetric_ties_break_as_compressed_tensors():
    # min -1, max 14 -> scale 1, zero point 1 (compressed-tensors: -8 + 1 = -7, odd).
    # 4.5: round(4.5 - 7) = -2 -> 5.0 (rounding 4.5 first, then adding 1, would give 4.0).
    w = torch.tensor([[-1.0, 14.0, 4.5, 2.0]])
    ct_fq, _, _, ct_zp = _ct_fake_quantize(w, 4, False, None)
    q = quantize_rtn(w, RTNSpec(bits=4, symmetric=False))
    assert q.zero is not None and q.zero.tolist() == [[1.0]] and ct_zp.tolist() == [[-7]]
    assert q.dequantize().tolist() == [[-1.0, 14.0, 5.0, 2.0]] == ct_fq.tolist()


@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_matches_compressed_tensors(bits, group_size):
    w = _weights(seed=50 + bits + (group_size or 0), rows=256, cols=512)
    ct_fq, ct_codes, ct_scale, ct_zp = _ct_fake_quantize(w, bits, False, group_size)
    spec = RTNSpec(bits=bits, symmetric=False, group_size=group_size)
    q = quantize_rtn(w, spec)
    assert q.zero is not None
    offset = 2 ** (bits - 1)  # compressed-tensors' codes and zero points are signed
    # Scale and zero point: bit-identical (all-zero groups aside: scale eps and a NaN zero
    # point cast to int there; both sides still dequantize those groups to exact zeros).
    nz = _nonzero_groups(w, group_size)
    assert torch.equal(q.scale[nz], ct_scale[nz])
    assert torch.equal(q.zero[nz], ct_zp.to(torch.float32)[nz] + offset)
    ours = q.dequantize()
    assert torch.equal(ours[3], ct_fq[3]) and torch.equal(ours[3], torch.zeros(w.shape[1]))
    # Codes, exactly (all-zero groups aside: 0 here, the int cast of NaN there).
    g = w.shape[1] if group_size is None else group_size
    in_nz = nz.repeat_interleave(g, dim=1)
    assert torch.equal((q.codes.to(torch.float32) - offset)[in_nz], ct_codes[in_nz])
    assert torch.equal(ours, ct_fq)
