"""Issue 9: the schema is the one source of truth for config defaults, bounds and docs.

Every config section has one typed dataclass (a `ConfigSection`) whose defaults are the
schema's, whose construction validates against the schema like `config.validate`, and
whose cross-field checks are the ones `validate` runs.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from sae_audit import config as audit_config
from sae_audit.causal import CausalConfig
from sae_audit.config import FROM_SCHEMA, ConfigError, ConfigSection, section_schema
from sae_audit.damaged_contexts import ContextConfig
from sae_audit.encode import EncodeConfig
from sae_audit.fixture.corpus import CorpusConfig
from sae_audit.fixture.model import ModelTrainConfig
from sae_audit.fixture.reparam import ReparamConfig
from sae_audit.fixture.sae import SAETrainConfig
from sae_audit.fixture.tokenizer import TokenizerConfig
from sae_audit.forecast import ForecastConfig
from sae_audit.match_sparsity import MatchedConfig
from sae_audit.models import ModelSpec
from sae_audit.outliers import OutliersConfig
from sae_audit.overlap import OverlapConfig
from sae_audit.perplexity import PerplexityConfig
from sae_audit.predict import PredictConfig
from sae_audit.seed_turnover import SeedTurnoverConfig
from sae_audit.stability import StabilityConfig
from sae_audit.survival import SurvivalConfig
from sae_audit.threshold_grid import ThresholdGridConfig
from sae_audit.tokens import DocumentSpec, TokenSetConfig
from sae_audit.watchlist import WatchlistConfig

from .conftest import TEST_CONFIG

SECTIONS: list[type[ConfigSection]] = [
    CorpusConfig,
    TokenizerConfig,
    ModelTrainConfig,
    SAETrainConfig,
    ReparamConfig,
    ModelSpec,
    DocumentSpec,
    TokenSetConfig,
    EncodeConfig,
    MatchedConfig,
    SurvivalConfig,
    PredictConfig,
    StabilityConfig,
    ThresholdGridConfig,
    ContextConfig,
    PerplexityConfig,
    OverlapConfig,
    OutliersConfig,
    SeedTurnoverConfig,
    CausalConfig,
    WatchlistConfig,
    ForecastConfig,
]

# Fields with no schema default, each for a reason the schema states.
NO_SCHEMA_DEFAULT = {
    "DocumentSpec.source": "required by the schema",
    "ModelSpec.source": "required by the schema",
    "DocumentSpec.dataset": "optional without default (hf only): empty stands for absent",
    "MatchedConfig.target": "not a schema key: one of compression.prune.matched.targets",
}

# Schema keys that no section dataclass reads, and who reads them instead.
UNREAD = {
    "results",  # the Snakefile: the output root
    "fixture.bundle",  # the fixture rules' --bundle flag (sae_audit.fixture.bundle)
    "report.figure_formats",  # the workflow: figure_targets in common.smk (figures.figure_formats)
    "models.*.reference",  # the workflow: a reference-comparison input file
    "models.*.tokens.paths",  # the workflow: the tokenize job's input files
    # the workflow rules' threads: / resources: of a model's heavy jobs
    "models.*.resources.mem_mb",
    "models.*.resources.runtime",
    "models.*.resources.threads",
    # each SAE's spec stays a dict: saes.py loads it, config.check_local_saes checks it
    "models.*.saes.*.source",
    "models.*.saes.*.path",
    "models.*.saes.*.release",
    "models.*.saes.*.sae_id",
    "models.*.saes.*.architecture",
    # the variant list: config.rtn_variants / variant_names / matched_variants name the
    # variants, and each names its own compression (sae_audit.variants.parse_variant)
    "compression.rtn.bits",
    "compression.rtn.group_size",
    "compression.rtn.symmetric",
    "compression.prune.sparsities",
    "compression.prune.matched.targets",  # one MatchedConfig per target
    "stability.null_run",  # config.variant_names: adds the fp-null variant
    "stability.noise_null",  # config.variant_names: adds the fp-noise variant
    # the calibration set has the token set's keys: tokenize_calibration reads it with
    # TokenSetConfig / DocumentSpec (from_dict on the validated dict, its own defaults)
    *(
        f"models.*.calibration.{k}"
        for k in (
            "source",
            "paths",
            "dataset.path",
            "dataset.name",
            "dataset.split",
            "dataset.revision",
            "text_column",
            "line_documents",
            "strip",
            "drop_empty",
            "join",
            "seq_len",
            "n_sequences",
            "n_shards",
            "add_special_tokens",
            "bos",
        )
    ),
    "compression.rtn.full_range",  # in the variant name (rtn-int<b>-full)
    # protect entries: each is passed whole to its protect job (stages.protect reads the
    # levels, budget and survived_r; the rule picks the SAE); config checks them
    "compression.protect.*.sae",
    "compression.protect.*.levels",
    "compression.protect.*.budget.bits_per_weight",
    "compression.protect.*.budget.bytes",
    "compression.protect.*.survived_r",
    # the workflow: forecast's on/off and the transfer list are rule-level (deploy.smk)
    "forecast.enabled",
    "forecast.fit_on",
    # the gate rule's inputs: the policy file (config.gate_policy) and the report path
    "gate.policy",
    "gate.report",
    # shipped formats: each entry is passed whole to its compress job (config.shipped_entry)
    # and read there (shipped.build_recipe, checkpoints.write_shipped); config checks them
    "compression.llmcompressor.*.scheme",
    "compression.llmcompressor.*.method",
    "compression.llmcompressor.*.group_size",
    "compression.llmcompressor.*.kv_cache",
    "compression.llmcompressor.*.smoothing_strength",
    "compression.gguf.*.type",
    "compression.external.*.source",
    "compression.external.*.format",
    "compression.external.*.bits",
}


def schema_keys(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted key, its schema) of every key, sections included; '*' is a name (a model's)."""
    for key, sub in node.get("properties", {}).items():
        dotted = f"{path}.{key}" if path else key
        yield dotted, sub
        yield from schema_keys(sub, dotted)
    more = node.get("additionalProperties")
    if isinstance(more, dict):
        yield f"{path}.*", more
        yield from schema_keys(more, f"{path}.*")


def is_leaf(sub: dict[str, Any]) -> bool:
    return "properties" not in sub and not isinstance(sub.get("additionalProperties"), dict)


def plain(value: Any) -> Any:
    return [plain(v) for v in value] if isinstance(value, list | tuple) else value


def default_config() -> dict[str, Any]:
    return audit_config.validate(yaml.safe_load(TEST_CONFIG.read_text()))


def section_of(cfg: dict[str, Any], section: str) -> dict[str, Any]:
    node = cfg
    for part in section.split("."):
        node = next(iter(node.values())) if part == "*" else node[part]
    return node


# ---------------------------------------------------------------- one source of truth
@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_fields_are_schema_keys_with_schema_defaults(cls: type[ConfigSection]) -> None:
    properties = section_schema(cls.section)["properties"]
    for f in dataclasses.fields(cls):
        name = f"{cls.__name__}.{f.name}"
        if f.name in cls.extra_fields:
            assert name in NO_SCHEMA_DEFAULT, name
            continue
        assert f.name in properties, f"{name} is not a key of {cls.section}"
        spec = properties[f.name]
        if "default" not in spec:
            assert name in NO_SCHEMA_DEFAULT, f"{name}: the schema has no default"
            continue
        assert name not in NO_SCHEMA_DEFAULT, name
        assert f.default is not FROM_SCHEMA, name
        assert plain(f.default) == spec["default"], name
        assert type(f.default) is type(spec["default"]) or isinstance(f.default, tuple), name


def test_every_schema_key_is_read_by_a_section_or_known() -> None:
    read = {f"{c.section}.{f.name}" for c in SECTIONS for f in dataclasses.fields(c)}
    leaves = {k for k, sub in schema_keys(audit_config.load_schema()) if is_leaf(sub)}
    # A field holding an object (tokens.dataset) reads every key inside it.
    unread = {k for k in leaves if not any(k == r or k.startswith(r + ".") for r in read)}
    assert unread == UNREAD


def test_every_schema_key_has_a_description() -> None:
    missing = [
        k for k, sub in schema_keys(audit_config.load_schema()) if not sub.get("description")
    ]
    assert missing == []


def test_matched_target_default_is_the_first_schema_target() -> None:
    targets = section_schema(MatchedConfig.section)["properties"]["targets"]["default"]
    assert MatchedConfig().target == targets[0]


def test_a_field_that_is_no_schema_key_fails_at_class_creation() -> None:
    with pytest.raises(TypeError, match="surivved"):

        @dataclasses.dataclass(frozen=True)
        class _Typo(ConfigSection, section="analysis"):
            surivved: float = FROM_SCHEMA


# ---------------------------------------------------------------- bounds
# Wrong types, as a YAML edit or a library caller could pass them (Any: past the type checker).
NOT_A_NUMBER: Any = "high"
NOT_A_PAIR: Any = (("a",),)


@pytest.mark.parametrize(
    ("factory", "key", "what"),
    [
        (lambda: CorpusConfig(max_chars=5000), "fixture.corpus.max_chars", "minimum of 10000"),
        (lambda: CorpusConfig(heldout_fraction=0.6), "fixture.corpus.heldout_fraction", "0.5"),
        (lambda: TokenizerConfig(vocab_size=270), "fixture.tokenizer.vocab_size", "minimum"),
        (lambda: ModelTrainConfig(context=4), "fixture.model.context", "minimum of 8"),
        (lambda: SAETrainConfig(n_eval_tokens=10), "fixture.sae.n_eval_tokens", "minimum"),
        (lambda: ModelSpec(source="x", dtype="int8"), "models.<model>.model.dtype", "one of"),
        (lambda: DocumentSpec(source="csv"), "models.<model>.tokens.source", "one of"),
        (
            lambda: DocumentSpec(source="text", text_column=""),
            "models.<model>.tokens.text_column",
            "non-empty",
        ),
        (lambda: TokenSetConfig(seq_len=1), "models.<model>.tokens.seq_len", "minimum of 2"),
        (lambda: EncodeConfig(device="gpu"), "encode.device", "does not match"),
        (lambda: EncodeConfig(batch_size=True), "encode.batch_size", "not of type 'integer'"),
        (lambda: MatchedConfig(hi=1.0), "compression.prune.matched.hi", "maximum of 1"),
        (lambda: MatchedConfig(max_steps=0), "compression.prune.matched.max_steps", "minimum"),
        (lambda: SurvivalConfig(active_rate=0.0), "analysis.active_rate", "minimum of 0"),
        (
            lambda: SurvivalConfig(survived=NOT_A_NUMBER),
            "analysis.survived",
            "not of type 'number'",
        ),
        (lambda: PredictConfig(folds=1), "predict.folds", "minimum of 2"),
        (lambda: PredictConfig(predictors=()), "predict.predictors", "should be non-empty"),
        (lambda: StabilityConfig(token_budgets=(0.0, 1.0)), "stability.token_budgets.0", "minimum"),
        (lambda: StabilityConfig(subsets=-1), "stability.subsets", "minimum of 0"),
        (lambda: ThresholdGridConfig(survived=(1.5,)), "threshold_grid.survived.0", "maximum"),
        (lambda: ContextConfig(n_contexts=0), "damaged_contexts.n_contexts", "minimum of 1"),
        (lambda: PerplexityConfig(window=1), "perplexity.window", "minimum of 2"),
        (lambda: OverlapConfig(pairs=NOT_A_PAIR), "overlap.pairs.0", "is too short"),
        (lambda: CausalConfig(features_per_forward=0), "causal.features_per_forward", "minimum"),
        (lambda: CausalConfig(kl_ratio_band=0.5), "causal.kl_ratio_band", "minimum of 1"),
    ],
)
def test_out_of_bounds_names_the_dotted_key(
    factory: Callable[[], object], key: str, what: str
) -> None:
    with pytest.raises(ValueError, match=r"config key") as info:
        factory()
    assert f"config key '{key}'" in str(info.value)
    assert what in str(info.value)


def test_construction_and_validate_give_the_same_message() -> None:
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    cfg["analysis"] = {"active_rate": 0.0}
    with pytest.raises(ConfigError) as from_config:
        audit_config.validate(cfg)
    with pytest.raises(ConfigError) as from_class:
        SurvivalConfig(active_rate=0.0)
    assert str(from_class.value) == str(from_config.value)


# ---------------------------------------------------------------- cross-field checks
def _causal_config(**values: Any) -> Any:
    from sae_audit.causal import CausalConfig  # imports torch: only when this case runs

    return CausalConfig(**values)


def _edit(section: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        node = cfg
        for part in section.split("."):
            node = node.setdefault(part, {})
        node.update(values)

    return edit


@pytest.mark.parametrize(
    ("edit", "factory", "fragment"),
    [
        (
            _edit("analysis", survived=0.4, destroyed=0.5),
            lambda: SurvivalConfig(survived=0.4, destroyed=0.5),
            "config key 'analysis.destroyed': must not exceed 'analysis.survived' (0.5 > 0.4)",
        ),
        (
            _edit("causal", survived=0.4, destroyed=0.5),
            lambda: _causal_config(survived=0.4, destroyed=0.5),
            "config key 'causal.destroyed': must not exceed 'causal.survived' (0.5 > 0.4)",
        ),
        (
            _edit("causal", features="watchlist"),
            lambda: _causal_config(features="watchlist"),
            "config key 'causal.watchlist': causal.features is watchlist but no watchlist",
        ),
        (
            _edit("threshold_grid", survived=[0.2], destroyed=[0.5]),
            lambda: ThresholdGridConfig(survived=(0.2,), destroyed=(0.5,)),
            "threshold grid would be empty",
        ),
        (
            _edit("perplexity", window=16, stride=16, bos=True),
            lambda: PerplexityConfig(window=16, stride=16, bos=True),
            "config key 'perplexity.stride': 16 skips tokens: at most 15",
        ),
        (
            _edit("compression.prune.matched", lo=0.5, hi=0.4),
            lambda: MatchedConfig(target="rtn-int4", lo=0.5, hi=0.4),
            "config key 'compression.prune.matched.lo': the sparsity search needs lo < hi",
        ),
        (
            _edit("compression.prune.matched", tolerance=float("inf")),
            lambda: MatchedConfig(target="rtn-int4", tolerance=float("inf")),
            "config key 'compression.prune.matched.tolerance': must be a finite",
        ),
        (
            _edit("fixture.model", d_model=64, n_head=3),
            lambda: ModelTrainConfig(d_model=64, n_head=3),
            "config key 'fixture.model.n_head': d_model / n_head must be a whole multiple of 4",
        ),
        (
            _edit("models.fixture.tokens", n_sequences=2, n_shards=3),
            lambda: TokenSetConfig(n_sequences=2, n_shards=3),
            "tokens.n_shards': 3 shards of 2 sequences",
        ),
        (
            _edit("predict", predictors=["log_meen"]),
            lambda: PredictConfig(predictors=("log_meen",)),
            "config key 'predict.predictors': 'log_meen' is not a registered predictor",
        ),
    ],
)
def test_cross_field_checks_fire_from_validate_and_construction(
    edit: Callable[[dict[str, Any]], None], factory: Callable[[], object], fragment: str
) -> None:
    cfg = yaml.safe_load(TEST_CONFIG.read_text())
    edit(cfg)
    with pytest.raises(ConfigError) as from_config:
        audit_config.validate(cfg)
    with pytest.raises(ValueError) as from_class:
        factory()
    assert fragment in str(from_config.value)
    # The same check, naming the model where the config has one.
    got = str(from_class.value).replace("<model>", "fixture")
    assert got == str(from_config.value)


def test_matched_target_must_be_a_compression_variant() -> None:
    with pytest.raises(ValueError, match="rtn or prune"):
        MatchedConfig(target="fp")


# ---------------------------------------------------------------- from_dict
@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_from_dict_round_trips(cls: type[ConfigSection]) -> None:
    section = section_of(default_config(), cls.section)
    extra = {"target": "rtn-int4"} if cls is MatchedConfig else {}
    obj = cls.from_dict(section, **extra)
    values = obj.to_dict()
    for key, value in values.items():
        if key in cls.extra_fields:
            continue
        if key in section:
            assert plain(value) == section[key], key
        assert not isinstance(value, list), f"{key}: arrays are tuples"
    assert cls.from_dict(values) == obj
    assert cls(**values) == obj
    assert cls.from_dict(copy.deepcopy(section), **extra) == obj


def test_from_dict_takes_its_keys_and_rejects_unknown_ones() -> None:
    tokens = default_config()["models"]["fixture"]["tokens"]
    assert "paths" in tokens and "source" in tokens  # keys of other readers: ignored
    assert TokenSetConfig.from_dict(tokens).seq_len == tokens["seq_len"]
    assert DocumentSpec.from_dict(tokens).source == tokens["source"]
    with pytest.raises(
        ConfigError, match=r"'models.<model>.tokens.seqlen'.*did you mean 'seq_len'"
    ):
        TokenSetConfig.from_dict({**tokens, "seqlen": 3})
    with pytest.raises(ConfigError, match=r"'models.<model>.model.source': required"):
        ModelSpec.from_dict({"dtype": "float32"})
    # An optional key without default, written as null, is absent.
    assert DocumentSpec.from_dict({"source": "text", "dataset": None}).dataset == {}


def test_from_dict_makes_tuples_and_so_does_construction() -> None:
    grid = ThresholdGridConfig.from_dict({"survived": [0.9], "destroyed": [0.5, 0.6]})
    assert grid == ThresholdGridConfig(survived=[0.9], destroyed=(0.5, 0.6))  # pyright: ignore[reportArgumentType]
    assert grid.destroyed == (0.5, 0.6)
    pairs = OverlapConfig.from_dict({"pairs": [["rtn-int4", "prune-matched-rtn-int4"]]}).pairs
    assert pairs == (("rtn-int4", "prune-matched-rtn-int4"),)
    hash(grid)  # frozen and hashable


def test_matched_from_dict_takes_the_target() -> None:
    matched = default_config()["compression"]["prune"]["matched"]
    cfg = MatchedConfig.from_dict(matched, target="rtn-int4")
    assert (cfg.target, cfg.tolerance, cfg.hi) == ("rtn-int4", matched["tolerance"], matched["hi"])
    assert cfg.n_sequences == matched["n_sequences"]


# ---------------------------------------------------------------- start-up cost
def test_config_imports_no_heavy_package() -> None:
    code = (
        "import sys, sae_audit.config; "
        "print(sorted({'torch', 'transformers', 'sae_lens', 'sklearn'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
