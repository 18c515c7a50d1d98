"""What a config needs from the hub, and fetching it (a local config fetches nothing)."""

from __future__ import annotations

from sae_audit import config as audit_config
from sae_audit.prefetch import fetch

from .conftest import ROOT


def test_prefetch_of_local_config_fetches_nothing():
    cfg = audit_config.load(ROOT / "config" / "config.yaml")
    assert {d["status"] for d in fetch(cfg)} == {"local"}
