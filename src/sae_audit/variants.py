"""Variant names: one string says what a compressed checkpoint is.

Grammar:
  fp                          the full-precision model
  rtn-int{b}[-g{G}][-asym|-full]
                              round-to-nearest, b bits, optional group size, asymmetric, or
                              symmetric on the full 2^b-level grid (compressed-tensors' and GPTQ's)
  prune-{s}                   per-tensor magnitude pruning at sparsity s (0 < s < 1)
  prune-matched-{target}      magnitude pruning with sparsity chosen to match a target variant's perplexity
  fp-null                     the FP model again, run as if it were compressed (stability check)
  fp-noise                    the FP weights through another numeric path (the other dtype):
                              the numeric-noise null, the floor under which nothing is damage
  lc-{key}                    made by llm-compressor's oneshot: compression.llmcompressor.{key}
  gguf-{key}                  written as a GGUF file: compression.gguf.{key}
  ext-{key}                   an artifact made elsewhere: compression.external.{key}
  protect-{key}               mixed-precision RTN protecting a watchlist: compression.protect.{key}

The shipped-format names (lc, gguf, ext) carry only the config key: what they do lives
in that config entry, which the compress rule passes (so editing it re-makes the variant).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

VariantKind = Literal[
    "fp",
    "null",
    "noise",
    "rtn",
    "prune",
    "prune-matched",
    "llmcompressor",
    "gguf",
    "external",
    "protect",
]
# Config section under `compression` and name prefix of each shipped-format kind.
SHIPPED: dict[str, tuple[str, VariantKind]] = {
    "llmcompressor": ("lc", "llmcompressor"),
    "gguf": ("gguf", "gguf"),
    "external": ("ext", "external"),
}
KEY_PATTERN = r"[a-z0-9][a-z0-9_.-]*"

_RTN = re.compile(
    r"^rtn-int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?:(?P<asym>-asym)|(?P<full>-full))?$"
)
_SHIPPED = re.compile(rf"^(?P<prefix>lc|gguf|ext)-(?P<key>{KEY_PATTERN})$")
_PRUNE = re.compile(r"^prune-(?P<sparsity>0?\.\d+|0)$")
_MATCHED = re.compile(r"^prune-matched-(?P<target>.+)$")
_PROTECT = re.compile(rf"^protect-(?P<key>{KEY_PATTERN})$")


@dataclass(frozen=True)
class Variant:
    """A parsed variant name."""

    name: str
    kind: VariantKind
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True
    full_range: bool = False
    sparsity: float | None = None
    target: str | None = None
    key: str | None = None  # the config key of a shipped-format variant

    @property
    def shipped(self) -> bool:
        return self.kind in ("llmcompressor", "gguf", "external")


def rtn_name(
    bits: int, group_size: int | None = None, symmetric: bool = True, full_range: bool = False
) -> str:
    name = f"rtn-int{bits}"
    if group_size is not None:
        name += f"-g{group_size}"
    if not symmetric:
        name += "-asym"
    elif full_range:
        name += "-full"
    return name


def shipped_name(section: str, key: str) -> str:
    """The variant of entry `key` of compression.<section> (llmcompressor, gguf, external)."""
    return f"{SHIPPED[section][0]}-{key}"


def protect_name(key: str) -> str:
    """The variant of entry `key` of compression.protect."""
    return f"protect-{key}"


def prune_name(sparsity: float) -> str:
    # Shortest decimal that round-trips, so 0.175 stays "0.175" and 0.5 is "0.5".
    return f"prune-{sparsity!r}" if 0 < sparsity < 1 else f"prune-{sparsity}"


def parse_variant(name: str) -> Variant:
    """Parse a variant name; raise ValueError naming the grammar when it does not fit."""
    if name == "fp":
        return Variant(name=name, kind="fp")
    if name == "fp-null":
        return Variant(name=name, kind="null")
    if name == "fp-noise":
        return Variant(name=name, kind="noise")
    if m := _RTN.match(name):
        bits = int(m["bits"])
        if not 2 <= bits <= 16:
            raise ValueError(f"variant {name!r}: RTN bits must be in 2..16, got {bits}")
        group = int(m["group"]) if m["group"] else None
        if group is not None and group < 1:
            raise ValueError(f"variant {name!r}: group size must be positive")
        return Variant(
            name=name,
            kind="rtn",
            bits=bits,
            group_size=group,
            symmetric=not m["asym"],
            full_range=bool(m["full"]),
        )
    if m := _SHIPPED.match(name):
        kind = next(k for p, k in SHIPPED.values() if p == m["prefix"])
        return Variant(name=name, kind=cast(VariantKind, kind), key=m["key"])
    if m := _PROTECT.match(name):
        return Variant(name=name, kind="protect", key=m["key"])
    if m := _MATCHED.match(name):
        target = parse_variant(m["target"])
        if target.kind in ("fp", "null", "noise", "prune-matched"):
            raise ValueError(
                f"variant {name!r}: matched pruning needs a compressed target (rtn, prune, "
                "lc, gguf or ext), not another matched or FP variant"
            )
        return Variant(name=name, kind="prune-matched", target=target.name)
    if m := _PRUNE.match(name):
        sparsity = float(m["sparsity"])
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"variant {name!r}: sparsity must be in (0, 1)")
        return Variant(name=name, kind="prune", sparsity=sparsity)
    raise ValueError(
        f"unknown variant {name!r}: expected 'fp', 'fp-null', 'fp-noise', "
        "'rtn-int<b>[-g<G>][-asym|-full]', 'prune-<sparsity>', 'prune-matched-<target>', 'lc-<key>', 'gguf-<key>', 'ext-<key>' or 'protect-<key>'"
    )


# Weight bits of llm-compressor's preset schemes and of the GGUF types we write: where a
# shipped variant sits beside RTN in tables and figures (None: weights untouched).
SCHEME_BITS: dict[str, int] = {
    "W4A16": 4,
    "W4A16_ASYM": 4,
    "W8A16": 8,
    "W8A8": 8,
    "FP8": 8,
    "FP8_DYNAMIC": 8,
}
# The GGUF types the damage forecast has a noise model for (sae_audit.forecast).
FORECAST_GGUF_TYPES = ("Q8_0", "Q4_0")
GGUF_BITS: dict[str, int] = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_0": 4, "Q4_1": 4, "F16": 16}


def shipped_bits(section: str, entry: Mapping[str, Any]) -> int | None:
    """The weight bit-width of one compression.<section> entry, for ordering and grouping."""
    if section == "llmcompressor":
        scheme = entry.get("scheme")
        return SCHEME_BITS[scheme] if scheme else None
    if section == "gguf":
        return GGUF_BITS[entry["type"]]
    return entry.get("bits")
