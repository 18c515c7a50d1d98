"""The fixture's training metrics table (stage fixture_training): on the real bundled
fixture, what it learned; on edited copies, what a missing or undefined metric becomes;
in the workflow, when the table is planned and that the report shows it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import polars as pl
import pytest

from sae_audit import stages
from sae_audit.files import InputError
from sae_audit.fixture.bundle import BUNDLE_DIR
from sae_audit.fixture_training import BUNDLED, SCHEMA, TRAINED, origin, training_table

from .conftest import ROOT, edited_config, planned_jobs, snakemake

DEFAULT_CONFIG = ROOT / "config" / "config.yaml"
BUNDLED_ARTIFACTS = {name: BUNDLE_DIR / name for name in ("model", "sae", "sae-twin")}
MODEL_ONLY = ("heldout_perplexity", "unigram_perplexity", "perplexity_vs_unigram")
SAE_ONLY = ("hook", "d_sae", "explained_variance", "l0", "n_dead_features", "dead_fraction")


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, Path]:
    out = tmp_path_factory.mktemp("fixture_training")
    table = stages.fixture_training(
        artifacts={k: str(v) for k, v in BUNDLED_ARTIFACTS.items()},
        out=out / "fixture_training.parquet",
        report=[out / "fixture_training.html", out / "fixture_training.csv"],
    )
    return table, out


def test_the_bundled_fixture_learned_something_real(bundled: tuple[pl.DataFrame, Path]):
    table, _ = bundled
    rows = {row["artifact"]: row for row in table.to_dicts()}
    assert list(rows) == ["model", "sae", "sae-twin"]
    model = rows["model"]
    # DESIGN: held-out perplexity well under the unigram baseline...
    assert model["kind"] == "model" and model["eval_tokens"] > 10_000
    assert 1 < model["heldout_perplexity"] < 0.5 * model["unigram_perplexity"]
    assert model["perplexity_vs_unigram"] == pytest.approx(
        model["heldout_perplexity"] / model["unigram_perplexity"]
    )
    assert model["steps"] > 0 and model["tokens_seen"] > model["train_set_tokens"] > 0
    assert 0 < model["final_train_loss"] < math.log(model["unigram_perplexity"])
    # ...and SAEs that reconstruct the residual stream with explained variance well above 0.
    for name in ("sae", "sae-twin"):
        sae = rows[name]
        assert sae["kind"] == "sae" and sae["hook"] == "blocks.2.hook_resid_post"
        assert 0.5 < sae["explained_variance"] <= 1
        assert 0 < sae["l0"] < sae["d_sae"] == 1024 and sae["d_model"] == 128
        assert 0 <= sae["dead_fraction"] < 0.5 and sae["eval_tokens"] > 0
    assert rows["sae"]["seed"] != rows["sae-twin"]["seed"]
    # every artifact is the package's own copy, and says so
    assert set(table["origin"]) == {BUNDLED}
    assert (
        f"held-out perplexity {model['heldout_perplexity']:.2f} vs unigram baseline"
        in (model["summary"])
    )
    assert f"explained variance {rows['sae']['explained_variance']:.3f}" in rows["sae"]["summary"]


def test_columns_have_their_dtypes_and_no_nan(bundled: tuple[pl.DataFrame, Path]):
    table, out = bundled
    written = pl.read_parquet(out / "fixture_training.parquet")
    assert written.schema == pl.Schema(SCHEMA) == table.schema
    for column, dtype in written.schema.items():
        if dtype.is_float():
            assert not written[column].is_nan().any(), column
    # a metric the artifact does not have is null
    kinds = written["kind"].to_list()
    for column in MODEL_ONLY:
        assert [v is None for v in written[column]] == [k != "model" for k in kinds], column
    for column in SAE_ONLY:
        assert [v is None for v in written[column]] == [k != "sae" for k in kinds], column
    assert written["final_train_loss"].null_count() == 2  # an SAE's is not recorded


def test_the_report_forms_hold_the_numbers(bundled: tuple[pl.DataFrame, Path]):
    table, out = bundled
    page = (out / "fixture_training.html").read_text()
    assert "held-out perplexity" in page and "3 rows, 21 columns" in page
    csv = pl.read_csv(out / "fixture_training.csv")
    assert csv["artifact"].to_list() == table["artifact"].to_list()
    assert csv["heldout_perplexity"][0] == pytest.approx(table["heldout_perplexity"][0])


def _copy(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(BUNDLE_DIR / name, dest)
    return dest


def test_an_artifact_trained_here_is_told_from_the_bundled_one(tmp_path: Path):
    sae = _copy(tmp_path, "sae")
    assert origin("sae", sae) == BUNDLED
    # a rebuild records its own wall time: not the bundle's build
    metrics = json.loads((sae / "metrics.json").read_text())
    (sae / "metrics.json").write_text(json.dumps({**metrics, "seconds": 1.0}))
    assert origin("sae", sae) == TRAINED
    # other weights under the bundle's very metrics are not the bundled SAE either
    other = _copy(tmp_path, "sae-twin")
    shutil.copyfile(BUNDLE_DIR / "sae" / "metrics.json", other / "metrics.json")
    assert origin("sae", other) == TRAINED
    assert origin("no-such-artifact", BUNDLE_DIR / "sae") == TRAINED
    row = training_table({"sae": sae}).row(0, named=True)
    assert row["origin"] == TRAINED and row["summary"].endswith("(trained in this run)")


def test_an_undefined_or_missing_metric_is_null(tmp_path: Path):
    model = tmp_path / "model"
    model.mkdir()
    recorded = json.loads((BUNDLE_DIR / "model" / "metrics.json").read_text())
    del recorded["unigram_perplexity"]  # a fixture built before it was recorded
    recorded["final_train_loss"] = float("nan")  # json writes NaN for an undefined loss
    (model / "metrics.json").write_text(json.dumps(recorded))
    row = training_table({"model": model}).row(0, named=True)
    assert row["unigram_perplexity"] is None and row["perplexity_vs_unigram"] is None
    assert row["final_train_loss"] is None and row["origin"] == TRAINED
    assert row["summary"].startswith(f"held-out perplexity {recorded['heldout_perplexity']:.2f} on")


def test_what_is_not_a_fixture_artifact_fails_naming_it(tmp_path: Path):
    (tmp_path / "metrics.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(InputError, match="neither a held-out perplexity"):
        training_table({"model": tmp_path})
    with pytest.raises(InputError, match="no such file"):
        training_table({"model": tmp_path / "missing"})
    with pytest.raises(InputError, match="no fixture artifact"):
        training_table({})


# ---------------------------------------------------------------- in the workflow
def _job_block(proc, rule: str) -> str:
    text = proc.stdout + proc.stderr
    [block] = [b for b in text.split("\n\n") if f"rule {rule}:" in b]
    return block


def test_the_report_plans_the_table_when_the_config_uses_the_fixture(tmp_path: Path):
    proc = snakemake(tmp_path, DEFAULT_CONFIG, "-n", "-p")
    assert planned_jobs(proc)["fixture_training"] == 1
    block = _job_block(proc, "fixture_training")
    assert "input: results/fixture/model, results/fixture/sae, results/fixture/sae-twin" in block
    assert (
        "--artifacts model=results/fixture/model sae=results/fixture/sae "
        "sae-twin=results/fixture/sae-twin --out results/tables/fixture_training.parquet "
        "--report results/report/fixture_training.html results/report/fixture_training.csv"
    ) in block
    assert "log: results/logs/fixture_training.log" in block
    assert "results/report/fixture_training.html" in _job_block(proc, "all")


def test_without_a_twin_there_is_no_twin_row(tmp_path: Path):
    config = edited_config(
        tmp_path, "no_twin", lambda c: c["fixture"]["sae"].update(twin_seed=None)
    )
    block = _job_block(snakemake(tmp_path, config, "-n", "-p"), "fixture_training")
    assert "--artifacts model=results/fixture/model sae=results/fixture/sae --out" in block


def test_a_config_without_the_fixture_plans_no_table(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jobs = planned_jobs(snakemake(tmp_path, ROOT / "config" / "paper.yaml", "-n"))
    assert jobs["all"] == 1 and "fixture_training" not in jobs


@pytest.mark.slow
def test_the_report_shows_the_table_with_its_caption(tmp_path: Path):
    """The default config's fixture (bundled copies: seconds), its table, and the report of
    that table: captioned by tables.rst, the page holding the numbers of the table."""
    import base64
    import re

    target = "results/report/fixture_training.html"
    snakemake(tmp_path, DEFAULT_CONFIG, target)
    table = pl.read_parquet(tmp_path / "results/tables/fixture_training.parquet")
    assert set(table["origin"]) == {BUNDLED}
    report = tmp_path / "report.html"
    snakemake(tmp_path, DEFAULT_CONFIG, "--report", str(report), target, cores="1")
    html = report.read_text()
    assert "6. Tables" in html and "unigram_perplexity" in html  # the caption's branch
    pages = [
        base64.b64decode(m[1]).decode()
        for m in re.finditer(r"filename=fixture_training\.html;base64,([A-Za-z0-9+/=]+)", html)
    ]
    assert pages and all(table["summary"][0] in page for page in pages)


@pytest.mark.slow
def test_a_run_that_trains_its_fixture_says_so(finished_run: Path):
    """The test config trains its own fixture: every row is `trained`, with its numbers."""
    table = pl.read_parquet(finished_run / "results/tables/fixture_training.parquet")
    assert table["artifact"].to_list() == ["model", "sae", "sae-twin"]
    assert set(table["origin"]) == {TRAINED}
    model = table.row(0, named=True)
    assert model["heldout_perplexity"] < model["unigram_perplexity"]
    assert (table["explained_variance"].drop_nulls() > 0).all()
