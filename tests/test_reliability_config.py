"""Issue 8: every config mistake that can be seen before the first job fails at start-up.

Each case asserts the failure, that its message names the config key (or the file) and
the fix, and that nothing was written under results/. A few go through the real
snakemake CLI (a dry run) to prove the failure comes before any job; the rest call
`validate` directly, which is what the Snakefile runs at start-up.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sae_audit import config as audit_config
from sae_audit.config import ConfigError

from .conftest import ROOT, TEST_CONFIG, edited_config, snakemake

PAPER = ROOT / "config" / "paper.yaml"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory relative config paths resolve against, as snakemake's would."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def base_config() -> dict[str, Any]:
    return yaml.safe_load(TEST_CONFIG.read_text())


def fails(cfg: dict[str, Any], workdir: Path, *fragments: str) -> str:
    """validate(cfg) raises ConfigError containing every fragment; nothing is written."""
    with pytest.raises(ConfigError) as info:
        audit_config.validate(cfg)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not (workdir / "results").exists()
    return message


def cli_fails(tmp_path: Path, edit: Callable[[dict[str, Any]], None], *fragments: str) -> str:
    """`snakemake -n` on the edited test config exits non-zero at start-up with the fragments."""
    proc = snakemake(tmp_path, edited_config(tmp_path, "bad", edit), "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for fragment in fragments:
        assert fragment in out, f"{fragment!r} not in:\n{out[-3000:]}"
    assert "Job stats" not in out  # failed before planning a single job
    assert not (tmp_path / "results").exists()
    return out


# ---------------------------------------------------------------- through the snakemake CLI
def test_active_rate_of_one_fails_at_startup(tmp_path: Path) -> None:
    cli_fails(
        tmp_path,
        lambda c: c.setdefault("analysis", {}).update(active_rate=1.0),
        "config key 'analysis.active_rate'",
        "1.0 is greater than or equal to the maximum of 1",
        "in (0, 1)",
    )


def test_misspelled_matched_target_names_its_key_at_startup(tmp_path: Path) -> None:
    def edit(c: dict[str, Any]) -> None:
        c["compression"]["prune"]["matched"]["targets"] = ["rtn-in4"]

    cli_fails(
        tmp_path,
        edit,
        "config key 'compression.prune.matched.targets'",
        "target 'rtn-in4'",
        "did you mean 'rtn-int4'",
        "['rtn-int8', 'rtn-int4', 'rtn-int2']",
    )


def test_fixture_sae_layer_past_the_fixture_model_fails_at_startup(tmp_path: Path) -> None:
    # test.yaml's fixture model has 2 layers: the SAE can read block 0 only.
    cli_fails(
        tmp_path,
        lambda c: c["fixture"]["sae"].update(layer=1),
        "config key 'fixture.sae.layer'",
        "2-layer fixture model",
        "use 0..0",
    )


def test_yaml_error_in_the_default_config_names_file_and_line(tmp_path: Path) -> None:
    # Without --configfile the Snakefile reads config/config.yaml of the working directory.
    bad = tmp_path / "config" / "config.yaml"
    bad.parent.mkdir()
    bad.write_text("models:\n  fixture:\n    model: {source: fixture\n    saes: [\n")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "1", "-n"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config file 'config/config.yaml', line 4, column 9: YAML syntax error" in out, out
    assert not (tmp_path / "results").exists()


def test_yaml_error_in_a_configfile_fails_at_startup(tmp_path: Path) -> None:
    # Snakemake parses --configfile itself, before the Snakefile runs, and says only
    # "Config file is not valid JSON or YAML": it still fails before any job.
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a: 1\n b: 2\n")
    proc = snakemake(tmp_path, bad, "-n", check=False)
    assert proc.returncode != 0
    assert "Job stats" not in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- validate(), unit level
def test_yaml_error_through_load_names_file_and_line(workdir: Path) -> None:
    bad = workdir / "bad.yaml"
    bad.write_text("models:\n  a: 1\n b: 2\n")
    with pytest.raises(ConfigError) as info:
        audit_config.load(bad)
    assert str(info.value).startswith(f"config file '{bad}', line 3, column 2: YAML syntax error")
    assert not (workdir / "results").exists()


@pytest.mark.parametrize(
    ("analysis", "fragments"),
    [
        ({"active_rate": 0.0}, ["config key 'analysis.active_rate'", "less than or equal to"]),
        ({"survived": -0.5}, ["config key 'analysis.survived'", "less than the minimum of 0"]),
        (
            {"survived": 0.4, "destroyed": 0.5},
            ["config key 'analysis.destroyed'", "must not exceed 'analysis.survived' (0.5 > 0.4)"],
        ),
    ],
)
def test_analysis_thresholds(workdir: Path, analysis: dict, fragments: list[str]) -> None:
    cfg = base_config()
    cfg["analysis"] = analysis
    fails(cfg, workdir, *fragments)


def test_more_shards_than_sequences(workdir: Path) -> None:
    cfg = base_config()
    cfg["models"]["fixture"]["tokens"].update(n_sequences=3, n_shards=4)
    fails(
        cfg,
        workdir,
        "config key 'models.fixture.tokens.n_shards'",
        "4 shards of 3 sequences",
        "use at most n_sequences shards",
    )


def write_sae_cfg(where: Path, d_in: int, hook: str) -> str:
    where.mkdir(parents=True)
    (where / "cfg.json").write_text(json.dumps({"d_in": d_in, "metadata": {"hook_name": hook}}))
    return str(where)


@pytest.mark.parametrize(
    ("d_in", "hook", "fragments"),
    [
        (32, "blocks.0.hook_resid_post", ["d_in=32", "the fixture model", "has width 64"]),
        (64, "blocks.2.hook_resid_post", ["past the model's 2 layers"]),
        (64, "blocks.0.hook_resid_mid", ["'blocks.0.hook_resid_mid' is not supported"]),
    ],
)
def test_path_sae_checked_against_the_fixture_model(
    workdir: Path, d_in: int, hook: str, fragments: list[str]
) -> None:
    cfg = base_config()
    path = write_sae_cfg(workdir / "sae", d_in, hook)
    cfg["models"]["fixture"]["saes"]["mine"] = {"path": path}
    fails(cfg, workdir, "config key 'models.fixture.saes.mine.path'", *fragments)


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        (
            "EleutherAI/pythia-70m/deduped",
            ["no such model directory: 'EleutherAI/pythia-70m/deduped'"],
        ),
        ("./models/missing", ["no such model directory: './models/missing'", "working directory"]),
        ("~/no-such-model", ["no such model directory: '~/no-such-model'"]),
        ("bad--name", ["no such model directory: 'bad--name', and not a hub id", "--"]),
    ],
)
def test_model_source_is_a_directory_or_a_hub_id(
    workdir: Path, source: str, fragments: list[str]
) -> None:
    cfg = base_config()
    cfg["models"]["fixture"]["model"]["source"] = source
    fails(cfg, workdir, "config key 'models.fixture.model.source'", *fragments)


def test_model_directory_without_config_json(workdir: Path) -> None:
    (workdir / "model").mkdir()
    cfg = base_config()
    cfg["models"]["fixture"]["model"]["source"] = "model"
    fails(cfg, workdir, "config key 'models.fixture.model.source'", "has no config.json")


def test_misspelled_overlap_pair(workdir: Path) -> None:
    cfg = base_config()
    cfg["overlap"] = {"pairs": [["rtn-int4", "prune-matched-rtn-in4"]]}
    fails(
        cfg,
        workdir,
        "config key 'overlap.pairs'",
        "'prune-matched-rtn-in4' (pair 0)",
        "did you mean 'prune-matched-rtn-int4'",
    )


def test_matched_target_with_bits_out_of_range_names_targets(workdir: Path) -> None:
    cfg = base_config()
    cfg["compression"]["prune"]["matched"]["targets"] = ["rtn-int9"]
    fails(cfg, workdir, "config key 'compression.prune.matched.targets'", "target 'rtn-int9'")


def _token_file(workdir: Path, kind: str) -> tuple[str, str]:
    """(tokens.source, path) of a bad local token file of `kind`."""
    if kind == "empty":
        (workdir / "a.txt").write_text("")
        return "text", "a.txt"
    if kind == "blank":
        (workdir / "a.txt").write_text(" \n\n\t \n")
        return "text", "a.txt"
    if kind == "missing":
        return "text", "nowhere.txt"
    if kind == "jsonl":
        (workdir / "a.jsonl").write_text("not json\n")
        return "jsonl", "a.jsonl"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), workdir / "a.parquet")
    return "parquet", "a.parquet"


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("empty", "'a.txt' is empty"),
        ("blank", "'a.txt' is whitespace only"),
        ("missing", "no such file: 'nowhere.txt'"),
        ("jsonl", "the first line of 'a.jsonl' is not valid JSON"),
        ("parquet", "'a.parquet' has no rows"),
    ],
)
def test_bad_local_token_files_name_the_file(workdir: Path, kind: str, fragment: str) -> None:
    source, path = _token_file(workdir, kind)
    cfg = base_config()
    cfg["models"]["fixture"]["tokens"] = {"source": source, "paths": [path], "n_shards": 1}
    fails(cfg, workdir, "config key 'models.fixture.tokens.paths'", fragment)


def test_text_column_missing_from_parquet(workdir: Path) -> None:
    pq.write_table(pa.table({"body": ["a document"]}), workdir / "a.parquet")
    cfg = base_config()
    cfg["models"]["fixture"]["tokens"] = {"source": "parquet", "paths": ["a.parquet"]}
    fails(cfg, workdir, "config key 'models.fixture.tokens.text_column'", "its columns: ['body']")


@pytest.mark.parametrize(
    ("release", "sae_id", "key", "fragments"),
    [
        (
            "pythia-70m-deduped-res-sn",
            "blocks.4.hook_resid_post",
            "release",
            ["not a sae-lens pretrained release", "did you mean 'pythia-70m-deduped-res-sm'"],
        ),
        (
            "pythia-70m-deduped-res-sm",
            "blocks.4.hook_resid_pots",
            "sae_id",
            ["not an SAE of release", "did you mean 'blocks.4.hook_resid_post'"],
        ),
        (
            "gpt2-small-resid-mid-v5-32k",
            "blocks.2.hook_resid_mid",
            "sae_id",
            ["SAE hook 'blocks.2.hook_resid_mid' is not supported", "hook_resid_post"],
        ),
        (
            "gemma-scope-2b-pt-att-canonical",
            "layer_2/width_16k/canonical",
            "sae_id",
            ["SAE hook 'blocks.2.attn.hook_z' is not supported", "hook_resid_post"],
        ),
        (
            # A real SAE of a 6-layer model, on the 2-layer fixture model.
            "pythia-70m-deduped-res-sm",
            "blocks.4.hook_resid_post",
            "sae_id",
            ["past the model's 2 layers"],
        ),
    ],
)
def test_pretrained_sae_checked_in_the_local_registry(
    workdir: Path, release: str, sae_id: str, key: str, fragments: list[str]
) -> None:
    cfg = base_config()
    cfg["models"]["fixture"]["saes"]["hub"] = {"release": release, "sae_id": sae_id}
    fails(cfg, workdir, f"config key 'models.fixture.saes.hub.{key}'", *fragments)


def test_paper_saes_pass_the_registry_check(workdir: Path) -> None:
    from sae_audit.hooknames import pretrained_hook

    cfg = audit_config.load(PAPER)
    entry = audit_config._registry_entry
    hooks = {
        model: [pretrained_hook(entry(s["release"]), s["sae_id"]) for s in spec["saes"].values()]
        for model, spec in cfg["models"].items()
    }
    assert hooks == {
        "pythia-70m": ["blocks.4.hook_resid_post"],
        "gemma-2-2b": ["blocks.12.hook_resid_post"],
    }
    assert not (workdir / "results").exists()


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (
            lambda c: c["fixture"]["model"].update(d_model=64, n_head=3),
            ["config key 'fixture.model.n_head'", "d_model=64, n_head=3"],
        ),
        (
            lambda c: c["compression"]["prune"]["matched"].update(lo=0.6, hi=0.5),
            ["config key 'compression.prune.matched.lo'", "lo < hi"],
        ),
        (
            lambda c: c.update(predict={"predictors": ["rarity", "log_meen"]}),
            ["config key 'predict.predictors'", "'log_meen'", "did you mean 'log_mean'"],
        ),
        (
            lambda c: c["perplexity"].update(window=64, stride=64, bos=True),
            ["config key 'perplexity.stride'", "at most 63"],
        ),
        (
            lambda c: c.update(threshold_grid={"survived": [0.2], "destroyed": [0.3, 0.4]}),
            ["config key 'threshold_grid.destroyed'", "threshold grid would be empty"],
        ),
        (
            lambda c: c["fixture"]["corpus"].update(heldout_fraction=0.6),
            ["config key 'fixture.corpus.heldout_fraction'", "maximum of 0.5"],
        ),
        (
            lambda c: c["fixture"]["tokenizer"].update(vocab_size=280),
            ["config key 'fixture.tokenizer.vocab_size'", "minimum of 300"],
        ),
    ],
)
def test_job_side_checks_run_at_startup(
    workdir: Path, edit: Callable[[dict[str, Any]], None], fragments: list[str]
) -> None:
    cfg = copy.deepcopy(base_config())
    edit(cfg)
    fails(cfg, workdir, *fragments)


def test_shipped_configs_still_validate(workdir: Path) -> None:
    for path in (ROOT / "config" / "config.yaml", TEST_CONFIG, PAPER):
        audit_config.load(path)
    assert not os.listdir(workdir)


# ---------------------------------------------------------------- shipped formats (issue 10)
@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        (
            {"kv_cache": "fp8", "method": "gptq"},
            ["compression.llmcompressor.bad.method", "scheme is null"],
        ),
        (
            {"scheme": "W8A8", "method": "awq"},
            ["compression.llmcompressor.bad.method", "weight-only"],
        ),
        ({"scheme": "W4A16", "method": "smoothquant+gptq"}, ["SmoothQuant", "weight-only"]),
        ({"method": "gptq"}, ["compression.llmcompressor.bad", "scheme"]),
        ({"scheme": "W3A16"}, ["compression.llmcompressor.bad.scheme", "W4A16"]),
    ],
)
def test_llmcompressor_entries(workdir: Path, entry: dict, fragments: list[str]) -> None:
    cfg = base_config()
    cfg["compression"]["llmcompressor"] = {"bad": entry}
    fails(cfg, workdir, *fragments)


def test_calibrating_on_the_evaluation_files_fails_at_startup(workdir: Path) -> None:
    (workdir / "eval.txt").write_text("some text\n")
    cfg = base_config()
    model = next(iter(cfg["models"].values()))
    model["tokens"] = {"source": "text", "paths": ["eval.txt"], "seq_len": 8, "n_sequences": 2}
    model["calibration"] = {"source": "text", "paths": ["eval.txt"]}
    cfg["compression"]["llmcompressor"] = {"w8": {"scheme": "W8A16"}}
    fails(cfg, workdir, "models.", ".calibration", "same data", "evaluation")


def test_external_artifact_of_another_model_fails_at_startup(workdir: Path) -> None:
    import torch

    from sae_audit.gguf_checkpoint import write_gguf
    from sae_audit.models import load_model
    from tests.conftest import save_tiny_model

    other = save_tiny_model("gpt_neox", workdir / "other", layers=5)
    write_gguf(load_model(other), "Q8_0", workdir / "other.gguf")
    del torch
    cfg = base_config()
    cfg["compression"]["external"] = {"prod": {"source": "other.gguf"}}
    message = fails(cfg, workdir, "compression.external.prod.source", "other.gguf")
    assert "num_hidden_layers 5 != base model's" in message and "fixture" in message
    cfg["compression"]["external"] = {"prod": {"source": "missing.gguf"}}
    fails(cfg, workdir, "compression.external.prod.source", "no such file")


def test_shipped_variant_names_reach_the_dag(tmp_path: Path) -> None:
    """lc-, gguf- variants (underscores included) plan compress, encode and calibration jobs."""
    from .conftest import planned_jobs

    def edit(cfg: dict[str, Any]) -> None:
        cfg["compression"]["llmcompressor"] = {"w8": {"scheme": "W8A16"}}
        cfg["compression"]["gguf"] = {"q8_0": {"type": "Q8_0"}}

    proc = snakemake(tmp_path, edited_config(tmp_path, "ship", edit), "-n")
    jobs = planned_jobs(proc)
    assert jobs["tokenize_calibration"] == 1
    out = proc.stdout + proc.stderr
    assert "checkpoints/" in out and "lc-w8" in out and "gguf-q8_0" in out
    # llm-compressor calibrates on a GPU where encode runs on one (SLURM: --gpus=1);
    # every other compress job asks for none
    compress = {}
    for block in out.split("rule compress:")[1:]:
        variant = re.search(r"variant=(\S+)", block)
        gpu = re.search(r"resources: .*\bgpu=(\d+)", block)
        assert variant and gpu, block
        compress[variant[1]] = gpu[1]
    assert compress["lc-w8"] == "1" and compress["gguf-q8_0"] == "0"
    assert compress["rtn-int4"] == "0"


# ---------------------------------------------------------------- issue 15: forecast, protect, gate
_PROTECT = {"levels": [{"bits": 4}, {"bits": 8}], "budget": {"bits_per_weight": 5.0}}


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (
            lambda c: c["compression"].update(protect={"w": {**_PROTECT, "sae": "resid"}}),
            ["config key 'compression.protect.w.sae'", "'resid'", "did you mean 'res'"],
        ),
        (
            lambda c: c["compression"].update(
                protect={"w": {**_PROTECT, "levels": [{"bits": 8}, {"bits": 4}]}}
            ),
            ["config key 'compression.protect.w.levels'", "fewest bits"],
        ),
        (
            lambda c: c["compression"].update(
                protect={"w": {**_PROTECT, "levels": [{"bits": None}, {"bits": 4}]}}
            ),
            ["config key 'compression.protect.w.levels'", "must be quantized"],
        ),
        (
            lambda c: c["compression"].update(
                protect={"w": {**_PROTECT, "budget": {"bits_per_weight": 5, "bytes": 9}}}
            ),
            ["compression.protect.w.budget"],
        ),
        (
            lambda c: c.update(watchlist={"file": "watch.txt"}),
            ["config key 'watchlist.file'", "watch.txt is not a file"],
        ),
        (
            lambda c: c.update(forecast={"measure": ["rtn-in4"]}),
            ["config key 'forecast.measure'", "did you mean 'rtn-int4'"],
        ),
        (
            lambda c: c.update(forecast={"measure": ["fp-null"]}),
            ["config key 'forecast.measure'", "'fp-null' is not forecast (no noise model"],
        ),
        (
            lambda c: (
                c["compression"].update(llmcompressor={"w8": {"scheme": "W8A8"}})
                or c.update(forecast={"measure": ["lc-w8"]})
            ),
            ["config key 'forecast.measure'", "one matrix at a time"],
        ),
        (
            lambda c: c["compression"].update(
                protect={"w": {**_PROTECT, "levels": [{"bits": 4, "group_size": 32}, {"bits": 4}]}}
            ),
            ["config key 'compression.protect.w.levels'", "cost the fewest bits"],
        ),
        (
            lambda c: c.update(forecast={"fit_on": ["rtn-int5"]}),
            ["config key 'forecast.fit_on'", "'rtn-int5' is not a configured variant"],
        ),
        (
            lambda c: c.update(gate={"policy": "policy.yaml"}),
            ["config key 'gate.policy'", "policy.yaml is not a file"],
        ),
    ],
)
def test_forecast_protect_and_gate_keys(
    workdir: Path, edit: Callable[[dict[str, Any]], None], fragments: list[str]
) -> None:
    cfg = base_config()
    edit(cfg)
    fails(cfg, workdir, *fragments)


@pytest.mark.parametrize(
    ("policy", "fragments"),
    [
        ("min_survived_pct: 120\n", ["min_survived_pct"]),
        ("min_survivd_pct: 90\n", ["min_survivd_pct"]),
        (
            "min_survived_pct: 90\nvariants: [rtn-int5]\n",
            ["release candidate 'rtn-int5'", "is not a configured variant", "'rtn-int4'"],
        ),
        ("variants: [rtn-int4]\n", ["sets no threshold"]),
    ],
)
def test_a_bad_policy_file_fails_at_startup(
    workdir: Path, policy: str, fragments: list[str]
) -> None:
    (workdir / "policy.yaml").write_text(policy)
    cfg = base_config()
    cfg["gate"] = {"policy": "policy.yaml"}
    fails(cfg, workdir, "config key 'gate.policy'", "policy.yaml", *fragments)
