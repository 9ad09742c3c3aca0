"""The controller's state for `/metrics`: leadership and each policy's gateways."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gatewayd.controller.status import READY
from gatewayd.metrics import Sample


def controller_samples(leader: bool, statuses: Mapping[str, Mapping[str, Any]]) -> list[Sample]:
    """Leadership, and for the leader each EgressGatewayPolicy's active gateways (0: its
    traffic has no usable gateway and is dropped) and Ready condition, as last planned."""
    samples = [Sample("gatewayd_controller_leader", "1 on the replica that holds the leader "
                      "Lease and plans.", float(leader))]
    for policy, status in sorted(statuses.items()):
        labels = {"policy": policy}
        active = [g for g in status.get("gateways") or [] if g.get("role") == "active"]
        ready = any(c.get("type") == READY and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        samples += [
            Sample("gatewayd_policy_active_gateways", "Entries of the policy with an active "
                   "gateway (0: no usable gateway, its traffic is dropped).",
                   len(active), labels),
            Sample("gatewayd_policy_ready", "1 when the policy's Ready condition is True.",
                   float(ready), labels),
        ]
    return samples
