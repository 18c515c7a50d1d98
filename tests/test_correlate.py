"""Per-feature Pearson r streamed from sparse shards, against np.corrcoef."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sae_audit.correlate import (
    SufficientSums,
    accumulate_pair,
    correlate_variant,
    fisher_interval,
    pearson_from_sums,
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
