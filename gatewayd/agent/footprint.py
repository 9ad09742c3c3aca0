"""What the agent programmed on this host (`GatewayFootprint`), recorded in its state directory,
so that teardown (`gatewayctl teardown`, removing the package) removes it without the config,
which may be invalid or gone by then.

- `programmed.json`: the tunnel interfaces the agent created (every one, until teardown);
- `sysctl-originals.json`: the kernel parameters the agent changed and their values before
  (written by `dataplane.sysctl.ensure_sysctls`);
- the nftables table and the egress IPs need no record: the table's name is fixed, and the
  egress IPs carry the agent's owner mark (`dataplane.netlink.OWNER_PROTOCOL`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd.agent.config import AgentConfig
from gatewayd.dataplane.nft_render import FAMILY, GATEWAY_TABLE
from gatewayd.runtime import write_json_atomic

PROGRAMMED_FILE = "programmed.json"
SYSCTL_ORIGINALS_FILE = "sysctl-originals.json"


def programmed_path(state_directory: Path) -> Path:
    return state_directory / PROGRAMMED_FILE


def sysctl_originals_path(state_directory: Path) -> Path:
    return state_directory / SYSCTL_ORIGINALS_FILE


def recorded_tunnels(state_directory: Path) -> tuple[str, ...]:
    """The tunnel interfaces recorded so far; none when the record is missing or damaged."""
    try:
        data = json.loads(programmed_path(state_directory).read_text())
    except (OSError, ValueError):
        return ()
    tunnels = data.get("tunnels") if isinstance(data, dict) else None
    if not isinstance(tunnels, list):
        return ()
    return tuple(sorted({name for name in tunnels if isinstance(name, str)}))


def record_tunnel(state_directory: Path, interface: str) -> None:
    """Add `interface` to the record (before it is created: a crash in between still leaves
    it known). Raises OSError when the record cannot be written."""
    tunnels = recorded_tunnels(state_directory)
    if interface in tunnels:
        return
    write_json_atomic(programmed_path(state_directory),
                      {"tunnels": sorted({*tunnels, interface})}, mode=0o600)


@dataclass(frozen=True)
class GatewayFootprint:
    """The agent's footprint (`gatewayd.footprint.Footprint`). Without a config (it may be
    invalid at package removal) the state directory's records say what to remove."""

    state_directory: Path
    tunnel: str | None = None  # the config's tunnel interface
    egress_interfaces: tuple[str, ...] = ()  # the uplink and the pools' interfaces
    role = "agent"
    kind = "gateway"
    table = (FAMILY, GATEWAY_TABLE)

    @classmethod
    def of(cls, config: AgentConfig) -> GatewayFootprint:
        interfaces = {config.uplink, *(p.interface for p in config.egress_ip_pools)}
        return cls(config.state_directory, config.tunnel.interface, tuple(sorted(interfaces)))

    def tunnel_interfaces(self) -> list[str]:
        return sorted({*recorded_tunnels(self.state_directory),
                       *([self.tunnel] if self.tunnel else [])})

    def observe(self) -> dict[str, Any]:
        """The addresses on the egress interfaces, provisioned or not: an egress IP taken
        from an interface (`interface`, or the other family of an `egressIP`) is the
        interface's own address."""
        from gatewayd.dataplane.addresses import held_addresses

        present = held_addresses(self.egress_interfaces)
        return {"egressIPsPresent": sorted(str(ip) for ip in present)}

    def teardown(self) -> list[str]:
        """First the tunnels, so that no more traffic arrives, then the table (filter and
        SNAT) and its routing guard, the egress IPs, and the kernel parameters go back to
        their values before the agent changed them. Then the saved plan and the records go,
        so a later start does not restore the plan."""
        from gatewayd.dataplane.addresses import AddressDriver
        from gatewayd.dataplane.forward_guard import remove_forward_guard
        from gatewayd.dataplane.nftables import NftablesDriver
        from gatewayd.dataplane.sysctl import restore_sysctls
        from gatewayd.dataplane.wireguard import WireGuardDriver

        removed = []
        wireguard = WireGuardDriver()
        for interface in self.tunnel_interfaces():
            if wireguard.delete(interface):
                removed.append(f"wireguard interface {interface}")
        if NftablesDriver(*self.table).delete():
            removed.append(f"nftables table {' '.join(self.table)}")
        removed += [f"routing guard {rule}" for rule in remove_forward_guard()]
        changes = AddressDriver().remove_all()
        removed += [f"egress IP {ip}" for ip in sorted(map(str, changes.removed))]
        removed += [f"sysctl {key} (restored)"
                    for key in restore_sysctls(sysctl_originals_path(self.state_directory))]
        for path in (self.state_directory / "plan.json", programmed_path(self.state_directory)):
            if path.exists():
                path.unlink()
                removed.append(str(path))
        return removed
