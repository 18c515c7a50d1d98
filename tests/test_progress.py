"""Progress bars of the long steps: a total and an ETA, and whole lines in a job log."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import pytest

from sae_audit import progress

# One status line of a bar in a log: count of total, percent, elapsed, ETA and rate.
LINE = re.compile(
    r"^(?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), "
    r"(?P<elapsed>[\d:]+) elapsed, ETA (?P<eta>[\d:]+|\?), .*/s"
)


def lines_of(text: str) -> list[re.Match[str]]:
    assert "\r" not in text
    assert text.endswith("\n")
    matches = [LINE.match(line) for line in text.splitlines()]
    assert all(matches), text
    return [m for m in matches if m]


def test_in_a_log_a_bar_writes_lines_with_its_total_and_eta() -> None:
    stream = io.StringIO()  # not a terminal, as a job's redirected stderr
    for _ in progress.bar(range(12), desc="encode rtn-int6", unit="batch", file=stream,
                          interval_s=0.05):  # fmt: skip
        time.sleep(0.02)
    lines = lines_of(stream.getvalue())
    assert [m["total"] for m in lines] == ["12"] * len(lines)
    assert lines[0]["n"] == "0" and lines[-1]["n"] == "12"
    assert {m["desc"] for m in lines} == {"encode rtn-int6"} and lines[0]["unit"] == "batch"
    # between the first and last line, at most one per interval (0.24 s of work: a few)
    assert 3 <= len(lines) <= 8
    assert all(m["eta"] != "?" for m in lines[1:])


def test_a_bar_updated_by_hand_shows_its_postfix_and_ends_once() -> None:
    stream = io.StringIO()
    bar = progress.bar(total=4, desc="fixture LM", unit="step", file=stream, interval_s=60)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix(loss="3.210", refresh=False)
    bar.close()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines  # the start and the end: the interval never passed
    assert lines[-1].startswith("fixture LM: 4/4 step (100%)") and "loss=3.210" in lines[-1]


def test_a_transient_bar_writes_nothing_unless_it_outlasts_the_interval() -> None:
    quick = io.StringIO()
    for _ in progress.bar(range(3), desc="ppl", file=quick, transient=True, interval_s=60):
        pass
    assert quick.getvalue() == ""
    slow = io.StringIO()
    for _ in progress.bar(range(6), desc="ppl", file=slow, transient=True, interval_s=0.05):
        time.sleep(0.02)
    lines = lines_of(slow.getvalue())
    assert lines[0]["n"] != "0" and lines[-1]["n"] == "6"


def test_on_a_terminal_a_bar_is_tqdms_own() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    for _ in progress.bar(range(3), desc="quantize", unit="matrix", file=stream):
        pass
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()
    assert not isinstance(progress.bar(range(1), desc="x", file=stream), progress.LogLines)


def test_fixture_sae_training_in_a_log_file_shows_total_and_eta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real training loop, its stderr a file as in a Snakemake job."""
    import torch
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    from sae_audit.fixture.sae import SAETrainConfig, fit_sae

    cfg = SAETrainConfig(d_sae=32, batch_size=64, max_steps=30, train_seconds=600.0)
    acts = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    log = tmp_path / "fixture_sae.log"
    with log.open("w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        fit_sae(StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=32)), acts, cfg)
    lines = lines_of(log.read_text())
    assert lines[0]["desc"] == "fixture SAE" and lines[0]["total"] == "30"
    assert lines[-1]["n"] == "30" and lines[-1]["eta"] != "?"
