"""Writing outputs atomically and reading inputs loudly, on real files."""

from __future__ import annotations

import math

import polars as pl
import pytest

from sae_audit.files import (
    AuditError,
    InputError,
    atomic_path,
    finite,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "sub" / "out.txt"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(out) as tmp:
        assert tmp != out and tmp.parent == out.parent
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(out.parent.iterdir()) == []
    # An existing output is left as it was.
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert out.read_text() == "old" and list(out.parent.iterdir()) == [out]
    with atomic_path(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and list(out.parent.iterdir()) == [out]


def test_atomic_directory_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.bin").write_text("x")
    with atomic_path(out, directory=True) as tmp:
        (tmp / "new.bin").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new.bin"]
    with pytest.raises(RuntimeError), atomic_path(out, directory=True) as tmp:
        (tmp / "half.bin").write_text("z")
        raise RuntimeError
    assert [p.name for p in out.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_write_parquet_refuses_nan_and_writes_nothing(tmp_path):
    out = tmp_path / "t.parquet"
    frame = pl.DataFrame({"a": [1, 2], "r": [0.5, float("nan")], "s": [1.0, float("inf")]})
    with pytest.raises(AuditError, match=r"t\.parquet.*NaN/inf in columns \['r', 's'\]"):
        write_parquet(frame, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # Null is how an undefined value is written.
    write_parquet(pl.DataFrame({"r": [0.5, None]}), out)
    assert read_parquet(out)["r"].to_list() == [0.5, None]


def test_write_json_refuses_nan_and_sorts_keys(tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(ValueError):
        write_json(out, {"perplexity": math.nan})
    assert list(tmp_path.iterdir()) == []
    write_json(out, {"b": 1, "a": 2.5})
    assert out.read_text() == '{\n  "a": 2.5,\n  "b": 1\n}\n'
    assert read_json(out) == {"a": 2.5, "b": 1}


def test_reading_a_missing_or_damaged_input_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "missing.parquet"
    with pytest.raises(InputError, match=r"missing\.parquet: no such file.*--forcerun survival"):
        read_parquet(missing, "survival")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"garbage\.parquet: cannot be read"):
        read_parquet(garbage)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(InputError, match=r"bad\.json: cannot be read.*--forcerun encode"):
        read_json(bad_json, "encode")


def test_finite_turns_undefined_into_none():
    assert finite(None) is None and finite(math.nan) is None and finite(math.inf) is None
    assert finite(2) == 2.0 and isinstance(finite(2), float)
