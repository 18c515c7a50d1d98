"""Causal feature survival (issue 14): does a feature still *do* what it did?

Pearson survival (sae_audit.correlate) asks whether a feature fires on the same tokens
in the compressed model. A feature can fire identically while the rest of the network
no longer reads it the same way; this module measures what it does, in the FP model and
in a variant, through interventions at the SAE's own hook, and compares the two.

Per feature f (decoder row w = W_dec[f]) and model, on the first sequences of the
evaluation token set:

- **ablation**: at the positions where f fires *in that model* (its own SAE encoding of
  its own activations), subtract f's decoder contribution a_f(x) w from the hooked
  activation; per position the KL(p_clean || p_ablated) of the next-token distribution
  (every position: effects propagate forward), and the mean logit change over the
  positions where f fires.
- **steering**: add `steering_scale * m_f * w` at every position (m_f the FP mean
  activation when firing); per-position KL(clean || steered), mean logit change.
- **direct logit effect**: w through the final norm (its mean removal for a LayerNorm,
  its gain elementwise, Gemma's 1 + weight) and the unembedding: a [vocab] vector, the
  logit lens of the direction with the norm folded.

Logit changes are centered over the vocabulary (softmax ignores a common shift). The
FP-vs-variant agreement of each: Pearson over positions of the per-position KLs, the
ratio of mean KL (variant / FP), the cosine of the mean logit changes, and the overlap
of the top-k promoted tokens (the largest logit drop when ablated, the largest rise when
steered or through the direct path). Edge cases are flagged, never NaN (`_pearson_rows`,
`_cosine_rows`, `compare_effects`).

**Causal class** (`causal_class`): insufficient when f never fires in FP on the measured
sequences (nothing to ablate); else with agreement = min(ablation KL r, steering KL r,
ablation logit cosine, steering logit cosine): destroyed when f never fires in the variant
or agreement < `causal.destroyed`; survived when agreement > `causal.survived` and both KL
ratios lie in [1 / kl_ratio_band, kl_ratio_band]; blurred otherwise. The cosines are in
it because KL is blind to the sign of an effect: a variant whose network reads the
feature reflected has KL magnitudes that still correlate. The direct logit effect is
reported beside the class, not in it: weight-only compression of the blocks leaves the
final norm and unembedding FP, so it is 1 by construction there.

Batching: B sequences repeated K times make one forward serve K features; copy k carries
only feature k's edit (`ActivationEdit`). No Python loop runs over tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from . import progress
from .causal_survival import causal_classes
from .config import FROM_SCHEMA, ConfigSection, check_causal
from .correlate import pearson_from_moments
from .files import InputError
from .models import family_of, resolve_hook
from .saes import SaeInput, sae_hook_name
from .table_docs import polars_schema
from .watchlist import read_watchlist


@dataclass(frozen=True)
class CausalConfig(ConfigSection, section="causal"):
    """Which features, on how many sequences, batched how, and the causal class thresholds."""

    enabled: bool = FROM_SCHEMA
    features: str = FROM_SCHEMA
    n_features: int = FROM_SCHEMA
    watchlist: str | None = FROM_SCHEMA
    n_sequences: int = FROM_SCHEMA
    batch_size: int = FROM_SCHEMA
    features_per_forward: int = FROM_SCHEMA
    steering_scale: float = FROM_SCHEMA
    top_k: int = FROM_SCHEMA
    survived: float = FROM_SCHEMA
    destroyed: float = FROM_SCHEMA
    kl_ratio_band: float = FROM_SCHEMA
    seed: int = FROM_SCHEMA

    def _check(self) -> None:
        check_causal(self.to_dict())


# ---------------------------------------------------------------- the edit at a hook
class ActivationEdit:
    """Context manager that adds `delta` to the activation at one hook point.

    The hook is the one `sae_audit.models.resolve_hook` maps the SAE's hook name to, as
    `ActivationCapture` reads it: a module's output (resid_post, attn_out, mlp_out; the
    first element when the module returns a tuple) or its input (resid_pre). Set
    `delta` before each forward: a tensor broadcastable to the activation ([rows, T, d]),
    or None for a clean forward. Whatever the hook saw before the edit is kept in `seen`.
    """

    def __init__(self, model: nn.Module, hook_name: str):
        self.point = resolve_hook(model, hook_name)
        self.model = model
        self.delta: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _edited(self, tensor: torch.Tensor) -> torch.Tensor:
        self.seen = tensor.detach()
        if self.delta is None:
            return tensor
        return tensor + self.delta.to(tensor.dtype)

    def __enter__(self) -> ActivationEdit:
        module = self.model.get_submodule(self.point.module)
        if self.point.use_input:

            def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if args:
                    return (self._edited(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._edited(kwargs["hidden_states"])}

            self._handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
                if isinstance(output, tuple | list):
                    return type(output)([self._edited(output[0]), *output[1:]])
                return self._edited(output)

            self._handle = module.register_forward_hook(hook)
        return self

    def __exit__(self, *_: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.delta = None
        self.seen = None


# ---------------------------------------------------------------- one model's effects
@dataclass
class Effects:
    """One model's causal effects of features on a set of [N, T] sequences."""

    features: np.ndarray  # [F] feature ids
    fire_count: np.ndarray  # [F] positions where the feature fires (the ablated ones)
    ablation_kl: np.ndarray  # [F, N*T] KL(clean || ablated) per position, float64
    steering_kl: np.ndarray  # [F, N*T] KL(clean || steered) per position
    ablation_logits: np.ndarray  # [F, V] mean centered logit change where it fires (0: never)
    steering_logits: np.ndarray  # [F, V] mean centered logit change over all positions
    direct_logits: np.ndarray  # [F, V] centered direct logit effect of the decoder direction


def direct_logit_effect(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """[F, V] logits a [F, d] set of residual directions writes through the final norm
    (folded: its mean removal for a LayerNorm, its gain elementwise) and the unembedding.

    The norm's division by the stream's scale is left out: it is the same for every
    direction, so it changes no cosine or ranking. Centered over the vocabulary.
    """
    norm = model.get_submodule(family_of(model).final_norm)
    w = directions.float()
    if isinstance(norm, nn.LayerNorm):
        w = w - w.mean(dim=-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        gain = weight.detach().float()
        if type(norm).__name__.startswith("Gemma"):  # Gemma's RMSNorm scales by 1 + weight
            gain = 1.0 + gain
        w = w * gain.to(w.device)
    hf_model: Any = model  # a transformers PreTrainedModel
    unembed = hf_model.get_output_embeddings()
    assert unembed is not None
    logits = w @ unembed.weight.detach().float().to(w.device).t()
    return logits - logits.mean(dim=-1, keepdim=True)


def _groups(n: int, size: int) -> Iterator[range]:
    for lo in range(0, n, size):
        yield range(lo, min(lo + size, n))


def _kl_rows(logp_clean: torch.Tensor, p_clean: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[b, T] KL(p_clean || softmax(logits)) per position, float32, clamped at 0."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (p_clean * (logp_clean - logq)).sum(dim=-1).clamp_min_(0.0)


@torch.no_grad()
def measure_effects(
    model: nn.Module,
    sae: Any,
    sae_input: SaeInput | None,
    features: Sequence[int] | np.ndarray,
    mean_when_firing: Sequence[float] | np.ndarray,
    ids: np.ndarray | torch.Tensor,
    *,
    steering_scale: float = 1.0,
    batch_size: int = 4,
    features_per_forward: int = 8,
    ablate: np.ndarray | torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> Effects:
    """Ablation, steering and direct logit effects of `features` in one model.

    `ids` [N, T] are the sequences; `ablate` [N, T] (bool, optional) the positions where
    ablation may act (encode's excluded special positions are False). Per batch of
    `batch_size` sequences: one clean forward (its hooked activation gives the model's own
    codes of every feature), then per group of `features_per_forward` features one
    ablation forward (only the copies of features that fire in the batch) and one
    steering forward, each on the batch repeated once per feature.
    """
    device = torch.device(device)
    hook = sae_hook_name(sae)
    ids_t = torch.tensor(np.array(ids), dtype=torch.long)
    n_seq, seq_len = ids_t.shape
    feats = np.asarray(features, dtype=np.int64)
    n_feat = feats.size
    feat_t = torch.from_numpy(feats).to(device)
    sae_dtype = next(sae.parameters()).dtype
    model_dtype = next(model.parameters()).dtype
    directions = sae.W_dec.detach()[feat_t].to(device)  # [F, d]
    dirs = directions.to(model_dtype)
    scale = torch.tensor(np.array(mean_when_firing, dtype=np.float64), device=device)
    steer = (steering_scale * scale.float())[:, None] * directions.float()  # [F, d]
    steer = steer.to(model_dtype)
    allowed = None if ablate is None else torch.tensor(np.array(ablate), dtype=torch.bool)
    k_max = max(1, int(features_per_forward))

    # Results stay on the device until the end: no copy back (and sync) per feature.
    ablation_kl = torch.zeros(n_feat, n_seq, seq_len, dtype=torch.float32, device=device)
    steering_kl = torch.zeros(n_feat, n_seq, seq_len, dtype=torch.float32, device=device)
    fire_count = torch.zeros(n_feat, dtype=torch.int64, device=device)
    vocab: int | None = None
    ablation_sum: torch.Tensor | None = None
    steering_sum: torch.Tensor | None = None
    positions = torch.arange(seq_len, device=device)

    with ActivationEdit(model, hook) as edit:
        for rows in _groups(n_seq, max(1, int(batch_size))):
            batch = ids_t[rows.start : rows.stop].to(device)
            b = batch.shape[0]
            edit.delta = None
            logits = model(input_ids=batch).logits
            acts = edit.seen
            assert acts is not None
            if vocab is None:
                vocab = int(logits.shape[-1])
                ablation_sum = torch.zeros(n_feat, vocab, dtype=torch.float64, device=device)
                steering_sum = torch.zeros(n_feat, vocab, dtype=torch.float64, device=device)
            assert ablation_sum is not None and steering_sum is not None
            x = acts.to(sae_dtype)
            if sae_input is not None:
                x = sae_input.prepare(x)
            coef = sae.encode(x)[..., feat_t].float()  # [b, T, F]
            if allowed is not None:
                coef = coef * allowed[rows.start : rows.stop, :, None].to(device)
            fires = coef > 0
            fire_count += fires.sum(dim=(0, 1))
            fires_here = fires.any(dim=1).any(dim=0).tolist()  # [F], one sync per batch
            clean = logits.float()
            logp_clean = torch.log_softmax(clean, dim=-1)
            p_clean = logp_clean.exp()
            # Positions before a row's first firing cannot change (causal attention): their
            # KL is set to exactly 0, not left at the batch-shape rounding of the forward.
            first = torch.where(fires, positions[None, :, None], seq_len).amin(dim=1)  # [b, F]
            for group in _groups(n_feat, k_max):
                live = [k for k in group if fires_here[k]]
                if live:
                    live_t = torch.tensor(live, device=device)
                    c = coef[:, :, live_t].permute(2, 0, 1)  # [k, b, T]
                    delta = -(c[..., None].to(model_dtype) * dirs[live_t][:, None, None, :])
                    edit.delta = delta.reshape(len(live) * b, seq_len, -1)
                    out = model(input_ids=batch.repeat(len(live), 1)).logits
                    for j, k in enumerate(live):
                        lg = out[j * b : (j + 1) * b]
                        kl = _kl_rows(logp_clean, p_clean, lg)
                        kl = torch.where(positions[None, :] >= first[:, k, None], kl, 0.0)
                        ablation_kl[k, rows.start : rows.stop] = kl
                        diff = lg.float() - clean
                        diff = diff - diff.mean(dim=-1, keepdim=True)
                        ablation_sum[k] += torch.einsum(
                            "btv,bt->v", diff, fires[:, :, k].float()
                        ).double()
                group_t = torch.tensor(list(group), device=device)
                delta = steer[group_t][:, None, None, :].expand(len(group), b, seq_len, -1)
                edit.delta = delta.reshape(len(group) * b, seq_len, -1)
                out = model(input_ids=batch.repeat(len(group), 1)).logits
                for j, k in enumerate(group):
                    lg = out[j * b : (j + 1) * b]
                    steering_kl[k, rows.start : rows.stop] = _kl_rows(logp_clean, p_clean, lg)
                    diff = lg.float() - clean
                    diff = diff - diff.mean(dim=-1, keepdim=True)
                    steering_sum[k] += diff.sum(dim=(0, 1)).double()
                edit.delta = None
    assert ablation_sum is not None and steering_sum is not None
    fired = fire_count.clamp_min(1).to(torch.float64)[:, None]
    return Effects(
        features=feats,
        fire_count=fire_count.cpu().numpy(),
        ablation_kl=ablation_kl.reshape(n_feat, -1).double().cpu().numpy(),
        steering_kl=steering_kl.reshape(n_feat, -1).double().cpu().numpy(),
        ablation_logits=(ablation_sum / fired).cpu().numpy(),
        steering_logits=(steering_sum / float(n_seq * seq_len)).cpu().numpy(),
        direct_logits=direct_logit_effect(model, directions).double().cpu().numpy(),
    )


# ---------------------------------------------------------------- agreement, never NaN
def _pearson_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise Pearson r of [F, P] arrays (x FP, y variant) and a flag per row.

    As `correlate.pearson_from_sums`, never NaN; in order of precedence:
      fp_no_effect      x is 0 everywhere                          r = 0
      variant_no_effect y is 0 everywhere                          r = 0
      both_constant     each side one nonzero value everywhere     r = 1
      fp_constant / variant_constant  one side constant             r = 0
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    return pearson_from_moments(
        var_x=(xc * xc).sum(axis=1),
        var_y=(yc * yc).sum(axis=1),
        cov=(xc * yc).sum(axis=1),
        sum_x2=(x * x).sum(axis=1),
        sum_y2=(y * y).sum(axis=1),
        silent=("fp_no_effect", "variant_no_effect"),
    )


def _cosine_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise cosine of [F, V] arrays; 0 with flag fp_no_effect / variant_no_effect
    where a side is the zero vector."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    nxx = (x * x).sum(axis=1)
    nyy = (y * y).sum(axis=1)
    ok = (nxx > 0) & (nyy > 0)
    cos = np.zeros(x.shape[0], dtype=np.float64)
    cos[ok] = (x[ok] * y[ok]).sum(axis=1) / np.sqrt(nxx[ok] * nyy[ok])
    np.clip(cos, -1.0, 1.0, out=cos)
    flags = np.full(x.shape[0], None, dtype=object)
    flags[nyy == 0] = "variant_no_effect"
    flags[nxx == 0] = "fp_no_effect"
    return cos, flags


def _top_overlap(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Share of the k largest entries of each row of x that are among y's k largest
    (ties broken by token id); 0 where either row is all zero."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k = max(1, min(int(k), x.shape[1]))
    top_x = np.argsort(-x, axis=1, kind="stable")[:, :k]
    top_y = np.argsort(-y, axis=1, kind="stable")[:, :k]
    same = np.array([np.intersect1d(a, b).size for a, b in zip(top_x, top_y, strict=True)])
    out = same / k
    out[~np.any(x != 0, axis=1) | ~np.any(y != 0, axis=1)] = 0.0
    return out.astype(np.float64)


def _ratio(fp: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """variant / fp, 0 where fp is 0 (flagged fp_no_effect by the caller)."""
    out = np.zeros_like(fp, dtype=np.float64)
    ok = fp > 0
    out[ok] = variant[ok] / fp[ok]
    return out


def _measure_columns(
    name: str, fp_kl: np.ndarray, var_kl: np.ndarray, fp_vec: np.ndarray, var_vec: np.ndarray,
    top_k: int, promote_sign: float,
) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    r, r_flag = _pearson_rows(fp_kl, var_kl)
    cos, cos_flag = _cosine_rows(fp_vec, var_vec)
    mean_fp, mean_var = fp_kl.mean(axis=1), var_kl.mean(axis=1)
    flag = np.where(r_flag == None, cos_flag, r_flag)  # noqa: E711 - elementwise on objects
    no_fp = np.isin(flag, ["fp_no_effect"])
    ratio = _ratio(mean_fp, mean_var)
    overlap = _top_overlap(promote_sign * fp_vec, promote_sign * var_vec, top_k)
    cos[no_fp] = 0.0
    overlap[no_fp] = 0.0
    cols = {
        f"{name}_kl_fp": mean_fp,
        f"{name}_kl_variant": mean_var,
        f"{name}_kl_r": r,
        f"{name}_kl_ratio": ratio,
        f"{name}_logit_cos": cos,
        f"{name}_top_overlap_fraction": overlap,
    }
    return cols, flag


def compare_effects(
    fp: Effects, variant: Effects, cfg: CausalConfig, variant_name: str = "variant"
) -> pl.DataFrame:
    """One row per feature: the FP-vs-variant agreement of each effect and its causal class
    at `cfg`'s thresholds (`causal_survival.causal_classes`). Flags per measure, null where nothing is odd:

    - ablation_flag: fp_silent (never fires in FP on these sequences: every ablation
      number 0, class insufficient), variant_silent (never fires in the variant: its
      ablation effect is 0, so r, cosine, ratio and overlap are 0, class destroyed), then
      the KL correlation's flags (`_pearson_rows`), then the logit cosine's.
    - steering_flag: the KL correlation's flags, then the cosine's.
    - direct_flag: fp_no_effect / variant_no_effect where a direct logit vector is 0.
    """
    if not np.array_equal(fp.features, variant.features):
        raise ValueError("FP and variant effects are of different features")
    abl, abl_flag = _measure_columns(
        "ablation", fp.ablation_kl, variant.ablation_kl, fp.ablation_logits,
        variant.ablation_logits, cfg.top_k, -1.0,
    )  # fmt: skip
    fp_silent = fp.fire_count == 0
    var_silent = variant.fire_count == 0
    abl_flag = np.where(var_silent, "variant_silent", abl_flag)
    abl_flag = np.where(fp_silent, "fp_silent", abl_flag)
    for key in ("kl_r", "kl_ratio", "logit_cos", "top_overlap_fraction"):
        abl[f"ablation_{key}"] = np.where(fp_silent | var_silent, 0.0, abl[f"ablation_{key}"])
    steer, steer_flag = _measure_columns(
        "steering", fp.steering_kl, variant.steering_kl, fp.steering_logits,
        variant.steering_logits, cfg.top_k, 1.0,
    )  # fmt: skip
    direct_cos, direct_flag = _cosine_rows(fp.direct_logits, variant.direct_logits)
    direct_overlap = _top_overlap(fp.direct_logits, variant.direct_logits, cfg.top_k)

    agreement = np.minimum.reduce(
        [abl["ablation_kl_r"], steer["steering_kl_r"], abl["ablation_logit_cos"],
         steer["steering_logit_cos"]]
    )  # fmt: skip
    cls = causal_classes(
        agreement, abl_flag, steer_flag, abl["ablation_kl_ratio"], steer["steering_kl_ratio"],
        survived=cfg.survived, destroyed=cfg.destroyed, kl_ratio_band=cfg.kl_ratio_band,
    )  # fmt: skip
    agreement = np.where(cls == "insufficient", 0.0, agreement)

    def flag_list(flags: np.ndarray) -> list[str | None]:
        return [None if f is None or f == "None" else str(f) for f in flags]

    return pl.DataFrame(
        {
            "feature": pl.Series(fp.features, dtype=pl.Int32),
            "variant": [variant_name] * fp.features.size,
            "fp_fire_count": pl.Series(fp.fire_count, dtype=pl.Int64),
            "variant_fire_count": pl.Series(variant.fire_count, dtype=pl.Int64),
            **abl,
            "ablation_flag": pl.Series(flag_list(abl_flag), dtype=pl.Utf8),
            **steer,
            "steering_flag": pl.Series(flag_list(steer_flag), dtype=pl.Utf8),
            "direct_logit_cos": direct_cos,
            "direct_top_overlap_fraction": direct_overlap,
            "direct_flag": pl.Series(flag_list(direct_flag), dtype=pl.Utf8),
            "causal_agreement": agreement,
            "causal_class": cls.astype(str).tolist(),
        }
    )


# ---------------------------------------------------------------- the table
def causal_table(
    fp_model: nn.Module,
    variant_model: nn.Module,
    sae: Any,
    sae_input: SaeInput | None,
    selected: pl.DataFrame,
    ids: np.ndarray,
    cfg: CausalConfig,
    *,
    variant: str,
    device: str | torch.device = "cpu",
    ablate: np.ndarray | None = None,
    chunk: int = 64,
) -> pl.DataFrame:
    """The causal table of one variant: one row per selected feature (`compare_effects`),
    without its class: `causal_survival.with_causal_class` adds that at the configured
    thresholds, which therefore never re-run these forward passes.

    `selected` has columns feature and mean_when_firing (`select_features`); `ids` the
    token sequences (the first `cfg.n_sequences` are used). Features are measured `chunk`
    at a time in both models, so memory holds a chunk's [vocab] vectors, never all of
    them; the mean_when_firing beside each row is the FP value the steering used.
    """
    ids = np.asarray(ids)[: cfg.n_sequences]
    mask = None if ablate is None else np.asarray(ablate)[: cfg.n_sequences]
    features = selected["feature"].to_numpy().astype(np.int64)
    means = selected["mean_when_firing"].to_numpy().astype(np.float64)
    step = max(1, int(chunk) // cfg.features_per_forward) * cfg.features_per_forward
    parts = []
    groups = list(_groups(features.size, step))
    for group in progress.bar(groups, desc=f"causal {variant}", unit="chunk"):
        sl = slice(group.start, group.stop)
        kwargs: dict[str, Any] = dict(
            steering_scale=cfg.steering_scale,
            batch_size=cfg.batch_size,
            features_per_forward=cfg.features_per_forward,
            ablate=mask,
            device=device,
        )
        fp = measure_effects(fp_model, sae, sae_input, features[sl], means[sl], ids, **kwargs)
        var = measure_effects(variant_model, sae, sae_input, features[sl], means[sl], ids, **kwargs)
        parts.append(
            compare_effects(fp, var, cfg, variant).with_columns(
                mean_when_firing=pl.Series(means[sl], dtype=pl.Float64)
            )
        )
    if not parts:
        return empty_table()
    table = pl.concat(parts)
    return table.select(COLUMNS).cast(SCHEMA)  # type: ignore[arg-type]


# The columns and their dtypes: tables.schema.yaml, table `causal_variant`.
SCHEMA = polars_schema("causal_variant")
COLUMNS = tuple(SCHEMA)


def empty_table() -> pl.DataFrame:
    """The causal table with its columns and no row (no feature selected)."""
    return pl.DataFrame(schema=SCHEMA)


# ---------------------------------------------------------------- which features
def select_features(
    fp_stats: pl.DataFrame,
    cfg: CausalConfig,
    active_rate: float,
    watchlist: Sequence[int] | None = None,
) -> pl.DataFrame:
    """The features to measure, as columns feature, firing_count, mean_when_firing.

    - top: the `n_features` active features (FP firing rate > `active_rate`) with the
      highest FP firing count (ties: lower id first);
    - random: a sample of `n_features` active features drawn with `seed`, by id;
    - watchlist: the given ids (`read_watchlist` of `watchlist`), in order, duplicates
      dropped; each must be a feature of the SAE that fires in FP (steering needs its
      mean activation), else InputError.
    """
    stats = fp_stats.select("feature", "firing_count", "firing_rate", "mean_when_firing")
    active = stats.filter(pl.col("firing_rate") > active_rate)
    if cfg.features == "top":
        chosen = active.sort(["firing_count", "feature"], descending=[True, False]).head(
            cfg.n_features
        )
    elif cfg.features == "random":
        ids = active["feature"].to_numpy()
        rng = np.random.default_rng(cfg.seed)
        pick = np.sort(rng.choice(ids, size=min(cfg.n_features, ids.size), replace=False))
        chosen = active.filter(pl.col("feature").is_in(pick.tolist())).sort("feature")
    elif cfg.features == "watchlist":
        if watchlist is None:
            if not cfg.watchlist:
                raise InputError("causal.features is 'watchlist' but causal.watchlist is null")
            watchlist = read_watchlist(cfg.watchlist)
        wanted = list(dict.fromkeys(int(f) for f in watchlist))
        by_id = {r["feature"]: r for r in stats.to_dicts()}
        missing = [f for f in wanted if f not in by_id]
        if missing:
            raise InputError(
                f"watchlist features {missing} are not features of this SAE (0..{stats.height - 1})"
            )
        silent = [f for f in wanted if not by_id[f]["firing_count"]]
        if silent:
            raise InputError(
                f"watchlist features {silent} never fire in the FP model: there is no "
                "effect to ablate and no mean activation to steer with"
            )
        chosen = pl.DataFrame([by_id[f] for f in wanted], schema=stats.schema)
    else:
        raise ValueError(f"causal.features must be top, random or watchlist: {cfg.features!r}")
    return chosen.select(
        pl.col("feature").cast(pl.Int32),
        pl.col("firing_count").cast(pl.Int64),
        pl.col("mean_when_firing").cast(pl.Float64),
    )
