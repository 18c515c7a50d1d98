"""TransformerLens-style hook names that sae-lens SAEs record (torch-free: the config check uses it)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

HOOK_PATTERN = re.compile(
    r"^blocks\.(?P<layer>\d+)\.(?P<point>hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$"
)
SUPPORTED = "blocks.<L>.hook_resid_post, hook_resid_pre, hook_mlp_out or hook_attn_out"

# Any TransformerLens hook name, supported or not (hook_embed, blocks.3.attn.hook_z, ...).
_ANY_HOOK = re.compile(r"^(hook_[a-z_]+|blocks\.\d+\.([a-z0-9_]+\.)*hook_[a-z_]+)$")


def pretrained_hook(release: Mapping[str, Any], sae_id: str) -> str | None:
    """The hook an SAE of sae-lens's registry reads, from the registry entry alone (no download).

    `release` is one entry of sae-lens's pretrained_saes.yaml. The registry records no
    hook name, so it is inferred where that is certain and None otherwise (the encode
    job then checks the SAE's own cfg when it loads it):
    - sae-lens's own releases name each SAE by its hook (pythia-70m-deduped-res-sm:
      blocks.4.hook_resid_post), so an id that is a whole hook name is the hook;
    - Gemma Scope (conversion_func gemma_2) derives it from the repo id and the folder,
      exactly as sae_lens.loading.pretrained_sae_loaders.get_gemma_2_config_from_hf does.
    """
    if _ANY_HOOK.match(sae_id):
        return sae_id
    if release.get("conversion_func") == "gemma_2":
        repo_id = str(release.get("repo_id", ""))
        folder = next((str(s["path"]) for s in release["saes"] if s["id"] == sae_id), "")
        layer = re.search(r"layer_(\d+)", folder)
        if "res" in repo_id and "embedding" in folder:
            return "hook_embed"
        if layer is None:
            return None
        if "res" in repo_id:
            return f"blocks.{layer[1]}.hook_resid_post"
        if "mlp" in repo_id:
            return f"blocks.{layer[1]}.hook_mlp_out"
        if "att" in repo_id:
            return f"blocks.{layer[1]}.attn.hook_z"
    return None
