"""TransformerLens-style hook names that sae-lens SAEs record (torch-free: the config check uses it)."""

from __future__ import annotations

import re

HOOK_PATTERN = re.compile(
    r"^blocks\.(?P<layer>\d+)\.(?P<point>hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$"
)
SUPPORTED = "blocks.<L>.hook_resid_post, hook_resid_pre, hook_mlp_out or hook_attn_out"
