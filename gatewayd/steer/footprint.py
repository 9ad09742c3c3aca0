"""What steer programmed on its node (`gatewayd.footprint.Footprint`): the steering table, the
policy routing rules and routes, and one tunnel per gateway slot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd.dataplane.nft_render import FAMILY, STEER_TABLE
from gatewayd.steer.config import SteerConfig
from gatewayd.steer.slots import slots_path, tunnel_interfaces


@dataclass(frozen=True)
class NodeFootprint:
    config: SteerConfig
    role = "steer"
    kind = "steer"
    table = (FAMILY, STEER_TABLE)

    @property
    def state_directory(self) -> Path:
        return self.config.state_directory

    def tunnel_interfaces(self) -> list[str]:
        return tunnel_interfaces(self.config)

    def observe(self) -> dict[str, Any]:
        return {}

    def teardown(self) -> list[str]:
        """The table first, then the routing and the tunnels; the slots go too, as no tunnel
        is left to keep its slot for."""
        from gatewayd.dataplane.nftables import NftablesDriver
        from gatewayd.dataplane.routing import PolicyRoutingDriver
        from gatewayd.dataplane.wireguard import WireGuardDriver

        removed = []
        if NftablesDriver(*self.table).delete():
            removed.append(f"nftables table {' '.join(self.table)}")
        if PolicyRoutingDriver(mark_mask=self.config.mark_mask).ensure({}):
            removed.append("policy routing rules")
        wireguard = WireGuardDriver()
        for interface in self.tunnel_interfaces():
            if wireguard.delete(interface):
                removed.append(f"wireguard interface {interface}")
        for path in (self.state_directory / "plan.json", slots_path(self.config)):
            if path.exists():
                path.unlink()
                removed.append(str(path))
        return removed
