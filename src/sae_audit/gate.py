"""The release gate: check compressed variants against a policy and certify each one.

`sae-audit gate` turns an audit's tables into a release decision. A policy file (YAML)
sets the thresholds a release candidate must meet: the share of active SAE features that
survive, the share of a watchlist of features that survive, the perplexity change, and
the share of features that survive causally. For every candidate the gate writes a JSON
certificate that records what was measured, against which thresholds, and the content
hashes of everything the verdict depends on (base model, checkpoint, SAE, token set,
policy, input tables), so a certificate can be re-derived and compared byte for byte; a
JUnit XML so CI shows each check as a test; and `gate.parquet`, one row per check.

Determinism is the point of a certificate: nothing in it is a timestamp or a path that
names this machine (paths are relative to the results directory), floats are rounded to
`SIGNIFICANT_DIGITS` significant digits before hashing so platform noise in the last bits
cannot flip a hash, and `certificate_hash` is the SHA-256 of the canonical JSON
(sorted keys, compact separators) of everything else.

Torch-free: the gate reads tables and hashes files; it never loads a model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import yaml
from jsonschema import Draft202012Validator

from .config import HUB_PREFIX  # a source given by its hub id, not a local directory
from .files import (
    AuditError,
    InputError,
    atomic_path,
    read_json,
    read_parquet,
    sha256_file,
    update_digest,
    write_json,
    write_parquet,
)
from .table_docs import polars_schema

log = logging.getLogger("sae_audit")

SCHEMA_VERSION = "sae-audit-certificate/1"
CERTIFICATE_SCHEMA = "certificate.schema.json"
SIGNIFICANT_DIGITS = 10
FP = "fp"
NULL_VARIANTS = ("fp-null", "fp-noise")  # controls: never release candidates, reported as nulls
NOT_CANDIDATES = frozenset((FP, *NULL_VARIANTS))
IGNORED_NAMES = frozenset({".snakemake_timestamp"})  # snakemake's marker; its mtime is no content
DIR_HASH_TAG = b"sae-audit-dir/1\0"  # versions the directory encoding of hash_path

# The keys of a variant's numbers, in the order the certificate and tests expect them.
NUMBER_KEYS = (
    "survived_pct",
    "destroyed_pct",
    "median_r",
    "n_active",
    "ppl_chunked",
    "dppl_chunked_pct",
    "ppl_sliding",
    "dppl_sliding_pct",
    "watchlist_survived_pct",
    "n_watch_active",
    "n_watch_inactive",
    "causal_survived_pct",
)
_SURVIVAL_KEYS = ("survived_pct", "destroyed_pct", "median_r", "n_active")
_PERPLEXITY_KEYS = ("ppl_chunked", "dppl_chunked_pct", "ppl_sliding", "dppl_sliding_pct")

# gate.parquet: one row per model, SAE, variant and check.
# The checks table's columns, documented in tables.schema.yaml (gate).
GATE_SCHEMA = polars_schema("gate")


# ---------------------------------------------------------------- policy
_PERCENT = {"type": ["number", "null"], "minimum": 0, "maximum": 100}
POLICY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "min_survived_pct": _PERCENT,
        "min_watchlist_survived_pct": _PERCENT,
        "max_perplexity_change_pct": {"type": ["number", "null"], "minimum": 0},
        "min_causal_survived_pct": _PERCENT,
        "variants": {
            "type": ["array", "null"],
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "minLength": 1, "not": {"enum": sorted(NOT_CANDIDATES)}},
        },
    },
}
# What each key accepts, for the error message (the user's fix).
_ALLOWED = {
    "min_survived_pct": "a number 0..100 or null",
    "min_watchlist_survived_pct": "a number 0..100 or null",
    "max_perplexity_change_pct": "a number >= 0 (the absolute dppl_chunked_pct) or null",
    "min_causal_survived_pct": "a number 0..100 or null",
    "variants": (
        "a non-empty list of distinct variant names (not fp, fp-null or fp-noise), or null "
        "for every variant but those"
    ),
}
_THRESHOLD_KEYS = (
    "min_survived_pct",
    "min_watchlist_survived_pct",
    "max_perplexity_change_pct",
    "min_causal_survived_pct",
)


@dataclass(frozen=True)
class Policy:
    """The thresholds a release candidate must meet; None: that check is not asked for.

    `variants` names the release candidates; None means every audited variant except FP
    and the nulls (fp-null, fp-noise), which are controls, not products.
    """

    min_survived_pct: float | None = None
    min_watchlist_survived_pct: float | None = None
    max_perplexity_change_pct: float | None = None
    min_causal_survived_pct: float | None = None
    variants: tuple[str, ...] | None = None

    def thresholds(self) -> dict[str, Any]:
        """The policy as plain JSON values (what a certificate records)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _THRESHOLD_KEYS}
        out["variants"] = None if self.variants is None else list(self.variants)
        return out


def read_policy(path: str | Path) -> Policy:
    """The policy in a YAML file; InputError naming the file, the key and the allowed form.

    Every key is optional (null: not checked), but a policy must set at least one
    threshold: a gate that checks nothing would certify anything.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such policy file; write one with the keys {list(_ALLOWED)}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot be read as YAML ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict):
        raise InputError(
            f"{path}: a policy must be a YAML mapping of the keys {list(_ALLOWED)}, "
            f"got {type(raw).__name__}"
        )
    for key in raw:
        if key not in _ALLOWED:
            raise InputError(
                f"{path}: unknown key {key!r}; a policy has only the keys {list(_ALLOWED)}"
            )
    errors = sorted(
        _policy_validator().iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        key = str(errors[0].absolute_path[0]) if errors[0].absolute_path else "?"
        raise InputError(
            f"{path}: key {key!r}: {errors[0].message}; allowed: {_ALLOWED.get(key, '?')}"
        )
    for key in _THRESHOLD_KEYS:
        value = raw.get(key)
        # jsonschema lets NaN through every bound (NaN compares false) and infinity through
        # an open one: neither is a threshold anybody meant.
        if value is not None and not math.isfinite(float(value)):
            raise InputError(
                f"{path}: key {key!r}: {value!r} is not finite; allowed: {_ALLOWED[key]}"
            )
    if all(raw.get(k) is None for k in _THRESHOLD_KEYS):
        raise InputError(
            f"{path}: sets no threshold; set at least one of {list(_THRESHOLD_KEYS)} "
            "(a gate that checks nothing would pass every variant)"
        )
    variants = raw.get("variants")
    return Policy(
        **{k: None if raw.get(k) is None else float(raw[k]) for k in _THRESHOLD_KEYS},
        variants=None if variants is None else tuple(variants),
    )


@functools.cache
def _policy_validator() -> Draft202012Validator:
    Draft202012Validator.check_schema(POLICY_SCHEMA)
    return Draft202012Validator(POLICY_SCHEMA)


# ---------------------------------------------------------------- hashing
def hash_path(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes, or of a directory's files and their names.

    A file hashes to its plain SHA-256 (what `sha256sum` prints). A directory hashes its
    files (recursively, symlinks followed) in the order of their relative POSIX paths:
    each path and each file's bytes are preceded by their length, so no two different
    trees encode to the same stream. Only `.snakemake_timestamp` is left out (snakemake
    writes it into every directory output; its content is no part of the artifact).
    Modification times, permissions and empty directories are not hashed, so the hash
    is the same on every machine that holds the same files.
    """
    path = Path(path)
    if path.is_file():
        return "sha256:" + sha256_file(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such file or directory to hash")
    return _hash_files(path, _tree_files(path))


def _tree_files(root: Path) -> list[str]:
    """The relative POSIX paths of the files under `root`, sorted; directory symlinks are
    followed once (a link back up the tree is not walked again)."""
    found: list[str] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name in IGNORED_NAMES:
                continue
            if (Path(dirpath) / name).is_file():
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def _hash_files(root: Path, relpaths: Sequence[str]) -> str:
    """The directory encoding of hash_path over the given files of `root`."""
    digest = hashlib.sha256(DIR_HASH_TAG)
    for rel in relpaths:
        name = rel.encode("utf-8")
        file = root / rel
        digest.update(len(name).to_bytes(8, "big"))
        digest.update(name)
        digest.update(file.stat().st_size.to_bytes(8, "big"))
        update_digest(digest, file)
    return "sha256:" + digest.hexdigest()


# Where the run happened is no part of a checkpoint: its manifest records the base model's
# absolute path beside the relative one (checkpoints.base_record), left out of its hash.
MACHINE_KEYS = ("base_absolute",)


# An external artifact's method records where it was and when it was written: the
# certificate records and hashes the artifact's content instead.
EXTERNAL_MACHINE_KEYS = ("source", "mtime")


def portable_method(method: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's method record without what only says where the run was."""
    if method.get("kind") == "external":
        return {k: v for k, v in method.items() if k not in EXTERNAL_MACHINE_KEYS}
    return dict(method)


def checkpoint_hash(checkpoint: Path) -> str:
    """``sha256:`` of a checkpoint directory, the same wherever the run was: its files as
    hash_path hashes them, but manifest.json by its canonical JSON without MACHINE_KEYS
    (floats rounded); an external variant's artifact by its content (its directory
    holds only the manifest)."""
    files = [f for f in _tree_files(checkpoint) if f != "manifest.json"]
    manifest = read_json(checkpoint / "manifest.json", "compress")
    kept = {k: v for k, v in manifest.items() if k not in MACHINE_KEYS}
    method = kept.get("method") or {}
    record: dict[str, Any] = {"files": _hash_files(checkpoint, files)}
    if method.get("kind") == "external":
        kept["method"] = portable_method(method)
        record["artifact"] = hash_path(method["source"])
    return hash_json(rounded({**record, "manifest": kept}))


def source_hash(source: Path | str) -> str:
    """The hash of a base model or SAE: its files on disk, or, given as `hub:<id>`, its
    hub id (the hub pins it, not this hash). A local path that is missing is an error,
    never taken for an id."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return hash_json({"hub_id": text[len(HUB_PREFIX) :]})
    return hash_path(source)


def canonical_json(data: Any) -> str:
    """The one JSON text of a value that its hash is taken of: sorted keys, no spaces."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def hash_json(data: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """A JSON value with every float rounded to `digits` significant digits (NaN and
    infinity become None, -0.0 becomes 0.0), so the last bits of a platform's arithmetic
    never reach a hash. Integers and booleans are kept as they are."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{digits}g}") + 0.0
    if isinstance(value, Mapping):
        return {str(k): rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return rounded(value.item(), digits)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


# ---------------------------------------------------------------- numbers and checks
@dataclass(frozen=True)
class Check:
    """One threshold of the policy applied to one variant.

    `measured` False: the number is not there (no causal table, no active watchlist
    feature, no perplexity row). An unmeasured causal check passes (the causal audit is
    optional); any other unmeasured check fails, since the gate cannot vouch for what it
    did not see.
    """

    name: str  # the policy key
    value: float | None
    threshold: float
    op: str  # ">=" or "<="
    passed: bool
    measured: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "op": self.op,
            "passed": self.passed,
            "measured": self.measured,
        }


def _one_row(frame: pl.DataFrame, variant: str, what: str) -> dict[str, Any] | None:
    rows = frame.filter(pl.col("variant") == variant)
    if rows.height > 1:
        raise InputError(f"{what}: {rows.height} rows for variant {variant!r}, expected one")
    return rows.row(0, named=True) if rows.height else None


def _number(row: Mapping[str, Any] | None, key: str) -> float | None:
    if row is None or row.get(key) is None:
        return None
    value = row[key]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _require(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(
            f"{what}: missing columns {missing}; it was written by an older sae-audit: "
            "re-run snakemake to re-make it"
        )


def variant_numbers(
    survival: pl.DataFrame,
    features: pl.DataFrame,
    perplexity: pl.DataFrame,
    causal_survival: pl.DataFrame | None,
    watchlist: Sequence[int] | None,
) -> dict[str, dict[str, float | None]]:
    """Per variant of the survival table (FP has no row there), the numbers a policy checks.

    Survival numbers come from the survival table, perplexity from the model's perplexity
    table, `causal_survived_pct` from the causal survival table when there is one. The
    watchlist's share survived is over the watchlist features active in FP (class is
    null for an inactive feature, so it can neither survive nor fail): those are counted
    in `n_watch_active`, the others in `n_watch_inactive`; with none active the share is
    None. Every key of NUMBER_KEYS is present; None where not measured.
    """
    _require(survival, ["variant", *_SURVIVAL_KEYS], "survival table")
    _require(perplexity, ["variant", "ppl_chunked", "dppl_chunked_pct"], "perplexity table")
    if causal_survival is not None:
        _require(causal_survival, ["variant", "causal_survived_pct"], "causal_survival table")
    watch: list[int] | None = None
    if watchlist is not None:
        _require(features, ["variant", "feature", "active", "class"], "features table")
        watch = list(dict.fromkeys(int(f) for f in watchlist))
    variants = survival.get_column("variant").to_list()
    if len(set(variants)) != len(variants):
        raise InputError("survival table: a variant has more than one row")
    out: dict[str, dict[str, float | None]] = {}
    for variant in variants:
        srow = _one_row(survival, variant, "survival table")
        prow = _one_row(perplexity, variant, "perplexity table")
        crow = (
            None
            if causal_survival is None
            else _one_row(causal_survival, variant, "causal_survival table")
        )
        numbers: dict[str, float | None] = dict.fromkeys(NUMBER_KEYS)
        numbers.update({k: _number(srow, k) for k in _SURVIVAL_KEYS})
        numbers.update({k: _number(prow, k) for k in _PERPLEXITY_KEYS})
        numbers["causal_survived_pct"] = _number(crow, "causal_survived_pct")
        if watch is not None:
            numbers.update(_watchlist_numbers(features, variant, watch))
        out[variant] = numbers
    return out


def _watchlist_numbers(features: pl.DataFrame, variant: str, watch: list[int]) -> dict[str, Any]:
    rows = features.filter((pl.col("variant") == variant) & pl.col("feature").is_in(watch))
    found = set(rows.get_column("feature").to_list())
    if missing := [f for f in watch if f not in found]:
        raise InputError(
            f"features table: watchlist features {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} have no row for variant {variant!r} "
            "(not features of this SAE); fix the watchlist"
        )
    if rows.height != len(watch):
        raise InputError(
            f"features table: a watchlist feature has more than one row for {variant!r}"
        )
    active = rows.filter(pl.col("active").fill_null(False))
    n_active = active.height
    n_survived = active.filter(pl.col("class") == "survived").height
    return {
        "n_watch_active": n_active,
        "n_watch_inactive": rows.height - n_active,
        "watchlist_survived_pct": 100.0 * n_survived / n_active if n_active else None,
    }


def evaluate(policy: Policy, numbers: Mapping[str, float | None]) -> list[Check]:
    """The policy's checks on one variant's numbers, in policy order; only the thresholds
    the policy sets. The perplexity check compares |dppl_chunked_pct| (a release must
    not move perplexity by more than the threshold either way)."""
    dppl = numbers.get("dppl_chunked_pct")
    specs: list[tuple[str, float | None, float | None, str, bool]] = [
        ("min_survived_pct", numbers.get("survived_pct"), policy.min_survived_pct, ">=", False),
        (
            "min_watchlist_survived_pct",
            numbers.get("watchlist_survived_pct"),
            policy.min_watchlist_survived_pct,
            ">=",
            False,
        ),
        (
            "max_perplexity_change_pct",
            None if dppl is None else abs(dppl),
            policy.max_perplexity_change_pct,
            "<=",
            False,
        ),
        (
            "min_causal_survived_pct",
            numbers.get("causal_survived_pct"),
            policy.min_causal_survived_pct,
            ">=",
            True,  # optional measurement: not measured does not fail
        ),
    ]
    checks = []
    for name, value, threshold, op, optional in specs:
        if threshold is None:
            continue
        if value is None or not math.isfinite(value):
            checks.append(Check(name, None, threshold, op, passed=optional, measured=False))
            continue
        passed = value >= threshold if op == ">=" else value <= threshold
        checks.append(Check(name, value, threshold, op, passed=passed, measured=True))
    return checks


def verdict(checks: Sequence[Check]) -> str:
    return "pass" if all(c.passed for c in checks) else "fail"


# ---------------------------------------------------------------- certificate
class CertificateError(InputError):
    """A certificate that does not match the shipped schema or its own hash."""


@functools.cache
def certificate_schema() -> dict[str, Any]:
    """The certificate's JSON Schema, shipped as package data beside this module."""
    text = importlib.resources.files("sae_audit").joinpath(CERTIFICATE_SCHEMA).read_text("utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


def _package_version() -> str:
    try:
        return importlib.metadata.version("sae-audit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def certificate(
    *,
    model: str,
    variant: str,
    sae: str,
    base_hash: str,
    checkpoint_hash: str,
    sae_hash: str,
    method: Mapping[str, Any],
    token_hash: str,
    n_shards: int,
    policy: Policy,
    policy_path: str,
    policy_hash: str,
    checks: Sequence[Check],
    numbers: Mapping[str, float | None],
    nulls: Mapping[str, Mapping[str, float | None]],
    baselines: Mapping[str, float | None],
    watchlist: Sequence[int] | None,
    watchlist_source: str | None,
    tables: Mapping[str, Mapping[str, str]],
    report: str,
    version: str | None = None,
) -> dict[str, Any]:
    """The certificate of one variant under one SAE, with its `certificate_hash`.

    Every path in it is as the caller gives it (run_gate passes paths relative to the
    results directory). Floats are rounded (`rounded`) before the hash is taken, and the
    returned dict holds the rounded values, so hashing it again gives the same hash.
    """
    body: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict(checks),
        "model": {
            "name": model,
            "variant": variant,
            "base_hash": base_hash,
            "checkpoint_hash": checkpoint_hash,
        },
        "saes": [{"name": sae, "hash": sae_hash}],
        "compression_config": {"hash": hash_json(rounded(dict(method))), "method": dict(method)},
        "token_set": {"hash": token_hash, "n_shards": n_shards},
        "policy": {"path": policy_path, "hash": policy_hash, **policy.thresholds()},
        "checks": [c.to_dict() for c in checks],
        "numbers": {k: numbers.get(k) for k in NUMBER_KEYS},
        "nulls": {n: {k: v.get(k) for k in NUMBER_KEYS} for n, v in sorted(nulls.items())},
        "baselines": dict(baselines),
        "watchlist": {
            "ids": None if watchlist is None else [int(f) for f in watchlist],
            "source": watchlist_source,
        },
        "tables": {name: dict(entry) for name, entry in sorted(tables.items())},
        "report": report,
        "sae_audit_version": _package_version() if version is None else version,
    }
    body = rounded(body)
    return {**body, "certificate_hash": hash_json(body)}


def validate_certificate(cert: Mapping[str, Any]) -> None:
    """Raise CertificateError unless `cert` matches the shipped schema and its own hash."""
    errors = sorted(
        Draft202012Validator(certificate_schema()).iter_errors(cert),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "(top)"
        raise CertificateError(
            f"certificate: at {where}: {errors[0].message} "
            f"({len(errors)} schema error(s); schema {CERTIFICATE_SCHEMA})"
        )
    body = {k: v for k, v in cert.items() if k != "certificate_hash"}
    if hash_json(rounded(body)) != cert["certificate_hash"]:
        raise CertificateError(
            "certificate: certificate_hash does not match its content (edited or damaged); "
            "re-run `sae-audit gate` to re-make it"
        )


def read_certificate(path: str | Path) -> dict[str, Any]:
    """A certificate file, validated; InputError naming the file when it is not valid."""
    cert = read_json(path)
    if not isinstance(cert, dict):
        raise CertificateError(f"{path}: not a certificate (a JSON object expected)")
    try:
        validate_certificate(cert)
    except CertificateError as e:
        raise CertificateError(f"{path}: {e}") from None
    return cert


# ---------------------------------------------------------------- JUnit
class GateResult(NamedTuple):
    """One variant's checks under one (model, SAE) basis."""

    model: str
    sae: str
    variant: str
    checks: Sequence[Check]


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.6g}"


def junit_xml(results: Sequence[tuple[str, str, str, Sequence[Check]]]) -> str:
    """JUnit XML of gate results, (model, sae, variant, checks) each: one testsuite per
    (model, sae) basis, one testcase per check. A failed check is a <failure> (an
    unmeasured one that fails too: the gate fails closed); a passing unmeasured check
    (a causal check without a causal table) is <skipped>."""
    root = ET.Element("testsuites", name="sae-audit gate")
    suites: dict[tuple[str, str], ET.Element] = {}
    counts: dict[tuple[str, str], list[int]] = {}
    for model, sae, variant, checks in results:
        key = (model, sae)
        if key not in suites:
            suites[key] = ET.SubElement(root, "testsuite", name=f"sae-audit gate {model}/{sae}")
            counts[key] = [0, 0, 0]
        for check in checks:
            case = ET.SubElement(
                suites[key], "testcase", classname=f"{model}.{sae}.{variant}", name=check.name
            )
            counts[key][0] += 1
            text = f"{check.name}: {_fmt(check.value)} {check.op} {_fmt(check.threshold)}"
            if not check.passed:
                counts[key][1] += 1
                failure = ET.SubElement(case, "failure", message=f"{text} violated")
                failure.set("type", "policy" if check.measured else "not_measured")
                failure.text = text
            elif not check.measured:
                counts[key][2] += 1
                ET.SubElement(case, "skipped", message=f"{check.name}: not measured")
    for key, suite in suites.items():
        tests, failures, skipped = counts[key]
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("errors", "0")
        suite.set("skipped", str(skipped))
    totals = [sum(c[i] for c in counts.values()) for i in range(3)]
    root.set("tests", str(totals[0]))
    root.set("failures", str(totals[1]))
    root.set("errors", "0")
    root.set("skipped", str(totals[2]))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def gate_table(results: Sequence[tuple[str, str, str, Sequence[Check]]]) -> pl.DataFrame:
    """gate.parquet's rows: one per model, SAE, variant and check; null where unmeasured."""
    rows = [
        {
            "model": model,
            "sae": sae,
            "variant": variant,
            "check": c.name,
            "value": c.value,
            "threshold": c.threshold,
            "op": c.op,
            "passed": c.passed,
            "measured": c.measured,
        }
        for model, sae, variant, checks in results
        for c in checks
    ]
    return pl.DataFrame(rows, schema=GATE_SCHEMA, orient="row")


# ---------------------------------------------------------------- the run
def _relative(path: Path, results_dir: Path) -> str:
    """A path as the certificate records it: relative to the results directory, else to
    the working directory, else its name alone (never a path naming this machine)."""
    if not path.is_absolute():
        return path.as_posix()
    for root in (results_dir, Path.cwd()):
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return path.name


def _table(results_dir: Path, rel: str, rule: str, optional: bool = False) -> pl.DataFrame | None:
    path = results_dir / rel
    if not path.is_file():
        if optional:
            return None
        raise InputError(
            f"{path}: no such file; rule {rule} makes it: run `snakemake --cores all "
            f"{path}` (or the whole workflow) first"
        )
    return read_parquet(path, rule)


def _token_set(results_dir: Path, model: str) -> tuple[str, int]:
    directory = results_dir / "tokens" / model
    shards = sorted(p.name for p in directory.glob("shard-*.parquet")) if directory.is_dir() else []
    if not shards:
        raise InputError(
            f"{directory}: no token shards (shard-*.parquet); rule tokenize makes them: run "
            f"`snakemake --cores all {directory}` first"
        )
    return _hash_files(directory, shards), len(shards)


def run_gate(
    results_dir: Path,
    bases: Sequence[tuple[str, str]],
    policy_path: Path,
    out_dir: Path,
    *,
    base_dirs: Mapping[str, Path],
    sae_dirs: Mapping[tuple[str, str], Path],
    watchlists: Mapping[tuple[str, str], list[int]] | None,
    report_path: str,
    watchlist_sources: Mapping[tuple[str, str], str] | None = None,
    table_out: Path | None = None,
    causal: bool = True,
) -> list[str]:
    """Gate every release candidate of every (model, sae) basis; write the certificates
    (`out_dir/{model}/{sae}/{variant}.json`), `out_dir/junit.xml` and
    the checks as one table (`table_out`, default `out_dir/gate.parquet`). Returns the failed
    candidates, as "model/sae/variant (checks)".

    Everything is read and checked before anything is written, so a missing input
    leaves no partial set of certificates behind.
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir)
    policy = read_policy(policy_path)
    policy_rel = _relative(Path(policy_path), results_dir)
    policy_hash = hash_path(policy_path)
    hashes: dict[Path, str] = {}

    def cached_hash(path: Path) -> str:
        # A base model or SAE is shared by many variants and may be gigabytes: hash it once.
        if path not in hashes:
            hashes[path] = source_hash(path)
        return hashes[path]

    certificates: list[tuple[Path, dict[str, Any]]] = []
    results: list[GateResult] = []
    for model, sae in bases:
        if model not in base_dirs:
            raise InputError(f"model {model!r}: no base model directory given (base_dirs)")
        if (model, sae) not in sae_dirs:
            raise InputError(f"{model}/{sae}: no SAE directory given (sae_dirs)")
        watchlist = None if watchlists is None else watchlists.get((model, sae))
        source = None if watchlist_sources is None else watchlist_sources.get((model, sae))
        if policy.min_watchlist_survived_pct is not None and watchlist is None:
            raise InputError(
                f"{policy_path}: key 'min_watchlist_survived_pct' is set but {model}/{sae} has "
                "no watchlist; give its watchlist or set the key to null"
            )
        rels = {
            "survival": f"tables/{model}/{sae}/survival.parquet",
            "features": f"tables/{model}/{sae}/features.parquet",
            "perplexity": f"tables/{model}/perplexity.parquet",
            "causal_survival": f"tables/{model}/{sae}/causal_survival.parquet",
        }
        survival = _table(results_dir, rels["survival"], "survival")
        features = _table(results_dir, rels["features"], "survival")
        perplexity = _table(results_dir, rels["perplexity"], "perplexity")
        # read only where causal survival is measured (causal.enabled): a table left from
        # an earlier run is no evidence of this one
        causal_table = (
            _table(results_dir, rels["causal_survival"], "causal_survival", optional=True)
            if causal
            else None
        )
        if not causal:
            del rels["causal_survival"]
        assert survival is not None and features is not None and perplexity is not None
        try:
            numbers = variant_numbers(survival, features, perplexity, causal_table, watchlist)
            # the verdict is taken on the numbers the certificate records
            numbers = {v: rounded(n) for v, n in numbers.items()}
        except InputError as e:
            raise InputError(f"{results_dir / 'tables' / model / sae}: {e}") from None
        tables = {
            name: {"path": rel, "hash": cached_hash(results_dir / rel)}
            for name, rel in rels.items()
            if (results_dir / rel).is_file()
        }
        candidates = _candidates(policy, policy_path, list(numbers))
        fp_row = _one_row(perplexity, FP, "perplexity table")
        if fp_row is None:
            raise InputError(
                f"{results_dir / rels['perplexity']}: no row for variant 'fp' (the baseline); "
                "rule perplexity makes it: re-run snakemake"
            )
        baselines = {
            k: _number(fp_row, k) for k in ("ppl_chunked", "ppl_sliding", "n_scored_chunked")
        }
        nulls = {n: numbers[n] for n in NULL_VARIANTS if n in numbers}
        base_hash = cached_hash(Path(base_dirs[model]))
        sae_hash = cached_hash(Path(sae_dirs[(model, sae)]))
        token_hash, n_shards = _token_set(results_dir, model)
        for variant in candidates:
            checkpoint = results_dir / "checkpoints" / model / variant
            manifest = read_json(checkpoint / "manifest.json", "compress")
            if not isinstance(manifest, dict) or not isinstance(manifest.get("method"), dict):
                raise InputError(
                    f"{checkpoint / 'manifest.json'}: no 'method' record; rule compress makes "
                    "it: delete the checkpoint and re-run snakemake"
                )
            checks = evaluate(policy, numbers[variant])
            cert = certificate(
                model=model,
                variant=variant,
                sae=sae,
                base_hash=base_hash,
                checkpoint_hash=checkpoint_hash(checkpoint),
                sae_hash=sae_hash,
                method=portable_method(manifest["method"]),
                token_hash=token_hash,
                n_shards=n_shards,
                policy=policy,
                policy_path=policy_rel,
                policy_hash=policy_hash,
                checks=checks,
                numbers=numbers[variant],
                nulls=nulls,
                baselines=baselines,
                watchlist=watchlist,
                watchlist_source=source,
                tables=tables,
                report=report_path,
            )
            validate_certificate(cert)
            certificates.append((out_dir / model / sae / f"{variant}.json", cert))
            results.append(GateResult(model, sae, variant, checks))

    for path, cert in certificates:
        write_json(path, cert)
    _remove_stale(out_dir, {path for path, _ in certificates})
    with atomic_path(out_dir / "junit.xml") as tmp:
        tmp.write_text(junit_xml(results), encoding="utf-8")
    write_parquet(gate_table(results), table_out or out_dir / "gate.parquet")
    failed: list[str] = []
    for result in results:
        v = verdict(result.checks)
        bad = [c.name for c in result.checks if not c.passed]
        if bad:
            failed.append(f"{result.model}/{result.sae}/{result.variant} ({', '.join(bad)})")
        log.info(
            "gate %s/%s/%s: %s%s",
            result.model,
            result.sae,
            result.variant,
            v.upper(),
            f" ({', '.join(bad)})" if bad else "",
        )
    return failed


class PolicyViolation(AuditError):
    """Release candidates violate the policy: `sae-audit gate` exits 1 saying which."""

    def __init__(self, failed: Sequence[str]):
        super().__init__(
            f"{len(failed)} release candidate(s) violate the policy: {'; '.join(failed)} "
            "(certificates and junit.xml are written; see their checks)"
        )
        self.failed = list(failed)


def _candidates(policy: Policy, policy_path: Path | str, audited: Sequence[str]) -> list[str]:
    """The release candidates: the policy's variants (each must have been audited), or
    every audited variant but FP and the nulls."""
    if policy.variants is None:
        return [v for v in audited if v not in NOT_CANDIDATES]
    missing = [v for v in policy.variants if v not in audited]
    if missing:
        raise InputError(
            f"{policy_path}: key 'variants': {missing} were not audited (audited: "
            f"{[v for v in audited if v not in NOT_CANDIDATES]}); name audited variants, or "
            "add them to the config and re-run snakemake"
        )
    return list(policy.variants)


def _remove_stale(out_dir: Path, written: set[Path]) -> None:
    """Remove the certificates an earlier gate run left in `out_dir` that this run did not
    write (a variant no longer a candidate, a basis no longer gated): a stale certificate
    beside fresh ones would vouch for what this run never checked. Only files that are
    certificates (their schema_version says so) are touched."""
    for path in iter_certificates(out_dir):
        if path in written:
            continue
        try:
            stale = json.loads(path.read_text(encoding="utf-8")).get("schema_version")
        except (OSError, ValueError, AttributeError):
            continue
        if stale == SCHEMA_VERSION:
            log.info("gate: removing stale certificate %s", path)
            path.unlink(missing_ok=True)


def iter_certificates(out_dir: Path) -> Iterator[Path]:
    """The certificate files a gate run wrote under `out_dir`, sorted."""
    yield from sorted(Path(out_dir).glob("*/*/*.json"))
