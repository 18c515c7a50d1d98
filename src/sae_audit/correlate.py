"""Per-feature Pearson correlation between FP and compressed SAE codes.

Pearson needs only six sums per feature (n, sum x, sum x^2, sum y, sum y^2,
sum xy), all in float64. Sums of x and of y come from each sparse side alone
(zeros add nothing); sum xy needs only the (token, feature) pairs nonzero on
both sides. The two shards are sorted by (token, feature), so they are merged
as two streams, joined piece by piece on one combined sorted key (see
`accumulate_selections` and `join_sorted_keys`): memory is bounded by a read batch
per side, a few piece-long arrays and the d_sae-long accumulators, never by the
token count.

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
        self._add_side(feature, value, self.sum_x, self.sum_x2, self.fire_x)

    def add_y(self, feature: np.ndarray, value: np.ndarray) -> None:
        """Add sparse variant activations (one row per nonzero)."""
        self._add_side(feature, value, self.sum_y, self.sum_y2, self.fire_y)

    def add_xy(self, feature: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """Add products of (token, feature) pairs nonzero on both sides (rows present in
        both shards); such a token was counted by `add_x` and by `add_y`, so it leaves
        the union support once."""
        self._add_products(feature, x, y)

    def _add_side(
        self,
        feature: np.ndarray,
        value: np.ndarray,
        total: np.ndarray,
        total_sq: np.ndarray,
        fire: np.ndarray,
        square: np.ndarray | None = None,
        positive: bool | None = None,
    ) -> None:
        """`square`: scratch for the squares; `positive`: every value is known to be > 0."""
        # np.bincount works on intp indices and float64 weights and converts anything else
        # on every call: the accumulation pass hands both over converted, once a piece.
        feature = feature.astype(np.intp, copy=False)
        value = value.astype(np.float64, copy=False)
        square = np.multiply(value, value, out=None if square is None else square[: value.size])
        total += np.bincount(feature, weights=value, minlength=self.d_sae)
        total_sq += np.bincount(feature, weights=square, minlength=self.d_sae)
        if positive or value.size == 0 or value.min() > 0:
            # Every row fires and is nonzero (a ReLU-type SAE's codes): one count serves both.
            count = np.bincount(feature, minlength=self.d_sae)
            fire += count
            self.n_support += count
        else:
            fire += np.bincount(feature[value > 0], minlength=self.d_sae)
            self.n_support += np.bincount(feature[value != 0], minlength=self.d_sae)

    def _add_products(
        self,
        feature: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        product: np.ndarray | None = None,
        nonzero: bool | None = None,
    ) -> None:
        """`product`: scratch for the products; `nonzero`: every x and y is known to be."""
        feature = feature.astype(np.intp, copy=False)
        x, y = x.astype(np.float64, copy=False), y.astype(np.float64, copy=False)
        product = np.multiply(x, y, out=None if product is None else product[: x.size])
        self.sum_xy += np.bincount(feature, weights=product, minlength=self.d_sae)
        both = feature if nonzero or (x.all() and y.all()) else feature[(x != 0) & (y != 0)]
        self.n_support -= np.bincount(both, minlength=self.d_sae)


# Rows per unit of work. Each read batch is worked on in pieces this long, so that the
# arrays of one piece stay in the CPU caches between the numpy passes over them: ~1.4x
# faster here than whole 1M-row batches. Much shorter pieces pay the per-call overhead and
# the d_sae-long bincount outputs (allocated, added) too often.
PIECE_ROWS = 1 << 17


class _Scratch:
    """Arrays reused piece after piece by one accumulation pass (or made for one join).

    A fresh numpy temporary of a piece's size comes from glibc, which hands freed memory
    back to the OS, so each piece would page-fault its temporaries in anew: ~10% of the
    pass here. What is computed into these is valid until the next piece.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        # The join packs (key, side, position); positions < 2**position_bits.
        self.position_bits = max(rows - 1, 1).bit_length()
        self.positions_a = np.arange(rows, dtype=np.int64)
        self.positions_b = self.positions_a | (1 << self.position_bits)  # the side bit: b
        self.merged = np.empty(2 * rows, dtype=np.int64)
        self.neighbours = np.empty(2 * rows, dtype=np.int64)
        self.same_key = np.empty(2 * rows, dtype=np.bool_)
        self.in_a = np.empty(rows, dtype=np.int64)
        self.in_b = np.empty(rows, dtype=np.int64)
        self.feature = np.empty(rows, dtype=np.intp)
        self.x = np.empty(rows, dtype=np.float64)
        self.y = np.empty(rows, dtype=np.float64)
        self.product = np.empty(rows, dtype=np.float64)
        self.square = np.empty(rows, dtype=np.float64)


def join_sorted_keys(
    key_a: np.ndarray, key_b: np.ndarray, scratch: _Scratch | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in a, in b) of the keys present in both, in key order.

    Both arrays must be non-negative int64 keys, strictly increasing (`shards.row_keys`
    checks a shard's rows are). The join is a merge on one combined sorted key: each row
    becomes (key, side, position) packed into one int64, a before b on equal keys; the
    two sorted runs are merged by a stable sort (timsort: linear for two runs) and a key
    present on both sides comes out as two neighbours. A binary search of each key of a
    in b costs ~log2(len b) mispredicted branches per key instead: ~3x slower here.
    Keys too wide to pack (over ~2^44 apart) fall back to that search. With `scratch`,
    the positions returned are views into it, valid until its next use.
    """
    n_a, n_b = key_a.size, key_b.size
    if n_a == 0 or n_b == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if scratch is None or scratch.rows < max(n_a, n_b):
        scratch = _Scratch(max(n_a, n_b))
    shift = scratch.position_bits + 1  # the side bit sits just above the position
    top = max(int(key_a[-1]), int(key_b[-1]))
    # Packing the keys as they are saves a pass; subtract the smallest only when needed.
    base = 0 if top.bit_length() + shift <= 63 else min(int(key_a[0]), int(key_b[0]))
    if (top - base).bit_length() + shift > 63:
        return _join_by_search(key_a, key_b)
    merged = scratch.merged[: n_a + n_b]
    for key, packed, positions in (
        (key_a, merged[:n_a], scratch.positions_a),
        (key_b, merged[n_a:], scratch.positions_b),
    ):
        if base:
            np.subtract(key, base, out=packed)
            packed <<= shift
        else:
            np.left_shift(key, shift, out=packed)
        packed |= positions[: key.size]
    merged.sort(kind="stable")
    # Neighbours with the same key differ only below `shift`: an a row, then its b row.
    neighbours = np.bitwise_xor(merged[1:], merged[:-1], out=scratch.neighbours[: n_a + n_b - 1])
    same_key = np.less(neighbours, 1 << shift, out=scratch.same_key[: n_a + n_b - 1])
    first = np.flatnonzero(same_key)
    position_mask = (1 << scratch.position_bits) - 1
    # mode="wrap": the positions are in range, and the default ("raise") with `out`
    # gathers into a temporary first.
    in_a = np.take(merged, first, out=scratch.in_a[: first.size], mode="wrap")
    in_a &= position_mask
    in_b = np.take(merged[1:], first, out=scratch.in_b[: first.size], mode="wrap")  # next ones
    in_b &= position_mask
    return in_a, in_b


def _join_by_search(key_a: np.ndarray, key_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    in_b = np.searchsorted(key_b, key_a)
    hit = in_b < key_b.size
    hit[hit] = key_b[in_b[hit]] == key_a[hit]
    return np.flatnonzero(hit).astype(np.int64), in_b[hit].astype(np.int64)


@dataclass(frozen=True)
class _Rows:
    """A piece of a code shard's rows, checked, in the types the sums use."""

    token: np.ndarray  # int64
    feature: np.ndarray  # intp: np.bincount's index type
    value: np.ndarray  # float64: the type of every sum
    key: np.ndarray  # int64 (token, feature) key, strictly increasing
    positive: bool  # every value > 0 (a ReLU-type SAE's codes): each row fires


def _checked_pieces(path: Path, meta: ShardMetadata, batch_rows: int) -> Iterator[_Rows]:
    """A shard's rows piece by piece, each in range and strictly sorted after the last.

    A piece's feature and value arrays are reused by the next (see `_Scratch`): a
    piece is valid until the next one is drawn.
    """
    feature_buffer = np.empty(PIECE_ROWS, dtype=np.intp)
    value_buffer = np.empty(PIECE_ROWS, dtype=np.float64)
    last_key = -1
    for batch in iter_code_batches(path, batch_rows):
        token = batch.column("token").to_numpy()
        feature = batch.column("feature").to_numpy()
        value = batch.column("value").to_numpy()
        for lo in range(0, token.size, PIECE_ROWS):
            piece = slice(lo, lo + PIECE_ROWS)
            key = row_keys(path, meta, token[piece], feature[piece], after=last_key)
            last_key = int(key[-1])
            wide_feature, wide_value = feature_buffer[: key.size], value_buffer[: key.size]
            np.copyto(wide_feature, feature[piece])
            np.copyto(wide_value, value[piece])
            positive = bool(value[piece].min() > 0)
            yield _Rows(token[piece], wide_feature, wide_value, key, positive)


def _check_pair(fp_meta: ShardMetadata, var_meta: ShardMetadata, fp: Path, var: Path) -> None:
    if fp_meta.d_sae != var_meta.d_sae:
        raise ValueError(f"d_sae differs: {fp} has {fp_meta.d_sae}, {var} has {var_meta.d_sae}")
    if (fp_meta.token_start, fp_meta.token_stop) != (var_meta.token_start, var_meta.token_stop):
        raise ValueError(
            f"token ranges differ: {fp} [{fp_meta.token_start}, {fp_meta.token_stop}) vs "
            f"{var} [{var_meta.token_start}, {var_meta.token_stop})"
        )
    for attr in ("model", "sae", "hook", "excluded"):
        if getattr(fp_meta, attr) != getattr(var_meta, attr):
            raise ValueError(
                f"{attr} differs: {fp} has {getattr(fp_meta, attr)!r}, "
                f"{var} has {getattr(var_meta, attr)!r}"
            )


TokenFilter = Callable[[np.ndarray], np.ndarray]  # global token positions -> keep mask
Selections = Sequence[tuple[SufficientSums, TokenFilter | None]]


def accumulate_pair(
    fp_shard: Path, variant_shard: Path, sums: SufficientSums, batch_rows: int = 1 << 20
) -> None:
    """Add one (FP, variant) shard pair covering the same tokens to ``sums`` in place."""
    accumulate_selections(fp_shard, variant_shard, [(sums, None)], batch_rows)


def _add_piece(selections: Selections, rows: _Rows | None, fp: bool, scratch: _Scratch) -> None:
    """Add a piece's rows to the sums of their side (x for FP, y for the variant)."""
    if rows is None:
        return
    for sums, keep in selections:
        kept = slice(None) if keep is None else keep(rows.token)
        totals = (
            (sums.sum_x, sums.sum_x2, sums.fire_x) if fp else (sums.sum_y, sums.sum_y2, sums.fire_y)
        )
        sums._add_side(rows.feature[kept], rows.value[kept], *totals, scratch.square, rows.positive)


def accumulate_selections(
    fp_shard: Path,
    variant_shard: Path,
    selections: Selections,
    batch_rows: int = 1 << 20,
) -> None:
    """Accumulate several token selections (budgets, subsets) in one pass over a shard pair.

    Each selection is (sums, keep) where ``keep`` maps token positions to a boolean
    mask (None keeps every token). The merge and join run once; only the
    accumulation is repeated per selection.

    The sums of one side need no alignment: each piece of rows adds them as it is read.
    Only sum xy needs a key's rows from both sides, so the two sorted streams are merged
    piece against piece: the rows of both current pieces up to the smaller of their last
    keys are complete (the other side's later rows have larger keys) and are joined, and
    a piece used up is replaced by the next. Memory: a read batch a side, and a few
    piece-long arrays.
    """
    fp_shard, variant_shard = Path(fp_shard), Path(variant_shard)
    fp_meta, var_meta = read_metadata(fp_shard), read_metadata(variant_shard)
    _check_pair(fp_meta, var_meta, fp_shard, variant_shard)
    for sums, _ in selections:
        if fp_meta.d_sae != sums.d_sae:
            raise ValueError(f"{fp_shard}: d_sae {fp_meta.d_sae} != accumulator d_sae {sums.d_sae}")
    scratch = _Scratch(PIECE_ROWS)
    fp_pieces = _checked_pieces(fp_shard, fp_meta, batch_rows)
    var_pieces = _checked_pieces(variant_shard, var_meta, batch_rows)
    a, b = next(fp_pieces, None), next(var_pieces, None)
    _add_piece(selections, a, True, scratch)
    _add_piece(selections, b, False, scratch)
    a_from = b_from = 0  # rows of a and b before these are joined already
    while a is not None and b is not None:
        cut = min(int(a.key[-1]), int(b.key[-1]))
        a_to = int(np.searchsorted(a.key, cut, side="right"))
        b_to = int(np.searchsorted(b.key, cut, side="right"))
        in_a, in_b = join_sorted_keys(a.key[a_from:a_to], b.key[b_from:b_to], scratch)
        n = in_a.size
        feature = np.take(a.feature[a_from:a_to], in_a, out=scratch.feature[:n], mode="wrap")
        x = np.take(a.value[a_from:a_to], in_a, out=scratch.x[:n], mode="wrap")
        y = np.take(b.value[b_from:b_to], in_b, out=scratch.y[:n], mode="wrap")
        nonzero = a.positive and b.positive
        for sums, keep in selections:
            if keep is None:
                sums._add_products(feature, x, y, scratch.product, nonzero)
            else:
                kept = keep(a.token[a_from:a_to][in_a])
                sums._add_products(feature[kept], x[kept], y[kept], scratch.product, nonzero)
        a_from, b_from = a_to, b_to
        if a_from == a.key.size:
            a, a_from = next(fp_pieces, None), 0
            _add_piece(selections, a, True, scratch)
        if b_from == b.key.size:
            b, b_from = next(var_pieces, None), 0
            _add_piece(selections, b, False, scratch)
    # One side has ended: the other's remaining rows match nothing, but add their sums.
    for rows in fp_pieces:
        _add_piece(selections, rows, True, scratch)
    for rows in var_pieces:
        _add_piece(selections, rows, False, scratch)
    # Every position the shard covers counts (a zero where nothing fired), except the
    # ones it excludes by design (encode.exclude_special_positions).
    tokens = np.arange(fp_meta.token_start, fp_meta.token_stop, dtype=np.int64)
    excluded = np.asarray(fp_meta.excluded, dtype=np.int64)
    for sums, keep in selections:
        if keep is None:
            sums.n += fp_meta.n_positions
        else:
            sums.n += int(keep(tokens).sum()) - int(keep(excluded).sum())


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
    return pearson_from_moments(
        var_x=sums.sum_x2 - sums.sum_x * sums.sum_x / n,
        var_y=sums.sum_y2 - sums.sum_y * sums.sum_y / n,
        cov=sums.sum_xy - sums.sum_x * sums.sum_y / n,
        sum_x2=sums.sum_x2,
        sum_y2=sums.sum_y2,
    )


def pearson_from_moments(
    *,
    var_x: np.ndarray,
    var_y: np.ndarray,
    cov: np.ndarray,
    sum_x2: np.ndarray,
    sum_y2: np.ndarray,
    silent: tuple[str, str] = ("fp_silent", "variant_silent"),
) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and its edge-case flags from centered second moments (times n) and the
    raw sums of squares, per element; never NaN (the precedence of pearson_from_sums).

    A side whose raw sum of squares is 0 is all zeros: flagged `silent` (FP's, the
    variant's), r = 0. sae_audit.causal uses it with its own names for that case.
    """
    fp_silent = sum_x2 == 0
    var_silent = sum_y2 == 0
    const_x = ~fp_silent & (var_x <= _ZERO_VARIANCE_RTOL * sum_x2)
    const_y = ~var_silent & (var_y <= _ZERO_VARIANCE_RTOL * sum_y2)

    ok = ~(fp_silent | var_silent | const_x | const_y)
    r = np.zeros(var_x.shape, dtype=np.float64)
    r[ok] = cov[ok] / np.sqrt(var_x[ok] * var_y[ok])
    np.clip(r, -1.0, 1.0, out=r)

    flags = np.full(var_x.shape, None, dtype=object)
    # Assign lowest precedence first so higher-precedence flags overwrite.
    flags[const_y] = "variant_constant"
    flags[const_x] = "fp_constant"
    both = const_x & const_y
    flags[both] = "both_constant"
    r[both] = 1.0
    flags[var_silent] = silent[1]
    flags[fp_silent] = silent[0]
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
