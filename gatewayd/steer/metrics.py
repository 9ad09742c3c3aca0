"""The node's state for `/metrics`: its tunnel to each gateway, probes, fast failovers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gatewayd.metrics import Sample
from gatewayd.probe import Failover


def gateway_samples(reachable: Mapping[str, bool | None],
                    failovers: Iterable[Failover]) -> list[Sample]:
    """Each probed gateway's health as the fast failover judges it (unknown ones left out),
    and the fast failovers in force, by policy and the gateway it left."""
    samples = [
        Sample("gatewayd_gateway_up", "1 when probes through the tunnel reach the gateway.",
               float(up), {"gateway": gateway})
        for gateway, up in sorted(reachable.items()) if up is not None
    ]
    samples += [
        Sample("gatewayd_failover_active", "1 while this node steers the policy's traffic to "
               "the standby because the gateway does not answer.", 1.0,
               {"policy": f.policy, "gateway": f.gateway})
        for f in sorted(failovers, key=lambda f: (f.policy, f.gateway))
    ]
    return samples
