"""Per-feature Pearson correlation between FP and compressed SAE codes.

Pearson needs only six sums per feature (n, sum x, sum x^2, sum y, sum y^2,
sum xy), all in float64. Sums of x and of y come from each sparse side alone
(zeros add nothing); sum xy needs only the (token, feature) pairs nonzero on
both sides. The two shards are sorted by (token, feature), so they are merged
as a stream over aligned token ranges: memory is bounded by about two read
batches per side plus the d_sae-long accumulators, never by the token count.

The same pass counts each feature's support: the tokens where it is nonzero in FP
or in the variant (the union of the two sparse supports, |X| + |Y| - |X and Y|).
`fisher_interval` turns r and the support into a confidence interval on r (see
there for the approximation and why the support, not the token count, is its n).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from sae_audit.files import InputError, rerun_hint
from sae_audit.shards import (
    Expected,
    ShardMetadata,
    iter_code_batches,
    pair_shards,
    read_metadata,
    row_keys,
)

# Relative size under which a variance counts as zero: float64 sums of float32
# values leave rounding residue ~1e-16 * sum x^2 when all values are equal.
_ZERO_VARIANCE_RTOL = 1e-12
_NO_TOKEN = -1  # tokens are >= 0
_ALL_TOKENS = np.iinfo(np.int64).max


@dataclass
class SufficientSums:
    """Running float64 sums for the Pearson correlation of every feature.

    x is the FP activation, y the variant's; ``n`` counts tokens (shared by all
    features). Fire counts count activations > 0; ``n_support`` counts the tokens
    where the feature is nonzero on either side (the union of the two supports).
    """

    d_sae: int
    n: int = 0
    sum_x: np.ndarray = field(init=False)
    sum_x2: np.ndarray = field(init=False)
    sum_y: np.ndarray = field(init=False)
    sum_y2: np.ndarray = field(init=False)
    sum_xy: np.ndarray = field(init=False)
    fire_x: np.ndarray = field(init=False)
    fire_y: np.ndarray = field(init=False)
    n_support: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.d_sae < 1:
            raise ValueError(f"d_sae must be positive, got {self.d_sae}")
        if self.n < 0:
            raise ValueError(f"n must be non-negative, got {self.n}")
        for name in ("sum_x", "sum_x2", "sum_y", "sum_y2", "sum_xy"):
            setattr(self, name, np.zeros(self.d_sae, dtype=np.float64))
        self.fire_x = np.zeros(self.d_sae, dtype=np.int64)
        self.fire_y = np.zeros(self.d_sae, dtype=np.int64)
        self.n_support = np.zeros(self.d_sae, dtype=np.int64)

    def add_x(self, feature: np.ndarray, value: np.ndarray) -> None:
        """Add sparse FP activations (one row per nonzero)."""
        v = value.astype(np.float64)
        self.sum_x += np.bincount(feature, weights=v, minlength=self.d_sae)
        self.sum_x2 += np.bincount(feature, weights=v * v, minlength=self.d_sae)
        self.fire_x += np.bincount(feature[v > 0], minlength=self.d_sae)
        self.n_support += np.bincount(feature[v != 0], minlength=self.d_sae)

    def add_y(self, feature: np.ndarray, value: np.ndarray) -> None:
        """Add sparse variant activations (one row per nonzero)."""
        v = value.astype(np.float64)
        self.sum_y += np.bincount(feature, weights=v, minlength=self.d_sae)
        self.sum_y2 += np.bincount(feature, weights=v * v, minlength=self.d_sae)
        self.fire_y += np.bincount(feature[v > 0], minlength=self.d_sae)
        self.n_support += np.bincount(feature[v != 0], minlength=self.d_sae)

    def add_xy(self, feature: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Add products of (token, feature) pairs nonzero on both sides (rows present in
        both shards); such a token was counted by `add_x` and by `add_y`, so it leaves
        the union support once."""
        prod = x.astype(np.float64) * y.astype(np.float64)
        self.sum_xy += np.bincount(feature, weights=prod, minlength=self.d_sae)
        self.n_support -= np.bincount(feature[(x != 0) & (y != 0)], minlength=self.d_sae)


class _SortedStream:
    """Buffered reader of one code shard that hands out complete token ranges."""

    def __init__(self, path: Path, meta: ShardMetadata, batch_rows: int):
        self.path = path
        self.meta = meta
        self._batches = iter_code_batches(path, batch_rows)
        self.token = np.empty(0, dtype=np.int64)
        self.feature = np.empty(0, dtype=np.int32)
        self.value = np.empty(0, dtype=np.float32)
        self.done = False
        self._last_token = _NO_TOKEN

    @property
    def horizon(self) -> int:
        """Every row with token < horizon has been read."""
        if self.done:
            return _ALL_TOKENS
        # The last buffered token may continue in the next batch.
        return int(self.token[-1]) if self.token.size else _NO_TOKEN

    def pull(self) -> None:
        try:
            batch = next(self._batches)
        except StopIteration:
            self.done = True
            return
        token = batch.column("token").to_numpy()
        if token.size == 0:
            return
        if token[0] < self._last_token:
            raise InputError(f"{self.path}: rows are not sorted by token; {rerun_hint('encode')}")
        self._last_token = int(token[-1])
        self.token = np.concatenate([self.token, token])
        self.feature = np.concatenate([self.feature, batch.column("feature").to_numpy()])
        self.value = np.concatenate([self.value, batch.column("value").to_numpy()])

    def take_below(self, cut: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = int(np.searchsorted(self.token, cut, side="left"))
        out = self.token[:k], self.feature[:k], self.value[:k]
        self.token, self.feature, self.value = self.token[k:], self.feature[k:], self.value[k:]
        return out


def _aligned_chunks(
    a: _SortedStream, b: _SortedStream
) -> Iterator[tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]]:
    """Yield (rows of a, rows of b) over the same token range, range after range."""
    while not (a.done and b.done):
        # Read from the side that lags, so neither buffer runs far ahead.
        (a if a.horizon <= b.horizon else b).pull()
        # Rows below both horizons are complete on both sides; once both
        # streams are exhausted the cut is _ALL_TOKENS and the buffers empty.
        cut = min(a.horizon, b.horizon)
        if cut > 0:
            chunk_a, chunk_b = a.take_below(cut), b.take_below(cut)
            if chunk_a[0].size or chunk_b[0].size:
                yield chunk_a, chunk_b


def _check_pair(fp_meta: ShardMetadata, var_meta: ShardMetadata, fp: Path, var: Path) -> None:
    if fp_meta.d_sae != var_meta.d_sae:
        raise ValueError(f"d_sae differs: {fp} has {fp_meta.d_sae}, {var} has {var_meta.d_sae}")
    if (fp_meta.token_start, fp_meta.token_stop) != (var_meta.token_start, var_meta.token_stop):
        raise ValueError(
            f"token ranges differ: {fp} [{fp_meta.token_start}, {fp_meta.token_stop}) vs "
            f"{var} [{var_meta.token_start}, {var_meta.token_stop})"
        )
    for attr in ("model", "sae", "hook"):
        if getattr(fp_meta, attr) != getattr(var_meta, attr):
            raise ValueError(
                f"{attr} differs: {fp} has {getattr(fp_meta, attr)!r}, "
                f"{var} has {getattr(var_meta, attr)!r}"
            )


TokenFilter = Callable[[np.ndarray], np.ndarray]  # global token positions -> keep mask


def accumulate_pair(
    fp_shard: Path, variant_shard: Path, sums: SufficientSums, batch_rows: int = 1 << 20
) -> None:
    """Add one (FP, variant) shard pair covering the same tokens to ``sums`` in place."""
    accumulate_selections(fp_shard, variant_shard, [(sums, None)], batch_rows)


def accumulate_selections(
    fp_shard: Path,
    variant_shard: Path,
    selections: Sequence[tuple[SufficientSums, TokenFilter | None]],
    batch_rows: int = 1 << 20,
) -> None:
    """Accumulate several token selections (budgets, subsets) in one pass over a shard pair.

    Each selection is (sums, keep) where ``keep`` maps token positions to a boolean
    mask (None keeps every token). The merge and join run once; only the
    accumulation is repeated per selection.
    """
    fp_shard, variant_shard = Path(fp_shard), Path(variant_shard)
    fp_meta, var_meta = read_metadata(fp_shard), read_metadata(variant_shard)
    _check_pair(fp_meta, var_meta, fp_shard, variant_shard)
    for sums, _ in selections:
        if fp_meta.d_sae != sums.d_sae:
            raise ValueError(f"{fp_shard}: d_sae {fp_meta.d_sae} != accumulator d_sae {sums.d_sae}")
    a = _SortedStream(fp_shard, fp_meta, batch_rows)
    b = _SortedStream(variant_shard, var_meta, batch_rows)
    for (tok_a, feat_a, val_a), (tok_b, feat_b, val_b) in _aligned_chunks(a, b):
        key_a = row_keys(fp_shard, fp_meta, tok_a, feat_a)
        key_b = row_keys(variant_shard, var_meta, tok_b, feat_b)
        hit = np.zeros(key_a.size, dtype=bool)
        idx = np.zeros(key_a.size, dtype=np.int64)
        if key_a.size and key_b.size:
            # Both key arrays are sorted and unique: a binary search is the join.
            idx = np.searchsorted(key_b, key_a)
            hit = idx < key_b.size
            hit[hit] = key_b[idx[hit]] == key_a[hit]
        for sums, keep in selections:
            if keep is None:
                sel_a, sel_b = slice(None), slice(None)
                both = hit
            else:
                sel_a, sel_b = keep(tok_a), keep(tok_b)
                both = hit & sel_a
            sums.add_x(feat_a[sel_a], val_a[sel_a])
            sums.add_y(feat_b[sel_b], val_b[sel_b])
            sums.add_xy(feat_a[both], val_a[both], val_b[idx[both]])
    tokens = np.arange(fp_meta.token_start, fp_meta.token_stop, dtype=np.int64)
    for sums, keep in selections:
        sums.n += fp_meta.n_tokens if keep is None else int(keep(tokens).sum())


def pearson_from_sums(sums: SufficientSums) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r over all tokens (zeros included) and a flag per feature.

    Never NaN. Edge cases, in order of precedence:
      fp_silent         never nonzero in FP (inactive; excluded later)   r = 0
      variant_silent    never nonzero in the variant                     r = 0
      both_constant     same nonzero value on every token on both sides  r = 1
      fp_constant       FP constant on every token, variant varies       r = 0
      variant_constant  variant constant on every token, FP varies       r = 0
    Flags are object-dtype strings, None when r is an ordinary correlation.
    """
    if sums.n < 2:
        raise ValueError(f"need at least 2 tokens for a correlation, got n={sums.n}")
    n = float(sums.n)
    # Centered second moments (times n); float64 throughout.
    var_x = sums.sum_x2 - sums.sum_x * sums.sum_x / n
    var_y = sums.sum_y2 - sums.sum_y * sums.sum_y / n
    cov = sums.sum_xy - sums.sum_x * sums.sum_y / n
    fp_silent = sums.sum_x2 == 0
    var_silent = sums.sum_y2 == 0
    const_x = ~fp_silent & (var_x <= _ZERO_VARIANCE_RTOL * sums.sum_x2)
    const_y = ~var_silent & (var_y <= _ZERO_VARIANCE_RTOL * sums.sum_y2)

    ok = ~(fp_silent | var_silent | const_x | const_y)
    r = np.zeros(sums.d_sae, dtype=np.float64)
    r[ok] = cov[ok] / np.sqrt(var_x[ok] * var_y[ok])
    np.clip(r, -1.0, 1.0, out=r)

    flags = np.full(sums.d_sae, None, dtype=object)
    # Assign lowest precedence first so higher-precedence flags overwrite.
    flags[const_y] = "variant_constant"
    flags[const_x] = "fp_constant"
    both = const_x & const_y
    flags[both] = "both_constant"
    r[both] = 1.0
    flags[var_silent] = "variant_silent"
    flags[fp_silent] = "fp_silent"
    r[var_silent | fp_silent] = 0.0
    return r, flags


def fisher_interval(
    r: np.ndarray, n_support: np.ndarray, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided ``confidence`` interval (r_lo, r_hi) on each r: Fisher's z with n = support.

    r itself is the Pearson correlation over *all* tokens, zeros included (the
    definition the classes use). Its interval is tanh(atanh r -+ q / sqrt(n - 3)), with
    q the standard normal quantile of (1 + confidence) / 2 and n the feature's support:
    the tokens where it is nonzero in FP or in the variant. Why not the token count:
    outside the support both activations are exactly 0 (a ReLU-type SAE's zeros, not
    noise), so those tokens agree by construction and say nothing about whether the
    variant reproduces the feature where it matters; every disagreement, a missed
    firing or a spurious one, lies inside the union of the two supports. With n = all
    tokens a feature that fired on 3 of 65,536 tokens would get an interval about
    +-0.008 wide; with n = its support it gets [-1, 1].

    Approximations, stated: Fisher's z assumes bivariate-normal pairs, and activations
    are skewed and zero-inflated; tokens of one sequence are correlated, so the support
    overstates the independent evidence and the interval is, if anything, too narrow.
    A bootstrap over sequences would address both, but it needs per-sequence sums
    (d_sae x n_sequences x 6 floats) or one set of accumulators per replicate (B times
    the memory and work of the pass), which breaks the d_sae-bounded streaming pass;
    this interval costs one counter per feature.

    Edge cases: n <= 3 gives [-1, 1] (no evidence); |r| = 1 with n > 3 gives the point
    (r = 1 exactly: identical activations); confidence = 0 gives the point r itself (no
    interval: point classes, as the reference study). Always r_lo <= r <= r_hi; NaN r
    gives NaN bounds (callers pass none: `pearson_from_sums` never returns NaN).
    """
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    r = np.asarray(r, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n_support, dtype=np.float64), r.shape)
    q = float(stats.norm.ppf(0.5 + confidence / 2.0))
    if q == 0.0:
        return r.copy(), r.copy()
    enough = n > 3
    inner = np.abs(r) < 1
    center = np.where(inner, np.arctanh(np.where(inner, r, 0.0)), np.copysign(np.inf, r))
    half = q / np.sqrt(np.where(enough, n - 3.0, 1.0))
    lo = np.where(enough, np.tanh(center - half), -1.0)
    hi = np.where(enough, np.tanh(center + half), 1.0)
    # tanh(atanh r) can differ from r by an ulp: keep the point inside its interval
    # (np.minimum, not fmin: a NaN r stays NaN).
    return np.minimum(lo, r), np.maximum(hi, r)


def correlate_variant(
    fp_paths: list[Path],
    variant_paths: list[Path],
    batch_rows: int = 1 << 20,
    variant: str | None = None,
    expect: Expected | None = None,
    confidence: float = 0.95,
) -> pl.DataFrame:
    """Correlate every feature between FP and variant shard sets.

    Shards are verified (manifest, provenance: see `shards.code_set_metadata`) and paired
    by token range; both sets must cover identical ranges with the same d_sae. Columns:
    feature, r, r_lo, r_hi (the ``confidence`` interval of `fisher_interval`), flag,
    fp_fire_count, variant_fire_count, n_support (tokens where the feature is nonzero in
    FP or in the variant), n_tokens.
    """
    pairs, fp_meta = pair_shards(fp_paths, variant_paths, variant, expect)
    sums = SufficientSums(d_sae=fp_meta.d_sae)
    for fp_path, var_path in pairs:
        accumulate_pair(fp_path, var_path, sums, batch_rows)
    r, flags = pearson_from_sums(sums)
    r_lo, r_hi = fisher_interval(r, sums.n_support, confidence)
    return pl.DataFrame(
        {
            "feature": np.arange(sums.d_sae, dtype=np.int32),
            "r": r,
            "r_lo": r_lo,
            "r_hi": r_hi,
            "flag": pl.Series("flag", list(flags), dtype=pl.String),
            "fp_fire_count": sums.fire_x,
            "variant_fire_count": sums.fire_y,
            "n_support": sums.n_support.copy(),
            "n_tokens": np.full(sums.d_sae, sums.n, dtype=np.int64),
        }
    )
