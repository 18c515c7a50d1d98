"""What the embedded fixture learned: its training metrics as one table, for the report.

The fixture is only a fair stand-in for a hub model if it learned something real: the
model's held-out perplexity well under a unigram baseline, the SAE reconstructing the
residual stream with explained variance well above zero. Each trained artifact records
those numbers in its own `metrics.json` when it is built (`sae_audit.fixture.model`,
`sae_audit.fixture.sae`), and a bundled copy carries the metrics of its build.
`training_table` gathers them, one row per artifact (the model, each SAE, the twin SAE),
with whether it is the package's bundled artifact or was trained in this run.

A metric an artifact does not have (an SAE's perplexity, the model's L0) is null, never
NaN; nothing here is measured again, only read (or derived from what was read).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from .files import InputError, finite, read_json
from .fixture import bundle

METRICS = "metrics.json"
RULE = "fixture_training"
MODEL, SAE = "model", "sae"
BUNDLED, TRAINED = "bundle", "trained"

# The table's columns in order, with their dtypes (tests and the report read these).
SCHEMA: dict[str, Any] = {
    "artifact": pl.String,  # its name under results/fixture: model, sae, sae-twin
    "kind": pl.String,  # model or sae
    "origin": pl.String,  # bundle (the package's copy) or trained (in this run)
    "summary": pl.String,  # the numbers that say it learned, as a sentence
    "hook": pl.String,  # SAE: the hook it reads
    "d_model": pl.Int64,  # model: residual width; SAE: its input width (d_in)
    "d_sae": pl.Int64,  # SAE: number of features
    "seed": pl.Int64,
    "steps": pl.Int64,  # optimizer steps
    "tokens_seen": pl.Int64,  # token positions trained on, repeats counted
    "train_set_tokens": pl.Int64,  # distinct token positions (model) / activations (SAE)
    "final_train_loss": pl.Float64,  # model: smoothed training loss (nats/token) at the end
    "eval_tokens": pl.Int64,  # the held-out positions the metrics below are measured on
    "heldout_perplexity": pl.Float64,  # model
    "unigram_perplexity": pl.Float64,  # model: add-one unigram fitted on the train text
    "perplexity_vs_unigram": pl.Float64,  # model: held-out / unigram (below 1: it learned)
    "explained_variance": pl.Float64,  # SAE: of the residual stream it reconstructs
    "l0": pl.Float64,  # SAE: mean active features per token
    "n_dead_features": pl.Int64,  # SAE: features that never fired on the eval tokens
    "dead_fraction": pl.Float64,  # SAE: n_dead_features / d_sae
    "train_seconds": pl.Float64,  # wall time of the training loop where it was built
}


def artifact_kind(metrics: Mapping[str, Any], path: str | Path) -> str:
    """`model` or `sae`, from what its metrics record."""
    if "heldout_perplexity" in metrics:
        return MODEL
    if "explained_variance" in metrics:
        return SAE
    raise InputError(
        f"{path}: records neither a held-out perplexity nor an explained variance: "
        "not the metrics of a fixture model or SAE"
    )


def origin(name: str, directory: str | Path, bundle_dir: str | Path = bundle.BUNDLE_DIR) -> str:
    """`bundle` when `directory` is the package's bundled `name` (the same files and the
    very metrics.json of the bundle's build, which a rebuild's wall time never repeats),
    else `trained`."""
    manifest = bundle.read_manifest(bundle_dir)
    record = (manifest or {}).get("artifacts", {}).get(name)
    if record is None or len(record["files"]) != 1:
        return TRAINED
    [(rel, expected)] = record["files"].items()
    bundled = Path(bundle_dir) / rel / METRICS
    mine = Path(directory) / METRICS
    if not bundled.is_file() or mine.read_bytes() != bundled.read_bytes():
        return TRAINED
    return BUNDLED if bundle.digest(directory) == expected else TRAINED


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def artifact_row(
    name: str, directory: str | Path, bundle_dir: str | Path = bundle.BUNDLE_DIR
) -> dict[str, Any]:
    """One row of the table: the recorded metrics of the artifact in `directory`."""
    path = Path(directory) / METRICS
    metrics = read_json(path, RULE)
    kind = artifact_kind(metrics, path)
    cfg = metrics.get("config", {})
    row: dict[str, Any] = dict.fromkeys(SCHEMA)
    row.update(
        artifact=name,
        kind=kind,
        origin=origin(name, directory, bundle_dir),
        seed=_int(cfg.get("seed")),
        steps=_int(metrics.get("steps")),
        train_seconds=finite(metrics.get("seconds")),
    )
    if kind == MODEL:
        heldout = finite(metrics["heldout_perplexity"])
        unigram = finite(metrics.get("unigram_perplexity"))
        row.update(
            d_model=_int(cfg.get("d_model")),
            tokens_seen=_int(metrics.get("tokens_seen")),
            train_set_tokens=_int(metrics.get("n_train_tokens")),
            final_train_loss=finite(metrics.get("final_train_loss")),
            eval_tokens=_int(metrics.get("heldout_tokens")),
            heldout_perplexity=heldout,
            unigram_perplexity=unigram,
            perplexity_vs_unigram=finite(heldout / unigram) if heldout and unigram else None,
        )
    else:
        sae_cfg = _sae_lens_cfg(Path(directory))
        d_sae = _int(sae_cfg.get("d_sae", cfg.get("d_sae")))
        steps, batch = row["steps"], _int(cfg.get("batch_size"))
        n_dead = _int(metrics.get("n_dead_features"))
        row.update(
            hook=metrics.get("hook_name") or sae_cfg.get("metadata", {}).get("hook_name"),
            d_model=_int(sae_cfg.get("d_in")),
            d_sae=d_sae,
            tokens_seen=steps * batch if steps is not None and batch is not None else None,
            train_set_tokens=_int(metrics.get("n_train_activations")),
            eval_tokens=_int(metrics.get("n_eval_tokens")),
            explained_variance=finite(metrics.get("explained_variance")),
            l0=finite(metrics.get("l0")),
            n_dead_features=n_dead,
            dead_fraction=n_dead / d_sae if n_dead is not None and d_sae else None,
        )
    row["summary"] = summary(row)
    return row


def _sae_lens_cfg(directory: Path) -> dict[str, Any]:
    path = directory / "cfg.json"
    return read_json(path, RULE) if path.is_file() else {}


def summary(row: Mapping[str, Any]) -> str:
    """What the row's numbers say, in one sentence (the report's caption points to it)."""
    if row["kind"] == MODEL:
        heldout, unigram = row["heldout_perplexity"], row["unigram_perplexity"]
        text = f"held-out perplexity {heldout:.2f}"
        if unigram is not None:
            text += f" vs unigram baseline {unigram:.2f} ({unigram / heldout:.1f}x lower)"
        if row["eval_tokens"] is not None:
            text += f" on {row['eval_tokens']:,} held-out tokens"
    else:
        ev = row["explained_variance"]
        text = "explained variance " + ("unknown" if ev is None else f"{ev:.3f}")
        if row["hook"]:
            text += f" of {row['hook']}"
        if row["l0"] is not None:
            text += f", L0 {row['l0']:.1f}"
        if row["n_dead_features"] is not None and row["d_sae"] is not None:
            text += f", {row['n_dead_features']} of {row['d_sae']} features dead"
        if row["eval_tokens"] is not None:
            text += f" on {row['eval_tokens']:,} activations it was not trained on"
    if row["steps"] is not None:
        text += f"; {row['steps']:,} steps"
    return text + f" ({'bundled copy' if row['origin'] == BUNDLED else 'trained in this run'})"


def training_table(
    artifacts: Mapping[str, str | Path], bundle_dir: str | Path = bundle.BUNDLE_DIR
) -> pl.DataFrame:
    """One row per trained fixture artifact (name -> its directory), in the given order."""
    if not artifacts:
        raise InputError("no fixture artifact given: nothing to tabulate")
    rows = [artifact_row(name, d, bundle_dir) for name, d in artifacts.items()]
    return pl.DataFrame(rows, schema=SCHEMA)
