"""Loading the frozen SAE that serves as the measurement basis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import hooked_width, resolve_hook


def load_sae(
    spec: dict[str, Any], device: str | torch.device = "cpu", path: str | Path | None = None
):
    """A sae-lens SAE from {path} (SAE.load_from_disk) or {release, sae_id} (SAE.from_pretrained).

    `path` overrides the spec (the workflow passes the fixture's built SAE directory).
    When the spec names an architecture, the loaded class must match it.
    """
    from sae_lens import SAE

    device = str(device)
    where = path or spec.get("path")
    if where is not None:
        sae = SAE.load_from_disk(str(where), device=device)
    elif spec.get("release") and spec.get("sae_id"):
        sae = SAE.from_pretrained(spec["release"], spec["sae_id"], device=device)
    else:
        raise ValueError("sae spec needs 'path' or 'release' + 'sae_id'")
    expected = spec.get("architecture")
    actual = sae.cfg.architecture()
    if expected and expected != actual:
        raise ValueError(
            f"sae.architecture is {expected!r} but the loaded SAE is {actual!r} ({type(sae).__name__})"
        )
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def sae_hook_name(sae: Any) -> str:
    hook = sae.cfg.metadata.hook_name
    if not hook:
        raise ValueError(
            "the SAE's cfg.metadata.hook_name is empty: cannot tell which activation it reads"
        )
    return str(hook)


def check_compatible(model: nn.Module, sae: Any) -> str:
    """Resolve the SAE's hook on the model and check widths; return the hook name."""
    hook = sae_hook_name(sae)
    resolve_hook(model, hook)
    width = hooked_width(model, hook)
    if int(sae.cfg.d_in) != width:
        raise ValueError(
            f"SAE d_in={sae.cfg.d_in} does not match the width {width} of {hook!r} in "
            f"{getattr(model.config, 'model_type', type(model).__name__)} (hidden_size): wrong SAE for this model"
        )
    return hook
