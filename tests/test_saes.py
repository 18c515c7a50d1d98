"""Loading sae-lens SAEs from disk: every architecture, and the architecture check."""

from __future__ import annotations

import pytest
import torch

from sae_audit.saes import load_sae

from .test_families import HIDDEN, SAE_CLASSES, make_sae


@pytest.mark.parametrize("arch", list(SAE_CLASSES))
def test_sae_of_each_architecture_loads_from_disk(tmp_path, arch):
    hook = "blocks.1.hook_resid_post"
    made = make_sae(arch, HIDDEN, 64, hook)
    made.save_model(tmp_path / arch)
    sae = load_sae({"path": str(tmp_path / arch)})
    assert type(sae).__name__ == SAE_CLASSES[arch] and type(sae) is type(made)
    assert sae.cfg.architecture() == arch and sae.cfg.d_in == HIDDEN and sae.cfg.d_sae == 64
    assert sae.cfg.metadata.hook_name == hook
    assert not any(p.requires_grad for p in sae.parameters())
    for name, p in made.state_dict().items():
        assert torch.equal(sae.state_dict()[name], p), name
    # The path argument overrides the spec's; a matching architecture is accepted.
    assert type(load_sae({"architecture": arch}, path=tmp_path / arch)) is type(made)
    wrong = "topk" if arch != "topk" else "jumprelu"
    with pytest.raises(ValueError) as err:
        load_sae({"path": str(tmp_path / arch), "architecture": wrong})
    assert repr(wrong) in str(err.value) and repr(arch) in str(err.value)
