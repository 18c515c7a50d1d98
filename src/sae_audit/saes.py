"""Loading the frozen SAE that serves as the measurement basis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import InputError
from .models import hooked_width, resolve_hook

# Hooks that read what a block writes into the residual stream (or the stream itself):
# TransformerLens's center_writing_weights makes every one of them mean-zero per token.
_RESIDUAL_WRITERS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                     "hook_mlp_out")  # fmt: skip
# Normalizations sae-lens applies inside encode/decode on every call.
_RUN_TIME_NORMALIZATION = ("none", "layer_norm", "constant_norm_rescale")


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


@dataclass(frozen=True)
class SaeInput:
    """How a hooked activation becomes this SAE's input, read from the SAE's metadata.

    - `center`: the SAE was trained on a TransformerLens model loaded with
      center_writing_weights=True (its cfg.metadata.model_from_pretrained_kwargs says
      so), whose residual stream is mean-zero over d_model at every token; subtracting the
      per-token mean from the HF activation reproduces that stream exactly (the model's
      LayerNorms remove the mean anyway, so nothing downstream changes). Only an explicit
      True counts: sae-lens records False when it trained on a raw stream, and an SAE that
      records nothing was not trained through TransformerLens's loader as far as we know.
    - `normalize_activations`: sae-lens applies it inside `encode`/`decode` ("none",
      "layer_norm", "constant_norm_rescale"); the load-time ones are folded into the
      weights by sae-lens or refused by `sae_input`.
    - `prepend_bos` (the SAE's training, None when not recorded) against `tokens_bos` (the
      evaluation token set's): a mismatch is measured anyway and reported, since one token
      set serves every SAE of a model; the SAE-quality table shows what it costs.
    """

    hook: str
    center: bool
    normalize_activations: str
    prepend_bos: bool | None
    tokens_bos: bool

    def prepare(self, acts: torch.Tensor) -> torch.Tensor:
        """The SAE's input from a [..., d_in] hooked activation."""
        return acts - acts.mean(dim=-1, keepdim=True) if self.center else acts

    @property
    def bos_mismatch(self) -> bool:
        return self.prepend_bos is not None and self.prepend_bos != self.tokens_bos

    def describe(self) -> str:
        """One log line: what was applied to the activations and what was checked."""
        center = (
            "per-token mean subtracted (center_writing_weights)" if self.center else "used as is"
        )
        bos = "not recorded" if self.prepend_bos is None else str(self.prepend_bos).lower()
        return (
            f"{self.hook}: {center}; normalize_activations={self.normalize_activations} "
            f"(applied by sae-lens); SAE prepend_bos={bos}, tokens.bos="
            f"{str(self.tokens_bos).lower()}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "centered": self.center,
            "normalize_activations": self.normalize_activations,
            "sae_prepend_bos": self.prepend_bos,
            "tokens_bos": self.tokens_bos,
        }


def sae_input(sae: Any, name: str, tokens_bos: bool) -> SaeInput:
    """What `sae`'s metadata asks of its input (see SaeInput); refuses what cannot be honoured.

    `name` is the SAE's name in the config (for the error), `tokens_bos` the model's
    `tokens.bos`.
    """
    hook = sae_hook_name(sae)
    normalize = str(sae.cfg.normalize_activations)
    if normalize not in _RUN_TIME_NORMALIZATION:
        # sae-lens folds these into the weights at load when it has the statistics, and
        # then marks the SAE "none"; still marked, the SAE would read unscaled input.
        raise InputError(
            f"SAE {name!r} has normalize_activations={normalize!r} that sae-lens did not fold "
            "into its weights on load (no norm scaling factor or whitening statistics were "
            "found for it): its codes would be computed on the wrong scale. Use an SAE whose "
            "release provides them, or fold them into the weights and load it by path"
        )
    metadata = sae.cfg.metadata
    kwargs = getattr(metadata, "model_from_pretrained_kwargs", None) or {}
    center = kwargs.get("center_writing_weights") is True and hook.endswith(_RESIDUAL_WRITERS)
    bos = getattr(metadata, "prepend_bos", None)
    return SaeInput(
        hook=hook,
        center=center,
        normalize_activations=normalize,
        prepend_bos=None if bos is None else bool(bos),
        tokens_bos=bool(tokens_bos),
    )
