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


def test_rows_in_order_are_kept_and_rows_out_of_order_are_sorted(tmp_path, monkeypatch):
    """The writer only checks a batch that is already in (token, feature) order (as encode
    passes them); a batch out of order, even only by feature within a token, is sorted."""
    sorted_batches = []
    lexsort = np.lexsort
    monkeypatch.setattr(np, "lexsort", lambda keys: sorted_batches.append(keys) or lexsort(keys))
    path = tmp_path / "shard.parquet"
    in_order = (
        np.array([100, 100, 101, 101, 102]),
        np.array([3, 7, 0, 2, 1], dtype=np.int32),  # features fall across a token boundary
        np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32),
    )
    features_out_of_order = (
        np.array([103, 103, 103, 104]),
        np.array([5, 9, 2, 1], dtype=np.int32),
        np.array([6.0, 7.0, 8.0, 9.0], dtype=np.float32),
    )
    tokens_out_of_order = (
        np.array([106, 105]),
        np.array([0, 4], dtype=np.int32),
        np.array([10.0, 11.0], dtype=np.float32),
    )
    with CodeShardWriter(path, _meta()) as w:
        for batch in (in_order, features_out_of_order, tokens_out_of_order):
            w.write(*batch)
    assert len(sorted_batches) == 2  # not the batch in order
    table = pq.read_table(path)
    np.testing.assert_array_equal(
        table["token"].to_numpy(), [100, 100, 101, 101, 102, 103, 103, 103, 104, 105, 106]
    )
    np.testing.assert_array_equal(table["feature"].to_numpy(), [3, 7, 0, 2, 1, 2, 5, 9, 1, 4, 0])
    np.testing.assert_array_equal(table["value"].to_numpy(), [1, 2, 3, 4, 5, 8, 6, 7, 9, 11, 10])
