"""Per-feature firing statistics of the FP codes, against a dense recomputation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_audit.fp_stats import fp_feature_stats

from .conftest import sparse_random, write_dense


def test_fp_stats_match_dense(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = sparse_random(rng, 300, 9, 0.2)
    x[:, 4] = 0.0  # never fires
    x[-5:, :] = 0.0  # trailing tokens where nothing fires still count
    paths = write_dense(tmp_path, "fp", x, n_shards=3)
    stats = fp_feature_stats(paths)
    assert stats.columns == [
        "feature", "firing_count", "firing_rate", "mean_when_firing", "peak", "sum", "sum_sq", "n_tokens"
    ]  # fmt: skip
    count = (x > 0).sum(axis=0)
    np.testing.assert_array_equal(stats["firing_count"].to_numpy(), count)
    np.testing.assert_allclose(stats["firing_rate"].to_numpy(), count / 300, rtol=1e-12)
    np.testing.assert_allclose(stats["peak"].to_numpy(), x.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["sum"].to_numpy(), x.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["sum_sq"].to_numpy(), (x * x).sum(axis=0), rtol=1e-12)
    mean = stats["mean_when_firing"].to_numpy()
    fires = count > 0
    np.testing.assert_allclose(mean[fires], x.sum(axis=0)[fires] / count[fires], rtol=1e-12)
    assert stats["mean_when_firing"][4] is None
    assert stats["peak"][4] == 0.0
    assert (stats["n_tokens"] == 300).all()
    # An explicit token count overrides the metadata total.
    np.testing.assert_allclose(
        fp_feature_stats(paths, n_tokens=600)["firing_rate"].to_numpy(), count / 600
    )
