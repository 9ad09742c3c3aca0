"""An invalid edit keeps the policy's last valid version; a never-valid policy has no effect."""

from __future__ import annotations

from typing import Any

import pytest

from gatewayd.policy.lastgood import PolicyMemory
from gatewayd.policy.snapshot import parse_objects

pytestmark = pytest.mark.unit


def policy(name: str, cidr: str, kind: str = "EgressGatewayPolicy") -> dict[str, Any]:
    api = "cilium.io/v2" if kind.startswith("Cilium") else "egress.gatewayd.io/v1alpha1"
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name},
        "spec": {
            "selectors": [{"podSelector": {"matchLabels": {"app": "a"}}}],
            "destinationCIDRs": [cidr],
            "egressGateway": {"nodeSelector": {"matchLabels": {"role": "gw"}}},
        },
    }


def destinations(memory: PolicyMemory, *objects: dict[str, Any]) -> dict[str, list[str]]:
    resolved = memory.resolve(parse_objects(("snap.yaml", o) for o in objects))
    return {p.name: [str(d) for d in p.destinations] for p in resolved.snapshot.policies}


def test_invalid_update_keeps_last_valid_version() -> None:
    memory = PolicyMemory()
    assert destinations(memory, policy("pay", "10.0.0.0/8")) == {"pay": ["10.0.0.0/8"]}
    assert destinations(memory, policy("pay", "10.0.0.0/33")) == {"pay": ["10.0.0.0/8"]}
    # ...and it keeps holding across further invalid loads, until a valid version arrives
    assert destinations(memory, policy("pay", "bad")) == {"pay": ["10.0.0.0/8"]}
    assert destinations(memory, policy("pay", "192.0.2.0/24")) == {"pay": ["192.0.2.0/24"]}


def test_kept_names_are_reported() -> None:
    memory = PolicyMemory()
    memory.resolve(parse_objects([("a.yaml", policy("pay", "10.0.0.0/8"))]))
    resolved = memory.resolve(parse_objects([("a.yaml", policy("pay", "10.0.0.0/99"))]))
    assert resolved.kept == ("EgressGatewayPolicy/pay",)


def test_never_valid_policy_has_no_effect() -> None:
    assert destinations(PolicyMemory(), policy("new", "300.0.0.0/8")) == {}


def test_deleted_policy_is_forgotten() -> None:
    memory = PolicyMemory()
    destinations(memory, policy("pay", "10.0.0.0/8"))
    assert destinations(memory) == {}
    # deleted, then re-created invalid: nothing to fall back to any more
    assert destinations(memory, policy("pay", "10.0.0.0/99")) == {}


def test_kinds_are_remembered_separately() -> None:
    memory = PolicyMemory()
    destinations(memory, policy("pay", "10.0.0.0/8", kind="CiliumEgressGatewayPolicy"))
    # an invalid EgressGatewayPolicy of the same name must not revive the Cilium one's spec
    resolved = memory.resolve(parse_objects([("a.yaml", policy("pay", "bad"))]))
    assert resolved.snapshot.policies == ()
