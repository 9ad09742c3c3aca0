"""The steer agent's configuration on a cloud node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gatewayd.configfile import (
    DEFAULT_TUNNEL_ADDRESS,
    ReconcileSettings,
    parse_endpoint,
    parse_interface_address,
    parse_interface_name,
    parse_wireguard_key,
    read_config,
    read_reconcile,
    read_snapshot_paths,
)

DEFAULT_PATH = Path("/etc/gatewayd/steer.yaml")
# One fwmark per gateway inside MARK_MASK, and one routing table. The default mask keeps
# clear of the marks others use on nodes: kube-proxy 0x4000/0x8000, Calico 0xffff0000,
# Cilium 0x0f00 (and its identity bits in the upper half), Weave 0x60000.
MARK_MASK = 0x000000F0
FIRST_TABLE = 26700


@dataclass(frozen=True)
class GatewayTunnelEnd:
    """This node's tunnel to one gateway: its own WireGuard interface, mark and table."""

    name: str
    interface: str
    listen_port: int
    public_key: str
    endpoint: str | None
    persistent_keepalive: int | None
    mark: int
    table: int
    address: str


@dataclass(frozen=True)
class SteerConfig:
    path: Path
    node: str
    snapshot: tuple[Path, ...]
    state_directory: Path
    private_key_file: Path
    mtu: int
    mark_mask: int
    gateways: tuple[GatewayTunnelEnd, ...]
    reconcile: ReconcileSettings


def load_steer_config(path: Path = DEFAULT_PATH) -> SteerConfig:
    top = read_config(path)
    node = top.string("node")
    snapshot = read_snapshot_paths(top)
    state_directory = Path(top.string("stateDirectory", "/var/lib/gatewayd-steer"))
    tunnel = top.section("tunnel", required=True)
    private_key_file = Path(
        tunnel.string("privateKeyFile", str(state_directory / "wireguard.key"))
    )
    mtu = tunnel.integer("mtu", 1420, 1280, 9000)
    mark_mask = tunnel.integer("markMask", MARK_MASK, 1, 2**32 - 1)
    lowest_bit = (mark_mask & -mark_mask) if mark_mask else 1
    gateways = []
    for index, gw in enumerate(tunnel.sections("gateways")):
        name = gw.string("name")
        mark = gw.integer("mark", (index + 1) * lowest_bit, 1, 2**32 - 1)
        if isinstance(mark, int) and isinstance(mark_mask, int) and (
            mark & ~mark_mask or not mark & mark_mask
        ):
            gw.error("mark", f"{mark:#x} must be a non-zero value inside markMask {mark_mask:#x}"
                     " (too many gateways for the mask? set markMask or each mark)")
        gateways.append(
            GatewayTunnelEnd(
                name=name,
                interface=gw.parsed(
                    "interface", parse_interface_name, "an interface name", f"egw-{name}"[:15]
                ),
                listen_port=gw.integer("listenPort", 51821 + index, 1, 65535),
                public_key=gw.parsed("publicKey", parse_wireguard_key, "a WireGuard public key"),
                endpoint=gw.parsed("endpoint", parse_endpoint, "HOST:PORT", None),
                persistent_keepalive=gw.integer("persistentKeepalive", 25, 0, 65535) or None,
                mark=mark,
                table=gw.integer("table", FIRST_TABLE + index, 1, 2**31 - 1),
                address=gw.parsed("address", parse_interface_address, "ADDRESS/PREFIXLEN",
                                  DEFAULT_TUNNEL_ADDRESS),
            )
        )
        gw.finish()
    tunnel.finish()
    tunnel.check_unique("gateways", [g.name for g in gateways])
    tunnel.check_unique("gateways", [g.interface for g in gateways])
    tunnel.check_unique("gateways", [f"mark {g.mark:#x}" for g in gateways])
    reconcile = read_reconcile(top.section("reconcile"))
    top.finish()
    top.raise_if_problems()
    return SteerConfig(
        path=path,
        node=node,
        snapshot=snapshot,
        state_directory=state_directory,
        private_key_file=private_key_file,
        mtu=mtu,
        mark_mask=mark_mask,
        gateways=tuple(gateways),
        reconcile=reconcile,
    )
