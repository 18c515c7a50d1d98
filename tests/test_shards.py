import numpy as np
import pyarrow.parquet as pq
import pytest

from sae_audit.shards import CodeShardWriter, ShardMetadata, iter_code_batches, read_metadata


def _meta(**kw):
    base = dict(
        model="m",
        variant="rtn-int6",
        sae="s",
        hook="blocks.1.hook_resid_post",
        d_sae=50,
        token_start=100,
        token_stop=200,
        config_hash="abc",
    )
    return ShardMetadata(**{**base, **kw})


def test_code_shard_round_trip_sorted_with_metadata(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "shard.parquet"
    written = []
    with CodeShardWriter(path, _meta(), row_group_size=7) as w:
        for lo in (100, 150):
            tok = rng.integers(lo, lo + 50, 40)
            feat = rng.integers(0, 50, 40)
            keys = np.unique(tok * 1000 + feat)  # unique (token, feature) pairs
            tok, feat = keys // 1000, (keys % 1000).astype(np.int32)
            val = rng.random(len(tok)).astype(np.float32) + 0.1
            perm = rng.permutation(len(tok))  # arrive unsorted within a batch
            w.write(tok[perm], feat[perm], val[perm])
            written.append((tok, feat, val))
    table = pq.read_table(path)
    assert table.schema.field("token").type == "int64"
    assert table.schema.field("feature").type == "int32"
    assert table.schema.field("value").type == "float"
    tok = table["token"].to_numpy()
    feat = table["feature"].to_numpy()
    assert np.all(np.lexsort((feat, tok)) == np.arange(len(tok)))
    assert np.array_equal(tok, np.concatenate([t for t, _, _ in written]))
    assert np.array_equal(table["value"].to_numpy(), np.concatenate([v for _, _, v in written]))
    meta = read_metadata(path)
    assert meta == _meta() and meta.n_tokens == 100
    assert sum(b.num_rows for b in iter_code_batches(path, batch_rows=5)) == len(tok)
    assert not (tmp_path / "shard.parquet.tmp").exists()


def test_out_of_order_batches_are_rejected_and_leave_nothing(tmp_path):
    path = tmp_path / "bad.parquet"
    with (
        pytest.raises(ValueError, match="increasing token order"),
        CodeShardWriter(path, _meta()) as w,
    ):
        w.write(np.array([150]), np.array([1]), np.array([1.0]))
        w.write(np.array([120]), np.array([1]), np.array([1.0]))
    assert not path.exists() and not (tmp_path / "bad.parquet.tmp").exists()
