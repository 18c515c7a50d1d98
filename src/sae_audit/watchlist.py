"""The watchlist: the features a deployment cares about most (config section `watchlist`).

One list serves the protect step (what the recipe keeps alive) and the release gate
(the watchlist minimum), so both read the same ids: a file of ids, or the top N active
features by FP firing count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .config import FROM_SCHEMA, ConfigSection
from .files import InputError


def read_watchlist(path: str | Path) -> list[int]:
    """Feature ids from a text file: one per line (or separated by commas or spaces);
    blank lines and '#' comments are ignored."""
    ids: list[int] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].replace(",", " ")
        for word in text.split():
            try:
                ids.append(int(word))
            except ValueError:
                raise InputError(
                    f"{path}:{n}: {word!r} is not a feature id (one integer per line)"
                ) from None
    return ids


@dataclass(frozen=True)
class WatchlistConfig(ConfigSection, section="watchlist"):
    """Config section `watchlist`: a file of feature ids, or the top N by FP use."""

    file: str | None = FROM_SCHEMA
    top: int = FROM_SCHEMA

    @property
    def source(self) -> str:
        """How the list was chosen, for tables and certificates."""
        return f"file {self.file}" if self.file else f"top {self.top} by FP firing count"


def watchlist_features(
    fp_stats: pl.DataFrame, cfg: WatchlistConfig, active_rate: float
) -> list[int]:
    """The watched feature ids, in order.

    A file's ids must be features of the SAE that are active in FP (firing rate above
    `active_rate`): survival is only defined for those, and a silent feature cannot be
    protected. Without a file: the `top` active features with the highest FP firing
    count (ties: lower id first).
    """
    active = fp_stats.filter(pl.col("firing_rate") > active_rate)
    if cfg.file is None:
        top = active.sort(["firing_count", "feature"], descending=[True, False]).head(cfg.top)
        return [int(f) for f in top["feature"]]
    wanted = list(dict.fromkeys(read_watchlist(Path(cfg.file))))
    known = set(fp_stats["feature"].to_list())
    missing = [f for f in wanted if f not in known]
    if missing:
        raise InputError(
            f"{cfg.file}: features {missing} are not features of this SAE "
            f"(0..{fp_stats.height - 1}); fix the file named by watchlist.file"
        )
    live = set(active["feature"].to_list())
    silent = [f for f in wanted if f not in live]
    if silent:
        raise InputError(
            f"{cfg.file}: features {silent} are not active in the FP model (firing rate at "
            f"most analysis.active_rate = {active_rate}), so their survival is undefined; "
            "remove them from the file named by watchlist.file"
        )
    if not wanted:
        raise InputError(f"{cfg.file}: no feature ids (watchlist.file); list one per line")
    return wanted
