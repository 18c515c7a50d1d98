"""Reliability: bad data never becomes a plausible-looking table (issue 8).

One small real audit (a tiny GPT-NeoX saved with save_pretrained, a sae-lens SAE,
checkpoints made by `compress`, shards made by `encode`) is built once per module;
each case damages a copy of it and asserts the exact outcome: the error, the file
it names, and that no output was left behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sae_audit import stages
from sae_audit.checkpoints import apply_state, compress_state, load_checkpoint, write_checkpoint
from sae_audit.encode import NonFiniteError, batch_nll
from sae_audit.files import AuditError, InputError, write_parquet
from sae_audit.match_sparsity import PruneSearch
from sae_audit.models import load_model
from sae_audit.shards import add_to_dir_manifest, encode_hash, write_token_shard
from sae_audit.variants import parse_variant

from .conftest import save_tiny_model
from .test_families import make_sae

SEQ_LEN, N_SEQ, N_SHARDS, D_SAE = 16, 8, 2, 48
MODEL_PARAMS = {"source": "x", "dtype": "float32", "revision": None, "attn_implementation": None}
ENCODE_PARAMS = {"batch_size": 4, "device": "cpu", "exclude_special_positions": False}
VARIANTS = ("fp", "rtn-int8", "rtn-int2")


def _sae_spec(sae_dir: Path) -> dict:
    return {"path": str(sae_dir), "architecture": "standard"}


@pytest.fixture(scope="module")
def audit(tmp_path_factory) -> Path:
    """Token shards, fp/rtn-int8/rtn-int2 checkpoints and their encoded shards."""
    root = tmp_path_factory.mktemp("audit")
    model_dir = save_tiny_model("gpt_neox", root / "model")
    hook = "blocks.1.hook_resid_post"
    ids = torch.randint(4, 64, (N_SEQ, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    from sae_audit.models import ActivationCapture

    model = load_model(model_dir)
    with ActivationCapture(model, [hook]) as cap, torch.no_grad():
        model(input_ids=ids)
    make_sae("standard", 32, D_SAE, hook, acts=cap.activations[hook]).save_model(root / "sae")
    per = N_SEQ // N_SHARDS
    for i in range(N_SHARDS):
        shard = ids[i * per : (i + 1) * per].numpy()
        write_token_shard(
            root / f"tokens/shard-{i:03d}.parquet", shard, i * per, {"seq_len": SEQ_LEN}
        )
    for variant in VARIANTS:
        stages.compress(
            model=MODEL_PARAMS,
            base=str(model_dir),
            variant=variant,
            out=root / f"checkpoints/{variant}",
        )
        for i in range(N_SHARDS):
            stages.encode(
                model=MODEL_PARAMS,
                saes={"res": _sae_spec(root / "sae")},
                encode=ENCODE_PARAMS,
                checkpoint=root / f"checkpoints/{variant}",
                tokens=root / f"tokens/shard-{i:03d}.parquet",
                codes_dir=root / f"codes/{variant}/shard-{i:03d}",
                nll=root / f"nll/{variant}/shard-{i:03d}.parquet",
                model_name="tiny",
            )
    return root


@pytest.fixture
def run(audit: Path, tmp_path: Path) -> Path:
    """A private copy of the audit that a case may damage."""
    shutil.copytree(audit, tmp_path / "run")
    return tmp_path / "run"


def codes(run: Path, variant: str) -> list[str]:
    return [str(run / f"codes/{variant}/shard-{i:03d}/res.parquet") for i in range(N_SHARDS)]


def nll(run: Path, variant: str) -> list[str]:
    return [str(run / f"nll/{variant}/shard-{i:03d}.parquet") for i in range(N_SHARDS)]


def real_expect(run: Path, audit: Path) -> dict:
    """What the workflow would expect of these shards (the SAE spec names the audit's path)."""
    return {
        "model": "tiny",
        "sae": "res",
        "config_hash": encode_hash(MODEL_PARAMS, ENCODE_PARAMS, _sae_spec(audit / "sae")),
        "n_tokens": N_SEQ * SEQ_LEN,
    }


def no_outputs(directory: Path) -> bool:
    return not directory.exists() or not any(directory.rglob("*"))


def rewrite_shard(path: Path, mutate) -> None:
    """Rewrite a code shard's rows as given (schema and metadata kept) and re-record it in
    its directory manifest, as a buggy or tampering writer would: only the content checks
    can catch what follows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = mutate(*(table.column(c).to_numpy().copy() for c in ("token", "feature", "value")))
    arrays = [pa.array(c, type=f.type) for c, f in zip(columns, table.schema, strict=True)]
    pq.write_table(pa.Table.from_arrays(arrays, schema=table.schema), path)
    add_to_dir_manifest(path)


# ---------------------------------------------------------------- the clean run is accepted
def test_clean_audit_passes_every_check(run: Path, audit: Path, tmp_path: Path):
    out = tmp_path / "out"
    stages.fp_stats(
        codes=codes(run, "fp"), out=str(out / "fp_stats.parquet"), expect=real_expect(run, audit)
    )
    for v in ("rtn-int8", "rtn-int2"):
        stages.correlate(fp=codes(run, "fp"), variant=codes(run, v), out=out / f"{v}.parquet", variant_name=v,
                         expect=real_expect(run, audit))  # fmt: skip
    stages.perplexity(nll={v: nll(run, v) for v in VARIANTS}, out=out / "ppl.parquet",
                            expect={"model": "tiny"})  # fmt: skip
    assert pl.read_parquet(out / "rtn-int8.parquet")["r"].is_finite().all()
    assert (run / "codes/fp/shard-000/manifest.json").is_file()


# ---------------------------------------------------------------- NaN / inf
def test_encode_refuses_a_checkpoint_that_gives_nan(run: Path):
    """A scrambled checkpoint body (valid header, garbage scales) must not become a shard."""
    tensors = run / "checkpoints/rtn-int8/compressed.safetensors"
    raw = bytearray(tensors.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = b"\xff" * (len(raw) - header)  # 0xffffffff is a float32 NaN
    tensors.write_bytes(bytes(raw))
    out = run / "codes/scrambled/shard-000"
    with pytest.raises(NonFiniteError) as err:
        stages.encode(model=MODEL_PARAMS, saes={"res": _sae_spec(run / "sae")}, encode=ENCODE_PARAMS,
                      checkpoint=run / "checkpoints/rtn-int8", tokens=run / "tokens/shard-000.parquet",
                      codes_dir=out, nll=run / "nll/scrambled/shard-000.parquet", model_name="tiny")  # fmt: skip
    msg = str(err.value)
    assert "model 'tiny'" in msg and "variant 'rtn-int8'" in msg and "shard-000.parquet" in msg
    assert "at token 1" in msg and "dtype" in msg  # the first bad token, and what to try
    assert no_outputs(out) and not (run / "nll/scrambled").exists()


@pytest.mark.parametrize("side", ["fp", "variant"])
def test_correlate_rejects_a_nan_activation(run: Path, tmp_path: Path, side: str):
    shard = Path(codes(run, "fp" if side == "fp" else "rtn-int2")[1])

    def poison(t, f, v):
        v[3] = np.nan
        return t, f, v

    rewrite_shard(shard, poison)
    out = tmp_path / "corr.parquet"
    with pytest.raises(InputError, match="non-finite activation nan") as err:
        stages.correlate(
            fp=codes(run, "fp"), variant=codes(run, "rtn-int2"), out=out, variant_name="rtn-int2"
        )
    assert str(shard) in str(err.value) and not out.exists()


def test_stats_rejects_an_infinite_activation(run: Path, tmp_path: Path):
    shard = Path(codes(run, "fp")[0])

    def poison(t, f, v):
        v[0] = np.inf
        return t, f, v

    rewrite_shard(shard, poison)
    with pytest.raises(InputError, match="non-finite activation inf") as err:
        stages.fp_stats(codes=codes(run, "fp"), out=str(tmp_path / "s.parquet"))
    assert str(shard) in str(err.value) and not (tmp_path / "s.parquet").exists()


def test_perplexity_rejects_a_nan_nll(run: Path, tmp_path: Path):
    import pyarrow.parquet as pq

    path = Path(nll(run, "rtn-int8")[0])
    table = pq.read_table(path)
    values = table.column("nll").to_numpy().copy()
    values[5] = np.nan
    pq.write_table(table.set_column(1, "nll", [values]), path)
    with pytest.raises(InputError, match="non-finite NLL nan") as err:
        stages.perplexity(nll={v: nll(run, v) for v in VARIANTS}, out=tmp_path / "p.parquet")
    assert str(path) in str(err.value) and not (tmp_path / "p.parquet").exists()


def test_stability_and_contexts_reject_a_nan_activation(run: Path, tmp_path: Path):
    shard = Path(codes(run, "rtn-int8")[0])

    def poison(t, f, v):
        v[:] = np.nan
        return t, f, v

    rewrite_shard(shard, poison)
    params = {"seq_len": SEQ_LEN, "analysis": {"active_rate": 0.001, "survived": 0.9, "destroyed": 0.5},
              "stability": {"token_budgets": [0.5, 1.0], "subsets": 1, "seed": 0}}  # fmt: skip
    with pytest.raises(InputError, match="non-finite") as err:
        stages.stability(fp=codes(run, "fp"), codes={"rtn-int8": codes(run, "rtn-int8")},
                         out=tmp_path / "st.parquet", **params)  # fmt: skip
    assert str(shard) in str(err.value)
    features = pl.DataFrame({"variant": ["rtn-int8"], "feature": [int(pl.read_parquet(shard)["feature"][0])],
                             "active": [True], "r": [0.1]})  # fmt: skip
    features.write_parquet(tmp_path / "features.parquet")
    with pytest.raises(InputError, match="non-finite"):
        stages.damaged_contexts(
            features=tmp_path / "features.parquet", fp=codes(run, "fp"),
            codes={"rtn-int8": codes(run, "rtn-int8")},
            tokens=[str(run / f"tokens/shard-{i:03d}.parquet") for i in range(N_SHARDS)],
            tokenizer=str(run / "model"),
            damaged_contexts={"n_features": 1, "n_contexts": 1, "window": 4},
            out=tmp_path / "ctx.parquet")  # fmt: skip
    assert not (tmp_path / "st.parquet").exists() and not (tmp_path / "ctx.parquet").exists()


def test_a_table_with_nan_is_never_written(tmp_path: Path):
    with pytest.raises(AuditError, match=r"NaN/inf in columns \['r'\]"):
        write_parquet(pl.DataFrame({"r": [0.5, float("nan")]}), tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


# ---------------------------------------------------------------- provenance
def test_a_shard_copied_from_another_variant_is_refused(run: Path, audit: Path, tmp_path: Path):
    """rtn-int8's shard directory copied over rtn-int2's: manifest intact, metadata says int8."""
    shutil.rmtree(run / "codes/rtn-int2/shard-001")
    shutil.copytree(run / "codes/rtn-int8/shard-001", run / "codes/rtn-int2/shard-001")
    out = tmp_path / "corr.parquet"
    with pytest.raises(InputError) as err:
        stages.correlate(fp=codes(run, "fp"), variant=codes(run, "rtn-int2"), out=out, variant_name="rtn-int2",
                         expect=real_expect(run, audit))  # fmt: skip
    msg = str(err.value)
    assert "variant='rtn-int8'" in msg and "variant='rtn-int2'" in msg and "shard-001" in msg
    assert not out.exists()


def test_a_shard_file_replaced_inside_its_directory_is_refused(run: Path, tmp_path: Path):
    """Snakemake cannot see a file changed inside a directory() output; the manifest can."""
    shutil.copy(codes(run, "rtn-int8")[0], codes(run, "rtn-int2")[0])
    with pytest.raises(InputError, match=r"encode wrote|checksum") as err:
        stages.correlate(
            fp=codes(run, "fp"), variant=codes(run, "rtn-int2"), out=str(tmp_path / "c.parquet")
        )
    assert codes(run, "rtn-int2")[0] in str(err.value) and "--forcerun encode" in str(err.value)


def test_a_deleted_shard_is_refused(run: Path, tmp_path: Path):
    Path(codes(run, "fp")[1]).unlink()
    with pytest.raises(InputError, match="deleted after encode wrote it") as err:
        stages.fp_stats(codes=codes(run, "fp"), out=str(tmp_path / "s.parquet"))
    assert codes(run, "fp")[1] in str(err.value)


def test_a_shard_from_another_config_is_refused(run: Path, audit: Path, tmp_path: Path):
    other = {
        **real_expect(run, audit),
        "config_hash": encode_hash(
            MODEL_PARAMS, {"batch_size": 8, "device": "cpu", "exclude_special_positions": False}, {}
        ),
    }
    with pytest.raises(InputError, match="config_hash="):
        stages.fp_stats(codes=codes(run, "fp"), out=str(tmp_path / "s.parquet"), expect=other)
    with pytest.raises(InputError, match="sae='other'"):
        stages.fp_stats(
            codes=codes(run, "fp"), out=str(tmp_path / "s.parquet"), expect={"sae": "other"}
        )
    # A token set of another size: the shards do not tile it.
    with pytest.raises(InputError, match="cover 128 tokens from 0, but the token set has 256"):
        stages.fp_stats(
            codes=codes(run, "fp"), out=str(tmp_path / "s.parquet"), expect={"n_tokens": 256}
        )
    assert not (tmp_path / "s.parquet").exists()


def test_nll_shards_listed_under_another_variant_are_refused(run: Path, tmp_path: Path):
    with pytest.raises(
        InputError, match="variant='rtn-int8' but this job reads variant='rtn-int2'"
    ):
        stages.perplexity(nll={"fp": nll(run, "fp"), "rtn-int2": nll(run, "rtn-int8")},
                          out=tmp_path / "p.parquet")  # fmt: skip


@pytest.mark.parametrize("damage", ["duplicate", "unsorted"])
def test_stats_rejects_duplicated_or_unsorted_rows(run: Path, tmp_path: Path, damage: str):
    """A duplicated (token, feature) row would be double-counted by every sum."""
    shard = Path(codes(run, "fp")[0])

    def mutate(t, f, v):
        if damage == "duplicate":
            return np.insert(t, 1, t[0]), np.insert(f, 1, f[0]), np.insert(v, 1, v[0])
        return t[::-1].copy(), f[::-1].copy(), v[::-1].copy()

    rewrite_shard(shard, mutate)
    with pytest.raises(InputError, match="not strictly sorted by \\(token, feature\\)") as err:
        stages.fp_stats(codes=codes(run, "fp"), out=str(tmp_path / "s.parquet"))
    assert str(shard) in str(err.value)


# ---------------------------------------------------------------- files a job cannot read
def test_a_truncated_shard_is_named(run: Path, tmp_path: Path):
    shard = Path(codes(run, "rtn-int8")[0])
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated or replaced") as err:
        stages.correlate(
            fp=codes(run, "fp"), variant=codes(run, "rtn-int8"), out=str(tmp_path / "c.parquet")
        )
    assert str(shard) in str(err.value)


def test_a_truncated_nll_shard_and_table_are_named(run: Path, tmp_path: Path):
    path = Path(nll(run, "fp")[0])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="cannot be read") as err:
        stages.perplexity(nll={v: nll(run, v) for v in VARIANTS}, out=tmp_path / "p.parquet")
    assert str(path) in str(err.value) and "--forcerun encode" in str(err.value)
    table = tmp_path / "features.parquet"
    table.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="cannot be read") as err:
        stages.overlap(features=table, pairs=[["a", "b"]], out=tmp_path / "o.parquet")
    assert str(table) in str(err.value)


def test_a_checkpoint_with_a_garbage_body_is_named(run: Path):
    tensors = run / "checkpoints/rtn-int2/compressed.safetensors"
    tensors.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="cannot be read") as err:
        load_checkpoint(run / "checkpoints/rtn-int2")
    assert str(tensors) in str(err.value) and "--forcerun compress" in str(err.value)


def test_a_failed_write_names_the_output_and_leaves_nothing(run: Path, tmp_path: Path):
    """A write past the file-size limit (as on a full disk): the CLI names the file, no traceback."""
    out = tmp_path / "stats.parquet"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    proc = subprocess.run(
        [sys.executable, "-m", "sae_audit.cli", "fp-stats", "--codes", *codes(run, "fp"), "--out", str(out)],
        capture_output=True, text=True, preexec_fn=small_files, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sae-audit fp-stats: error:") and str(out) in last
    assert "File too large" in last and "disk is full" in last and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- correctness
def test_checkpoint_loads_from_any_working_directory(audit: Path, tmp_path: Path, monkeypatch):
    """The manifest names its base relative to itself (and absolutely), not to the cwd."""
    base = Path(os.path.relpath(audit / "model", Path.cwd()))
    write_checkpoint(base, "rtn-int4", tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt/manifest.json").read_text())
    assert manifest["base"] == str(base) and Path(manifest["base_absolute"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_checkpoint(tmp_path / "ckpt").config.model_type == "gpt_neox"
    # The whole tree moved: the relative path still finds the base.
    moved = tmp_path / "moved"
    shutil.copytree(audit / "model", moved / "model")
    shutil.copytree(tmp_path / "ckpt", moved / "ckpt")
    rel = json.loads((moved / "ckpt/manifest.json").read_text())
    rel["base_relative"] = os.path.relpath(moved / "model", moved / "ckpt")
    rel["base_absolute"] = str(tmp_path / "gone")
    (moved / "ckpt/manifest.json").write_text(json.dumps(rel))
    assert load_checkpoint(moved / "ckpt").config.model_type == "gpt_neox"


def test_matched_search_in_bf16_runs_the_encoded_network(tmp_path: Path):
    """Search and encode load through one loader in the run dtype: bit-identical logits.

    The old search cast a float32 model with .to(bfloat16), which also rounds the
    non-persistent rotary inv_freq, and so scored a slightly different network.
    """
    base = rotary_model(tmp_path / "model")
    ids = torch.randint(4, 64, (4, 96), generator=torch.Generator().manual_seed(1))
    sparsity = 0.3
    write_checkpoint(base, "prune-matched-rtn-int6", tmp_path / "ckpt", sparsity=sparsity)
    encoded = load_checkpoint(tmp_path / "ckpt", dtype="bfloat16")
    searched = PruneSearch(str(base), "rtn-int6", dtype="bfloat16").model_at(sparsity)
    with torch.no_grad():
        a, b = encoded(input_ids=ids).logits, searched(input_ids=ids).logits
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
        assert torch.equal(batch_nll(encoded, ids), batch_nll(searched, ids))
    rotary = [n for n, _ in searched.named_buffers() if n.endswith("inv_freq")]
    assert rotary and all(searched.get_buffer(n).dtype == torch.float32 for n in rotary)
    # The old search (prune a float32 model, then cast it) scores another network.
    old = load_model(base, dtype="float32")
    apply_state(old, *compress_state(old, parse_variant("prune-matched-rtn-int6"), sparsity))
    old = old.to(torch.bfloat16)
    with torch.no_grad():
        assert not torch.equal(old(input_ids=ids).logits, a)


def rotary_model(path: Path) -> Path:
    """A tiny GPT-NeoX whose rotary embedding covers the whole head (many frequencies)."""
    from transformers import AutoModelForCausalLM

    from .conftest import tiny_config

    config = tiny_config("gpt_neox", layers=2)
    config.rope_parameters["partial_rotary_factor"] = 1.0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path)
    return path


def test_matched_stage_reproduces_the_target_perplexity_in_bf16(tmp_path: Path):
    """Target = the encoded prune-0.3 checkpoint; the search's first midpoint is 0.3."""
    base = rotary_model(tmp_path / "model")
    ids = torch.randint(4, 64, (6, 64), generator=torch.Generator().manual_seed(2)).numpy()
    write_token_shard(tmp_path / "tokens/shard-000.parquet", ids, 0, {"seq_len": 64})
    make_sae("standard", 32, D_SAE, "blocks.1.hook_resid_post").save_model(tmp_path / "sae")
    params = {**MODEL_PARAMS, "dtype": "bfloat16"}
    stages.compress(model=params, base=str(base), variant="prune-0.3", out=tmp_path / "ckpt")
    stages.encode(model=params, saes={"res": _sae_spec(tmp_path / "sae")}, encode=ENCODE_PARAMS,
                  checkpoint=tmp_path / "ckpt", tokens=tmp_path / "tokens/shard-000.parquet",
                  codes_dir=tmp_path / "codes", nll=tmp_path / "nll.parquet", model_name="tiny")  # fmt: skip
    result = stages.match_sparsity(
        model=params, base=str(base), target="prune-0.3", target_nll=[str(tmp_path / "nll.parquet")],
        tokens=[str(tmp_path / "tokens/shard-000.parquet")], encode=ENCODE_PARAMS,
        matched={"tolerance": 1e-9, "lo": 0.0, "hi": 0.6, "max_steps": 1, "n_sequences": None},
        out=tmp_path / "matched.json", model_name="tiny",
    )  # fmt: skip
    first = result["trace"][0]
    assert first["sparsity"] == 0.3
    assert first["perplexity"] == pytest.approx(result["target_perplexity"], rel=1e-12)


def test_auc_spread_is_the_population_sd_over_folds():
    from sae_audit.predict import PredictConfig, predict_survival

    rng = np.random.default_rng(0)
    n = 200
    rate = rng.uniform(0.002, 0.2, n)
    table = pl.DataFrame({
        "feature": np.arange(n), "active": np.ones(n, bool), "firing_rate": rate,
        "mean_when_firing": rng.uniform(0.5, 2, n), "peak": rng.uniform(2, 5, n),
        "class": np.where(rate + rng.normal(0, 0.03, n) > 0.1, "survived", "blurred"),
    })  # fmt: skip
    out = predict_survival(table, PredictConfig(folds=5))
    assert out["auc_sd"] == pytest.approx(float(np.std(out["fold_aucs"], ddof=0)))
    assert out["auc_sd"] < float(np.std(out["fold_aucs"], ddof=1))


def test_overlap_of_two_undamaged_variants_is_null_with_a_reason(tmp_path: Path):
    rows = [{"variant": v, "feature": f, "active": True, "class": "survived", "damage": 0.01 * f}
            for v in ("rtn-int8", "prune-matched-rtn-int8") for f in range(5)]  # fmt: skip
    pl.DataFrame(rows).write_parquet(tmp_path / "features.parquet")
    table = stages.overlap(features=tmp_path / "features.parquet",
                           pairs=[["rtn-int8", "prune-matched-rtn-int8"]], out=tmp_path / "o.parquet")  # fmt: skip
    row = pl.read_parquet(tmp_path / "o.parquet").to_dicts()[0]
    assert row["jaccard_nonsurviving"] is None and row["jaccard_destroyed"] is None
    assert "jaccard_nonsurviving undefined: no nonsurviving features" in row["reason"]
    assert row["spearman"] == pytest.approx(1.0) and table.height == 1


def test_reference_token_recipe_is_the_raw_wikitext_text(tmp_path: Path, monkeypatch):
    """config/paper.yaml's recipe on WikiText-shaped rows: the ids of the raw joined text."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from sae_audit.tokens import TokenSetConfig, build_token_set, load_documents, load_token_ids

    from .conftest import ROOT
    from .test_tokens import _train_tokenizer

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [""," = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : Unrecorded Chronicles .\n",
            " The game began development in 2010 .\n", "", " = = Gameplay = = \n", "  \n"] * 6  # fmt: skip
    (tmp_path / "wt/data").mkdir(parents=True)
    pq.write_table(pa.table({"text": rows}), tmp_path / "wt/data/train-00000-of-00001.parquet")
    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    spec = {**paper["models"]["pythia-70m"]["tokens"], "dataset": {"path": str(tmp_path / "wt")}}
    tokenizer = _train_tokenizer(with_bos=False)
    raw = "\n\n".join(r for r in rows if r.strip())
    expected = tokenizer(raw, add_special_tokens=False)["input_ids"]
    seq_len = 8
    cfg = TokenSetConfig(seq_len=seq_len, n_sequences=len(expected) // seq_len, n_shards=1,
                         join=spec["join"], add_special_tokens=spec["add_special_tokens"])  # fmt: skip
    out = tmp_path / "tokens.parquet"
    build_token_set(load_documents(spec, []), tokenizer, cfg, [out])
    got = load_token_ids([out]).reshape(-1)
    assert got.tolist() == expected[: got.size]
    # The stripped recipe the config used before is a different text: this test can fail.
    stripped = load_documents({**spec, "strip": True, "line_documents": True}, [])
    assert "\n\n".join(stripped) != raw


def test_nll_shards_are_checked_like_code_shards(run: Path, tmp_path: Path):
    """A shard listed twice would count twice; another config's or a missing shard is refused."""
    out = tmp_path / "p.parquet"
    twice = {v: nll(run, v) for v in VARIANTS} | {
        "rtn-int8": [*nll(run, "rtn-int8"), nll(run, "rtn-int8")[0]]
    }
    with pytest.raises(InputError, match="token ranges overlap"):
        stages.perplexity(nll=twice, out=out)
    expect = {
        "model": "tiny",
        "config_hash": encode_hash(MODEL_PARAMS, ENCODE_PARAMS),
        "n_tokens": N_SEQ * SEQ_LEN,
    }
    stages.perplexity(
        nll={v: nll(run, v) for v in VARIANTS}, expect=expect, out=out
    )  # as encode wrote them
    out.unlink()
    with pytest.raises(InputError, match="config_hash="):
        stages.perplexity(
            nll={v: nll(run, v) for v in VARIANTS},
            out=out,
            expect={
                **expect,
                "config_hash": encode_hash(MODEL_PARAMS, {"batch_size": 8, "device": "cpu"}),
            },
        )
    with pytest.raises(InputError, match="a shard is missing"):
        stages.perplexity(nll={v: nll(run, v)[:1] for v in VARIANTS}, expect=expect, out=out)
    assert not out.exists()
