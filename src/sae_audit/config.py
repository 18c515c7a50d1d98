"""The workflow config: load, validate against the JSON schema, and derive what the DAG needs.

The Snakefile and the CLI share these functions, so a variant list or a model's
source path is computed in one place. Each job receives only its own slice of the
config (see `slice_hash`), so editing one key re-runs only the jobs that read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from jsonschema import validators

from .hooknames import HOOK_PATTERN, SUPPORTED, pretrained_hook
from .variants import (
    FORECAST_GGUF_TYPES,
    SHIPPED,
    parse_variant,
    protect_name,
    prune_name,
    rtn_name,
    shipped_name,
)

FIXTURE = "fixture"
# A model source beside 'fixture': the planted control fixture_reparam builds from the
# fixture model (sae_audit.fixture.reparam), a reparameterized copy, never a trained model.
FIXTURE_REPARAM = "fixture-reparam"
FIXTURE_MODELS = (FIXTURE, FIXTURE_REPARAM)


def schema_path() -> Path:
    """The schema ships with the package (the workflow's copy is a symlink-free duplicate check)."""
    return Path(str(resources.files("sae_audit") / "config.schema.yaml"))


def load_schema() -> dict[str, Any]:
    # libyaml's loader where installed: the pure-Python one takes ~25 ms on this file,
    # which every snakemake start-up and every job importing a config section would pay.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(schema_path().read_text(), Loader=loader)


@functools.cache
def _schema() -> dict[str, Any]:
    """The schema, parsed once per process (validation reads it, never changes it)."""
    return load_schema()


# Schema checks of one value (not of an object's keys), whose error the key's description completes.
_VALUE_CHECKS = frozenset(
    {"type", "enum", "const", "pattern", "minLength", "minItems", "maxItems", "uniqueItems"}
    | {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
)


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


def validate(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate (filling schema defaults) and cross-check; raise ConfigError naming the key."""
    plain: dict[str, Any] = json.loads(json.dumps(config))  # a plain, mutable copy
    validator_cls = validators.validator_for(_schema())
    validator = _with_defaults(validator_cls)(_schema())
    errors = sorted(validator.iter_errors(plain), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_error_message(errors[0]))
    _cross_check(plain)
    return plain


def _error_message(err: Any, section: str = "") -> str:
    """ "config key '<dotted key>': <what is wrong> (<the key's description>)" of a schema error."""
    key = ".".join([*([section] if section else []), *(str(p) for p in err.absolute_path)])
    # A bound or type error says what is wrong; the key's description says what is right.
    about = err.schema.get("description") if isinstance(err.schema, dict) else None
    hint = f" ({about.strip()})" if about and err.validator in _VALUE_CHECKS else ""
    return f"config key '{key or '<top level>'}': {err.message}{hint}"


def _with_defaults(validator_cls: Any) -> Any:
    """A validator that also fills `default`s in, like snakemake.utils.validate(set_default=True)."""
    validate_properties = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: Any, instance: Any, schema: Any) -> Any:
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(prop, json.loads(json.dumps(sub["default"])))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_cls, {"properties": set_defaults})


# ---------------------------------------------------------------- typed sections
class _FromSchema:
    def __repr__(self) -> str:
        return "FROM_SCHEMA"


# The default of a ConfigSection field: the class takes the schema's default instead.
# Typed Any so that `seed: int = FROM_SCHEMA` type-checks.
FROM_SCHEMA: Any = _FromSchema()


def section_schema(section: str) -> dict[str, Any]:
    """The schema of the config section at a dotted path; '*' stands for any name (a model's)."""
    node = _schema()
    for part in section.split("."):
        node = node["additionalProperties"] if part == "*" else node["properties"][part]
    return node


def schema_default(section: str, key: str) -> Any:
    """The schema's default of `<section>.<key>`, arrays as tuples (frozen dataclasses hold it)."""
    spec = section_schema(section)["properties"][key]
    if "default" not in spec:
        raise KeyError(f"schema key '{section}.{key}' has no default")
    return _frozen(spec["default"])


def section_label(section: str) -> str:
    """How messages name a section: 'models.<model>.tokens' for 'models.*.tokens'."""
    return section.replace("*", "<model>")


def _frozen(value: Any) -> Any:
    """Arrays as (nested) tuples: what a frozen, hashable dataclass field holds."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """Tuples as lists, mappings as dicts: what jsonschema takes for JSON arrays and objects."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.cache
def _keys_validator(section: str, keys: tuple[str, ...]) -> Any:
    """A validator of `keys` of a section against their schemas (types, bounds, enums).

    Only the keys' own schemas: a dataclass holds some keys of a section (tokens is
    two classes), so the section's `required` and cross-key rules are validate()'s.
    """
    properties = section_schema(section)["properties"]
    fragment = {"type": "object", "properties": {k: properties[k] for k in keys}}
    return validators.validator_for(_schema())(fragment)


class ConfigSection:
    """Base of the typed config sections: one frozen dataclass per schema section.

    A subclass names its section, `class SurvivalConfig(ConfigSection, section="analysis")`,
    and declares keys of that section as fields (`extra_fields` names any that are not);
    a field whose default is FROM_SCHEMA gets the schema's default when the class is
    created, so every default is written once, in the schema. Construction validates
    each field against its schema key, raising ConfigError (a ValueError) naming the
    dotted key as `validate` does, then runs `_check`, the cross-field checks, which
    call the same functions `validate` calls (so a subclass overrides `_check`, never
    `__post_init__`). `from_dict` turns the section's dict into the dataclass.
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]
    section: ClassVar[str]  # dotted schema path; '*' stands for a model's name
    extra_fields: ClassVar[frozenset[str]] = frozenset()  # fields that are no key of the section

    def __init_subclass__(
        cls, *, section: str, extra_fields: Iterable[str] = (), **kwargs: Any
    ) -> None:
        # Runs before @dataclass reads the class, so the filled-in defaults are its defaults.
        super().__init_subclass__(**kwargs)
        cls.section = section
        cls.extra_fields = frozenset(extra_fields)
        properties = section_schema(section)["properties"]
        for name, annotation in inspect.get_annotations(cls).items():
            if "ClassVar" in str(annotation):
                continue
            if name not in properties and name not in cls.extra_fields:
                raise TypeError(f"{cls.__name__}.{name} is not a key of config section {section!r}")
            if cls.__dict__.get(name) is FROM_SCHEMA:
                setattr(cls, name, schema_default(section, name))

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                # Cls(x=[...]) holds tuples, as from_dict makes and the defaults are.
                object.__setattr__(self, name, _frozen(value))
        keys, absent = _checked_keys(type(self))
        values = {k: _plain(getattr(self, k)) for k in keys}
        # A key the schema gives no default is absent when it holds the field's default.
        values = {k: v for k, v in values.items() if k not in absent or v != absent[k]}
        errors = _keys_validator(self.section, tuple(sorted(values))).iter_errors(values)
        first = min(errors, key=lambda e: [str(p) for p in e.absolute_path], default=None)
        if first is not None:
            raise ConfigError(_error_message(first, section_label(self.section)))
        self._check()

    def _check(self) -> None:
        """Cross-field checks the schema cannot express; a subclass calls validate()'s own."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as {name: value}: what the cross-field checks take, and from_dict."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], /, **extra: Any) -> Self:
        """The section as the validated config holds it (a dict), as this dataclass.

        Keys of the section that another reader owns (the token set's `paths`, a class
        sharing the section) are ignored; a key the section does not have is an error.
        Arrays become tuples and the fields are validated. `extra` sets fields that are
        no key of the section (MatchedConfig.target).
        """
        properties = section_schema(cls.section)["properties"]
        where = section_label(cls.section)
        names = cls.__dataclass_fields__
        _, absent = _checked_keys(cls)
        kwargs: dict[str, Any] = {}
        for key, value in {**d, **extra}.items():
            if key in names:
                if value is None and key in absent:
                    continue  # an optional key without default, written as null: absent
                kwargs[key] = value
            elif key not in properties:
                raise ConfigError(
                    f"config key '{where}.{key}': not a key of {where}"
                    f"{_suggest(key, sorted(properties))}"
                )
        for name, f in names.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in kwargs:
                raise ConfigError(f"config key '{where}.{name}': required, but missing")
        return cls(**kwargs)


@functools.cache
def _checked_keys(cls: type[ConfigSection]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(the schema keys a class validates, {key: field default} of keys the schema gives no
    default, whose field default stands for 'absent')."""
    properties = section_schema(cls.section)["properties"]
    keys = tuple(k for k in cls.__dataclass_fields__ if k not in cls.extra_fields)
    absent: dict[str, Any] = {}
    for key in keys:
        f = cls.__dataclass_fields__[key]
        if "default" in properties[key]:
            continue
        if f.default is not dataclasses.MISSING:
            absent[key] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            absent[key] = _plain(f.default_factory())
    return keys, absent


# ---------------------------------------------------------------- cross-field checks
# What the schema cannot say about one section. validate() runs each on the config,
# and the section's dataclass on itself, so both reject the same values the same way.
def check_survival_thresholds(analysis: Mapping[str, Any], where: str = "analysis") -> None:
    if analysis["destroyed"] > analysis["survived"]:
        raise ConfigError(
            f"config key '{where}.destroyed': must not exceed '{where}.survived' "
            f"({analysis['destroyed']} > {analysis['survived']})"
        )


def check_causal(causal: Mapping[str, Any]) -> None:
    """causal: its class thresholds in order, and a watchlist when it is the selection."""
    check_survival_thresholds(causal, "causal")
    if causal["features"] == "watchlist" and not causal.get("watchlist"):
        raise ConfigError(
            "config key 'causal.watchlist': causal.features is watchlist but no watchlist "
            "file is given (a text file of feature ids, one per line)"
        )


def _check_causal(config: dict[str, Any]) -> None:
    causal = config.get("causal")
    if not causal:
        return
    check_causal(causal)
    if causal["features"] == "watchlist" and not Path(causal["watchlist"]).is_file():
        raise ConfigError(
            f"config key 'causal.watchlist': {causal['watchlist']} is not a file (a text "
            "file of feature ids, one per line; relative to the working directory)"
        )


def check_protect_entry(entry: Mapping[str, Any], where: str) -> None:
    """A protect entry's levels: the first (the base) is the cheapest, none repeats."""
    levels = [(lv["bits"], lv.get("group_size")) for lv in entry["levels"]]
    if len(set(levels)) != len(levels):
        raise ConfigError(f"config key '{where}.levels': a level is listed twice: {levels}")

    def cost(bits: int | None, group: int | None) -> float:
        # storage bits per weight of a wide matrix: codes, and one fp16 scale per group
        return 16.0 if bits is None else bits + (16.0 / group if group else 0.0)

    if levels[0][0] is None or any(cost(*lv) <= cost(*levels[0]) for lv in levels[1:]):
        raise ConfigError(
            f"config key '{where}.levels': the first level is the base every block matrix "
            f"starts at, so it must be quantized and cost the fewest bits per weight (scales "
            f"included); got {levels}"
        )


def _check_protect(config: dict[str, Any]) -> None:
    for key, entry in config["compression"].get("protect", {}).items():
        where = f"compression.protect.{key}"
        check_protect_entry(entry, where)
        sae = entry.get("sae")
        for model, spec in config["models"].items():
            if sae is not None and sae not in spec["saes"]:
                raise ConfigError(
                    f"config key '{where}.sae': {sae!r} is not an SAE of model {model!r}"
                    f"{_suggest(sae, list(spec['saes']))}; choose from {sorted(spec['saes'])} "
                    "or null (each model's first SAE)"
                )


def _check_watchlist(config: dict[str, Any]) -> None:
    path = config["watchlist"]["file"]
    if path is not None and not Path(path).is_file():
        raise ConfigError(
            f"config key 'watchlist.file': {path} is not a file (a text file of feature ids, "
            "one per line; relative to the working directory), or null for the top features"
        )


def forecast_variants(config: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The variants the forecast models, each with its config entry (shipped formats) or
    None: RTN, pruning, llm-compressor presets and the GGUF types it has a noise model for.
    Nulls, external artifacts and protected variants are not forecast (protect forecasts
    its own plan); the forecast stage still skips an llm-compressor entry it cannot model."""
    out: dict[str, dict[str, Any] | None] = {}
    for name in variant_names(config):
        kind = parse_variant(name).kind
        found = shipped_entry(config, name)
        if kind in ("rtn", "prune", "prune-matched", "llmcompressor") or (
            kind == "gguf" and found is not None and found[1]["type"] in FORECAST_GGUF_TYPES
        ):
            out[name] = found[1] if found else None
    return out


def _check_forecast(config: dict[str, Any]) -> None:
    names = variant_names(config)
    for key in ("measure", "fit_on"):
        for name in config["forecast"][key]:
            if name not in names:
                raise ConfigError(
                    f"config key 'forecast.{key}': {name!r} is not a configured variant"
                    f"{_suggest(name, names)}; choose from {names}"
                )
    modelled = forecast_variants(config)
    for key in ("measure", "fit_on"):
        for name in config["forecast"][key]:
            if name not in modelled:
                raise ConfigError(
                    f"config key 'forecast.{key}': {name!r} is not forecast (no noise model: "
                    "the forecast models RTN, pruning, llm-compressor presets and GGUF "
                    f"{' / '.join(FORECAST_GGUF_TYPES)}, not null, external or protected variants)"
                )
    for name in config["forecast"]["measure"]:
        if parse_variant(name).kind not in ("rtn", "prune", "prune-matched", "gguf"):
            raise ConfigError(
                f"config key 'forecast.measure': {name!r} has no per-matrix compression to "
                "quantize one matrix at a time; use RTN, pruning or GGUF variants"
            )


# The release policy gate.policy null means: the package's (sae_audit.gate reads it).
DEFAULT_POLICY = Path(__file__).with_name("policy.yaml")


def gate_policy(config: Mapping[str, Any]) -> Path:
    """The release gate's policy file: gate.policy, or the package's default."""
    return Path(config["gate"]["policy"] or DEFAULT_POLICY)


def _check_gate(config: dict[str, Any]) -> None:
    from .gate import read_policy

    path = gate_policy(config)
    if not path.is_file():
        raise ConfigError(
            f"config key 'gate.policy': {path} is not a file (the release policy, YAML; "
            "copy the package's sae_audit/policy.yaml)"
        )
    try:
        policy = read_policy(path)
    except ValueError as e:  # InputError names the file and key
        raise ConfigError(f"config key 'gate.policy': {e}") from e
    names = variant_names(config)
    for name in policy.variants or ():
        if name not in names:
            raise ConfigError(
                f"config key 'gate.policy': {path} names release candidate {name!r}, which "
                f"is not a configured variant{_suggest(name, names)}; choose from {names}"
            )


def check_threshold_grid(grid: Mapping[str, Any], where: str = "threshold_grid") -> None:
    survived, destroyed = list(grid["survived"]), list(grid["destroyed"])
    if not any(d <= s for s in survived for d in destroyed):
        # The threshold_grid job skips pairs with destroyed > survived and fails when none is left.
        raise ConfigError(
            f"config key '{where}.destroyed': no value is <= any of "
            f"{where}.survived {survived}, so the threshold grid would be empty"
        )


def check_predictors(
    predictors: Iterable[str], registered: Collection[str], where: str = "predict"
) -> None:
    for name in predictors:
        if name not in registered:
            raise ConfigError(
                f"config key '{where}.predictors': {name!r} is not a registered predictor"
                f"{_suggest(name, sorted(registered))}; choose from {sorted(registered)}"
            )


def check_perplexity(ppl: Mapping[str, Any], where: str = "perplexity") -> None:
    if ppl["sliding"]:
        # With BOS prepended a window holds window - 1 text tokens, and the stride may not
        # skip any (sliding_perplexity.sliding_window_nll).
        span = ppl["window"] - 1 if ppl["bos"] else ppl["window"]
        if ppl["stride"] > span:
            raise ConfigError(
                f"config key '{where}.stride': {ppl['stride']} skips tokens: at most "
                f"{span} (the window's text tokens{', BOS excluded' if ppl['bos'] else ''})"
            )


def check_matched(matched: Mapping[str, Any], where: str = "compression.prune.matched") -> None:
    # The bracket matters only where a search runs: the config with targets, or a
    # MatchedConfig (which has one target, no `targets`).
    if not matched.get("targets", True):
        return
    if not math.isfinite(matched["tolerance"]):
        # YAML's .inf / .nan pass the schema's bound; a search needs a real tolerance.
        raise ConfigError(
            f"config key '{where}.tolerance': must be a finite relative tolerance, "
            f"got {matched['tolerance']}"
        )
    if not matched["lo"] < matched["hi"]:
        raise ConfigError(
            f"config key '{where}.lo': the sparsity search needs lo < hi, got "
            f"lo={matched['lo']}, hi={matched['hi']}"
        )


def check_fixture_model(model: Mapping[str, Any], where: str = "fixture.model") -> None:
    d_model, n_head = model["d_model"], model["n_head"]
    if d_model % n_head or (d_model // n_head) % 4:
        # GPT-NeoX's rotary_pct 0.25 needs a head dimension that is a multiple of 4.
        raise ConfigError(
            f"config key '{where}.n_head': d_model / n_head must be a whole multiple of 4, "
            f"got d_model={d_model}, n_head={n_head}"
        )


def check_fixture_sae(sae: Mapping[str, Any], where: str = "fixture.sae") -> None:
    if sae["twin_seed"] is not None and sae["twin_seed"] == sae["seed"]:
        raise ConfigError(
            f"config key '{where}.twin_seed': {sae['twin_seed']} is the main SAE's seed "
            f"({where}.seed), so the twin would be the same SAE: use another seed, or null"
        )


def check_reparam(
    reparam: Mapping[str, Any], model: Mapping[str, Any], where: str = "fixture.reparam"
) -> None:
    """The planted control's dimension and blocks exist in the fixture model (fixture.model)."""
    if not reparam["dim"] < model["d_model"]:
        raise ConfigError(
            f"config key '{where}.dim': {reparam['dim']} is not a residual dimension of the "
            f"fixture model (fixture.model.d_model={model['d_model']}): use 0..{model['d_model'] - 1}"
        )
    bad = [layer for layer in reparam["layers"] or () if layer >= model["n_layer"]]
    if bad:
        raise ConfigError(
            f"config key '{where}.layers': {bad} past the fixture model's "
            f"{model['n_layer']} blocks (fixture.model.n_layer): use 0..{model['n_layer'] - 1}"
        )


def check_token_set(tokens: Mapping[str, Any], where: str) -> None:
    if tokens["n_shards"] > tokens["n_sequences"]:
        raise ConfigError(
            f"config key '{where}.n_shards': {tokens['n_shards']} shards of "
            f"{tokens['n_sequences']} sequences (tokens.n_sequences) leave a shard empty: "
            "use at most n_sequences shards"
        )


def _cross_check(config: dict[str, Any]) -> None:
    """What the schema cannot say: relations between keys, and cheap looks at local files.

    Everything a job would reject from the config alone is rejected here, before the
    first job, so a typo costs seconds rather than the minutes of work before that job.
    """
    _check_variants(config)
    _check_shipped(config)
    _check_analysis(config)
    _check_causal(config)
    _check_protect(config)
    _check_watchlist(config)
    _check_forecast(config)
    _check_gate(config)
    _check_fixture(config)
    for model, spec in config["models"].items():
        sae_sources = [sae.get("source") for sae in spec["saes"].values()]
        uses_fixture = spec["model"]["source"] in FIXTURE_MODELS or FIXTURE in (
            spec["tokens"]["source"],
            *sae_sources,
        )
        if uses_fixture and "fixture" not in config:
            raise ConfigError(
                f"config key 'models.{model}': uses the fixture but 'fixture' is not configured"
            )
        check_model_source(model, spec)
        check_token_set(spec["tokens"], f"models.{model}.tokens")
        _check_tokens(model, spec["tokens"])
        check_local_saes(model, spec, config.get("fixture"))


def _suggest(name: str, choices: list[str]) -> str:
    """' (did you mean 'a' or 'b'?)' for close matches of a typo, else ''."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _check_variants(config: dict[str, Any]) -> None:
    # Matched targets first: 'prune-matched-<typo>' would otherwise fail to parse below
    # and name only 'compression', not the key that holds the typo.
    bases = (
        rtn_variants(config)
        + [prune_name(s) for s in config["compression"]["prune"]["sparsities"]]
        + shipped_variants(config)
    )
    key = "compression.prune.matched.targets"
    for target in config["compression"]["prune"]["matched"]["targets"]:
        if target not in bases:
            raise ConfigError(
                f"config key '{key}': target {target!r} is not a configured RTN or pruning "
                f"variant{_suggest(target, bases)}; choose from {bases} (made by "
                "compression.rtn, compression.prune.sparsities, .llmcompressor, .gguf, .external)"
            )
    for name in variant_names(config):
        try:
            parse_variant(name)
        except ValueError as e:
            where = (
                "compression.prune.sparsities" if name.startswith("prune-") else "compression.rtn"
            )
            raise ConfigError(f"config key '{where}': {e}") from e
    check_matched(config["compression"]["prune"]["matched"])
    names = variant_names(config)
    for i, pair in enumerate(config["overlap"]["pairs"]):
        for name in pair:
            if name not in names:
                raise ConfigError(
                    f"config key 'overlap.pairs': {name!r} (pair {i}) is not a configured "
                    f"variant{_suggest(name, names)}; choose from {names}"
                )


# Weight-only schemes: AWQ fits weight scales and nothing else.
_WEIGHT_ONLY = {"W4A16", "W4A16_ASYM", "W8A16"}


def check_llmcompressor_entry(entry: Mapping[str, Any], where: str) -> None:
    """Combinations llm-compressor would reject, or that would silently do nothing."""
    scheme, method = entry.get("scheme"), entry.get("method", "rtn")
    if scheme is None and entry.get("kv_cache") is None:
        raise ConfigError(
            f"config key '{where}': compresses nothing; set a scheme (e.g. W4A16, W8A8, "
            "FP8_DYNAMIC), a kv_cache (fp8, int8), or both"
        )
    if scheme is None and method != "rtn":
        raise ConfigError(
            f"config key '{where}.method': {method!r} fits weights, but scheme is null "
            "(a KV-cache-only variant); set a scheme or drop method"
        )
    if method == "awq" and scheme not in _WEIGHT_ONLY:
        raise ConfigError(
            f"config key '{where}.method': awq fits weight-only schemes "
            f"({sorted(_WEIGHT_ONLY)}), not {scheme!r}; use gptq or smoothquant+gptq"
        )
    if method.startswith("smoothquant") and scheme in _WEIGHT_ONLY:
        raise ConfigError(
            f"config key '{where}.method': SmoothQuant moves activation outliers into the "
            f"weights, which only helps when activations are quantized; {scheme!r} is weight-only "
            "(use gptq or awq, or a W8A8 / FP8 scheme)"
        )


def _check_shipped(config: dict[str, Any]) -> None:
    compression = config["compression"]
    for key, entry in compression["llmcompressor"].items():
        check_llmcompressor_entry(entry, f"compression.llmcompressor.{key}")
    if compression["llmcompressor"]:
        for model, spec in config["models"].items():
            _check_calibration(model, spec, config)
    if compression["external"] and len(config["models"]) > 1:
        raise ConfigError(
            "config key 'compression.external': an external artifact compresses one base "
            f"model, but {len(config['models'])} models are configured ({list(config['models'])}); "
            "audit external artifacts with a config of one model"
        )
    for key, entry in compression["external"].items():
        for model, spec in config["models"].items():
            check_external(f"compression.external.{key}", entry, model, spec, config.get("fixture"))


def _check_calibration(model: str, spec: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """The calibration set exists and is not the evaluation text (windows are checked later)."""
    calibration, tokens = spec["calibration"], spec["tokens"]
    key = f"models.{model}.calibration"
    if calibration["source"] == FIXTURE and "fixture" not in config:
        raise ConfigError(
            f"config key '{key}': defaults to the fixture's training text, but 'fixture' is not "
            "configured; set a calibration token set disjoint from models."
            f"{model}.tokens (e.g. {{source: text, paths: [calib.txt]}})"
        )
    same_source = calibration["source"] == tokens["source"] and calibration["source"] != FIXTURE
    same_data = calibration.get("paths", []) == tokens.get("paths", []) and calibration.get(
        "dataset"
    ) == tokens.get("dataset")
    if same_source and same_data:
        raise ConfigError(
            f"config key '{key}': the calibration set reads the same data as models.{model}"
            ".tokens; calibrating on the evaluation text would flatter the compressed models: "
            "point it at other files or another split"
        )
    check_token_set(calibration, key)
    _check_tokens(model, calibration, "calibration")


def check_external(
    where: str,
    entry: Mapping[str, Any],
    model: str,
    spec: Mapping[str, Any],
    fixture: Mapping[str, Any] | None,
) -> None:
    """The artifact exists, has a format we read, and declares the base model's shape."""
    from .artifacts import ModelShape, artifact_shape, check_matches, resolve_format
    from .files import InputError

    source = entry["source"]
    if not Path(source).exists():
        raise ConfigError(
            f"config key '{where}.source': no such file or directory: {source!r} (relative "
            f"paths are relative to the working directory {Path.cwd()})"
        )
    what, width, layers = _model_shape(spec, fixture)
    model_type: str | None = "gpt_neox" if spec["model"]["source"] in FIXTURE_MODELS else None
    vocab = None
    base_dir = Path(spec["model"]["source"])
    if base_dir.is_dir():
        base_cfg = _read_json(base_dir / "config.json") or {}
        model_type, vocab = (
            ModelShape.from_hf_config(base_cfg).model_type,
            base_cfg.get("vocab_size"),
        )
    base = ModelShape(model_type, width, layers, vocab)
    try:
        fmt = resolve_format(source, entry.get("format", "auto"))
        check_matches(artifact_shape(source, fmt), base, repr(source), f"{what} (models.{model})")
    except InputError as e:
        raise ConfigError(f"config key '{where}.source': {e}") from e


def _check_analysis(config: dict[str, Any]) -> None:
    check_survival_thresholds(config["analysis"])
    check_threshold_grid(config["threshold_grid"])
    predictors = config["predict"]["predictors"]
    if not set(predictors) <= set(schema_default("predict", "predictors")):
        # Only a non-default name pays for importing sae_audit.predict (scikit-learn, ~2 s).
        from .predict import PREDICTORS

        check_predictors(predictors, PREDICTORS)
    check_perplexity(config["perplexity"])


def _uses_fixture_sae(config: Mapping[str, Any]) -> bool:
    return any(
        sae.get("source") == FIXTURE
        for spec in config["models"].values()
        for sae in spec["saes"].values()
    )


def _check_fixture(config: dict[str, Any]) -> None:
    """The fixture trainers' own checks (sae_audit.fixture), for the fixture models in use."""
    fixture = config.get("fixture")
    if fixture is None:
        return
    uses_model = any(
        spec["model"]["source"] in FIXTURE_MODELS or spec["tokens"]["source"] == FIXTURE
        for spec in config["models"].values()
    )
    if not uses_model and not _uses_fixture_sae(config):
        return
    check_fixture_model(fixture["model"])
    n_layer = fixture["model"]["n_layer"]
    if any(spec["model"]["source"] == FIXTURE_REPARAM for spec in config["models"].values()):
        check_reparam(fixture["reparam"], fixture["model"])
    layer = fixture["sae"]["layer"]
    if _uses_fixture_sae(config):
        check_fixture_sae(fixture["sae"])
    if _uses_fixture_sae(config) and not layer <= n_layer - 2:
        # The fixture SAE reads hidden_states[layer + 1]; the last block's entry is normalized.
        raise ConfigError(
            f"config key 'fixture.sae.layer': {layer} is not a block of the "
            f"{n_layer}-layer fixture model whose raw output it can read: "
            f"use 0..{n_layer - 2} (or raise fixture.model.n_layer)"
        )


# ---------------------------------------------------------------- model sources
def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


def check_model_source(model: str, spec: Mapping[str, Any]) -> None:
    """'fixture', 'fixture-reparam', an existing model directory, or a well-formed hub id
    (checked offline)."""
    source = spec["model"]["source"]
    key = f"models.{model}.model.source"
    if source in FIXTURE_MODELS:
        return
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"config key '{key}': {source!r} has no config.json: not a transformers model "
                "directory (save one with save_pretrained)"
            )
        return
    if _looks_like_path(source):
        hint = (
            "; '~' is not expanded: write the full path"
            if source.startswith("~") and path.expanduser().is_dir()
            else f" (relative paths are relative to the working directory {Path.cwd()})"
        )
        raise ConfigError(f"config key '{key}': no such model directory: {source!r}{hint}")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError as e:
        raise ConfigError(
            f"config key '{key}': no such model directory: {source!r}, and not a hub id "
            f"('name' or 'org/name'): {e}"
        ) from e


# ---------------------------------------------------------------- token files
_BLANK = b" \t\r\n\x0b\x0c"
_FIRST_LINE_CAP = 1 << 20  # a longer first JSON line is left to the tokenize job


def _first_line(path: Path) -> bytes | None:
    """The first line with a non-whitespace byte (at most _FIRST_LINE_CAP bytes), or None.

    Reads only up to that line, so a real file costs one small read however big it is.
    """
    with path.open("rb") as f:
        while line := f.readline(_FIRST_LINE_CAP):
            if line.strip(_BLANK):
                return line
    return None


def _check_tokens(model: str, tokens: Mapping[str, Any], section: str = "tokens") -> None:
    """The token set's local input files (a cheap look at each); check_token_set did its keys."""
    source = tokens["source"]
    if source not in ("text", "jsonl", "parquet"):
        return
    key = f"models.{model}.{section}.paths"
    column = tokens["text_column"]
    for item in tokens["paths"]:
        path = Path(item)
        if not path.exists():
            raise ConfigError(
                f"config key '{key}': no such file: {item!r} "
                f"(relative paths are relative to the working directory {Path.cwd()})"
            )
        if not path.is_file():
            raise ConfigError(f"config key '{key}': {item!r} is not a file")
        if source == "parquet":
            _check_parquet(model, item, column, section)
            continue
        first = _first_line(path)
        if first is None:
            what = "empty" if path.stat().st_size == 0 else "whitespace only"
            raise ConfigError(
                f"config key '{key}': {item!r} is {what}: no text to tokenize "
                "(fill it or drop it from the list)"
            )
        if source == "jsonl" and len(first) < _FIRST_LINE_CAP:
            _check_jsonl_row(model, item, first, column, section)


def _check_jsonl_row(
    model: str, item: str, line: bytes, column: str, section: str = "tokens"
) -> None:
    key = f"models.{model}.{section}.paths"
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ConfigError(
            f"config key '{key}': the first line of {item!r} is not valid JSON ({e}): "
            "tokens.source jsonl needs one JSON object per line"
        ) from e
    if not isinstance(row, dict):
        raise ConfigError(
            f"config key '{key}': the first line of {item!r} is a JSON {type(row).__name__}, "
            f"expected an object with a {column!r} key ({section}.text_column)"
        )
    if column not in row:
        raise ConfigError(
            f"config key 'models.{model}.{section}.text_column': {column!r} is not a "
            f"key of the first row of {item!r}; its keys: {sorted(row)}"
        )


def _check_parquet(model: str, item: str, column: str, section: str = "tokens") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = f"models.{model}.{section}.paths"
    try:
        meta = pq.read_metadata(item)  # the footer only, not the data
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"config key '{key}': {item!r} is not a Parquet file: {e}") from e
    if meta.num_rows == 0:
        raise ConfigError(
            f"config key '{key}': {item!r} has no rows: no text to tokenize "
            "(fill it or drop it from the list)"
        )
    names = meta.schema.to_arrow_schema().names
    if column not in names:
        raise ConfigError(
            f"config key 'models.{model}.{section}.text_column': {column!r} is not a "
            f"column of {item!r}; its columns: {names}"
        )


# ---------------------------------------------------------------- SAEs
def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


_TOP_LINE = re.compile(r"^(?=[^\s#])(.*)$", re.MULTILINE)
_PLAIN_KEY = re.compile(r"([^\s'\"?&*!|>%@`{\[-][^:\n]*):\s*")


@functools.cache
def _sae_registry() -> dict[str, str] | None:
    """sae-lens's pretrained-SAE registry as {release: its yaml text}; None without sae-lens.

    Importing sae_lens (for get_pretrained_saes_directory) takes several seconds, and
    parsing all of its 1.5 MB pretrained_saes.yaml ~0.7 s, which every `snakemake`
    start-up (and every cluster job) would pay. Locating the package imports nothing,
    and the file is one top-level key per release, so each release's text is cut out
    by its key line and only the releases a config names get parsed.
    """
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    if not path.is_file():
        return None
    text = path.read_text()
    lines = list(_TOP_LINE.finditer(text))
    keys = [_PLAIN_KEY.fullmatch(m[1]) for m in lines]
    if not all(keys):
        # Not the one-plain-key-per-release layout: parse the whole file instead.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        return {name: yaml.safe_dump({name: entry}) for name, entry in data.items()}
    ends = [m.start() for m in lines[1:]] + [len(text)]
    return {
        key[1]: text[m.start() : end] for key, m, end in zip(keys, lines, ends, strict=True) if key
    }


@functools.cache
def _registry_entry(release: str) -> dict[str, Any]:
    text = (_sae_registry() or {})[release]
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))[release]


def _pretrained_hook(model: str, name: str, sae: Mapping[str, Any]) -> tuple[str, str | None]:
    """(config key, hook or None) of a {release, sae_id} SAE, looked up in the local registry.

    A release the registry lacks is, for sae-lens, a hub repo id (when it has a '/'):
    nothing local says what it holds, so only its form is checked.
    """
    release, sae_id = sae["release"], sae["sae_id"]
    base = f"models.{model}.saes.{name}"
    registry = _sae_registry()
    if registry is None:
        return f"{base}.sae_id", None
    if release not in registry:
        if "/" in release:
            return f"{base}.sae_id", None
        raise ConfigError(
            f"config key '{base}.release': {release!r} is not a sae-lens pretrained release"
            f"{_suggest(release, list(registry))}; name a release of sae_lens's "
            "pretrained_saes.yaml, or a hub repo id 'org/name'"
        )
    entry = _registry_entry(release)
    ids = [str(s["id"]) for s in entry["saes"]]
    if sae_id not in ids:
        shown = ids if len(ids) <= 12 else [*ids[:12], "..."]
        raise ConfigError(
            f"config key '{base}.sae_id': {sae_id!r} is not an SAE of release {release!r}"
            f"{_suggest(sae_id, ids)}; its ids: {shown}"
        )
    return f"{base}.sae_id", pretrained_hook(entry, sae_id)


def _model_shape(
    spec: Mapping[str, Any], fixture: Mapping[str, Any] | None
) -> tuple[str, Any, Any]:
    """(description, width, layers) of the model, from local config only; None where unknown."""
    source = spec["model"]["source"]
    if source in FIXTURE_MODELS:
        # the reparameterized copy has the fixture model's shape by construction
        what = "the fixture model" if source == FIXTURE else "the reparameterized fixture model"
        if fixture is None:
            return what, None, None
        fm = fixture["model"]
        return f"{what} (fixture.model)", fm["d_model"], fm["n_layer"]
    path = Path(source)
    model_cfg = _read_json(path / "config.json") if path.is_dir() else None
    if model_cfg is None:
        return source, None, None  # a hub model: its config is not read at start-up
    width = model_cfg.get("hidden_size") or model_cfg.get("n_embd")
    layers = model_cfg.get("num_hidden_layers") or model_cfg.get("n_layer")
    return source, width, layers


def check_local_saes(
    model: str, spec: Mapping[str, Any], fixture: Mapping[str, Any] | None = None
) -> None:
    """Before any job runs: an SAE must read a hook the model has, at its width.

    Only local files are read (the model's config.json, the SAE's cfg.json, sae-lens's
    registry yaml; the fixture model's shape is its config), so planning never touches
    the network. A hub SAE's d_in, and anything about a hub model, is checked when the
    encode job loads them.
    """
    what, width, layers = _model_shape(spec, fixture)
    for name, sae in spec["saes"].items():
        d_in: Any = None
        if sae.get("source") == FIXTURE:
            if fixture is None:
                continue
            key = f"models.{model}.saes.{name}.source"
            hook: str | None = f"blocks.{fixture['sae']['layer']}.hook_resid_post"
            d_in = fixture["model"]["d_model"]
        elif "path" in sae:
            key = f"models.{model}.saes.{name}.path"
            sae_cfg = _read_json(Path(sae["path"]) / "cfg.json")
            if sae_cfg is None:
                raise ConfigError(f"config key '{key}': no sae-lens cfg.json in {sae['path']!r}")
            hook = (sae_cfg.get("metadata") or {}).get("hook_name") or sae_cfg.get("hook_name")
            d_in = sae_cfg.get("d_in")
        else:
            key, hook = _pretrained_hook(model, name, sae)
            if hook is None:
                continue
        match = HOOK_PATTERN.match(hook or "")
        if match is None:
            raise ConfigError(
                f"config key '{key}': SAE hook {hook!r} is not supported; expected {SUPPORTED}"
            )
        if width is not None and d_in is not None and int(d_in) != int(width):
            raise ConfigError(
                f"config key '{key}': SAE d_in={d_in} but {hook} of {what} "
                f"has width {width}: this SAE was trained on another model"
            )
        if layers is not None and int(match["layer"]) >= int(layers):
            raise ConfigError(
                f"config key '{key}': SAE hook {hook} is past the model's {layers} layers: "
                f"use an SAE of blocks 0..{int(layers) - 1} of this model"
            )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; a syntax error names the file and the line.

    Snakemake's own loader says only 'Config file is not valid JSON or YAML'.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = ": ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError(
            f"config file {str(path)!r}{where}: YAML syntax error: {problem} (fix the YAML there)"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r}: YAML error: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r}: must be a mapping of keys (models:, compression:, ...), "
            f"got {type(data).__name__}"
        )
    return data


def check_config_file(path: str | Path) -> None:
    """read_config_file for its error only; a missing file is left to Snakemake's message."""
    if Path(path).is_file():
        read_config_file(path)


def load(path: str | Path) -> dict[str, Any]:
    return validate(read_config_file(path))


# ---------------------------------------------------------------- derived
def rtn_variants(config: Mapping[str, Any]) -> list[str]:
    rtn = config["compression"]["rtn"]
    return [
        rtn_name(b, rtn.get("group_size"), rtn.get("symmetric", True), rtn.get("full_range", False))
        for b in rtn["bits"]
    ]


def shipped_variants(config: Mapping[str, Any]) -> list[str]:
    """lc-, gguf- and ext- variants, in config order within each section."""
    return [
        shipped_name(section, key)
        for section in SHIPPED
        for key in config["compression"].get(section, {})
    ]


def shipped_entry(config: Mapping[str, Any], variant: str) -> tuple[str, dict[str, Any]] | None:
    """(section, config entry) of a shipped-format variant; None for any other variant."""
    v = parse_variant(variant)
    if not v.shipped:
        return None
    section = next(s for s, (_, kind) in SHIPPED.items() if kind == v.kind)
    return section, dict(config["compression"][section][v.key])


def calibrated_variants(config: Mapping[str, Any]) -> list[str]:
    """Variants whose compress job reads the calibration token set (llm-compressor's)."""
    return [shipped_name("llmcompressor", k) for k in config["compression"]["llmcompressor"]]


# ---------------------------------------------------------------- where a model's parts live
def fixture_model_dirs(results: str) -> dict[str, str]:
    """The model directories the fixture rules build, by model source: the trained fixture
    and the planted control (rule fixture_reparam, a reparameterized copy of it)."""
    return {
        FIXTURE: f"{results}/fixture/model",
        FIXTURE_REPARAM: f"{results}/fixture/model-reparam",
    }


def base_model_path(config: Mapping[str, Any], model: str) -> str:
    """The FP model's source: a built fixture model, or a hub id / local path from the config."""
    source = str(config["models"][model]["model"]["source"])
    return fixture_model_dirs(config["results"]).get(source, source)


def local_sae_dirs(config: Mapping[str, Any], model: str) -> dict[str, str]:
    """SAEs of a model that live on disk, name -> directory (the fixture's, or a configured
    path); the others load by release and id."""
    dirs = {}
    for name, spec in config["models"][model]["saes"].items():
        if spec.get("source") == FIXTURE:
            dirs[name] = f"{config['results']}/fixture/sae"
        elif "path" in spec:
            dirs[name] = spec["path"]
    return dirs


# What a certificate hashes of a source given by its hub id (sae_audit.gate.HUB_PREFIX).
HUB_PREFIX = "hub:"


def sae_sources(config: Mapping[str, Any], model: str) -> dict[str, str]:
    """Every SAE of a model, name -> its directory when on disk, else `hub:release/sae_id`
    (what pins it on the hub): what a certificate hashes."""
    local = local_sae_dirs(config, model)
    return {
        name: local.get(name) or f"{HUB_PREFIX}{spec.get('release')}/{spec.get('sae_id')}"
        for name, spec in config["models"][model]["saes"].items()
    }


def base_model_source(config: Mapping[str, Any], model: str) -> str:
    """The FP model as a certificate hashes it: a built fixture model or a local directory
    (its files), else `hub:<id>` (check_model_source has told the two apart at start-up)."""
    path = base_model_path(config, model)
    if config["models"][model]["model"]["source"] in FIXTURE_MODELS or _looks_like_path(path):
        return path
    return path if Path(path).is_dir() else f"{HUB_PREFIX}{path}"


def protect_variants(config: Mapping[str, Any]) -> list[str]:
    """protect- variants, in config order (compression.protect)."""
    return [protect_name(key) for key in config["compression"].get("protect", {})]


def protect_entry(config: Mapping[str, Any], variant: str) -> dict[str, Any] | None:
    """The compression.protect entry of a protect- variant; None for any other variant."""
    v = parse_variant(variant)
    if v.kind != "protect":
        return None
    return dict(config["compression"]["protect"][v.key])


def protect_sae(config: Mapping[str, Any], model: str, key: str) -> str:
    """The SAE whose watchlist entry `key` protects in `model` (its `sae`, or the first)."""
    name = config["compression"]["protect"][key].get("sae")
    return name if name is not None else next(iter(config["models"][model]["saes"]))


def matched_variants(config: Mapping[str, Any]) -> list[str]:
    return [f"prune-matched-{t}" for t in config["compression"]["prune"]["matched"]["targets"]]


def variant_names(config: Mapping[str, Any]) -> list[str]:
    """Every compressed variant, in display order (FP excluded: it is the reference)."""
    prune = config["compression"]["prune"]
    names = (
        rtn_variants(config)
        + shipped_variants(config)
        + [prune_name(s) for s in prune["sparsities"]]
        + matched_variants(config)
        + protect_variants(config)
    )
    if config["stability"]["null_run"]:
        names.append("fp-null")
    if config["stability"]["noise_null"]:
        names.append("fp-noise")
    return names


def variant_bits(config: Mapping[str, Any]) -> dict[str, int | None]:
    """Weight bits of every compressed variant (None: no bit-width, e.g. pruning, KV-only):
    where each sits in tables and figures, shipped formats beside RTN at the same bits."""
    from .variants import shipped_bits

    bits: dict[str, int | None] = {}
    for name in variant_names(config):
        v = parse_variant(name)
        found = shipped_entry(config, name)
        bits[name] = shipped_bits(*found) if found else v.bits
    return bits


def equal_bits_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(RTN variant, shipped variant) at the same weight bits: what a deployment team asks
    first is which features the shipped method saves that plain RTN destroys, and back."""
    bits = variant_bits(config)
    rtn = rtn_variants(config)
    return [
        (r, s)
        for s in shipped_variants(config)
        if bits[s] is not None
        for r in rtn
        if bits[r] == bits[s]
    ]


def overlap_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Configured pairs, or by default each RTN variant against each matched-pruning variant
    and each shipped variant against RTN at its bit-width."""
    if config["overlap"]["pairs"]:
        return [(a, b) for a, b in config["overlap"]["pairs"]]
    matched = [(r, m) for m in matched_variants(config) for r in rtn_variants(config)]
    return matched + equal_bits_pairs(config)


def model_names(config: Mapping[str, Any]) -> list[str]:
    return list(config["models"])


def sae_names(config: Mapping[str, Any], model: str) -> list[str]:
    return list(config["models"][model]["saes"])


def slice_hash(*parts: Any) -> str:
    """Short stable hash of config slices: recorded in outputs to say what made them."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode_hash(
    model_params: Mapping[str, Any],
    encode_params: Mapping[str, Any],
    sae_spec: Mapping[str, Any] | None = None,
) -> str:
    """The config hash a shard records: what encode ran with (the SAE's spec for a code shard).

    The workflow computes the same hash from the config to check a shard is the one its
    rule asked for; the variant is checked by name beside it.
    """
    return slice_hash(dict(model_params), dict(encode_params), dict(sae_spec or {}))
