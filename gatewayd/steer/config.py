"""The steer agent's configuration on a cloud node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gatewayd.configfile import (
    ReconcileSettings,
    read_reconcile,
    read_snapshot_paths,
    parse_endpoint,
    parse_interface_name,
    parse_wireguard_key,
    read_config,
)

DEFAULT_PATH = Path("/etc/gatewayd/steer.yaml")
# fwmarks and routing tables are numbered from here, one per gateway, in config order.
FIRST_MARK = 0x6700
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
    address: str | None


@dataclass(frozen=True)
class SteerConfig:
    path: Path
    node: str
    snapshot: tuple[Path, ...]
    state_directory: Path
    private_key_file: Path
    mtu: int
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
    gateways = []
    for index, gw in enumerate(tunnel.sections("gateways")):
        name = gw.string("name")
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
                mark=gw.integer("mark", FIRST_MARK + index, 1, 2**32 - 1),
                table=gw.integer("table", FIRST_TABLE + index, 1, 2**31 - 1),
                address=gw.optional_string("address"),
            )
        )
        gw.finish()
    tunnel.finish()
    tunnel.check_unique("gateways", [g.name for g in gateways])
    tunnel.check_unique("gateways", [g.interface for g in gateways])
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
        gateways=tuple(gateways),
        reconcile=reconcile,
    )
