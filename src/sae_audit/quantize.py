"""Round-to-nearest (RTN) weight quantization, per output channel or per group.

One function covers symmetric and asymmetric, per-channel and group-wise RTN
(DESIGN.md: variants are options of one function, not copies of it). Weights
are [out, in] with quantization groups running along the input dimension; the
caller transposes Conv1D-style [in, out] weights first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RTNSpec:
    """How to quantize: bit-width, symmetry, group size (None = whole row) and range convention.

    full_range picks the symmetric grid (it only applies to symmetric quantization):

    - False (default, the reference study's "narrow" grid): codes in +-(2^(b-1) - 1), 2^b - 1
      levels, scale = max|w| / (2^(b-1) - 1) (int4: /7). The code -2^(b-1) is never produced.
    - True (the compressed-tensors / GPTQ convention): scale = max|w| / ((2^b - 1) / 2)
      (int4: /7.5), codes clamp(round(w / scale), -2^(b-1), 2^(b-1) - 1): 2^b levels, and the
      positive max|w| (which rounds to 2^(b-1)) is clipped to 2^(b-1) - 1. Scales and
      dequantized weights are bit-identical to compressed-tensors' calculate_qparams +
      fake_quantize in float32 (all-zero groups: scale 1 here, float32 eps there; both give 0).

    Asymmetric quantization always uses all 2^b levels, so full_range=True with
    symmetric=False is rejected.
    """

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    full_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(
                f"group_size must be a positive integer or None, got {self.group_size}"
            )
        if self.full_range and not self.symmetric:
            raise ValueError(
                "full_range=True only applies to symmetric quantization (asymmetric RTN "
                "already uses all 2^bits levels); use symmetric=True or full_range=False"
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        # Asymmetric codes are unsigned 0..2^b-1: int16 holds 8-bit ones, int32 the rest.
        if self.symmetric:
            return torch.int8 if self.bits <= 8 else torch.int16
        return torch.int16 if self.bits <= 8 else torch.int32


@dataclass
class QuantizedTensor:
    """Integer codes plus the per-(row, group) scale and zero point that dequantize them."""

    codes: torch.Tensor  # [out, in], integer
    scale: torch.Tensor  # [out, n_groups], float32
    zero: torch.Tensor | None  # [out, n_groups], float32 (asymmetric only)
    group_size: int  # columns per group (== in for per-channel)

    def dequantize(self) -> torch.Tensor:
        out, cols = self.codes.shape
        n_groups = self.scale.shape[1]
        codes = self.codes.to(torch.float32)
        pad = n_groups * self.group_size - cols
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        grouped = codes.view(out, n_groups, self.group_size)
        if self.zero is not None:
            grouped = grouped - self.zero.unsqueeze(-1)
        deq = grouped * self.scale.unsqueeze(-1)
        return deq.view(out, -1)[:, :cols]


def quantize_rtn(weight: torch.Tensor, spec: RTNSpec) -> QuantizedTensor:
    """Quantize a 2-D [out, in] weight; computed in float32 whatever the weight's dtype.

    Symmetric: scale = max|w| / d per (row, group), codes clamp(round(w/scale), qmin, qmax),
    with d = qmax = 2^(b-1) - 1 (narrow, the default) or d = (2^b - 1) / 2 (spec.full_range,
    the compressed-tensors/GPTQ grid; see RTNSpec).
    Asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale), codes
    clamp(round(w/scale) + zero, 0, 2^b - 1), with the range widened to include 0 so zero
    weights stay exactly zero. Scale, zero point and codes equal compressed-tensors' bit for
    bit (its rounding order: w/scale + zero point, rounded once).
    All-zero rows (or groups) get scale 1 and codes 0: they dequantize to exact zeros.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_rtn expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    out, cols = w.shape
    group = cols if spec.group_size is None else min(spec.group_size, cols)
    n_groups = -(-cols // group)
    pad = n_groups * group - cols
    # Padding with zeros changes neither max|w| nor (with 0 included) the asymmetric range.
    padded = torch.nn.functional.pad(w, (0, pad)) if pad else w
    grouped = padded.view(out, n_groups, group)
    if spec.symmetric:
        # Full range divides by (qmax - qmin) / 2 as a float, as compressed-tensors'
        # calculate_qparams does (int4: 7.5; exact in float32 for every allowed bit-width).
        divisor = (spec.qmax - spec.qmin) / 2 if spec.full_range else spec.qmax
        scale = grouped.abs().amax(dim=-1) / divisor
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(grouped / scale.unsqueeze(-1)), spec.qmin, spec.qmax)
        zero = None
    else:
        lo = grouped.amin(dim=-1).clamp(max=0.0)
        hi = grouped.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / spec.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        # compressed-tensors' arithmetic, in its signed codes: round(w/scale + zp) with
        # zp = round(-2^(b-1) - min/scale), then shifted to 0..2^b-1. Rounding w/scale first
        # and adding the zero point after would break ties (w/scale = k + 1/2) the other way
        # whenever the zero point is odd.
        offset = 2 ** (spec.bits - 1)
        signed_zero = torch.clamp(torch.round(-offset - lo / scale), -offset, offset - 1)
        signed = torch.round(grouped / scale.unsqueeze(-1) + signed_zero.unsqueeze(-1))
        codes = torch.clamp(signed, -offset, offset - 1) + offset
        zero = signed_zero + offset
    codes = codes.view(out, -1)[:, :cols].to(spec.code_dtype)
    return QuantizedTensor(codes=codes.contiguous(), scale=scale, zero=zero, group_size=group)


def fake_quantize(weight: torch.Tensor, spec: RTNSpec) -> torch.Tensor:
    """Quantize then dequantize, returned in float32 (cast to the run dtype afterwards)."""
    return quantize_rtn(weight, spec).dequantize()
