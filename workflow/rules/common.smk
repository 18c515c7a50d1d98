# Shared helpers: paths, per-model sources and the JSON config slices each rule passes.
import json
import re
from pathlib import Path

from sae_audit import config as audit_config
from sae_audit.config import FIXTURE, encode_hash
from sae_audit.fixture import bundle as fixture_bundle

R = config["results"]
MODELS = audit_config.model_names(config)
VARIANTS = audit_config.variant_names(config)
ALL_VARIANTS = ["fp", *VARIANTS]


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),
    sae="|".join(
        sorted({re.escape(s) for m in MODELS for s in config["models"][m]["saes"]})
    ),
    variant="[A-Za-z0-9._-]+",
    shard=r"\d+",


def model_cfg(model):
    return config["models"][model]


def model_threads(wildcards):
    """Threads, memory and runtime of a model's heavy jobs (`models.<name>.resources`)."""
    return model_cfg(wildcards.model)["resources"]["threads"]


def model_mem_mb(wildcards):
    return model_cfg(wildcards.model)["resources"]["mem_mb"]


def model_runtime(wildcards):
    return model_cfg(wildcards.model)["resources"]["runtime"]


def n_shards(model):
    return model_cfg(model)["tokens"]["n_shards"]


def shards(model):
    return [f"{i:03d}" for i in range(n_shards(model))]


def dumps(*slices, **named):
    """A config slice as compact JSON: what a rule passes in params (and so what re-runs it)."""
    return json.dumps(
        named if named else slices[0], sort_keys=True, separators=(",", ":")
    )


# The model directories the fixture rules build, by model source (config.fixture_model_dirs).
FIXTURE_MODEL_DIRS = audit_config.fixture_model_dirs(R)


def fixture_model_dir(source=FIXTURE):
    return FIXTURE_MODEL_DIRS[source]


# The fixture rules' config slices, and whether they may copy the package's bundle.
FIXTURE_SLICES = fixture_bundle.stage_configs(config["fixture"])
BUNDLE = dumps(config["fixture"]["bundle"])


def bundle_manifest(wildcards):
    """The bundle's manifest as an input (a new bundle re-runs the fixture rules)."""
    manifest = fixture_bundle.BUNDLE_DIR / fixture_bundle.MANIFEST
    return [str(manifest)] if config["fixture"]["bundle"] and manifest.exists() else []


def base_model(wildcards):
    """The FP model's source: a built fixture model, or a hub id / local path from the config."""
    return audit_config.base_model_path(config, wildcards.model)


def base_model_input(wildcards):
    source = model_cfg(wildcards.model)["model"]["source"]
    return [FIXTURE_MODEL_DIRS[source]] if source in FIXTURE_MODEL_DIRS else []


def sae_dirs(model):
    """SAEs of a model that live on disk, name -> directory (the fixture's, or a configured path)."""
    return audit_config.local_sae_dirs(config, model)


def twin_sae_dir(model, sae):
    """The twin of a basis's SAE, where it has one (the fixture SAE with
    fixture.sae.twin_seed set, fixture_sae_twin); else None (no seed_turnover table)."""
    if model_cfg(model)["saes"][sae].get("source") != FIXTURE:
        return None
    if config["fixture"]["sae"]["twin_seed"] is None:
        return None
    return f"{R}/fixture/sae-twin"


# What the fixture learned, for the report: the trained artifacts this config uses, by
# their bundle names (the model whenever a model, the planted control or the SAE builds
# on it; the SAE and its twin where a basis reads the fixture SAE). Empty: no table.
def fixture_trained_dirs():
    uses_sae = any(
        spec.get("source") == FIXTURE
        for model in MODELS
        for spec in model_cfg(model)["saes"].values()
    )
    uses_model = uses_sae or any(
        model_cfg(model)["model"]["source"] in FIXTURE_MODEL_DIRS for model in MODELS
    )
    dirs = {"model": fixture_model_dir()} if uses_model else {}
    if uses_sae:
        dirs["sae"] = f"{R}/fixture/sae"
        if config["fixture"]["sae"]["twin_seed"] is not None:
            dirs["sae-twin"] = f"{R}/fixture/sae-twin"
    return dirs


def fixture_training_targets():
    """The fixture's training table and its report forms, when the config uses the fixture."""
    if not fixture_trained_dirs():
        return []
    return [f"{R}/tables/fixture_training.parquet"] + [
        f"{R}/report/fixture_training.{ext}" for ext in ("html", "csv")
    ]


def seed_turnover_input(model, sae):
    """The basis's seed_turnover table where it has a twin SAE (else none), read by
    the survival summary."""
    if twin_sae_dir(model, sae) is None:
        return []
    return [f"{R}/tables/{model}/{sae}/seed_turnover.parquet"]


def saes(model):
    return audit_config.sae_names(config, model)


def tokenizer_source(wildcards):
    """The model's own directory: the fixture's reparameterized copy carries its tokenizer."""
    return base_model(wildcards)


def token_text_inputs(wildcards):
    tokens = model_cfg(wildcards.model)["tokens"]
    if tokens["source"] == FIXTURE:
        return [f"{R}/fixture/corpus/heldout.txt"]
    return tokens["paths"]


def token_dir(wildcards):
    return f"{R}/tokens/{wildcards.model}"


def token_files(model):
    return [f"{R}/tokens/{model}/shard-{s}.parquet" for s in shards(model)]


def code_dirs(model, variant):
    """One directory per token shard, holding one code shard per SAE of the model."""
    return [f"{R}/codes/{model}/{variant}/shard-{s}" for s in shards(model)]


def code_files(model, variant, sae):
    return [f"{d}/{sae}.parquet" for d in code_dirs(model, variant)]


def shard_expectation(model, sae=None):
    """What readers check every shard's metadata against (sae_audit.shards.Expected): the
    model, encode's config hash and the token count; for code shards also the SAE (whose
    spec is part of their hash). Without `sae`: the expectation of the NLL shards."""
    m = model_cfg(model)
    expect = {
        "model": model,
        "config_hash": encode_hash(m["model"], config["encode"]),
        "n_tokens": m["tokens"]["n_sequences"] * m["tokens"]["seq_len"],
    }
    if sae is not None:
        expect.update(
            sae=sae,
            config_hash=encode_hash(m["model"], config["encode"], m["saes"][sae]),
        )
    return dumps(expect)


def nll_shards(model, variant):
    return expand(
        f"{R}/nll/{model}/{variant}/shard-{{shard}}.parquet", shard=shards(model)
    )


def all_targets():
    targets = []
    for model in MODELS:
        targets.append(f"{R}/tables/{model}/perplexity.parquet")
        targets.append(f"{R}/tables/{model}/outliers.parquet")
        for sae in saes(model):
            targets += basis_targets(model, sae)
    # the report's page of every output table's columns (rule table_docs); the release
    # gate's certificates (rule gate)
    return (
        targets
        + fixture_training_targets()
        + [f"{R}/report/columns.html", f"{R}/certificates"]
    )


# The causal section split by who reads it: the class thresholds only re-class measured
# features (rule causal_survival), everything else shapes the forward passes (rule causal),
# which read of `encode` only the device and which positions are excluded.
_THRESHOLD_KEYS = ("survived", "destroyed", "kl_ratio_band")
CAUSAL_THRESHOLDS = {k: config["causal"][k] for k in _THRESHOLD_KEYS}
CAUSAL_MEASURE = {k: v for k, v in config["causal"].items() if k not in _THRESHOLD_KEYS}
CAUSAL_ENCODE = {
    k: config["encode"][k] for k in ("device", "exclude_special_positions")
}


def causal_watchlist(wildcards):
    """The causal watchlist file, when causal.features is watchlist (an input of rule causal)."""
    causal = config["causal"]
    return [causal["watchlist"]] if causal["features"] == "watchlist" else []


def basis_targets(model, sae):
    """Tables, figures and report items of one (model, SAE) measurement basis."""
    return [
        f"{R}/tables/{model}/{sae}/{name}.parquet"
        for name in (
            "survival",
            "sae_quality",
            "predict",
            "overlap",
            "stability",
            "threshold_grid",
            "damaged_contexts",
            "equal_bits",
            *(["seed_turnover"] if twin_sae_dir(model, sae) else []),
            *(["causal_survival"] if CAUSAL else []),
            *(["forecast_accuracy"] if FORECAST else []),
            *(["protect"] if protect_keys(model, sae) else []),
        )
    ] + figure_targets(model, sae)


# ---------------------------------------------------------------- forecast, protect, gate
FORECAST = config["forecast"]["enabled"]
# What the forecast's passes read (the variants' noise models come with --variants).
FORECAST_CONFIG = {
    k: config["forecast"][k]
    for k in ("n_sequences", "n_samples", "batch_size", "seed", "measure")
}
# Variants the forecast models, with their config entry or null (config.forecast_variants).
FORECAST_VARIANTS = audit_config.forecast_variants(config)
FORECAST_MATCHED = [v for v in FORECAST_VARIANTS if v.startswith("prune-matched-")]
WATCHLIST_FILES = [config["watchlist"]["file"]] if config["watchlist"]["file"] else []
PROTECT_KEYS = list(config["compression"].get("protect", {}))


def protect_keys(model, sae):
    """The compression.protect entries that protect this basis's SAE in this model."""
    return [
        k for k in PROTECT_KEYS if audit_config.protect_sae(config, model, k) == sae
    ]


def protect_fp_stats(wildcards):
    """The FP statistics of the SAE a protect entry watches (its watchlist's source)."""
    model = wildcards.model
    sae = audit_config.protect_sae(config, model, wildcards.key)
    return f"{R}/features/{model}/{sae}/fp_stats.parquet"


def protect_plan_input(wildcards):
    """A protect- variant is built from the plan its protect job wrote."""
    if wildcards.variant.startswith("protect-"):
        return [f"{R}/protect/{wildcards.model}/{wildcards.variant[len('protect-'):]}"]
    return []


# The tables the gate reads, per basis (causal only when measured).
GATE_TABLES = [
    f"{R}/tables/{m}/{s}/{t}.parquet"
    for m in MODELS
    for s in saes(m)
    for t in (
        "survival",
        "features",
        *(["causal_survival"] if config["causal"]["enabled"] else []),
    )
] + [f"{R}/tables/{m}/perplexity.parquet" for m in MODELS]
GATE_FIXTURE_SOURCES = sorted(
    {model_cfg(m)["model"]["source"] for m in MODELS} & set(FIXTURE_MODEL_DIRS)
)


def shipped_entry(wildcards):
    """The config entry (compression.<section>.<key>) of a shipped-format variant, as JSON;
    'null' for every other variant, so editing an entry re-makes only its own variant.
    """
    found = audit_config.shipped_entry(config, wildcards.variant)
    return dumps(found[1] if found else None)


def calibration_input(wildcards):
    """The calibration token set, for the variants llm-compressor fits."""
    if wildcards.variant in audit_config.calibrated_variants(config):
        return [calibration_file(wildcards.model)]
    return []


def compress_gpu(wildcards):
    """llm-compressor's calibration runs on a GPU where the forward passes do."""
    calibrated = wildcards.variant in audit_config.calibrated_variants(config)
    return int(calibrated and config["encode"]["device"] != "cpu")


def calibration_file(model):
    return f"{R}/calibration/{model}/tokens.parquet"


def external_input(wildcards):
    """An external artifact is an input: replacing it re-runs its variant."""
    found = audit_config.shipped_entry(config, wildcards.variant)
    if found and found[0] == "external":
        return [found[1]["source"]]
    return []


def calibration_text_inputs(wildcards):
    calibration = model_cfg(wildcards.model)["calibration"]
    if calibration["source"] == FIXTURE:
        return [f"{R}/fixture/corpus/train.txt"]
    return calibration["paths"]


def equal_bits_variants():
    """The variants of config.equal_bits_pairs: what the equal_bits table reads."""
    return sorted({v for pair in audit_config.equal_bits_pairs(config) for v in pair})


def matched_files(model):
    """The matched-pruning search results of a model, by variant."""
    return {
        v: f"{R}/matched/{model}/{v}.json"
        for v in audit_config.matched_variants(config)
    }


def matched_input(wildcards):
    if wildcards.variant.startswith("prune-matched-"):
        return [f"{R}/matched/{wildcards.model}/{wildcards.variant}.json"]
    return []


def figure_targets(model, sae):
    """Every figure of one basis, in every requested format (report.figure_formats), and
    the report's tables (HTML to view, CSV to download)."""
    figures = [
        f"{R}/figures/{model}/{sae}/{name}.{ext}"
        for name in FIGURES
        for ext in FIGURE_FORMATS
    ]
    tables = [
        f"{R}/report/{model}/{sae}/{t}.{ext}"
        for t in report_tables(model)
        for ext in ("html", "csv")
    ]
    return figures + tables + [f"{R}/report/{model}/{sae}/features.html"]


def report_tables(model):
    """The report's tables; with published results configured, the comparison too."""
    extra = ["reference_comparison"] if model_cfg(model).get("reference") else []
    return REPORT_TABLES + extra


# The figure registry (sae_audit.figures): per figure its input tables, caption and
# report category; one rule plot_NAME each in plots.smk, drawn by sae_audit.plots.NAME
# and captioned by workflow/report/NAME.rst (tests/test_plots.py checks they agree).
from sae_audit.figures import FIGURE_REGISTRY, figure_formats

# Causal survival (config causal.enabled): its rules, tables and figure only when on.
CAUSAL = config["causal"]["enabled"]
FIGURES = [name for name, fig in FIGURE_REGISTRY.items() if CAUSAL or not fig.causal]
# The formats every figure is written in: PNG (the report's) first, then those requested.
FIGURE_FORMATS = figure_formats(config["report"]["figure_formats"])
# Result tables (tables/{model}/NAME.parquet) the report shows (rule report_tables).
REPORT_TABLES = [
    "survival",
    "sae_quality",
    "perplexity",
    "predict",
    "overlap",
    "threshold_grid",
    "damaged_contexts",
    "equal_bits",
    *(["causal_survival", "causal_disagreements"] if CAUSAL else []),
    *(["forecast_accuracy"] if FORECAST else []),
    *(["protect"] if PROTECT_KEYS else []),
]


def report_table_source(model, sae, table):
    """Perplexity is one table per model; every other report table is per (model, SAE)."""
    if table == "perplexity":
        return f"{R}/tables/{model}/perplexity.parquet"
    return f"{R}/tables/{model}/{sae}/{table}.parquet"


def sliding_files(model):
    """Sliding-window perplexity results per variant, when that evaluation is on."""
    if not config["perplexity"]["sliding"]:
        return {}
    return {v: f"{R}/perplexity/{model}/{v}/sliding.json" for v in ALL_VARIANTS}


# The workflow's repository root, from this file: run as a module, workflow.basedir is
# the deploying workflow's directory, not this one's.
WORKFLOW_ROOT = Path(str(workflow.current_basedir)).parents[1]


def reference_path(model):
    """Published results CSV: a relative path is the user's, from the working directory,
    else one shipped with the workflow (config/reference/), from its repository root."""
    path = Path(model_cfg(model)["reference"])
    if not path.is_absolute() and not path.exists():
        path = WORKFLOW_ROOT / path
    return str(path)
