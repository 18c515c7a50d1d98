"""Per-feature Pearson r streamed from sparse shards, against np.corrcoef."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sae_audit.correlate as correlate_module
from sae_audit.correlate import (
    SufficientSums,
    _Scratch,
    accumulate_pair,
    accumulate_selections,
    correlate_variant,
    fisher_interval,
    join_sorted_keys,
    pearson_from_sums,
)
from sae_audit.files import InputError
from sae_audit.shards import (
    CODE_SCHEMA,
    METADATA_KEY,
    CodeShardWriter,
    ShardMetadata,
    iter_code_batches,
)

from .conftest import sparse_random, write_dense


def _pair_data(seed: int = 0, n: int = 600, d: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = sparse_random(rng, n, d, 0.3)
    noise = rng.normal(0.0, 0.5, size=(n, d)) * (rng.random((n, d)) < 0.5)
    y = np.maximum(x + noise, 0.0).astype(np.float32).astype(np.float64)
    y[:, 0] = 0.0  # never fires in the variant
    x[:, 1] = rng.uniform(0.5, 2.0, n).astype(np.float32)  # always fires in both
    y[:, 1] = (x[:, 1] * 0.8 + rng.uniform(0.1, 0.5, n)).astype(np.float32)
    x[:, 2] = rng.uniform(0.5, 2.0, n).astype(np.float32)  # always fires in FP only
    x[:, 3] = 0.0  # never fires in FP
    return x, y


def test_pearson_from_sparse_shards_equals_corrcoef(tmp_path: Path) -> None:
    x, y = _pair_data()
    # Misaligned row groups and read batches exercise the streaming merge.
    fp = write_dense(tmp_path, "fp", x, n_shards=3, row_group_size=37, rows_per_write=11)
    var = write_dense(tmp_path, "rtn-int6", y, n_shards=3, row_group_size=53, rows_per_write=29)
    out = correlate_variant(fp, list(reversed(var)), batch_rows=41)
    assert out.columns == [
        "feature",
        "r",
        "r_lo",
        "r_hi",
        "flag",
        "fp_fire_count",
        "variant_fire_count",
        "n_support",
        "n_tokens",
    ]
    r = out["r"].to_numpy()
    flag = out["flag"].to_list()
    assert not np.isnan(r).any()
    for f in range(x.shape[1]):
        if f in (0, 3):
            continue
        assert flag[f] is None
        expected = np.corrcoef(x[:, f], y[:, f])[0, 1]
        assert abs(r[f] - expected) < 1e-9, (f, r[f], expected)
    assert r[0] == 0.0 and flag[0] == "variant_silent"
    assert r[3] == 0.0 and flag[3] == "fp_silent"
    np.testing.assert_array_equal(out["fp_fire_count"].to_numpy(), (x > 0).sum(axis=0))
    np.testing.assert_array_equal(out["variant_fire_count"].to_numpy(), (y > 0).sum(axis=0))
    assert out["variant_fire_count"][1] == 600 and out["fp_fire_count"][2] == 600
    assert (out["n_tokens"] == 600).all()
    # support: the tokens where the feature is nonzero in FP or in the variant, by hand
    np.testing.assert_array_equal(out["n_support"].to_numpy(), ((x != 0) | (y != 0)).sum(axis=0))
    assert out["n_support"][3] == (y[:, 3] != 0).sum() > 0  # FP-silent: the variant's alone
    lo, hi = out["r_lo"].to_numpy(), out["r_hi"].to_numpy()
    assert np.all(lo <= r) and np.all(r <= hi) and np.all(lo >= -1) and np.all(hi <= 1)
    assert not (np.isnan(lo).any() or np.isnan(hi).any())


def test_accumulate_pair_sums_equal_dense(tmp_path: Path) -> None:
    x, y = _pair_data(seed=3, n=200)
    (fp,) = write_dense(tmp_path, "fp", x, n_shards=1)
    (var,) = write_dense(tmp_path, "v", y, n_shards=1)
    sums = SufficientSums(d_sae=x.shape[1])
    accumulate_pair(fp, var, sums, batch_rows=7)
    assert sums.n == 200
    np.testing.assert_allclose(sums.sum_xy, (x * y).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sums.sum_x2, (x * x).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sums.sum_y, y.sum(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(sums.n_support, ((x != 0) | (y != 0)).sum(axis=0))


def test_support_is_the_union_of_the_two_sparse_supports(tmp_path: Path) -> None:
    """Planted supports: FP fires on tokens {0..9}, the variant on {5..19} -> union 20."""
    n = 64
    x, y = np.zeros((n, 2)), np.zeros((n, 2))
    x[0:10, 0], y[5:20, 0] = 1.0, 2.0
    x[[1, 7, 40], 1] = [1.0, 2.0, 3.0]  # feature 1: FP only, 3 tokens
    (fp,) = write_dense(tmp_path, "fp", x, n_shards=1)
    (var,) = write_dense(tmp_path, "v", y, n_shards=1)
    sums = SufficientSums(d_sae=2)
    accumulate_pair(fp, var, sums, batch_rows=5)
    assert sums.n_support.tolist() == [20, 3]


def test_fisher_interval_widens_with_less_support() -> None:
    r = np.full(4, 0.95)
    lo, hi = fisher_interval(r, np.array([3, 4, 100, 3000]), 0.95)
    assert (lo[0], hi[0]) == (-1.0, 1.0)  # n <= 3: no evidence at all
    assert np.all(lo <= r) and np.all(r <= hi)
    assert np.all(np.diff(hi - lo) < 0)  # narrower with every step of support
    # the textbook interval at n = 3000: tanh(atanh(0.95) -+ 1.959964 / sqrt(2997))
    half = 1.959964 / np.sqrt(2997)
    np.testing.assert_allclose(
        [lo[3], hi[3]], np.tanh(np.arctanh(0.95) + np.array([-half, half])), rtol=1e-6
    )
    # confidence 0: the point; |r| = 1 with support: the point
    lo0, hi0 = fisher_interval(r, np.array([3, 4, 100, 3000]), 0.0)
    np.testing.assert_array_equal(lo0, r)
    np.testing.assert_array_equal(hi0, r)
    lo1, hi1 = fisher_interval(np.array([1.0, -1.0, 0.0]), np.array([50, 50, 50]), 0.95)
    assert lo1[0] == hi1[0] == 1.0 and lo1[1] == hi1[1] == -1.0 and lo1[2] < 0 < hi1[2]
    with pytest.raises(ValueError, match="confidence"):
        fisher_interval(r, np.array([5, 5, 5, 5]), 1.0)


def test_zero_variance_features_are_flagged_not_nan() -> None:
    n = 10
    ramp = np.arange(1, n + 1.0)
    # feature 0: FP constant, variant varies; 1: both constant; 2: variant constant.
    x = np.stack([np.full(n, 2.0), np.full(n, 2.0), ramp], axis=1)
    y = np.stack([ramp, np.full(n, 3.0), np.full(n, 4.0)], axis=1)
    sums = SufficientSums(d_sae=3, n=n)
    sums.sum_x, sums.sum_x2 = x.sum(0), (x * x).sum(0)
    sums.sum_y, sums.sum_y2 = y.sum(0), (y * y).sum(0)
    sums.sum_xy = (x * y).sum(0)
    r, flags = pearson_from_sums(sums)
    assert list(flags) == ["fp_constant", "both_constant", "variant_constant"]
    np.testing.assert_array_equal(r, [0.0, 1.0, 0.0])


def test_correlate_rejects_mismatched_shards(tmp_path: Path) -> None:
    x, y = _pair_data(n=100)
    fp = write_dense(tmp_path, "fp", x, n_shards=2)
    var = write_dense(tmp_path, "v", y, n_shards=3)
    with pytest.raises(ValueError, match="different token ranges"):
        correlate_variant(fp, var)
    wide = write_dense(tmp_path, "w", y, n_shards=2, d_sae=x.shape[1] + 1)
    with pytest.raises(ValueError, match="d_sae"):
        correlate_variant(fp, wide)


# ---------------------------------------------------------------- the join and the streaming pass
def _dict_join(key_a: np.ndarray, key_b: np.ndarray) -> tuple[list[int], list[int]]:
    """The join by hand: positions of the keys found on both sides, in key order."""
    where_b = {int(k): i for i, k in enumerate(key_b)}
    pairs = [(i, where_b[int(k)]) for i, k in enumerate(key_a) if int(k) in where_b]
    return [i for i, _ in pairs], [j for _, j in pairs]


def _sorted_keys(rng: np.random.Generator, n: int, high: int, low: int = 0) -> np.ndarray:
    return np.unique(rng.integers(low, high, n)).astype(np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_join_sorted_keys_equals_a_dict_join(seed: int) -> None:
    rng = np.random.default_rng(seed)
    high = int(rng.choice([10, 1_000, 1 << 40]))
    for n_a, n_b in [(0, 0), (0, 5), (5, 0), (1, 1), (1, 50), (50, 1), (300, 200), (2000, 3000)]:
        key_a, key_b = _sorted_keys(rng, n_a, high), _sorted_keys(rng, n_b, high)
        in_a, in_b = join_sorted_keys(key_a, key_b)
        assert (in_a.tolist(), in_b.tolist()) == _dict_join(key_a, key_b), (n_a, n_b, high)
        assert in_a.dtype == in_b.dtype == np.int64


def test_join_sorted_keys_edge_cases() -> None:
    keys = np.array([0, 3, 7, 8, 1 << 20], dtype=np.int64)
    # identical sides, disjoint sides, interleaved sides, a single shared key at either end
    assert [a.tolist() for a in join_sorted_keys(keys, keys)] == [[0, 1, 2, 3, 4]] * 2
    assert join_sorted_keys(keys, keys + (1 << 21))[0].size == 0
    assert join_sorted_keys(keys[::2], keys[1::2])[0].size == 0
    first, last = keys[:1], keys[-1:]
    assert [a.tolist() for a in join_sorted_keys(first, keys)] == [[0], [0]]
    assert [a.tolist() for a in join_sorted_keys(keys, last)] == [[4], [0]]


@pytest.mark.parametrize("low", [(1 << 62) - 10_000, 0])
def test_join_sorted_keys_wide_keys_pack_relative_or_fall_back(low: int) -> None:
    """Keys too big to pack as they are: packed relative to the smallest key, or (keys
    ~2^62 apart, no room at all) joined by binary search; the answer is the same."""
    rng = np.random.default_rng(1)
    high = low + 10_000 if low else 1 << 62
    key_a, key_b = _sorted_keys(rng, 3000, high, low), _sorted_keys(rng, 3000, high, low)
    key_b = np.union1d(key_b, key_a[::3])  # plenty of matches even when sparse
    in_a, in_b = join_sorted_keys(key_a, key_b)
    assert (in_a.tolist(), in_b.tolist()) == _dict_join(key_a, key_b)
    assert in_a.size >= 1000


def test_join_sorted_keys_reuses_scratch_across_calls() -> None:
    """With scratch, every call's answer is right though the buffers are reused, and a
    scratch too small for the keys is not written past its end."""
    rng = np.random.default_rng(2)
    scratch = _Scratch(64)
    for n in (64, 10, 64, 1, 200):
        key_a, key_b = _sorted_keys(rng, n, 300), _sorted_keys(rng, n, 300)
        in_a, in_b = join_sorted_keys(key_a, key_b, scratch)
        assert (in_a.tolist(), in_b.tolist()) == _dict_join(key_a, key_b)


def _dense_sums(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "sum_x": x.sum(0), "sum_x2": (x * x).sum(0), "sum_y": y.sum(0), "sum_y2": (y * y).sum(0),
        "sum_xy": (x * y).sum(0), "fire_x": (x > 0).sum(0), "fire_y": (y > 0).sum(0),
        "n_support": ((x != 0) | (y != 0)).sum(0),
    }  # fmt: skip


def _assert_sums_equal_dense(sums: SufficientSums, x: np.ndarray, y: np.ndarray) -> None:
    assert sums.n == x.shape[0]
    for name, expected in _dense_sums(x, y).items():
        got = getattr(sums, name)
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.parametrize(
    ("piece_rows", "batch_rows"), [(5, 13), (7, 7), (64, 41), (1 << 17, 1 << 20)]
)
def test_streaming_pass_equals_dense_sums_at_any_piece_and_batch_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_rows: int, batch_rows: int
) -> None:
    """Pieces and batches end inside a token (~4 rows a token here) and at different rows
    on each side; features fire on one side only; signs vary (negative rows are nonzero
    but do not fire)."""
    monkeypatch.setattr(correlate_module, "PIECE_ROWS", piece_rows)
    x, y = _pair_data(seed=5, n=150, d=16)
    x[:, 4] = 0.0  # variant only
    y[:, 5] = 0.0  # FP only
    y[:40, 6] = -y[:40, 6] - 0.5  # negative activations: nonzero, never firing
    x[::3, 7] = -1.0
    y = y.astype(np.float32).astype(np.float64)  # what the shard holds
    (fp,) = write_dense(tmp_path, "fp", x, n_shards=1, row_group_size=23, rows_per_write=9)
    (var,) = write_dense(tmp_path, "v", y, n_shards=1, row_group_size=31, rows_per_write=4)
    sums = SufficientSums(d_sae=x.shape[1])
    accumulate_pair(fp, var, sums, batch_rows=batch_rows)
    _assert_sums_equal_dense(sums, x, y)


def test_selections_accumulate_only_their_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(correlate_module, "PIECE_ROWS", 11)
    x, y = _pair_data(seed=6, n=120, d=10)
    (fp,) = write_dense(tmp_path, "fp", x, n_shards=1, rows_per_write=7)
    (var,) = write_dense(tmp_path, "v", y, n_shards=1, rows_per_write=5)
    odd = SufficientSums(d_sae=10)
    head = SufficientSums(d_sae=10)
    everything = SufficientSums(d_sae=10)
    selections = [(odd, lambda t: t % 2 == 1), (head, lambda t: t < 50), (everything, None)]
    accumulate_selections(fp, var, selections, batch_rows=17)
    _assert_sums_equal_dense(odd, x[1::2], y[1::2])
    _assert_sums_equal_dense(head, x[:50], y[:50])
    _assert_sums_equal_dense(everything, x, y)


def test_excluded_positions_count_in_no_statistic(tmp_path: Path) -> None:
    """Shards that exclude positions (encode.exclude_special_positions) correlate as if
    those positions were not in the token set at all: r, the token count and every
    selection's count are those of the kept positions."""
    x, y = _pair_data(seed=8, n=120, d=6)
    excluded = [*range(0, 120, 12), 5, 77]  # each sequence's first, and two more
    fp = write_dense(tmp_path, "fp", x, n_shards=2, rows_per_write=7, excluded=excluded)
    var = write_dense(tmp_path, "v", y, n_shards=2, rows_per_write=5, excluded=excluded)
    kept = np.setdiff1d(np.arange(120), excluded)
    out = correlate_variant(fp, var)
    assert (out["n_tokens"] == kept.size).all()
    for f in (1, 2, 4, 5):
        expected = np.corrcoef(x[kept, f], y[kept, f])[0, 1]
        assert abs(out["r"][f] - expected) < 1e-9, f
    head = SufficientSums(d_sae=6)
    for a, b in zip(fp, var, strict=True):
        accumulate_selections(a, b, [(head, lambda t: t < 50)])
    in_head = kept[kept < 50]
    _assert_sums_equal_dense(head, x[in_head], y[in_head])
    # FP and variant shards must exclude the same positions.
    other = write_dense(tmp_path / "o", "v", y, n_shards=2, excluded=excluded[:-1])
    with pytest.raises(ValueError, match="excluded differs"):
        correlate_variant(fp, other)


@pytest.mark.parametrize("empty", ["fp", "variant", "both"])
def test_an_empty_shard_adds_only_the_other_side(tmp_path: Path, empty: str) -> None:
    x, y = _pair_data(seed=7, n=60, d=6)
    if empty in ("fp", "both"):
        x[:] = 0.0
    if empty in ("variant", "both"):
        y[:] = 0.0
    (fp,) = write_dense(tmp_path, "fp", x, n_shards=1)
    (var,) = write_dense(tmp_path, "v", y, n_shards=1)
    assert sum(b.num_rows for b in iter_code_batches(fp if empty != "variant" else var)) == 0
    sums = SufficientSums(d_sae=6)
    accumulate_pair(fp, var, sums, batch_rows=8)
    _assert_sums_equal_dense(sums, x, y)
    out = correlate_variant([fp], [var])
    assert (out["r"] == 0.0).all()
    fp_silent = ~(x != 0).any(axis=0)
    expected = np.where(fp_silent, "fp_silent", "variant_silent")  # fp_silent takes precedence
    assert out["flag"].to_list() == expected.tolist()


def test_identical_shards_correlate_exactly_one(tmp_path: Path) -> None:
    """The same codes on both sides add the same float64 terms in the same order to sum x^2,
    sum y^2 and sum xy: r is exactly 1 (the noise null's floor relies on it)."""
    x, _ = _pair_data(seed=8, n=500, d=12)
    x[:, 3] = x[:, 2]  # no silent feature: every column varies
    fp = write_dense(tmp_path, "fp", x, n_shards=2, row_group_size=37)
    twin = write_dense(tmp_path, "twin", x, n_shards=2, row_group_size=37)
    out = correlate_variant(fp, twin, batch_rows=53)
    assert out["r"].to_list() == [1.0] * 12


def test_a_duplicated_row_across_a_piece_boundary_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (token, feature) row twice would be counted twice by every sum: found even when
    the two copies land in different pieces (and read batches)."""
    monkeypatch.setattr(correlate_module, "PIECE_ROWS", 4)
    meta = ShardMetadata(model="m", variant="fp", sae="s", hook="h", d_sae=8,
                         token_start=0, token_stop=10, config_hash="x")  # fmt: skip
    # Written by hand, as a damaged or foreign shard would be: the writer is not under test.
    path = tmp_path / "fp.parquet"
    rows = {
        "token": [0, 0, 1, 2, 2, 3, 3, 4],  # rows 3 and 4: token 2, feature 5, twice
        "feature": [1, 2, 0, 5, 5, 1, 6, 0],
        "value": [1.0] * 8,
    }
    schema = CODE_SCHEMA.with_metadata({METADATA_KEY: meta.to_json()})
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), path)
    good = tmp_path / "v" / "shard-0.parquet"
    with CodeShardWriter(good, replace(meta, variant="v")) as writer:
        writer.write(np.array([0]), np.array([1], dtype=np.int32), np.ones(1, dtype=np.float32))
    for batch_rows in (4, 100):
        with pytest.raises(InputError, match=r"not strictly sorted by \(token, feature\)"):
            accumulate_pair(path, good, SufficientSums(d_sae=8), batch_rows=batch_rows)


def test_reading_in_row_group_runs_keeps_every_row_in_order(tmp_path: Path) -> None:
    """The read side correlate streams from: row groups of uneven sizes are read in runs of
    at most batch_rows rows (a longer group alone, split), every row once, in order."""
    meta = ShardMetadata(model="m", variant="fp", sae="s", hook="h", d_sae=4,
                         token_start=0, token_stop=1000, config_hash="x")  # fmt: skip
    path = tmp_path / "fp" / "shard-0.parquet"
    start = 0
    with CodeShardWriter(path, meta) as writer:
        for n in (3, 50, 1, 7, 20, 2, 2, 30):  # one write, one row group
            token = np.arange(start, start + n)
            writer.write(token, np.zeros(n, dtype=np.int32), np.ones(n, dtype=np.float32))
            start += n
    for batch_rows in (1, 5, 8, 25, 1000):
        batches = list(iter_code_batches(path, batch_rows))
        assert all(0 < b.num_rows <= batch_rows for b in batches), batch_rows
        token = np.concatenate([b.column("token").to_numpy() for b in batches])
        assert token.tolist() == list(range(start)), batch_rows
