"""Forecasting SAE feature damage before compressing: first-order noise propagation.

Rounding a weight to a grid of step `d` leaves an error close to uniform on [-d/2, d/2]:
variance d^2/12. Treating every compression error as independent zero-mean noise of that
variance, each feature's expected squared change is, to first order, the variance its
Jacobian passes on from every noise source. We estimate it without ever running a
compressed model: forward-mode AD (dual numbers) carries one random draw of the noise of
one source (one block matrix, one Linear's input, one attention module's KV cache)
through the FP forward to the SAE's codes; the tangent of the codes is the first-order
change of every feature at once, the activation function's derivative included.
Averaging its square over tokens and draws gives variance[scheme, source, feature].

Speed: each (source, distinct noise pattern) costs one dual forward from that source to
the hook, no further. Modules that finished before the source started replay their cached
FP outputs, schemes whose noise is proportional at a source (RTN at any bit-width on the
same grid, Q8_0 and Q4_0) share one pass, and the noise draws are spread over the
sequences (draw d on sequences d, d + n_samples, ...) instead of multiplying the passes.

Forecast -> tables: `forecast_table` (per variant and feature), `source_table` (per variant
and source, beside a measured leave-one-module-quantized run), and `forecast_accuracy`
(against the measured audit's feature table and the FP-statistics predictor).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import polars as pl
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from . import progress
from .config import FROM_SCHEMA, ConfigSection
from .models import HookPoint, as_out_in, blocks_of, family_of, from_out_in, resolve_hook
from .models import target_weights as _target_weights
from .prune import magnitude_mask
from .quantize import RTNSpec, fake_quantize, quantize_rtn
from .saes import SaeInput, sae_hook_name
from .table_docs import polars_schema
from .variants import FORECAST_GGUF_TYPES, Variant

SQRT12 = math.sqrt(12.0)
GGUF_TYPES = FORECAST_GGUF_TYPES
FLOAT_FORMATS = ("fp8",)
ACTIVATION_FORMATS = ("int8", "fp8")
KV_FORMATS = ("fp8", "int8")
GGUF_BLOCK = 32
FP8_MAX = 448.0  # float8 e4m3: largest finite value
FP8_MANTISSA_BITS = 3
FP8_MIN_NORMAL_EXP = -6  # below 2^-6 e4m3 is subnormal: a fixed step of 2^-9
# compressed-tensors' symmetric int8 scale: absmax / ((qmax - qmin) / 2) = absmax / 127.5
INT8_HALF_RANGE = 255 / 2
INPUT_SUFFIX = ":input"
KV_SUFFIX = ":kv"


@dataclass(frozen=True)
class ForecastConfig(ConfigSection, section="forecast"):
    """Config section `forecast`: how many tokens and noise draws the forward-AD passes use,
    and which variants get leave-one-module-quantized runs beside their forecast."""

    n_sequences: int = FROM_SCHEMA
    n_samples: int = FROM_SCHEMA
    batch_size: int = FROM_SCHEMA
    seed: int = FROM_SCHEMA
    measure: tuple[str, ...] = FROM_SCHEMA


# ---------------------------------------------------------------- noise schemes
@dataclass(frozen=True)
class NoiseScheme:
    """One variant's compression as independent rounding noise (see the module docstring).

    At most one weight part (`weights`, `gguf_type`, `float_weights`, `sparsity`), plus
    optional activation and KV-cache noise. A scheme with none of them forecasts zero.
    """

    name: str
    weights: RTNSpec | None = None
    gguf_type: str | None = None
    float_weights: str | None = None
    sparsity: float | None = None
    activations: str | None = None
    kv_cache: str | None = None

    def __post_init__(self) -> None:
        parts = [self.weights, self.gguf_type, self.float_weights, self.sparsity]
        if sum(p is not None for p in parts) > 1:
            raise ValueError(
                f"noise scheme {self.name!r}: at most one weight part (weights, gguf_type, "
                "float_weights, sparsity), since one compression writes each weight once"
            )
        _check_choice(self.name, "gguf_type", self.gguf_type, GGUF_TYPES)
        _check_choice(self.name, "float_weights", self.float_weights, FLOAT_FORMATS)
        _check_choice(self.name, "activations", self.activations, ACTIVATION_FORMATS)
        _check_choice(self.name, "kv_cache", self.kv_cache, KV_FORMATS)
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"noise scheme {self.name!r}: sparsity must be in [0, 1)")

    @property
    def has_weight_noise(self) -> bool:
        parts = (self.weights, self.gguf_type, self.float_weights, self.sparsity)
        return any(p is not None for p in parts)


def _check_choice(name: str, key: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"noise scheme {name!r}: {key}={value!r} is not one of {choices}")


def fp8_relative_std(scaled: torch.Tensor) -> torch.Tensor:
    """Rounding-noise std of e4m3 at values already scaled into its range.

    The step at x is 2^(floor(log2|x|) - 3) (three mantissa bits), constant 2^-9 in the
    subnormal range below 2^-6; the noise std is step / sqrt(12).
    """
    a = scaled.abs().to(torch.float32).clamp_min(2.0**FP8_MIN_NORMAL_EXP)
    exponent = torch.floor(torch.log2(a))
    return torch.exp2(exponent - FP8_MANTISSA_BITS) / SQRT12


def _fp8_std(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """fp8 noise std of x quantized with scale absmax / 448 (broadcast), in x's units."""
    scale = absmax.to(torch.float32) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return fp8_relative_std(x.to(torch.float32) / scale) * scale


def _rtn_std(w: torch.Tensor, spec: RTNSpec) -> torch.Tensor:
    # The scale quantize_rtn itself uses, so forecast and compression cannot drift apart.
    q = quantize_rtn(w, spec)
    cols = w.shape[1]
    return q.scale.repeat_interleave(q.group_size, dim=1)[:, :cols] / SQRT12


def _gguf_std(w: torch.Tensor, gguf_type: str) -> torch.Tensor:
    out, cols = w.shape
    if cols % GGUF_BLOCK:
        raise ValueError(
            f"{gguf_type} quantizes rows in blocks of {GGUF_BLOCK}; a row of {cols} values "
            "does not divide into them"
        )
    blocks = w.to(torch.float32).reshape(out, cols // GGUF_BLOCK, GGUF_BLOCK)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    # Q8_0: d = absmax / 127. Q4_0: d = (value of largest magnitude) / -8, step |d|.
    step = absmax / (127.0 if gguf_type == "Q8_0" else 8.0)
    return (step / SQRT12).expand_as(blocks).reshape(out, cols)


def weight_noise_std(weight_out_in: torch.Tensor, scheme: NoiseScheme) -> torch.Tensor:
    """Per-element std (float32, [out, in]) of the error `scheme` leaves in a weight.

    Zeros when the scheme does not touch weights. Pruning's error is the removed value
    itself: std |w| where pruned (its sign is what the random draw randomizes).
    """
    w = weight_out_in.detach().to(torch.float32)
    if w.dim() != 2:
        raise ValueError(f"weight_noise_std expects an [out, in] matrix, got {tuple(w.shape)}")
    if scheme.weights is not None:
        return _rtn_std(w, scheme.weights)
    if scheme.gguf_type is not None:
        return _gguf_std(w, scheme.gguf_type)
    if scheme.float_weights is not None:
        return _fp8_std(w, w.abs().amax(dim=1, keepdim=True))
    if scheme.sparsity is not None:
        return w.abs() * (~magnitude_mask(w, scheme.sparsity)).to(torch.float32)
    return torch.zeros_like(w)


def activation_noise_std(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Std of dynamic per-token quantization of a Linear's input [..., d] (float32).

    int8: step = max|x_t| / 127.5 per token (compressed-tensors' symmetric scale), uniform
    over the token's entries; fp8: e4m3 rounding with the token's absmax scaled to 448.
    """
    absmax = x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32)
    if kind == "int8":
        return (absmax / INT8_HALF_RANGE / SQRT12).expand(x.shape)
    return _fp8_std(x.detach(), absmax)


def kv_noise_std(x: torch.Tensor, absmax: float, kind: str) -> torch.Tensor:
    """Std of static per-tensor quantization of keys or values with a calibrated absmax."""
    if kind == "int8":
        std = absmax / INT8_HALF_RANGE / SQRT12
        return torch.full(x.shape, std, dtype=torch.float32, device=x.device)
    return _fp8_std(x.detach(), torch.tensor(absmax, device=x.device))


# ---------------------------------------------------------------- variants -> schemes
# compressed-tensors' presets as installed (preset_name_to_scheme; tests hold this to it).
# W8A16 is group-wise (128) there, like W4A16. FP8 scales weights and activations per
# tensor from calibration, FP8_DYNAMIC per channel and per token: fp8 rounding noise is
# relative (3 mantissa bits at any scale), so both get the same noise model.
_LC_WEIGHTS: dict[str, RTNSpec | str] = {
    "W4A16": RTNSpec(bits=4, group_size=128, full_range=True),
    "W4A16_ASYM": RTNSpec(bits=4, symmetric=False, group_size=128),
    "W8A16": RTNSpec(bits=8, group_size=128, full_range=True),
    "W8A8": RTNSpec(bits=8, full_range=True),
    "FP8": "fp8",
    "FP8_DYNAMIC": "fp8",
}
_LC_ACTIVATIONS: dict[str, str] = {"W8A8": "int8", "FP8": "fp8", "FP8_DYNAMIC": "fp8"}


def scheme_for_variant(
    variant: Variant, entry: Mapping[str, Any] | None = None, sparsity: float | None = None
) -> NoiseScheme | None:
    """The noise model of a variant; None where it has none (FP, controls, external
    artifacts, GGUF types other than Q8_0/Q4_0, unknown llm-compressor schemes).

    `entry` is the variant's config entry (gguf, llmcompressor), `sparsity` the matched
    sparsity of a prune-matched variant.
    """
    from .checkpoints import rtn_spec

    name = variant.name
    if variant.kind == "rtn":
        return NoiseScheme(name, weights=rtn_spec(variant))
    if variant.kind == "prune":
        return NoiseScheme(name, sparsity=variant.sparsity)
    if variant.kind == "prune-matched":
        if sparsity is None:
            raise ValueError(f"variant {name!r}: pass the sparsity its matched search chose")
        return NoiseScheme(name, sparsity=float(sparsity))
    if variant.kind in ("gguf", "llmcompressor"):
        if entry is None:
            raise ValueError(
                f"variant {name!r}: pass its config entry (compression.*.{variant.key})"
            )
        if variant.kind == "gguf":
            gguf_type = entry.get("type")
            return NoiseScheme(name, gguf_type=gguf_type) if gguf_type in GGUF_TYPES else None
        return _llmcompressor_scheme(name, entry)
    return None


def _llmcompressor_scheme(name: str, entry: Mapping[str, Any]) -> NoiseScheme | None:
    """An llm-compressor entry as noise: the preset's grid, activations and KV cache.

    GPTQ and AWQ choose their roundings (and AWQ its scales) to cancel error, and
    SmoothQuant moves activation range into the weights; the forecast gives them the same
    grid noise as RTN on that grid, so it is an upper bound for them.
    """
    preset, kv = entry.get("scheme"), entry.get("kv_cache")
    if preset is None:
        return NoiseScheme(name, kv_cache=kv) if kv else None
    if preset not in _LC_WEIGHTS:
        return None
    weights = _LC_WEIGHTS[preset]
    group_size = entry.get("group_size")
    if isinstance(weights, RTNSpec):
        if group_size is not None:
            weights = replace(weights, group_size=int(group_size))
        return NoiseScheme(
            name, weights=weights, activations=_LC_ACTIVATIONS.get(preset), kv_cache=kv
        )
    return NoiseScheme(
        name, float_weights=weights, activations=_LC_ACTIVATIONS.get(preset), kv_cache=kv
    )


# ---------------------------------------------------------------- the forecast
@dataclass
class Forecast:
    """variance[s, m, f]: expected squared first-order change of feature f's activation
    caused by source m's noise under scheme s, averaged over `n_tokens` tokens."""

    schemes: list[str]
    sources: list[str]
    variance: np.ndarray  # [n_schemes, n_sources, d_sae] float64
    fp_mean: np.ndarray  # [d_sae] FP activation mean over the same tokens
    fp_variance: np.ndarray  # [d_sae] FP activation variance (population)
    n_tokens: int


class _Stop(Exception):
    """Raised from the hook to end a forward once the SAE's input exists."""


@dataclass
class _Order:
    """One plain forward's module calls: start/finish event numbers and call counts."""

    start: dict[str, int] = field(default_factory=dict)
    finish: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


@dataclass
class _Group:
    """Schemes sharing one noise pattern at a source: one dual pass serves them all.

    `members` are (scheme index, variance factor relative to the pattern).
    """

    key: str  # the pattern's std (weights) or the noise kind (input, kv)
    std: torch.Tensor | None  # weight sources: [out, in] std of the pattern
    members: list[tuple[int, float]]


@dataclass
class _Source:
    name: str
    kind: str  # "weight", "input" or "kv"
    modules: list[str]  # where the tangent enters (kv: k and v producing Linears)
    skip: list[str]  # modules that finished before it started: replayed from cache
    groups: list[_Group]
    roles: dict[str, torch.Tensor] = field(default_factory=dict)  # kv: 1 key, 2 value
    kv_absmax: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def key(self) -> int:
        """A seed part that names the source (stable across runs and source lists)."""
        return zlib.crc32(self.name.encode())


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Eager attention for the duration: SDPA's CPU kernels have no forward-AD formula."""
    config: Any = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in (None, "eager"):
        yield
        return
    setter = cast(Callable[[str], None], getattr(model, "set_attn_implementation"))  # noqa: B009
    setter("eager")
    try:
        yield
    finally:
        setter(impl)


def _first(value: object) -> torch.Tensor:
    tensor = value[0] if isinstance(value, tuple | list) else value
    assert isinstance(tensor, torch.Tensor)
    return tensor


@contextmanager
def _capture(model: nn.Module, point: HookPoint, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record the hooked activation into store["acts"] and stop the forward there."""
    module = model.get_submodule(point.module)

    def grab(value: object) -> None:
        store["acts"] = _first(value)
        raise _Stop

    if point.use_input:
        handle = module.register_forward_pre_hook(
            lambda _m, args, kwargs: grab(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: grab(out))
    try:
        yield
    finally:
        handle.remove()


def _run(model: nn.Module, ids: torch.Tensor) -> None:
    with suppress(_Stop):
        model(input_ids=ids, use_cache=False)


def _hooked_run(
    model: nn.Module, point: HookPoint, ids: torch.Tensor, handles: list[Any]
) -> torch.Tensor:
    """One forward up to the hook with `handles` installed, removed afterwards whatever
    happens; the hooked activation."""
    store: dict[str, torch.Tensor] = {}
    try:
        with _capture(model, point, store):
            _run(model, ids)
    finally:
        for h in handles:
            h.remove()
    return store["acts"]


def _call_order(model: nn.Module, point: HookPoint, ids: torch.Tensor) -> _Order:
    """Module call order of one forward, up to the hook (which modules feed it and which
    finished before which started)."""
    order, counter, handles = _Order(), [0], []

    def on_start(name: str) -> None:
        order.calls[name] = order.calls.get(name, 0) + 1
        order.start.setdefault(name, counter[0])
        counter[0] += 1

    def on_finish(name: str) -> None:
        order.finish.setdefault(name, counter[0])
        counter[0] += 1

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: on_start(n)))
            handles.append(module.register_forward_hook(lambda *_, n=name: on_finish(n)))
    _hooked_run(model, point, ids, handles)
    return order


def _skip_set(order: _Order, starts_at: int) -> list[str]:
    """The outermost modules, each called once, that finished before event `starts_at`."""
    done = {n for n, f in order.finish.items() if f < starts_at and order.calls.get(n, 0) == 1}
    return sorted(n for n in done if n.rpartition(".")[0] not in done)


_KV_LAYOUT: dict[str, tuple[str, tuple[str, ...]]] = {
    # model_type -> (attention module path in a block, the Linears producing k and v)
    "gpt_neox": ("attention", ("query_key_value",)),
    "gpt2": ("attn", ("c_attn",)),
}
_KV_LLAMA = ("self_attn", ("k_proj", "v_proj"))


def _kv_modules(model: nn.Module, upstream: set[str]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(attention module, {Linear: role over its output's last dim}) per upstream block.

    Roles: 0 query, 1 key, 2 value. GPT-NeoX interleaves heads as [n_head, 3, head_dim]
    (its attention views the fused output that way and chunks q, k, v per head); GPT-2
    concatenates [q | k | v]; Llama-like families have separate k_proj and v_proj. The
    deployed cache quantizes keys after rotary embedding; noise entered before it has the
    same distribution for int8 (a rotation of isotropic noise) and nearly so for fp8.
    """
    family = family_of(model)
    config: Any = getattr(model, "config")  # noqa: B009
    model_type = str(config.model_type)
    attn, linears = _KV_LAYOUT.get(model_type, _KV_LLAMA)
    hidden = int(config.hidden_size)
    out = []
    for i, _ in enumerate(blocks_of(model)):
        prefix = f"{family.blocks}.{i}.{attn}"
        roles: dict[str, torch.Tensor] = {}
        for lin in linears:
            path = f"{prefix}.{lin}"
            if path not in upstream:
                continue
            width = int(_out_in(model, path).shape[0])
            idx = torch.arange(width)
            if model_type == "gpt_neox":
                head = hidden // int(config.num_attention_heads)
                roles[path] = (idx // head) % 3
            elif model_type == "gpt2":
                roles[path] = idx // hidden
            else:
                roles[path] = torch.full((width,), 1 if lin == "k_proj" else 2)
        if roles:
            out.append((prefix, roles))
    return out


def _out_in(model: nn.Module, module_path: str) -> torch.Tensor:
    return as_out_in(model.get_parameter(f"{module_path}.weight").detach(), model)


def _weight_groups(w: torch.Tensor, schemes: Sequence[NoiseScheme]) -> list[_Group]:
    """Group the schemes whose std at this weight is proportional (one pass each group)."""
    groups: list[_Group] = []
    for s, scheme in enumerate(schemes):
        if not scheme.has_weight_noise:
            continue
        std = weight_noise_std(w, scheme)
        norm = float(std.norm())
        if norm == 0.0:
            continue
        for g in groups:
            assert g.std is not None
            ref = float(g.std.norm())
            if torch.allclose(std / norm, g.std / ref, rtol=1e-5, atol=1e-8):
                g.members.append((s, (norm / ref) ** 2))
                break
        else:
            groups.append(_Group(key=f"weights#{len(groups)}", std=std, members=[(s, 1.0)]))
    return groups


def _kind_groups(schemes: Sequence[NoiseScheme], attr: str) -> list[_Group]:
    kinds: dict[str, list[tuple[int, float]]] = {}
    for s, scheme in enumerate(schemes):
        kind = getattr(scheme, attr)
        if kind is not None:
            kinds.setdefault(kind, []).append((s, 1.0))
    return [_Group(key=k, std=None, members=m) for k, m in kinds.items()]


def _plan_sources(model: nn.Module, order: _Order, schemes: Sequence[NoiseScheme]) -> list[_Source]:
    """Every noise source upstream of the hook that some scheme perturbs."""
    upstream = set(order.start)
    sources: list[_Source] = []
    weights = [
        (name, name.removesuffix(".weight"))
        for name, _ in _target_weights(model)
        if name.removesuffix(".weight") in upstream
    ]
    for name, path in weights:
        groups = _weight_groups(_out_in(model, path), schemes)
        if groups:
            skip = _skip_set(order, order.start[path])
            sources.append(_Source(name, "weight", [path], skip, groups))
    input_groups = _kind_groups(schemes, "activations")
    if input_groups:
        for _, path in weights:
            skip = _skip_set(order, order.start[path])
            sources.append(_Source(path + INPUT_SUFFIX, "input", [path], skip, input_groups))
    kv_groups = _kind_groups(schemes, "kv_cache")
    if kv_groups:
        for attn, roles in _kv_modules(model, upstream):
            first = min(order.start[p] for p in roles)
            source = _Source(attn + KV_SUFFIX, "kv", sorted(roles), _skip_set(order, first),
                             kv_groups, roles=roles)  # fmt: skip
            sources.append(source)
    return sources


def _calibrate_kv(
    model: nn.Module, point: HookPoint, batches: list[torch.Tensor], sources: list[_Source]
) -> None:
    """Static per-tensor KV absmax over the forecast tokens (key, value) per Linear."""
    kv = [s for s in sources if s.kind == "kv"]
    if not kv:
        return
    absmax = {p: [0.0, 0.0] for s in kv for p in s.modules}
    roles = {p: r for s in kv for p, r in s.roles.items()}

    def record(path: str, out: torch.Tensor) -> None:
        role = roles[path].to(out.device)
        for j, which in enumerate((1, 2)):
            sel = out[..., role == which]
            if sel.numel():
                absmax[path][j] = max(absmax[path][j], float(sel.abs().amax()))

    def recorder(path: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        return lambda _m, _a, out: record(path, out)

    handles = [model.get_submodule(p).register_forward_hook(recorder(p)) for p in absmax]
    store: dict[str, torch.Tensor] = {}
    try:
        with _capture(model, point, store):
            for ids in batches:
                _run(model, ids)
    finally:
        for h in handles:
            h.remove()
    for s in kv:
        s.kv_absmax = {p: (absmax[p][0], absmax[p][1]) for p in s.modules}


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _normal(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """Standard normal noise, drawn on the CPU (the same numbers on any device)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


class _Replay:
    """Make modules return cached FP outputs instead of computing them."""

    def __init__(self, model: nn.Module, cache: dict[str, object], names: list[str]):
        self.modules = [(model.get_submodule(n), cache[n]) for n in names]
        self.saved: list[object | None] = []

    def __enter__(self) -> None:
        for module, out in self.modules:
            self.saved.append(module.__dict__.get("forward"))
            module.forward = _replayer(out)  # type: ignore[method-assign]

    def __exit__(self, *_: object) -> None:
        for (module, _out), old in zip(self.modules, self.saved, strict=True):
            if old is None:
                del module.forward
            else:
                module.forward = old  # type: ignore[method-assign]
        self.saved.clear()


def _replayer(out: object) -> Callable[..., object]:
    return lambda *_args, **_kwargs: _clone(out)


def _clone(value: object) -> object:
    # A fresh copy each pass, so nothing downstream can modify the cache in place.
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(v) for v in value)
    return value


@dataclass
class _Batch:
    ids: torch.Tensor
    draws: torch.Tensor  # [B] noise draw of each sequence
    index: int
    acts: torch.Tensor  # FP activation at the hook
    cache: dict[str, object]  # FP outputs of the modules sources skip
    encode_jvp: Callable[[torch.Tensor], torch.Tensor]  # d codes for a d acts
    seed: int
    eps: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def weight_eps(self, source: _Source, std: torch.Tensor) -> dict[int, torch.Tensor]:
        """Draw d's standard normal noise for a weight: the same in every batch (one draw
        is one fixed compression error), for every group of the source, and whichever
        other sources and schemes a forecast has (seeded by the source's name)."""
        if source.name not in self.eps:
            self.eps = {source.name: {
                d: _normal(tuple(std.shape), _seed_of(self.seed, source.key, d), std.device)
                for d in self.draws.unique().tolist()
            }}  # fmt: skip
        return self.eps[source.name]


def _tangent_maker(
    source: _Source, group: _Group, batch: _Batch, model: nn.Module
) -> Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]:
    """tangent(module path, module input, module output) for one pass."""
    if source.kind == "weight":
        assert group.std is not None
        std = group.std

        def weight_tangent(_path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(y)
            for d, eps in batch.weight_eps(source, std).items():
                rows = batch.draws == d
                out[rows] = x[rows] @ (std * eps).to(x.dtype).t()
            return out

        return weight_tangent
    # dynamic rounding: fresh noise per token, so per batch
    gen_seed = _seed_of(batch.seed, source.key, batch.index, 1)
    if source.kind == "input":

        def input_tangent(path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            std = activation_noise_std(x, group.key)
            noise = (std * _normal(tuple(x.shape), gen_seed, x.device)).to(x.dtype)
            w = _out_in(model, path).to(device=x.device, dtype=x.dtype)
            return noise @ w.t()

        return input_tangent

    def kv_tangent(path: str, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        role = source.roles[path].to(y.device)
        out = torch.zeros_like(y)
        eps = _normal(tuple(y.shape), _seed_of(gen_seed, source.modules.index(path)), y.device)
        for j, which in enumerate((1, 2)):
            sel = role == which
            if bool(sel.any()):
                part = y[..., sel]
                std = kv_noise_std(part, source.kv_absmax[path][j], group.key)
                out[..., sel] = (std * eps[..., sel]).to(y.dtype)
        return out

    return kv_tangent


def _dual_pass(
    model: nn.Module, point: HookPoint, batch: _Batch, source: _Source,
    make: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor], check: bool = True,
) -> torch.Tensor | None:  # fmt: skip
    """First-order change of every feature's code [B, T, d_sae] (None: none reaches it).

    `check`: compare the pass's primal activation with the FP one (the replayed modules
    must not change the forward; once per source and batch suffices)."""
    handles = []
    for path in source.modules:

        def inject(_m: nn.Module, args: tuple, out: torch.Tensor, path: str = path) -> Any:
            return fwAD.make_dual(out, make(path, args[0], out))

        handles.append(model.get_submodule(path).register_forward_hook(inject))
    store: dict[str, torch.Tensor] = {}
    try:
        with fwAD.dual_level(), _Replay(model, batch.cache, source.skip):
            with _capture(model, point, store):
                _run(model, batch.ids)
            primal, tangent = fwAD.unpack_dual(store["acts"])
            primal, tangent = primal.clone(), None if tangent is None else tangent.clone()
    finally:
        for h in handles:
            h.remove()
    if check and not torch.allclose(primal, batch.acts, rtol=1e-4, atol=1e-5):
        raise RuntimeError(
            f"replaying cached FP outputs of {source.skip} changed the hooked activation in "
            f"the pass for {source.name}: this model's forward does not fit the forecast's "
            "shortcut"
        )
    return None if tangent is None else batch.encode_jvp(tangent)


def _encode_jvp(
    sae: Any, sae_in: SaeInput, acts: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The SAE encoder's Jacobian-vector product at the FP activations.

    torch.func.linearize traces the encoder once per batch and then computes tangents
    only (a third of a dual encode on the fixture); where it cannot trace an encoder,
    each call runs the encoder on dual numbers instead.
    """

    def encode(x: torch.Tensor) -> torch.Tensor:
        return sae.encode(sae_in.prepare(x))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, jvp = torch.func.linearize(encode, acts)
        return jvp
    except Exception:  # any tracing failure: the dual path is always valid

        def dual(tangent: torch.Tensor) -> torch.Tensor:
            with fwAD.dual_level():
                out = fwAD.unpack_dual(encode(fwAD.make_dual(acts, tangent))).tangent
            if out is None:  # the codes do not depend on the input (a constant encoder)
                return acts.new_zeros((*acts.shape[:-1], int(sae.cfg.d_sae)))
            return out

        return dual


def _sum_squares(delta: torch.Tensor) -> np.ndarray:
    """Per-feature sum of squares over every leading dimension, in float64."""
    flat = delta.reshape(-1, delta.shape[-1]).float()  # squares of bf16 lose too much
    return (flat * flat).sum(dim=0, dtype=torch.float64).cpu().numpy()


def _fp_batch(
    model: nn.Module, point: HookPoint, ids: torch.Tensor, cached: set[str]
) -> tuple[torch.Tensor, dict[str, object]]:
    """The FP hooked activation, and the outputs of the modules some source skips."""
    cache: dict[str, object] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _a, out, n=n: cache.__setitem__(n, out)
        )
        for n in cached
    ]
    return _hooked_run(model, point, ids, handles), cache


class _Moments:
    """Streaming mean and population variance per feature (Chan's parallel update)."""

    def __init__(self, d: int):
        self.n, self.mean, self.m2 = 0, np.zeros(d), np.zeros(d)

    def add(self, codes: torch.Tensor) -> None:
        x = codes.reshape(-1, codes.shape[-1]).double().cpu().numpy()
        n_b, mean_b = x.shape[0], x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta**2 * self.n * n_b / n
        self.n = n

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / max(self.n, 1)


def forecast_variances(
    model: nn.Module,
    sae: Any,
    sae_in: SaeInput,
    tokens: torch.Tensor,
    schemes: Sequence[NoiseScheme],
    *,
    n_samples: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> Forecast:
    """Per scheme, source and feature: the expected variance over tokens of the first-order
    change of the feature's activation that the source's noise causes (its mean over the
    tokens of one noise draw taken out: Pearson r ignores a constant shift; see the
    module docstring).

    `tokens` [n_seq, seq_len] int64; the model and SAE must already be on `device`.
    `n_samples` independent noise draws per weight, draw d applied to sequences d,
    d + n_samples, ... (more draws cost nothing but random numbers). Activation and KV
    noise is drawn afresh per token, as dynamic rounding is.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n_seq, seq_len], got {tuple(tokens.shape)}")
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    point = resolve_hook(model, sae_hook_name(sae))
    ids = tokens.to(device=device, dtype=torch.long)
    batches = [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    d_sae = int(sae.cfg.d_sae)
    with _eager_attention(model), torch.no_grad():
        order = _call_order(model, point, ids[:1])
        sources = _plan_sources(model, order, schemes)
        _calibrate_kv(model, point, batches, sources)
        sums = [np.zeros((len(s.groups), d_sae)) for s in sources]
        # per draw: the sum of the change and its token count, to take out the change's
        # mean over tokens (Pearson r is blind to a constant shift)
        firsts = [np.zeros((len(s.groups), n_samples, d_sae)) for s in sources]
        counts = np.zeros(n_samples)
        moments = _Moments(d_sae)
        cached = {n for s in sources for n in s.skip}
        total = len(batches) * len(sources)
        with progress.bar(total=total, desc="forecast", unit="source-batch") as bar:
            start = 0
            for b, batch_ids in enumerate(batches):
                acts, cache = _fp_batch(model, point, batch_ids, cached)
                moments.add(sae.encode(sae_in.prepare(acts)))
                draws = torch.arange(start, start + batch_ids.shape[0], device=ids.device)
                jvp = _encode_jvp(sae, sae_in, acts)
                batch = _Batch(batch_ids, draws % n_samples, b, acts, cache, jvp, seed)
                start += batch_ids.shape[0]
                draw_of = (draws % n_samples).cpu().numpy()
                np.add.at(counts, draw_of, batch_ids.shape[1])
                for m, source in enumerate(sources):
                    for g, group in enumerate(source.groups):
                        make = _tangent_maker(source, group, batch, model)
                        delta = _dual_pass(model, point, batch, source, make, check=g == 0)
                        if delta is not None:
                            sums[m][g] += _sum_squares(delta)
                            per_row = delta.sum(dim=1, dtype=torch.float64).cpu().numpy()
                            np.add.at(firsts[m][g], draw_of, per_row)
                    bar.update(1)
    n_tokens = int(ids.numel())
    variance = np.zeros((len(schemes), len(sources), d_sae))
    used = counts > 0
    for m, source in enumerate(sources):
        for g, group in enumerate(source.groups):
            # variance over tokens within each draw, pooled: sum of squares less each
            # draw's (sum)^2 / count
            shift = (firsts[m][g][used] ** 2 / counts[used][:, None]).sum(axis=0)
            centered = np.maximum(sums[m][g] - shift, 0.0)
            for s, factor in group.members:
                variance[s, m] += factor * centered / n_tokens
    return Forecast(
        schemes=[s.name for s in schemes],
        sources=[s.name for s in sources],
        variance=variance,
        fp_mean=moments.mean,
        fp_variance=moments.variance,
        n_tokens=n_tokens,
    )


def feature_jvp(
    model: nn.Module,
    sae: Any,
    sae_in: SaeInput,
    tokens: torch.Tensor,
    weight: str,
    direction: torch.Tensor,
) -> torch.Tensor:
    """[n_seq, seq_len, d_sae]: d codes / d t of the weight `weight` (a target weight's name)
    moved to W + t * direction ([out, in]), at t = 0: the forecast's propagation for one
    fixed direction, which a finite difference can check."""
    path = weight.removesuffix(".weight")
    point = resolve_hook(model, sae_hook_name(sae))
    ids = tokens.to(dtype=torch.long)
    source = _Source(weight, "weight", [path], [], [])
    with _eager_attention(model), torch.no_grad():
        acts, _ = _fp_batch(model, point, ids, set())
        batch = _Batch(ids, torch.zeros(len(ids)), 0, acts, {}, _encode_jvp(sae, sae_in, acts), 0)
        d = direction.to(device=acts.device, dtype=acts.dtype)
        delta = _dual_pass(model, point, batch, source, lambda _p, x, _y: x @ d.t())
    return torch.zeros((*acts.shape[:-1], int(sae.cfg.d_sae))) if delta is None else delta


# ---------------------------------------------------------------- measured counterpart
def compressed_weight(weight_out_in: torch.Tensor, scheme: NoiseScheme) -> torch.Tensor:
    """The weight as `scheme`'s real method leaves it ([out, in], float32)."""
    w = weight_out_in.detach().to(torch.float32)
    if scheme.weights is not None:
        return fake_quantize(w, scheme.weights)
    if scheme.gguf_type is not None:
        import gguf

        qtype = getattr(gguf.GGMLQuantizationType, scheme.gguf_type)
        data = np.ascontiguousarray(w.cpu().numpy(), dtype=np.float32)
        back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
        return torch.from_numpy(np.asarray(back, dtype=np.float32).reshape(w.shape)).to(w.device)
    if scheme.float_weights is not None:
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    if scheme.sparsity is not None:
        return w * magnitude_mask(w, scheme.sparsity).to(torch.float32)
    raise ValueError(f"noise scheme {scheme.name!r} has no weight part to measure")


def _codes(
    model: nn.Module, sae: Any, sae_in: SaeInput, point: HookPoint, batches: list[torch.Tensor]
) -> list[torch.Tensor]:
    store: dict[str, torch.Tensor] = {}
    out = []
    with _capture(model, point, store):
        for ids in batches:
            _run(model, ids)
            out.append(sae.encode(sae_in.prepare(store["acts"])))
    return out


def measure_source_variances(
    model: nn.Module,
    sae: Any,
    sae_in: SaeInput,
    tokens: torch.Tensor,
    scheme: NoiseScheme,
    sources: Sequence[str],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """[n_sources, d_sae]: the variance over tokens of a_variant - a_fp with only that one
    block matrix compressed by the scheme's real method (leave-one-module-quantized).

    Only weight sources can be measured this way; anything else raises ValueError.
    """
    targets = dict(_target_weights(model))
    unknown = [s for s in sources if s not in targets]
    if unknown:
        raise ValueError(
            f"measure_source_variances measures block matrices only; not one: {unknown}"
        )
    if not scheme.has_weight_noise:
        raise ValueError(f"noise scheme {scheme.name!r} has no weight part to measure")
    point = resolve_hook(model, sae_hook_name(sae))
    ids = tokens.to(device=device, dtype=torch.long)
    batches = [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    d_sae = int(sae.cfg.d_sae)
    squares, firsts = np.zeros((len(sources), d_sae)), np.zeros((len(sources), d_sae))
    params = [targets[name] for name in sources]
    with torch.no_grad():
        # each matrix compressed once; batch by batch, FP codes once and each matrix swapped
        # in and back, so no tokens x features matrix outlives its batch
        compressed = [
            from_out_in(compressed_weight(as_out_in(p.data, model), scheme), model).to(p.dtype)
            for p in params
        ]
        with progress.bar(
            total=len(batches) * len(params), desc="measure", unit="source-batch"
        ) as bar:
            for batch in batches:
                (fp,) = _codes(model, sae, sae_in, point, [batch])
                for m, (param, changed) in enumerate(zip(params, compressed, strict=True)):
                    original = param.data.clone()
                    try:
                        param.data.copy_(changed)
                        (variant,) = _codes(model, sae, sae_in, point, [batch])
                    finally:
                        param.data.copy_(original)
                    diff = variant - fp
                    squares[m] += _sum_squares(diff)
                    firsts[m] += (
                        diff.reshape(-1, d_sae).sum(dim=0, dtype=torch.float64).cpu().numpy()
                    )
                    bar.update(1)
    n = max(int(ids.numel()), 1)
    # the change's variance over tokens, as the forecast's (its mean taken out)
    out = np.maximum(squares - firsts**2 / n, 0.0)
    return out / max(int(ids.numel()), 1)


# ---------------------------------------------------------------- tables
def forecast_table(forecast: Forecast) -> pl.DataFrame:
    """Per (variant, feature): the forecast noise, correlation and its top source.

    forecast_r = sqrt(fp_variance / (fp_variance + noise_variance)): the Pearson r of FP
    against FP plus independent noise of that variance. A feature with no FP variance on
    these tokens is `silent`: its r is undefined (null), never NaN.
    """
    n_s, n_m, d = forecast.variance.shape
    noise = forecast.variance.sum(axis=1)  # [n_s, d]
    fp_var = np.broadcast_to(forecast.fp_variance, (n_s, d))
    silent = fp_var <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(fp_var / (fp_var + noise))
        top = forecast.variance.argmax(axis=1) if n_m else np.zeros((n_s, d), dtype=np.int64)
        top_share = forecast.variance.max(axis=1) / noise if n_m else np.zeros((n_s, d))
    r = np.where(noise == 0, 1.0, r)
    quiet = noise <= 0
    names = np.array(forecast.sources or [""], dtype=object)
    return pl.DataFrame(
        {
            "variant": np.repeat(np.array(forecast.schemes, dtype=object), d),
            "feature": np.tile(np.arange(d, dtype=np.int32), n_s),
            "fp_variance": fp_var.reshape(-1),
            "noise_variance": noise.reshape(-1),
            "forecast_r": _nullable(r, silent),
            "forecast_damage": _nullable(1.0 - r, silent),
            "silent": silent.reshape(-1),
            "top_source": pl.Series(names[top].reshape(-1), dtype=pl.String).set(
                pl.Series(quiet.reshape(-1)), None
            ),
            "top_source_fraction": _nullable(top_share, quiet),
        },
        schema_overrides={"variant": pl.String, "feature": pl.Int32},
    )


def _nullable(values: np.ndarray, null: np.ndarray) -> pl.Series:
    """Float64 series with nulls where `null` (and wherever a value is not finite)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    mask = np.asarray(null).reshape(-1) | ~np.isfinite(v)
    return pl.Series(np.where(mask, 0.0, v)).set(pl.Series(mask), None)


def _ranks(shares: np.ndarray) -> np.ndarray:
    """1 = largest; ties share the best rank."""
    from scipy.stats import rankdata

    return rankdata(-shares, method="min").astype(np.int32)


def source_table(
    forecast: Forecast,
    measured: Mapping[str, np.ndarray] | None = None,
    sources_measured: Sequence[str] | None = None,
    features: np.ndarray | None = None,
) -> pl.DataFrame:
    """Per (variant, source): its share of the summed noise over `features` (default:
    every non-silent one), its rank, the same for a measured run where given, and how
    many features it is the top source of.

    `measured[variant]` is measure_source_variances' [len(sources_measured), d_sae] array;
    measured shares and ranks are among the measured sources only, null elsewhere.
    """
    feats = np.flatnonzero(forecast.fp_variance > 0) if features is None else np.asarray(features)
    if not forecast.sources:
        return pl.DataFrame(schema=_SOURCE_SCHEMA)
    measured = measured or {}
    if measured and sources_measured is None:
        sources_measured = forecast.sources
    rows = []
    for s, variant in enumerate(forecast.schemes):
        v = forecast.variance[s][:, feats]  # [n_sources, n_feats]
        per_source = v.sum(axis=1)
        total = float(per_source.sum())
        ranks = _ranks(per_source) if total > 0 else None
        noisy = v.sum(axis=0) > 0
        led = np.bincount(v.argmax(axis=0)[noisy], minlength=len(forecast.sources))
        m_share, m_rank = _measured(measured.get(variant), sources_measured, feats)
        for m, source in enumerate(forecast.sources):
            rows.append(
                {
                    "variant": variant,
                    "source": source,
                    "forecast_fraction": per_source[m] / total if total > 0 else None,
                    "forecast_rank": int(ranks[m]) if ranks is not None else None,
                    "measured_fraction": m_share.get(source),
                    "measured_rank": m_rank.get(source),
                    "n_features_led": int(led[m]) if len(led) else 0,
                }
            )
    return pl.DataFrame(rows, schema=_SOURCE_SCHEMA)


# The per-source table's columns, documented in tables.schema.yaml (forecast_sources).
_SOURCE_SCHEMA = polars_schema("forecast_sources")


def _measured(
    values: np.ndarray | None, names: Sequence[str] | None, feats: np.ndarray
) -> tuple[dict[str, float], dict[str, int]]:
    if values is None or names is None:
        return {}, {}
    if values.shape[0] != len(names):
        raise ValueError(
            f"measured array has {values.shape[0]} rows for {len(names)} sources_measured"
        )
    per_source = values[:, feats].sum(axis=1)
    total = float(per_source.sum())
    if total <= 0:
        return {}, {}
    ranks = _ranks(per_source)
    return (
        {n: float(per_source[i] / total) for i, n in enumerate(names)},
        {n: int(ranks[i]) for i, n in enumerate(names)},
    )


# ---------------------------------------------------------------- accuracy
LOG_RATIO_CLIP = 30.0  # |log(noise / fp variance)| beyond this carries no more information

# The accuracy table's columns, documented in tables.schema.yaml (forecast_accuracy).
ACCURACY_SCHEMA = polars_schema("forecast_accuracy")


def _joined(forecast: pl.DataFrame, features: pl.DataFrame) -> pl.DataFrame:
    """Active, classed (not insufficient), non-silent features with both tables' columns."""
    from .survival import INSUFFICIENT

    feats = features.filter(
        pl.col("active").fill_null(False)
        & pl.col("class").is_not_null()
        & (pl.col("class") != INSUFFICIENT)
        & pl.col("damage").is_not_null()
    )
    fc = forecast.filter(~pl.col("silent") & pl.col("forecast_damage").is_not_null()).select(
        "variant", "feature", "forecast_damage", "noise_variance", "fp_variance"
    )
    return feats.join(
        fc.with_columns(pl.col("feature").cast(feats.schema["feature"])),
        on=["variant", "feature"],
        how="inner",
    )


def _design(table: pl.DataFrame, predictors: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """FP-statistics matrix and the combined one (plus clipped log noise-to-signal)."""
    from .predict import predictor_matrix

    x = predictor_matrix(table, predictors)
    ratio = (
        table.get_column("noise_variance").to_numpy() / table.get_column("fp_variance").to_numpy()
    )
    with np.errstate(divide="ignore"):
        log_ratio = np.clip(np.log(ratio), -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return x, np.column_stack([x, log_ratio])


def _cv_auc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float | None, str | None]:
    """Mean stratified-CV ROC-AUC of predict.py's pipeline (None and why when undefined)."""
    from .predict import cross_validated

    minority = int(min(y.sum(), y.size - y.sum()))
    if minority < folds:
        return None, f"minority class has {minority} members, fewer than folds={folds}"
    aucs, _ = cross_validated(x, y, folds, seed)
    return float(np.mean(aucs)), None


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < y.size else None


@dataclass
class _Rows:
    """One variant's joined rows as arrays."""

    y: np.ndarray  # damaged (class != survived)
    fp: np.ndarray
    combined: np.ndarray
    forecast: np.ndarray
    damage: np.ndarray


def _variant_rows(joined: pl.DataFrame, variant: str, predictors: tuple[str, ...]) -> _Rows:
    table = joined.filter(pl.col("variant") == variant)
    fp, combined = _design(table, predictors)
    keep = np.all(np.isfinite(combined), axis=1)
    return _Rows(
        y=(table.get_column("class") != "survived").to_numpy()[keep].astype(np.int64),
        fp=fp[keep],
        combined=combined[keep],
        forecast=table.get_column("forecast_damage").to_numpy()[keep],
        damage=table.get_column("damage").cast(pl.Float64).to_numpy()[keep],
    )


def _within(variant: str, rows: _Rows, folds: int, seed: int) -> dict[str, Any]:
    from scipy.stats import spearmanr

    notes = []
    n = int(rows.y.size)
    spearman = None
    if n >= 2 and np.ptp(rows.forecast) > 0 and np.ptp(rows.damage) > 0:
        spearman = float(cast(Any, spearmanr(rows.forecast, rows.damage)).statistic)
    else:
        notes.append("spearman undefined (fewer than 2 features or a constant column)")
    auc = _auc(rows.y, rows.forecast) if n else None
    if auc is None:
        notes.append("single class: AUCs undefined")
        fp_auc = combined_auc = None
    else:
        fp_auc, why = _cv_auc(rows.fp, rows.y, folds, seed)
        combined_auc, _ = _cv_auc(rows.combined, rows.y, folds, seed)
        if why:
            notes.append(f"CV AUCs undefined: {why}")
    return {
        "variant": variant, "fit_on": None, "n_features": n, "n_damaged": int(rows.y.sum()),
        "spearman": spearman, "forecast_auc": auc, "fpstats_cv_auc": fp_auc,
        "combined_cv_auc": combined_auc, "transfer_auc": None, "transfer_fpstats_auc": None,
        "note": "; ".join(notes) or None,
    }  # fmt: skip


def _transfer(variant: str, fit_on: str, train: _Rows, test: _Rows, seed: int) -> dict[str, Any]:
    from .predict import _model

    auc = fp_auc = None
    note = None
    if not 0 < train.y.sum() < train.y.size:
        note = f"single class in {fit_on}: nothing to fit"
    elif _auc(test.y, test.forecast) is None:
        note = "single class: AUCs undefined"
    else:
        combined = _model(seed).fit(train.combined, train.y)
        auc = _auc(test.y, combined.predict_proba(test.combined)[:, 1])
        fp_only = _model(seed).fit(train.fp, train.y)
        fp_auc = _auc(test.y, fp_only.predict_proba(test.fp)[:, 1])
    return {
        "variant": variant, "fit_on": fit_on, "n_features": int(test.y.size),
        "n_damaged": int(test.y.sum()), "spearman": None, "forecast_auc": None,
        "fpstats_cv_auc": None, "combined_cv_auc": None, "transfer_auc": auc,
        "transfer_fpstats_auc": fp_auc, "note": note,
    }  # fmt: skip


def forecast_accuracy(
    forecast: pl.DataFrame,
    features: pl.DataFrame,
    fit_on: Sequence[str] = (),
    seed: int = 0,
    *,
    predictors: Sequence[str] | None = None,
    folds: int | None = None,
) -> pl.DataFrame:
    """How well the forecast (a `forecast_table`) matches the measured audit (`features`,
    tables/{model}/{sae}/features.parquet), beside and combined with the FP-statistics
    predictor of sae_audit.predict (same pipeline, stratified folds, seed).

    One row per variant in both tables (fit_on null), and one per (fit_on A, variant B)
    for each A in `fit_on`: the combined model fit on A's features, scored on B's
    (transfer_auc; transfer_fpstats_auc the FP-statistics-only model likewise). Undefined
    values are null with the reason in `note`.
    """
    from .predict import PredictConfig

    cfg = PredictConfig()  # the schema's predictors and folds where none are given
    names = tuple(predictors) if predictors is not None else cfg.predictors
    n_folds = int(folds) if folds is not None else cfg.folds
    joined = _joined(forecast, features)
    present = set(joined.get_column("variant").unique().to_list())
    variants = [
        v for v in forecast.get_column("variant").unique(maintain_order=True) if v in present
    ]
    rows = {v: _variant_rows(joined, v, names) for v in variants}
    out = [_within(v, rows[v], n_folds, seed) for v in variants]
    for a in fit_on:
        if a not in rows:
            raise ValueError(f"fit_on {a!r} is not a variant of both tables: {variants}")
        out += [_transfer(b, a, rows[a], rows[b], seed) for b in variants if b != a]
    return pl.DataFrame(out, schema=ACCURACY_SCHEMA)
