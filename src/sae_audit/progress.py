"""Progress bars of the long steps, readable on a terminal and in a job log alike.

On a terminal a bar is tqdm's own, redrawn in place, with its total and ETA. In a job
log (stderr redirected to a file: every Snakemake job) tqdm's carriage-return redraws pile
up into one unreadable line, so there a bar writes whole lines instead: one when it
starts, then at most one every `LOG_INTERVAL_S` seconds, and one when it ends, each with
the count, the total, the elapsed time and the ETA.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sized
from typing import IO, Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")

# Seconds between two lines of a bar in a job log: a long step says where it is a few
# times a minute, a short one writes its first and last line only.
LOG_INTERVAL_S = 20.0
LINE_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), "
    "{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}"
)
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit}, {elapsed} elapsed, {rate_fmt}{postfix}"


def bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    transient: bool = False,
    file: IO[str] | None = None,
    interval_s: float = LOG_INTERVAL_S,
) -> tqdm:
    """A progress bar over `iterable` (or updated by hand, `total` steps) on `file` (stderr).

    `transient`: an inner bar of a longer step (one evaluation of a search), erased when
    done on a terminal; in a log it writes nothing unless it outlasts `interval_s`.
    """
    stream = sys.stderr if file is None else file
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=not transient, file=stream)
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    return LogLines(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        bar_format=LINE_FORMAT if total else LINE_FORMAT_NO_TOTAL,
        mininterval=interval_s,
        maxinterval=interval_s,
        delay=interval_s if transient else 0.0,
        # The average rate since the start: a steady ETA from lines far apart.
        smoothing=0.0,
        leave=False,
    )


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


class LogLines(tqdm):
    """tqdm writing newline-terminated status lines instead of redrawing one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lines = 0
        self._last_line_n = -1
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # msg "" is tqdm clearing the line on close (leave=False): nothing to clear here.
        if msg == "":
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        self._lines += 1
        self._last_line_n = self.n
        return True

    def close(self) -> None:
        # The final line, unless the last one said it already or the bar never showed.
        if not self.disable and self._lines and self._last_line_n != self.n:
            self.display()
        super().close()
