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
