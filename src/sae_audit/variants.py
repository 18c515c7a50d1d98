"""Variant names: one string says what a compressed checkpoint is.

Grammar:
  fp                          the full-precision model
  rtn-int{b}[-g{G}][-asym]    round-to-nearest, b bits, optional group size, asymmetric
  prune-{s}                   per-tensor magnitude pruning at sparsity s (0 < s < 1)
  prune-matched-{target}      magnitude pruning with sparsity chosen to match a target variant's perplexity
  fp-null                     the FP model again, run as if it were compressed (stability check)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

VariantKind = Literal["fp", "null", "rtn", "prune", "prune-matched"]

_RTN = re.compile(r"^rtn-int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<asym>-asym)?$")
_PRUNE = re.compile(r"^prune-(?P<sparsity>0?\.\d+|0)$")
_MATCHED = re.compile(r"^prune-matched-(?P<target>.+)$")


@dataclass(frozen=True)
class Variant:
    """A parsed variant name."""

    name: str
    kind: VariantKind
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    sparsity: float | None = None
    target: str | None = None


def rtn_name(bits: int, group_size: int | None = None, symmetric: bool = True) -> str:
    name = f"rtn-int{bits}"
    if group_size is not None:
        name += f"-g{group_size}"
    if not symmetric:
        name += "-asym"
    return name


def prune_name(sparsity: float) -> str:
    # Shortest decimal that round-trips, so 0.175 stays "0.175" and 0.5 is "0.5".
    return f"prune-{sparsity!r}" if 0 < sparsity < 1 else f"prune-{sparsity}"


def parse_variant(name: str) -> Variant:
    """Parse a variant name; raise ValueError naming the grammar when it does not fit."""
    if name == "fp":
        return Variant(name=name, kind="fp")
    if name == "fp-null":
        return Variant(name=name, kind="null")
    if m := _RTN.match(name):
        bits = int(m["bits"])
        if not 2 <= bits <= 16:
            raise ValueError(f"variant {name!r}: RTN bits must be in 2..16, got {bits}")
        group = int(m["group"]) if m["group"] else None
        if group is not None and group < 1:
            raise ValueError(f"variant {name!r}: group size must be positive")
        return Variant(name=name, kind="rtn", bits=bits, group_size=group, symmetric=not m["asym"])
    if m := _MATCHED.match(name):
        target = parse_variant(m["target"])
        if target.kind not in ("rtn", "prune"):
            raise ValueError(f"variant {name!r}: matched pruning needs an rtn or prune target")
        return Variant(name=name, kind="prune-matched", target=target.name)
    if m := _PRUNE.match(name):
        sparsity = float(m["sparsity"])
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"variant {name!r}: sparsity must be in (0, 1)")
        return Variant(name=name, kind="prune", sparsity=sparsity)
    raise ValueError(
        f"unknown variant {name!r}: expected 'fp', 'fp-null', 'rtn-int<b>[-g<G>][-asym]', "
        "'prune-<sparsity>' or 'prune-matched-<target>'"
    )
