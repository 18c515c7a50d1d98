"""Hook names of sae-lens's registry, inferred without downloading anything."""

from __future__ import annotations

import pytest

from sae_audit.hooknames import HOOK_PATTERN, pretrained_hook


def _gemma_scope(repo_id: str, sae_id: str, path: str) -> dict:
    return {
        "conversion_func": "gemma_2",
        "repo_id": repo_id,
        "saes": [
            {"id": "other", "path": "layer_0/width_16k/average_l0_9"},
            {"id": sae_id, "path": path},
        ],
    }


@pytest.mark.parametrize(
    "sae_id", ["blocks.4.hook_resid_post", "blocks.3.attn.hook_z", "hook_embed"]
)
def test_an_id_that_is_a_hook_name_is_the_hook(sae_id):
    assert pretrained_hook({"repo_id": "someone/saes"}, sae_id) == sae_id


@pytest.mark.parametrize(
    ("repo_id", "path", "hook"),
    [
        ("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", "blocks.12.hook_resid_post"),
        ("google/gemma-scope-2b-pt-mlp", "layer_3/width_16k/average_l0_50", "blocks.3.hook_mlp_out"),
        ("google/gemma-scope-2b-pt-att", "layer_7/width_16k/average_l0_20", "blocks.7.attn.hook_z"),
        ("google/gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_21", "hook_embed"),
        ("google/gemma-scope-2b-pt-res", "no_layer_here", None),
    ],
)  # fmt: skip
def test_gemma_scope_hooks_follow_the_repo_and_folder(repo_id, path, hook):
    release = _gemma_scope(repo_id, "layer_x/canonical", path)
    assert pretrained_hook(release, "layer_x/canonical") == hook


def test_an_unknown_release_gives_no_hook():
    assert pretrained_hook({"repo_id": "someone/saes", "saes": []}, "my-sae-7") is None


def test_supported_hook_points():
    for name in ("hook_resid_post", "hook_resid_pre", "hook_mlp_out", "hook_attn_out"):
        match = HOOK_PATTERN.match(f"blocks.11.{name}")
        assert match and match["layer"] == "11" and match["point"] == name
    for name in ("blocks.1.attn.hook_z", "hook_embed", "blocks.x.hook_resid_post"):
        assert HOOK_PATTERN.match(name) is None
