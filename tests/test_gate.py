"""The release gate (sae_audit.gate): policy parsing, checks, certificates, JUnit, exit codes.

The inputs are small tables built in tmp_path with the documented columns and dtypes
(table_docs.polars_schema), shaped like a real run's: one model "m" with one SAE "res",
the FP baseline, the two nulls and two candidates (rtn-int8 good, rtn-int2 bad).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.resources
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from sae_audit import gate
from sae_audit.files import InputError
from sae_audit.table_docs import polars_schema

MODEL, SAE = "m", "res"
N_FEATURES = 8
ACTIVE = [True] * 6 + [False] * 2  # features 6 and 7 never fire enough in FP
# class per feature (null for inactive ones), per variant
CLASSES: dict[str, list[str | None]] = {
    "fp-null": ["survived"] * 6 + [None, None],
    "fp-noise": ["survived"] * 5 + ["blurred", None, None],
    "rtn-int8": ["survived"] * 5 + ["insufficient", None, None],
    "rtn-int2": ["survived", "blurred", "destroyed", "destroyed", "destroyed", "blurred"]
    + [None] * 2,
}
PPL = {"fp": 20.0, "fp-null": 20.0, "fp-noise": 20.002, "rtn-int8": 20.1, "rtn-int2": 31.0}
GOOD_POLICY = """\
min_survived_pct: 80
max_perplexity_change_pct: 5.0
min_causal_survived_pct: 50
"""


def table(name: str, columns: dict[str, list[Any]]) -> pl.DataFrame:
    """A documented table: the given columns, every other documented column null."""
    schema = polars_schema(name)
    n = len(next(iter(columns.values())))
    data = {c: columns.get(c, [None] * n) for c in schema}
    return pl.DataFrame(data, schema=schema)


def survival_frame() -> pl.DataFrame:
    rows: dict[str, list[Any]] = {k: [] for k in ("variant", "n_active", "n_survived")}
    rows |= {k: [] for k in ("n_destroyed", "survived_pct", "destroyed_pct", "median_r")}
    rows |= {"ppl_chunked": [], "dppl_chunked_pct": []}
    for variant, classes in CLASSES.items():
        active = [c for c in classes if c is not None]
        survived, destroyed = active.count("survived"), active.count("destroyed")
        rows["variant"].append(variant)
        rows["n_active"].append(len(active))
        rows["n_survived"].append(survived)
        rows["n_destroyed"].append(destroyed)
        rows["survived_pct"].append(100.0 * survived / len(active))
        rows["destroyed_pct"].append(100.0 * destroyed / len(active))
        rows["median_r"].append(0.99 if variant != "rtn-int2" else 0.41)
        rows["ppl_chunked"].append(PPL[variant])
        rows["dppl_chunked_pct"].append(100.0 * (PPL[variant] / PPL["fp"] - 1))
    return table("survival", rows)


def features_frame() -> pl.DataFrame:
    rows: dict[str, list[Any]] = {"variant": [], "feature": [], "active": [], "class": []}
    for variant, classes in CLASSES.items():
        for feature, (active, cls) in enumerate(zip(ACTIVE, classes, strict=True)):
            rows["variant"].append(variant)
            rows["feature"].append(feature)
            rows["active"].append(active)
            rows["class"].append(cls)
    rows["r"] = [0.95 if c == "survived" else 0.3 for c in rows["class"]]
    return table("features", rows)


def perplexity_frame() -> pl.DataFrame:
    variants = list(PPL)
    return table(
        "perplexity",
        {
            "variant": variants,
            "n_scored_chunked": [1000] * len(variants),
            "ppl_chunked": [PPL[v] for v in variants],
            "dppl_chunked_pct": [100.0 * (PPL[v] / PPL["fp"] - 1) for v in variants],
        },
    )


def causal_frame() -> pl.DataFrame:
    variants = list(CLASSES)
    return table(
        "causal_survival",
        {
            "variant": variants,
            "n_features": [4] * len(variants),
            "causal_survived_pct": [100.0, 100.0, 75.0, 25.0],
        },
    )


def build_results(root: Path, causal: bool = True) -> dict[str, Any]:
    """A results directory with everything the gate reads; returns run_gate's keyword args."""
    r = root / "results"
    tables = r / "tables" / MODEL / SAE
    tables.mkdir(parents=True)
    survival_frame().write_parquet(tables / "survival.parquet")
    features_frame().write_parquet(tables / "features.parquet")
    perplexity_frame().write_parquet(r / "tables" / MODEL / "perplexity.parquet")
    if causal:
        causal_frame().write_parquet(tables / "causal_survival.parquet")
    for variant in PPL:
        ckpt = r / "checkpoints" / MODEL / variant
        ckpt.mkdir(parents=True)
        kind = {"fp": "fp", "fp-null": "null", "fp-noise": "noise"}.get(variant, "rtn")
        method: dict[str, Any] = {"kind": kind}
        if kind == "rtn":
            method |= {"bits": int(variant[-1]), "group_size": None, "symmetric": True}
        manifest = {"base_relative": "../../../fixture/model", "method": method, "variant": variant}
        (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (ckpt / "compressed.safetensors").write_bytes(variant.encode() * 8)
        (ckpt / ".snakemake_timestamp").write_text("")
    tokens = r / "tokens" / MODEL
    tokens.mkdir(parents=True)
    for s in range(2):
        (tokens / f"shard-{s:03d}.parquet").write_bytes(bytes([s]) * 64)
    base = r / "fixture" / "model"
    base.mkdir(parents=True)
    (base / "config.json").write_text('{"n_layer": 4}')
    (base / "model.safetensors").write_bytes(b"weights" * 10)
    sae = r / "fixture" / "sae"
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text('{"d_sae": 8}')
    (sae / "sae_weights.safetensors").write_bytes(b"sae" * 10)
    policy = root / "policy.yaml"
    policy.write_text(GOOD_POLICY)
    return {
        "results_dir": r,
        "bases": [(MODEL, SAE)],
        "policy_path": policy,
        "base_dirs": {MODEL: base},
        "sae_dirs": {(MODEL, SAE): sae},
        "watchlists": {(MODEL, SAE): [0, 2, 5, 7]},
        "report_path": "results/report/report.html",
    }


def run(args: dict[str, Any], out: Path, **extra: Any) -> list[str]:
    return gate.run_gate(out_dir=out, **{**args, **extra})


def read_cert(out: Path, variant: str) -> dict[str, Any]:
    return json.loads((out / MODEL / SAE / f"{variant}.json").read_text())


# ---------------------------------------------------------------- policy
def test_read_policy_good(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "min_survived_pct: 90\nmin_watchlist_survived_pct: 100\n"
        "max_perplexity_change_pct: 2.5\nmin_causal_survived_pct: null\n"
        "variants: [rtn-int8, gguf-q8_0]\n"
    )
    policy = gate.read_policy(path)
    assert policy == gate.Policy(90.0, 100.0, 2.5, None, ("rtn-int8", "gguf-q8_0"))
    path.write_text("min_survived_pct: 0\n")
    assert gate.read_policy(path) == gate.Policy(min_survived_pct=0.0)


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ("min_survived_pct: 90\nwatchlist_note: hi\n", "watchlist_note", "unknown key"),
        ("min_survived_pct: high\n", "min_survived_pct", "0..100"),
        ("min_survived_pct: true\n", "min_survived_pct", "0..100"),
        ("min_survived_pct: 150\n", "min_survived_pct", "0..100"),
        ("min_watchlist_survived_pct: -1\n", "min_watchlist_survived_pct", "0..100"),
        ("max_perplexity_change_pct: -2\n", "max_perplexity_change_pct", ">= 0"),
        ("max_perplexity_change_pct: .inf\n", "max_perplexity_change_pct", "not finite"),
        ("min_causal_survived_pct: .nan\n", "min_causal_survived_pct", "not finite"),
        ("min_survived_pct: 1\nvariants: rtn-int8\n", "variants", "list"),
        ("min_survived_pct: 1\nvariants: []\n", "variants", "list"),
        ("min_survived_pct: 1\nvariants: [fp-null]\n", "variants", "fp-null"),
        ("min_survived_pct: 1\nvariants: [a, a]\n", "variants", "distinct"),
        ("variants: [rtn-int8]\n", "min_survived_pct", "no threshold"),
        ("- min_survived_pct\n", "min_survived_pct", "mapping"),
        ("", "min_survived_pct", "mapping"),
        ("min_survived_pct: [1\n", "", "YAML"),
    ],
)
def test_read_policy_bad(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        gate.read_policy(path)
    message = str(info.value)
    assert str(path) in message and key in message and words in message


def test_read_policy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such policy file"):
        gate.read_policy(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- evaluate
NUMBERS: dict[str, float | None] = {
    **dict.fromkeys(gate.NUMBER_KEYS),
    "survived_pct": 90.0,
    "dppl_chunked_pct": -3.0,
    "watchlist_survived_pct": 100.0,
    "causal_survived_pct": 60.0,
}
ALL = gate.Policy(80.0, 100.0, 5.0, 50.0)


def by_name(checks: list[gate.Check]) -> dict[str, gate.Check]:
    return {c.name: c for c in checks}


def test_evaluate_pass() -> None:
    checks = gate.evaluate(ALL, NUMBERS)
    assert [c.name for c in checks] == list(gate._THRESHOLD_KEYS)
    assert all(c.passed and c.measured for c in checks)
    assert by_name(checks)["max_perplexity_change_pct"].value == 3.0  # |dppl|
    assert gate.verdict(checks) == "pass"
    # only the thresholds the policy sets are checked
    assert [c.name for c in gate.evaluate(gate.Policy(min_survived_pct=1.0), NUMBERS)] == [
        "min_survived_pct"
    ]


@pytest.mark.parametrize(
    ("key", "value", "check"),
    [
        ("survived_pct", 79.9, "min_survived_pct"),
        ("watchlist_survived_pct", 75.0, "min_watchlist_survived_pct"),
        ("dppl_chunked_pct", -5.01, "max_perplexity_change_pct"),
        ("dppl_chunked_pct", 7.0, "max_perplexity_change_pct"),
        ("causal_survived_pct", 49.0, "min_causal_survived_pct"),
    ],
)
def test_evaluate_fail_per_threshold(key: str, value: float, check: str) -> None:
    checks = by_name(gate.evaluate(ALL, {**NUMBERS, key: value}))
    assert [n for n, c in checks.items() if not c.passed] == [check]
    assert checks[check].measured
    assert gate.verdict(list(checks.values())) == "fail"


def test_evaluate_boundary_passes() -> None:
    checks = gate.evaluate(ALL, {**NUMBERS, "survived_pct": 80.0, "dppl_chunked_pct": 5.0})
    assert all(c.passed for c in checks)


def test_evaluate_not_measured() -> None:
    # causal not measured: recorded, does not fail
    checks = by_name(gate.evaluate(ALL, {**NUMBERS, "causal_survived_pct": None}))
    causal = checks["min_causal_survived_pct"]
    assert (causal.measured, causal.passed, causal.value) == (False, True, None)
    # any other number missing: the gate fails closed
    for key, check in [
        ("survived_pct", "min_survived_pct"),
        ("watchlist_survived_pct", "min_watchlist_survived_pct"),
        ("dppl_chunked_pct", "max_perplexity_change_pct"),
    ]:
        c = by_name(gate.evaluate(ALL, {**NUMBERS, key: None}))[check]
        assert (c.measured, c.passed) == (False, False)


# ---------------------------------------------------------------- numbers
def test_variant_numbers_watchlist_arithmetic() -> None:
    numbers = gate.variant_numbers(
        survival_frame(), features_frame(), perplexity_frame(), causal_frame(), [0, 2, 5, 7, 7]
    )
    assert list(numbers) == list(CLASSES)  # FP has no survival row
    int2 = numbers["rtn-int2"]
    # watchlist 0, 2, 5, 7 (7 given twice): 7 is inactive in FP, so 3 count; of those only
    # feature 0 survived under rtn-int2
    assert (int2["n_watch_active"], int2["n_watch_inactive"]) == (3, 1)
    assert int2["watchlist_survived_pct"] == pytest.approx(100 / 3)
    assert numbers["fp-null"]["watchlist_survived_pct"] == 100.0
    assert numbers["rtn-int8"]["watchlist_survived_pct"] == pytest.approx(200 / 3)  # 5 insufficient
    assert int2["survived_pct"] == pytest.approx(100 / 6)
    assert int2["destroyed_pct"] == pytest.approx(50.0)
    assert int2["n_active"] == 6
    assert int2["dppl_chunked_pct"] == pytest.approx(55.0)
    assert int2["causal_survived_pct"] == 25.0
    assert int2["ppl_sliding"] is None  # sliding off


def test_variant_numbers_no_watchlist_no_causal() -> None:
    numbers = gate.variant_numbers(
        survival_frame(), features_frame(), perplexity_frame(), None, None
    )
    for key in ("watchlist_survived_pct", "n_watch_active", "n_watch_inactive"):
        assert numbers["rtn-int8"][key] is None
    assert numbers["rtn-int8"]["causal_survived_pct"] is None
    # only inactive watchlist features: the share is undefined, not 0
    only_inactive = gate.variant_numbers(
        survival_frame(), features_frame(), perplexity_frame(), None, [6, 7]
    )["rtn-int8"]
    assert only_inactive["watchlist_survived_pct"] is None
    assert only_inactive["n_watch_inactive"] == 2


def test_variant_numbers_unknown_watchlist_feature() -> None:
    with pytest.raises(InputError, match=r"watchlist features \[99\]"):
        gate.variant_numbers(survival_frame(), features_frame(), perplexity_frame(), None, [1, 99])


# ---------------------------------------------------------------- hashing
def test_hash_path_file_and_directory(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    assert gate.hash_path(f) == "sha256:" + hashlib.sha256(b"hello").hexdigest()

    def tree(name: str, files: dict[str, bytes]) -> str:
        root = tmp_path / name
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return gate.hash_path(root)

    base = tree("t1", {"x/a": b"1", "b": b"22"})
    assert tree("t2", {"b": b"22", "x/a": b"1", ".snakemake_timestamp": b"t"}) == base
    assert tree("t3", {"x/a": b"1", "b": b"23"}) != base  # content
    assert tree("t4", {"x/c": b"1", "b": b"22"}) != base  # a name
    # length prefixes: moving bytes between a name and its content changes the hash
    assert tree("t5", {"ab": b"c"}) != tree("t6", {"a": b"bc"})
    with pytest.raises(InputError):
        gate.hash_path(tmp_path / "missing")


# ---------------------------------------------------------------- run_gate and certificates
def test_run_gate_writes_valid_certificates(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    out = tmp_path / "gate"
    assert [f.split(" ")[0] for f in run(args, out)] == [f"{MODEL}/{SAE}/rtn-int2"]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == [
        "gate.parquet",
        "junit.xml",
        f"{MODEL}/{SAE}/rtn-int2.json",
        f"{MODEL}/{SAE}/rtn-int8.json",
    ]
    good, bad = read_cert(out, "rtn-int8"), read_cert(out, "rtn-int2")
    for cert in (good, bad):
        gate.validate_certificate(cert)
        assert gate.read_certificate(out / MODEL / SAE / f"{cert['model']['variant']}.json")
    assert good["verdict"] == "pass" and bad["verdict"] == "fail"
    assert set(good["nulls"]) == {"fp-null", "fp-noise"}
    assert good["nulls"]["fp-noise"]["survived_pct"] == pytest.approx(500 / 6)
    assert good["compression_config"]["method"] == {
        "kind": "rtn",
        "bits": 8,
        "group_size": None,
        "symmetric": True,
    }
    assert good["token_set"]["n_shards"] == 2
    assert good["baselines"]["ppl_chunked"] == 20.0
    assert good["policy"]["path"] == "policy.yaml" or not Path(good["policy"]["path"]).is_absolute()
    assert good["policy"]["min_survived_pct"] == 80.0
    assert good["watchlist"] == {"ids": [0, 2, 5, 7], "source": None}
    assert good["tables"]["survival"]["path"] == f"tables/{MODEL}/{SAE}/survival.parquet"
    assert good["report"] == "results/report/report.html"
    text = (out / MODEL / SAE / "rtn-int8.json").read_text()
    assert str(tmp_path) not in text  # nothing that names this machine
    failed = {c["name"] for c in bad["checks"] if not c["passed"]}
    assert failed == {"min_survived_pct", "max_perplexity_change_pct", "min_causal_survived_pct"}
    # floats are rounded before hashing: 10 significant digits
    assert good["numbers"]["dppl_chunked_pct"] == float(f"{100 * (20.1 / 20 - 1):.10g}")


@pytest.mark.parametrize(
    "damage",
    [
        lambda c: c.pop("verdict"),
        lambda c: c.update(verdict="maybe"),
        lambda c: c.update(extra=1),
        lambda c: c["model"].update(checkpoint_hash="md5:00"),
        lambda c: c["checks"][0].update(op="=="),
        lambda c: c["numbers"].update(survived_pct=101.0),
        lambda c: c["numbers"].update(survived_pct=99.0),  # valid shape, hash no longer matches
    ],
)
def test_corrupted_certificate_fails_validation(tmp_path: Path, damage: Any) -> None:
    args = build_results(tmp_path)
    run(args, tmp_path / "gate")
    cert = read_cert(tmp_path / "gate", "rtn-int8")
    bad = copy.deepcopy(cert)
    damage(bad)
    with pytest.raises(gate.CertificateError):
        gate.validate_certificate(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"bad\.json"):
        gate.read_certificate(path)


def test_certificate_schema_is_package_data_and_documented() -> None:
    text = importlib.resources.files("sae_audit").joinpath("certificate.schema.json").read_text()
    schema = json.loads(text)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for name, prop in node.get("properties", {}).items():
                assert "description" in prop, f"{where}/{name} has no description"
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(schema, "")


def test_determinism_and_checkpoint_hash(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    run(args, tmp_path / "a")
    run(args, tmp_path / "b")
    for variant in ("rtn-int8", "rtn-int2"):
        a = (tmp_path / "a" / MODEL / SAE / f"{variant}.json").read_bytes()
        assert a == (tmp_path / "b" / MODEL / SAE / f"{variant}.json").read_bytes()
    assert (tmp_path / "a" / "junit.xml").read_bytes() == (
        tmp_path / "b" / "junit.xml"
    ).read_bytes()
    before = read_cert(tmp_path / "a", "rtn-int8")
    payload = args["results_dir"] / "checkpoints" / MODEL / "rtn-int8" / "compressed.safetensors"
    data = bytearray(payload.read_bytes())
    data[3] ^= 1
    payload.write_bytes(bytes(data))
    run(args, tmp_path / "c")
    after = read_cert(tmp_path / "c", "rtn-int8")
    assert after["model"]["checkpoint_hash"] != before["model"]["checkpoint_hash"]
    assert after["certificate_hash"] != before["certificate_hash"]
    assert after["model"]["base_hash"] == before["model"]["base_hash"]
    assert after["saes"] == before["saes"] and after["token_set"] == before["token_set"]
    # the other variant's checkpoint is untouched: its certificate is the same bytes
    assert read_cert(tmp_path / "c", "rtn-int2") == read_cert(tmp_path / "a", "rtn-int2")
    gate.validate_certificate(after)


def test_junit_counts(tmp_path: Path) -> None:
    args = build_results(tmp_path, causal=False)
    out = tmp_path / "gate"
    run(args, out)
    root = ET.parse(out / "junit.xml").getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == f"sae-audit gate {MODEL}/{SAE}"
    cases = suite.findall("testcase")
    # 2 candidates x 3 checks; rtn-int2 fails survival and perplexity; causal is
    # unmeasured (no causal table) for both: skipped, not failed
    assert len(cases) == 6
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("6", "2", "2")
    assert suite.get("errors") == "0"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("6", "2", "2")
    failed = {(c.get("classname"), c.get("name")) for c in cases if c.find("failure") is not None}
    assert failed == {
        (f"{MODEL}.{SAE}.rtn-int2", "min_survived_pct"),
        (f"{MODEL}.{SAE}.rtn-int2", "max_perplexity_change_pct"),
    }
    skipped = {c.get("classname") for c in cases if c.find("skipped") is not None}
    assert skipped == {f"{MODEL}.{SAE}.rtn-int8", f"{MODEL}.{SAE}.rtn-int2"}
    message = next(c.find("failure") for c in cases if c.find("failure") is not None)
    assert message is not None and "violated" in (message.get("message") or "")


def test_junit_xml_parses_with_junitparser() -> None:
    import junitparser

    checks = [
        gate.Check("min_survived_pct", 50.0, 80.0, ">=", False, True),
        gate.Check("min_causal_survived_pct", None, 50.0, ">=", True, False),
    ]
    xml = gate.junit_xml([gate.GateResult("m", "s", "v", checks)])
    parsed = junitparser.JUnitXml.fromstring(xml)
    suite = next(iter(parsed))
    assert (suite.tests, suite.failures, suite.skipped) == (2, 1, 1)


def test_failed_candidates_are_returned(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    failed = run(args, tmp_path / "g1")  # rtn-int2 fails
    assert [f.split(" ")[0] for f in failed] == [f"{MODEL}/{SAE}/rtn-int2"]
    only_good = tmp_path / "only_good.yaml"
    only_good.write_text(GOOD_POLICY + "variants: [rtn-int8]\n")
    assert run(args, tmp_path / "g3", policy_path=only_good) == []
    assert not (tmp_path / "g3" / MODEL / SAE / "rtn-int2.json").exists()


def test_gate_parquet_has_no_nan(tmp_path: Path) -> None:
    args = build_results(tmp_path, causal=False)
    out = tmp_path / "gate"
    run(args, out)
    frame = pl.read_parquet(out / "gate.parquet")
    assert frame.schema == pl.Schema(gate.GATE_SCHEMA)
    assert frame.height == 6
    for column in ("value", "threshold"):
        values = frame.get_column(column).to_list()
        assert not any(v is not None and math.isnan(v) for v in values)
    unmeasured = frame.filter(~pl.col("measured"))
    assert unmeasured.get_column("check").unique().to_list() == ["min_causal_survived_pct"]
    assert unmeasured.get_column("value").null_count() == unmeasured.height
    assert unmeasured.get_column("passed").all()


def test_watchlist_policy_in_run(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    policy = tmp_path / "watch.yaml"
    policy.write_text("min_watchlist_survived_pct: 60\n")
    out = tmp_path / "gate"
    assert run(args, out, policy_path=policy, watchlist_sources={(MODEL, SAE): "watch.txt"})
    good, bad = read_cert(out, "rtn-int8"), read_cert(out, "rtn-int2")
    assert good["verdict"] == "pass" and bad["verdict"] == "fail"
    assert bad["numbers"]["n_watch_inactive"] == 1
    assert good["watchlist"]["source"] == "watch.txt"
    # a watchlist threshold without a watchlist is a configuration error, not a pass
    with pytest.raises(InputError, match="min_watchlist_survived_pct"):
        run(args, tmp_path / "g2", policy_path=policy, watchlists=None)


def test_missing_inputs_name_file_and_rule(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    r = args["results_dir"]
    (r / "tables" / MODEL / SAE / "features.parquet").unlink()
    with pytest.raises(InputError, match=r"features\.parquet: no such file; rule survival"):
        run(args, tmp_path / "gate")
    assert not (tmp_path / "gate").exists()  # nothing written before every input is read


def test_missing_checkpoint_and_tokens(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    r = args["results_dir"]
    for f in (r / "tokens" / MODEL).iterdir():
        f.unlink()
    with pytest.raises(InputError, match="rule tokenize"):
        run(args, tmp_path / "gate")
    args = build_results(tmp_path / "again")
    (args["results_dir"] / "checkpoints" / MODEL / "rtn-int8" / "manifest.json").unlink()
    with pytest.raises(InputError, match=r"manifest\.json: no such file.*compress"):
        run(args, tmp_path / "gate")


def test_policy_variant_not_audited(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    policy = tmp_path / "p.yaml"
    policy.write_text("min_survived_pct: 10\nvariants: [rtn-int8, gguf-q4_0]\n")
    with pytest.raises(InputError, match=r"p\.yaml: key 'variants': \['gguf-q4_0'\]"):
        run(args, tmp_path / "gate", policy_path=policy)


def test_stale_certificates_removed(tmp_path: Path) -> None:
    args = build_results(tmp_path)
    out = tmp_path / "gate"
    run(args, out)
    keep = out / MODEL / SAE / "notes.json"
    keep.write_text('{"mine": 1}')
    only_good = tmp_path / "only_good.yaml"
    only_good.write_text(GOOD_POLICY + "variants: [rtn-int8]\n")
    assert run(args, out, policy_path=only_good) == []
    assert not (out / MODEL / SAE / "rtn-int2.json").exists()
    assert keep.exists() and (out / MODEL / SAE / "rtn-int8.json").exists()
    assert sorted(p.name for p in gate.iter_certificates(out)) == ["notes.json", "rtn-int8.json"]


def test_checkpoint_hash_ignores_where_the_run_was(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        (root / "compressed.safetensors").write_bytes(b"codes")
        manifest = {"variant": "rtn-int4", "base": "results/fixture/model",
                    "base_absolute": str(root / "results/fixture/model")}  # fmt: skip
        (root / "manifest.json").write_text(json.dumps(manifest))
    assert gate.checkpoint_hash(one) == gate.checkpoint_hash(two)
    assert gate.hash_path(one) != gate.hash_path(two)  # the plain tree hash would differ
    (two / "compressed.safetensors").write_bytes(b"codez")
    assert gate.checkpoint_hash(one) != gate.checkpoint_hash(two)


def test_a_hub_model_is_hashed_by_its_id_and_a_missing_path_is_an_error(tmp_path: Path) -> None:
    pythia, gemma = "hub:EleutherAI/pythia-70m", "hub:google/gemma-2-2b"
    assert gate.source_hash(pythia) == gate.source_hash(pythia)
    assert gate.source_hash(pythia) != gate.source_hash(gemma)
    (tmp_path / "w.bin").write_bytes(b"x")
    assert gate.source_hash(tmp_path) == gate.hash_path(tmp_path)
    with pytest.raises(InputError, match="no such file or directory"):
        gate.source_hash(tmp_path / "results" / "fixture" / "model")  # never taken for an id


def test_an_external_artifact_is_hashed_by_its_content_not_its_place(tmp_path: Path) -> None:
    def checkpoint(root: Path, weights: bytes) -> Path:
        artifact = root / "artifact"
        artifact.mkdir(parents=True)
        (artifact / "model.safetensors").write_bytes(weights)
        ckpt = root / "ckpt"
        ckpt.mkdir()
        method = {"kind": "external", "format": "compressed-tensors", "source": str(artifact),
                  "mtime": artifact.stat().st_mtime, "size": len(weights)}  # fmt: skip
        (ckpt / "manifest.json").write_text(json.dumps({"variant": "ext-a", "method": method}))
        return ckpt

    one, two = checkpoint(tmp_path / "one", b"w1"), checkpoint(tmp_path / "two", b"w1")
    assert gate.checkpoint_hash(one) == gate.checkpoint_hash(two)
    three = checkpoint(tmp_path / "three", b"w2")
    assert gate.checkpoint_hash(one) != gate.checkpoint_hash(three)
    method = json.loads((one / "manifest.json").read_text())["method"]
    assert set(gate.portable_method(method)) == {"kind", "format", "size"}
