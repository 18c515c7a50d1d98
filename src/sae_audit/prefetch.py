"""Fetch everything a config needs into the HF cache, so compute nodes run offline.

Run `sae-audit prefetch --configfile config/paper.yaml` on a machine with hub access
(a login node); then run the workflow with HF_HUB_OFFLINE=1. Local paths and the
fixture need nothing and are reported as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import FIXTURE, FIXTURE_MODELS


@dataclass(frozen=True)
class FetchItem:
    kind: str  # "model" | "sae" | "dataset"
    model: str  # config model name
    what: str  # hub id, release/sae_id, or dataset path/name/split
    revision: str | None = None
    local: bool = False  # nothing to fetch: fixture or a local path


def _is_local(source: str) -> bool:
    return source in FIXTURE_MODELS or Path(source).exists() or source.startswith((".", "/"))


def plan(config: Mapping[str, Any]) -> list[FetchItem]:
    """What a run of this config reads from the hub, without touching the network."""
    items: list[FetchItem] = []
    for name, spec in config["models"].items():
        source = spec["model"]["source"]
        items.append(
            FetchItem("model", name, source, spec["model"].get("revision"), _is_local(source))
        )
        for sae_name, sae in spec["saes"].items():
            if "release" in sae:
                items.append(FetchItem("sae", name, f"{sae['release']}/{sae['sae_id']}"))
            else:
                items.append(
                    FetchItem("sae", name, sae.get("path", FIXTURE) + f" ({sae_name})", local=True)
                )
        tokens = spec["tokens"]
        if tokens["source"] == "hf":
            ds = tokens["dataset"]
            what = "/".join(str(x) for x in (ds["path"], ds.get("name"), ds.get("split")) if x)
            items.append(FetchItem("dataset", name, what, ds.get("revision")))
    return items


def fetch(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Download every non-local item of the plan into the HF cache; return what was done."""
    done = []
    for item in plan(config):
        if item.local:
            done.append({**item.__dict__, "status": "local"})
            continue
        if item.kind == "model":
            from huggingface_hub import snapshot_download

            path = snapshot_download(item.what, revision=item.revision)
        elif item.kind == "sae":
            from sae_lens import SAE

            release, sae_id = item.what.split("/", 1)
            SAE.from_pretrained(release, sae_id, device="cpu")
            path = "HF cache"
        else:
            from datasets import load_dataset

            spec = config["models"][item.model]["tokens"]["dataset"]
            load_dataset(
                spec["path"],
                spec.get("name"),
                split=spec.get("split"),
                revision=spec.get("revision"),
            )
            path = "HF datasets cache"
        done.append({**item.__dict__, "status": "fetched", "path": str(path)})
    return done
