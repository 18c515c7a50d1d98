"""The watchlist: the top features by FP use, or a file of ids checked against the SAE."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from sae_audit.files import InputError
from sae_audit.watchlist import WatchlistConfig, watchlist_features


def fp_stats(counts: list[int], n_tokens: int = 100) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "feature": list(range(len(counts))),
            "firing_count": counts,
            "firing_rate": [c / n_tokens for c in counts],
        }
    )


def test_top_takes_the_most_used_active_features_ties_by_id() -> None:
    stats = fp_stats([5, 50, 0, 50, 20, 1])
    # feature 5 fires at rate 0.01, not above active_rate 0.01: never watched
    assert watchlist_features(stats, WatchlistConfig(top=3), 0.01) == [1, 3, 4]
    assert watchlist_features(stats, WatchlistConfig(top=10), 0.01) == [1, 3, 4, 0]


def test_a_file_keeps_its_order_and_drops_repeats(tmp_path: Path) -> None:
    path = tmp_path / "watch.txt"
    path.write_text("# the features we ship with\n4\n1, 4\n\n0  # and this one\n")
    cfg = WatchlistConfig(file=str(path))
    assert watchlist_features(fp_stats([5, 50, 0, 50, 20]), cfg, 0.01) == [4, 1, 0]
    assert cfg.source == f"file {path}"
    assert WatchlistConfig(top=7).source == "top 7 by FP firing count"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("9\n", "features [9] are not features of this SAE (0..4)"),
        ("2\n", "features [2] are not active in the FP model"),
        ("# nothing\n", "no feature ids"),
        ("x\n", "'x' is not a feature id"),
    ],
)
def test_a_bad_file_names_itself_and_the_fix(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "watch.txt"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        watchlist_features(fp_stats([5, 50, 0, 50, 20]), WatchlistConfig(file=str(path)), 0.01)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
