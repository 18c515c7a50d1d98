"""The workflow config: load, validate against the JSON schema, and derive what the DAG needs.

The Snakefile and the CLI share these functions, so a variant list or a model's
source path is computed in one place. Each job receives only its own slice of the
config (see `slice_hash`), so editing one key re-runs only the jobs that read it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import validators

from .hooknames import HOOK_PATTERN, SUPPORTED
from .variants import parse_variant, prune_name, rtn_name

FIXTURE = "fixture"


def schema_path() -> Path:
    """The schema ships with the package (the workflow's copy is a symlink-free duplicate check)."""
    return Path(str(resources.files("sae_audit") / "config.schema.yaml"))


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text())


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


def validate(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate (filling schema defaults) and cross-check; raise ConfigError naming the key."""
    plain: dict[str, Any] = json.loads(json.dumps(config))  # a plain, mutable copy
    validator_cls = validators.validator_for(load_schema())
    validator = _with_defaults(validator_cls)(load_schema())
    errors = sorted(validator.iter_errors(plain), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        raise ConfigError(f"config key '{key}': {err.message}")
    _cross_check(plain)
    return plain


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


def _cross_check(config: dict[str, Any]) -> None:
    names = variant_names(config)
    for name in names:
        try:
            parse_variant(name)
        except ValueError as e:
            raise ConfigError(f"config key 'compression': {e}") from e
    for target in config["compression"]["prune"]["matched"]["targets"]:
        if target not in names:
            raise ConfigError(
                f"config key 'compression.prune.matched.targets': target {target!r} is not a "
                f"configured variant; configured: {names}"
            )
    analysis = config["analysis"]
    if analysis["destroyed"] > analysis["survived"]:
        raise ConfigError(
            "config key 'analysis.destroyed': must not exceed 'analysis.survived' "
            f"({analysis['destroyed']} > {analysis['survived']})"
        )
    for model, spec in config["models"].items():
        sae_sources = [sae.get("source") for sae in spec["saes"].values()]
        uses_fixture = FIXTURE in (spec["model"]["source"], spec["tokens"]["source"], *sae_sources)
        if uses_fixture and "fixture" not in config:
            raise ConfigError(
                f"config key 'models.{model}': uses the fixture but 'fixture' is not configured"
            )
    for model, spec in config["models"].items():
        check_local_saes(model, spec)
    for pair in config["overlap"]["pairs"]:
        for name in pair:
            if name not in names:
                raise ConfigError(
                    f"config key 'overlap.pairs': {name!r} is not a configured variant"
                )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def check_local_saes(model: str, spec: Mapping[str, Any]) -> None:
    """Before any job runs: an on-disk SAE must read a hook the model has, at its width.

    Only local files are read (the model's config.json, the SAE's cfg.json), so planning
    never touches the network; hub SAEs are checked when the encode job loads them.
    """
    source = Path(spec["model"]["source"])
    model_cfg = _read_json(source / "config.json") if source.is_dir() else None
    for name, sae in spec["saes"].items():
        if "path" not in sae:
            continue
        key = f"models.{model}.saes.{name}.path"
        sae_cfg = _read_json(Path(sae["path"]) / "cfg.json")
        if sae_cfg is None:
            raise ConfigError(f"config key '{key}': no sae-lens cfg.json in {sae['path']!r}")
        hook = (sae_cfg.get("metadata") or {}).get("hook_name") or sae_cfg.get("hook_name")
        match = HOOK_PATTERN.match(hook or "")
        if match is None:
            raise ConfigError(
                f"config key '{key}': SAE hook {hook!r} is not supported; expected {SUPPORTED}"
            )
        if model_cfg is None:
            continue
        width = model_cfg.get("hidden_size") or model_cfg.get("n_embd")
        layers = model_cfg.get("num_hidden_layers") or model_cfg.get("n_layer")
        if width is not None and int(sae_cfg["d_in"]) != int(width):
            raise ConfigError(
                f"config key '{key}': SAE d_in={sae_cfg['d_in']} but {hook} of {spec['model']['source']} "
                f"has width {width}: this SAE was trained on another model"
            )
        if layers is not None and int(match["layer"]) >= int(layers):
            raise ConfigError(
                f"config key '{key}': SAE hook {hook} is past the model's {layers} layers"
            )


def load(path: str | Path) -> dict[str, Any]:
    return validate(yaml.safe_load(Path(path).read_text()))


# ---------------------------------------------------------------- derived
def rtn_variants(config: Mapping[str, Any]) -> list[str]:
    rtn = config["compression"]["rtn"]
    return [rtn_name(b, rtn.get("group_size"), rtn.get("symmetric", True)) for b in rtn["bits"]]


def matched_variants(config: Mapping[str, Any]) -> list[str]:
    return [f"prune-matched-{t}" for t in config["compression"]["prune"]["matched"]["targets"]]


def variant_names(config: Mapping[str, Any]) -> list[str]:
    """Every compressed variant, in display order (FP excluded: it is the reference)."""
    prune = config["compression"]["prune"]
    names = (
        rtn_variants(config)
        + [prune_name(s) for s in prune["sparsities"]]
        + matched_variants(config)
    )
    if config["stability"]["null_run"]:
        names.append("fp-null")
    return names


def overlap_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Configured pairs, or by default each RTN variant against each matched-pruning variant."""
    if config["overlap"]["pairs"]:
        return [(a, b) for a, b in config["overlap"]["pairs"]]
    return [(r, m) for m in matched_variants(config) for r in rtn_variants(config)]


def model_names(config: Mapping[str, Any]) -> list[str]:
    return list(config["models"])


def sae_names(config: Mapping[str, Any], model: str) -> list[str]:
    return list(config["models"][model]["saes"])


def slice_hash(*parts: Any) -> str:
    """Short stable hash of config slices: recorded in outputs to say what made them."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
