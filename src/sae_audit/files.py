"""Writing outputs atomically and reading inputs loudly.

Every output of the audit is written to a temporary name and renamed into place,
so a killed or failing job never leaves a half-written file that looks finished.
A failed write (disk full, quota, file-size limit) and an unreadable input (a
truncated Parquet file, a garbage checkpoint) become an `AuditError` that names
the file and the fix; the CLI prints it as one line instead of a library traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl


class AuditError(Exception):
    """A failure a user can act on: the message names the file or key and the fix."""


class InputError(AuditError, ValueError):
    """An input file is missing, damaged, or not what the rule asked for (a bad value)."""


class OutputError(AuditError):
    """An output could not be written."""


def rerun_hint(rule: str | None = None) -> str:
    """The recovery a damaged input needs: re-make it from what made it."""
    force = f"`snakemake --cores all --forcerun {rule}`" if rule else "`snakemake --cores all`"
    return f"delete it and re-run ({force} re-makes it and everything that reads it)"


def unreadable(path: str | Path, err: BaseException, rule: str | None = None) -> InputError:
    """The error for an input that exists but cannot be parsed."""
    return InputError(f"{path}: cannot be read ({type(err).__name__}: {err}); {rerun_hint(rule)}")


# What a failing write raises: the OS error itself, or a library's wrapper of it.
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError, pl.exceptions.ComputeError)


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; rename it into place on success.

    On any error the temporary is removed and `path` is left as it was; a failed write
    (ENOSPC, EDQUOT, EFBIG, whatever library raised it) is re-raised as OutputError
    naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{path}: cannot create its directory: {e}") from e
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            _remove(path)
        tmp.replace(path)
    except WRITE_ERRORS as e:
        # Writers wrap the OS error in their own types (polars' ComputeError, pyarrow's
        # ArrowIOError): whatever the type, the user needs the file and the way out.
        _remove(tmp)
        raise OutputError(
            f"{path}: could not be written ({type(e).__name__}: {e}); if the disk is full or "
            "a quota or file-size limit (ulimit -f) was hit, free space and re-run the same "
            "command"
        ) from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """JSON with sorted keys; NaN or infinity is refused (JSON has no such numbers)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=float, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def non_finite_columns(frame: pl.DataFrame) -> list[str]:
    """Float columns holding NaN or +-infinity."""
    bad = []
    for name, dtype in frame.schema.items():
        if dtype.is_float():
            col = frame.get_column(name)
            if bool(col.is_nan().any()) or bool(col.is_infinite().any()):
                bad.append(name)
    return bad


def write_parquet(frame: pl.DataFrame, path: str | Path) -> None:
    """A result table; a NaN or infinity in it is a bug upstream, never written.

    An undefined number is null, with a reason column beside it saying why.
    """
    bad = non_finite_columns(frame)
    if bad:
        raise AuditError(
            f"{path}: refusing to write a table with NaN/inf in columns {bad}; an undefined "
            "value must be null with a reason (a bug in sae-audit: please report it)"
        )
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp)


def write_csv(frame: pl.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_csv(tmp)


def read_parquet(path: str | Path, rule: str | None = None) -> pl.DataFrame:
    """A result table, with an error naming the file when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; {rerun_hint(rule)}")
    try:
        return pl.read_parquet(path)
    except Exception as e:  # polars raises several exception types for a damaged file
        raise unreadable(path, e, rule) from e


def read_json(path: str | Path, rule: str | None = None) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; {rerun_hint(rule)}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise unreadable(path, e, rule) from e


def update_digest(digest: Any, path: str | Path, chunk: int = 1 << 22) -> Any:
    """Feed a file's bytes into `digest` (a hashlib object), streamed; return it."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    return update_digest(hashlib.sha256(), path, chunk).hexdigest()


def finite(value: float | None) -> float | None:
    """A float for a table: None when undefined (NaN) so the table holds null, not NaN."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
