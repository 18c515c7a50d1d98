"""The real Snakefile, run with the real snakemake CLI on the small test config in a temp dir."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from sae_audit.shards import read_metadata

from .conftest import TEST_CONFIG, edited_config, planned_jobs, snakemake


@pytest.mark.slow
def test_end_to_end_outputs(finished_run: Path):
    results = finished_run / "results"
    summary = pl.read_parquet(results / "tables/fixture/res/survival.parquet")
    by_variant = {row["variant"]: row for row in summary.to_dicts()}
    assert set(by_variant) == {
        "rtn-int8",
        "rtn-int4",
        "rtn-int2",
        "prune-matched-rtn-int4",
        "fp-null",
        "fp-noise",
    }
    # The FP model against itself: every active feature survives with r = 1.
    features = pl.read_parquet(results / "tables/fixture/res/features.parquet")
    null = features.filter((pl.col("variant") == "fp-null") & pl.col("active"))
    assert null.height > 0
    assert (null["r"] - 1.0).abs().max() < 1e-6
    assert by_variant["fp-null"]["survived_pct"] == 100.0
    # Compression damages features, more at fewer bits.
    assert by_variant["rtn-int2"]["survived_pct"] < by_variant["rtn-int8"]["survived_pct"]
    for row in by_variant.values():
        classes = ("survived_pct", "blurred_pct", "destroyed_pct", "insufficient_pct")
        assert sum(row[c] for c in classes) == pytest.approx(100.0)
    # Perplexity beside the classes, and FP's perplexity change is zero.
    ppl = pl.read_parquet(results / "tables/fixture/perplexity.parquet")
    fp = ppl.filter(pl.col("variant") == "fp").to_dicts()[0]
    assert fp["dppl_chunked_pct"] == 0.0 and fp["ppl_chunked"] > 1
    assert ppl.filter(pl.col("variant") == "rtn-int2")["ppl_chunked"][0] > fp["ppl_chunked"]
    # Every rule left a log; figures exist and are real PNGs.
    assert list((results / "logs").rglob("encode/**/*.log"))
    for png in (results / "figures/fixture/res").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (results / "figures/fixture/res/class_fractions_vs_bits.png").exists()
    # The SAE's quality on every variant's activations, from the shards' footers.
    quality = pl.read_parquet(results / "tables/fixture/res/sae_quality.parquet")
    by_variant = {row["variant"]: row for row in quality.to_dicts()}
    assert set(by_variant) == {"fp", *set(summary["variant"])}
    fp_quality = by_variant["fp"]
    assert fp_quality["explained_variance"] > 0.5 and fp_quality["l0"] > 1
    assert fp_quality["n_positions"] == 96 * 64 and fp_quality["centered"] is False
    # The FP model run again has the very same activations; INT2 reconstructs worse.
    assert by_variant["fp-null"]["explained_variance"] == fp_quality["explained_variance"]
    assert by_variant["rtn-int2"]["explained_variance"] != fp_quality["explained_variance"]
    assert quality.null_count().sum_horizontal().item() == 0
    # Causal survival beside Pearson survival, every variant; the FP model run again
    # acts exactly as FP does.
    causal = pl.read_parquet(results / "tables/fixture/res/causal_survival.parquet")
    assert set(causal["variant"]) == set(summary["variant"])
    null_causal = causal.filter(pl.col("variant") == "fp-null").row(0, named=True)
    assert null_causal["median_causal_agreement"] == 1.0
    assert null_causal["causal_survived_pct"] == 100.0
    assert (results / "figures/fixture/res/causal_vs_pearson.png").is_file()


@pytest.mark.slow
def test_rerun_plans_nothing(finished_run: Path):
    assert planned_jobs(snakemake(finished_run, TEST_CONFIG, "-n")) == {}


@pytest.mark.slow
def test_adding_a_bit_width_adds_only_its_jobs(finished_run: Path, tmp_path: Path):
    config = edited_config(
        tmp_path, "more_bits", lambda c: c["compression"]["rtn"]["bits"].append(6)
    )
    jobs = planned_jobs(snakemake(finished_run, config, "-n"))
    assert jobs["encode"] == 2  # one per token shard of the new variant
    assert jobs["compress"] == 1 and jobs["correlate"] == 1
    assert "fixture_model" not in jobs and "tokenize" not in jobs and "fp_stats" not in jobs
    assert jobs["survival"] == 1


@pytest.mark.slow
def test_changing_class_thresholds_reruns_no_encode(finished_run: Path, tmp_path: Path):
    config = edited_config(
        tmp_path, "thresholds", lambda c: c.setdefault("analysis", {}).update(survived=0.8)
    )
    jobs = planned_jobs(snakemake(finished_run, config, "-n"))
    assert jobs.get("survival") == 1
    assert not {"encode", "compress", "correlate", "tokenize", "fixture_model", "causal"} & set(
        jobs
    )


@pytest.mark.slow
def test_changing_causal_thresholds_reruns_no_forward_pass(finished_run: Path, tmp_path: Path):
    """The causal class thresholds re-class the measured features (causal_survival and
    what reads it); no causal forward pass runs again."""
    config = edited_config(
        tmp_path,
        "causal",
        lambda c: c.setdefault("causal", {}).update(survived=0.8, kl_ratio_band=3.0),
    )
    jobs = planned_jobs(snakemake(finished_run, config, "-n"))
    assert jobs.get("causal_survival") == 1 and jobs.get("plot_causal_vs_pearson") == 1
    assert not {"causal", "encode", "correlate", "survival"} & set(jobs)


def test_bad_config_key_fails_before_any_job(tmp_path: Path):
    config = edited_config(tmp_path, "bad", lambda c: c["compression"]["rtn"].update(bitz=[3]))
    proc = snakemake(tmp_path, config, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "config key 'compression.rtn'" in out and "bitz" in out
    assert not (tmp_path / "results").exists()


def test_unknown_matched_target_names_the_key(tmp_path: Path):
    def edit(c):
        c["compression"]["prune"]["matched"]["targets"] = ["rtn-int5"]

    proc = snakemake(tmp_path, edited_config(tmp_path, "bad_target", edit), "-n", check=False)
    assert proc.returncode != 0
    assert "config key 'compression.prune.matched.targets'" in proc.stdout + proc.stderr


ROOT = Path(__file__).resolve().parents[1]


def test_snakemake_lint_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(ROOT / "Snakefile")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_is_the_workflow_schema():
    # workflow/schemas/config.schema.yaml is the package's schema (a symlink), not a drifting copy.
    assert (ROOT / "workflow/schemas/config.schema.yaml").resolve() == (
        ROOT / "src/sae_audit/config.schema.yaml"
    ).resolve()


def planned_wildcards(proc: subprocess.CompletedProcess) -> list[str]:
    return [
        line.strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip().startswith("wildcards:")
    ]


@pytest.mark.slow
def test_changing_the_token_budget_reruns_tokenize_and_downstream(
    finished_run: Path, tmp_path: Path
):
    config = edited_config(
        tmp_path, "budget", lambda c: c["models"]["fixture"]["tokens"].update(n_sequences=80)
    )
    jobs = planned_jobs(snakemake(finished_run, config, "-n"))
    assert jobs["tokenize"] == 1
    assert jobs["encode"] == 2 * 7  # every (variant, shard): fp, 3 RTN, matched, null, noise
    assert jobs["survival"] == 1 and jobs["match_sparsity"] == 1
    assert not {"fixture_model", "fixture_sae", "fixture_corpus"} & set(jobs)


@pytest.mark.slow
def test_adding_a_model_adds_only_its_jobs(finished_run: Path, tmp_path: Path):
    def add(c):
        c["models"]["fixture_short"] = {
            **c["models"]["fixture"],
            "tokens": {**c["models"]["fixture"]["tokens"], "seq_len": 32},
        }

    proc = snakemake(finished_run, edited_config(tmp_path, "two_models", add), "-n")
    wildcards = planned_wildcards(proc)
    assert wildcards and all("model=fixture_short" in w for w in wildcards if "model=" in w)
    assert planned_jobs(proc)["encode"] == 2 * 7


@pytest.mark.slow
def test_a_killed_run_resumes_with_only_the_unfinished_jobs(finished_run: Path, tmp_path: Path):
    """Kill a run while an encode job runs; the same command then finishes only what is left."""
    import os
    import shutil
    import signal
    import time

    from .conftest import ROOT

    work = tmp_path / "resume"
    shutil.copytree(finished_run, work, symlinks=True, copy_function=shutil.copy2)
    config = edited_config(
        tmp_path, "more_bits", lambda c: c["compression"]["rtn"]["bits"].append(6)
    )
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(config), "--cores", "1"]  # fmt: skip
    run = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    encode_log = work / "results/logs/encode/fixture/rtn-int6/shard-000.log"
    deadline = time.monotonic() + 300
    while not encode_log.exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    assert encode_log.exists(), "the encode job never started"
    # Interrupt the whole run mid-job, as Ctrl-C or a cancelled batch job does (after a
    # SIGKILL or power loss Snakemake's lock stays: `snakemake --unlock` first).
    os.killpg(run.pid, signal.SIGTERM)
    run.wait(timeout=120)
    # Nothing half-written: the shard directory of the killed job is absent or has no partial shard.
    killed = work / "results/codes/fixture/rtn-int6/shard-000"
    assert not killed.exists() or not list(killed.glob("*.tmp"))
    jobs = planned_jobs(snakemake(work, config, "-n", "--rerun-incomplete"))
    assert 1 <= jobs["encode"] <= 2  # the killed job (and its sibling shard if it had not run)
    assert not {"tokenize", "fixture_model", "fixture_sae", "fp_stats"} & set(jobs)
    assert jobs.get("compress", 0) <= 1
    snakemake(work, config, "--rerun-incomplete")  # the same command, resumed
    assert planned_jobs(snakemake(work, config, "-n")) == {}


SHIPPED = {
    "llmcompressor": {
        "gptq-w4": {"scheme": "W4A16", "method": "gptq", "group_size": 32},
        "kv-int8": {"kv_cache": "int8"},
    },
    "gguf": {"q4_0": {"type": "Q4_0"}},
}


@pytest.mark.slow
def test_shipped_formats_flow_through_the_workflow(finished_run: Path, tmp_path: Path):
    """llm-compressor and GGUF variants run beside RTN: only their own jobs are added,
    they reach every table, and editing one entry re-makes that variant alone."""
    import shutil

    work = tmp_path / "run"
    shutil.copytree(finished_run, work, symlinks=True)
    config = edited_config(tmp_path, "shipped", lambda c: c["compression"].update(SHIPPED))
    jobs = planned_jobs(snakemake(work, config, "-n"))
    assert jobs["compress"] == 3 and jobs["encode"] == 2 * 3
    assert jobs["tokenize_calibration"] == 1
    assert "tokenize" not in jobs and "fixture_model" not in jobs
    snakemake(work, config)
    results = work / "results"
    shipped = {"lc-gptq-w4", "lc-kv-int8", "gguf-q4_0"}
    survival = pl.read_parquet(results / "tables/fixture/res/survival.parquet")
    assert shipped <= set(survival["variant"])
    ppl = pl.read_parquet(results / "tables/fixture/perplexity.parquet")
    assert shipped <= set(ppl["variant"])
    fp_ppl = ppl.filter(pl.col("variant") == "fp")["ppl_chunked"][0]
    for variant in shipped:  # each changes the model, none breaks it
        row = ppl.filter(pl.col("variant") == variant).to_dicts()[0]
        assert row["ppl_chunked"] != fp_ppl and row["ppl_chunked"] < 2 * fp_ppl, variant
    overlap = pl.read_parquet(results / "tables/fixture/res/overlap.parquet")
    pairs = set(zip(overlap["variant_a"], overlap["variant_b"], strict=True))
    assert {("rtn-int4", "lc-gptq-w4"), ("rtn-int4", "gguf-q4_0")} <= pairs
    assert (results / "calibration/fixture/tokens.parquet").is_file()
    # Editing one entry re-makes that variant and what reads it, nothing else.
    regrouped = copy.deepcopy(SHIPPED)
    regrouped["llmcompressor"]["gptq-w4"]["group_size"] = 16
    edited = edited_config(tmp_path, "edited", lambda c: c["compression"].update(regrouped))
    jobs = planned_jobs(snakemake(work, edited, "-n"))
    assert jobs["compress"] == 1 and jobs["encode"] == 2
    assert "tokenize_calibration" not in jobs


@pytest.mark.slow
def test_special_positions_are_left_out_of_every_statistic(tmp_path: Path):
    """With a BOS at every sequence start and encode.exclude_special_positions, no code
    shard has a row there, each records the positions, and the FP firing rates count
    only the others; the FP encode log says what it left out."""

    def edit(c):
        c["models"]["fixture"]["tokens"]["bos"] = True
        c["encode"]["exclude_special_positions"] = True

    config = edited_config(tmp_path, "special", edit)
    snakemake(tmp_path, config, "results/features/fixture/res/fp_stats.parquet")
    results = tmp_path / "results"
    stats = pl.read_parquet(results / "features/fixture/res/fp_stats.parquet")
    assert stats["n_tokens"].unique().to_list() == [96 * 64 - 96]
    for shard in sorted((results / "codes/fixture/fp").glob("shard-*/res.parquet")):
        meta = read_metadata(shard)
        starts = list(range(meta.token_start, meta.token_stop, 64))
        assert list(meta.excluded) == starts  # the BOS of each sequence, nothing else
        tokens = pl.read_parquet(shard, columns=["token"])["token"]
        assert not tokens.is_in(starts).any()
    log = (results / "logs/encode/fixture/fp/shard-000.log").read_text()
    assert "excluding positions of special tokens [0]" in log


def test_causal_survival_can_be_turned_off(tmp_path: Path):
    """causal.enabled: false plans no causal job, table or figure."""

    def edit(c):
        c["causal"] = {"enabled": False}

    jobs = planned_jobs(snakemake(tmp_path, edited_config(tmp_path, "nocausal", edit), "-n"))
    assert jobs and not {"causal", "causal_survival", "plot_causal_vs_pearson"} & set(jobs)
    on = planned_jobs(snakemake(tmp_path, TEST_CONFIG, "-n"))
    assert on["causal"] == 6 and on["causal_survival"] == 1
