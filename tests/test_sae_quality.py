"""The SAE-quality table: per variant, the footer sums of its code shards added up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from sae_audit import stages
from sae_audit.encode import EncodeConfig, EncodeTarget, encode_shard_multi
from sae_audit.files import InputError
from sae_audit.models import ActivationCapture, load_model
from sae_audit.sae_quality import SCHEMA, sae_quality_table
from sae_audit.saes import SaeInput
from sae_audit.shards import QUALITY_KEY, Expected, add_to_dir_manifest, write_token_shard

from .conftest import write_dense
from .test_families import make_sae

HOOK = "blocks.1.hook_resid_post"


def _encode(model, sae, tmp_path: Path, variant: str, n_shards: int = 2) -> list[Path]:
    """`n_shards` shards of 3 sequences each, encoded as encode does."""
    paths = []
    for i in range(n_shards):
        ids = torch.randint(4, 64, (3, 6), generator=torch.Generator().manual_seed(i))
        tokens = tmp_path / f"tokens-{i}.parquet"
        write_token_shard(tokens, ids.numpy(), 3 * i, {"seq_len": 6})
        codes = tmp_path / variant / f"shard-{i}" / "sae.parquet"
        sae_in = SaeInput(HOOK, False, "none", prepend_bos=True, tokens_bos=False)
        encode_shard_multi(
            model,
            [EncodeTarget(sae, HOOK, codes, "sae", input=sae_in)],
            tokens,
            tmp_path / variant / f"nll-{i}.parquet",
            {"model": "tiny", "variant": variant, "config_hash": "hash"},
            EncodeConfig(batch_size=2, device="cpu", exclude_special_positions=False),
            torch.device("cpu"),
        )
        paths.append(codes)
    return paths


@pytest.fixture
def encoded(gpt_neox_dir, tmp_path):
    model = load_model(gpt_neox_dir)
    ids = torch.randint(4, 64, (6, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ActivationCapture(model, [HOOK]) as capture:
        model(input_ids=ids)
    acts = capture.activations[HOOK]
    sae = make_sae("standard", 32, 40, HOOK, acts=acts, seed=3)
    # A decoder that undoes the encoder where it fires: a reconstruction worth measuring.
    with torch.no_grad():
        sae.W_dec.copy_(torch.linalg.pinv(sae.W_enc))
        sae.b_dec.copy_(acts.reshape(-1, 32).mean(dim=0))
    return model, sae, tmp_path


def test_one_row_per_variant_summed_over_its_shards(encoded):
    model, sae, tmp_path = encoded
    codes = {"fp": _encode(model, sae, tmp_path, "fp")}
    table = sae_quality_table(codes, Expected(model="tiny", sae="sae", n_tokens=36))
    assert table.schema == pl.Schema(SCHEMA)
    row = table.row(0, named=True)
    assert row["variant"] == "fp" and row["n_positions"] == 36
    # Reconstruction better than the mean vector, not perfect; defined everywhere.
    assert 0 < row["explained_variance"] < 1 and row["mse"] > 0
    n_codes = sum(pq.read_metadata(p).num_rows for p in codes["fp"])
    assert row["l0"] == pytest.approx(n_codes / 36)
    assert 0 <= row["dead_fraction"] < 1
    assert row["hook"] == HOOK and row["sae_prepend_bos"] is True and row["tokens_bos"] is False
    assert row["centered"] is False and row["normalize_activations"] == "none"
    # Summed over shards, not averaged per shard: one shard alone gives other numbers.
    half = sae_quality_table({"fp": codes["fp"][:1]}, Expected()).row(0, named=True)
    assert half["n_positions"] == 18 and half["explained_variance"] != row["explained_variance"]


def test_a_shard_without_quality_sums_or_with_wrong_ones_is_refused(encoded):
    model, sae, tmp_path = encoded
    old = write_dense(tmp_path / "old", "fp", np.eye(4, dtype=np.float32), n_shards=1)
    with pytest.raises(InputError, match=r"no SAE-quality sums .*no 'sae_audit_quality' metadata"):
        sae_quality_table({"fp": old}, Expected())
    # A footer whose count disagrees with the shard's positions (another run's sums).
    (path,) = _encode(model, sae, tmp_path, "fp", n_shards=1)
    table = pq.read_table(path)
    footer = json.loads(pq.read_metadata(path).metadata[QUALITY_KEY])
    footer["n"] += 1
    pq.write_table(
        table.replace_schema_metadata(
            {**table.schema.metadata, QUALITY_KEY: json.dumps(footer).encode()}
        ),
        path,
    )
    with pytest.raises(InputError, match="but encode wrote"):  # changed after encode
        sae_quality_table({"fp": [path]}, Expected())
    add_to_dir_manifest(path)  # as if encode had written it so
    with pytest.raises(InputError, match="sums 19 positions but the shard covers 18"):
        sae_quality_table({"fp": [path]}, Expected())


def test_the_stage_writes_the_table(encoded):
    model, sae, tmp_path = encoded
    codes = {v: [str(p) for p in _encode(model, sae, tmp_path, v)] for v in ("fp", "rtn-int4")}
    out = tmp_path / "sae_quality.parquet"
    stages.sae_quality(codes=codes, expect={"model": "tiny", "n_tokens": 36}, out=out)
    table = pl.read_parquet(out)
    assert table["variant"].to_list() == ["fp", "rtn-int4"]
    assert table.null_count().sum_horizontal().item() == 0
    with pytest.raises(InputError, match="variant"):  # shards of fp read as rtn-int4
        stages.sae_quality(codes={"rtn-int4": codes["fp"]}, expect=None, out=out)
