"""The gateway agent's configuration (`/etc/gatewayd/gatewayd.yaml`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gatewayd.configfile import (
    DEFAULT_TUNNEL_ADDRESS,
    ReconcileSettings,
    parse_endpoint,
    parse_interface_address,
    parse_interface_name,
    parse_network,
    parse_wireguard_key,
    read_config,
    read_reconcile,
    read_snapshot_paths,
)
from gatewayd.policy.model import EgressIPPool, IPNetwork

DEFAULT_PATH = Path("/etc/gatewayd/gatewayd.yaml")


@dataclass(frozen=True)
class TunnelPeer:
    name: str
    public_key: str
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: str | None = None
    persistent_keepalive: int | None = None


@dataclass(frozen=True)
class GatewayTunnel:
    interface: str
    listen_port: int
    private_key_file: Path
    mtu: int
    address: str
    peers: tuple[TunnelPeer, ...]


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    name: str
    labels: dict[str, str]
    snapshot: tuple[Path, ...]
    state_directory: Path
    uplink: str
    egress_ip_pools: tuple[EgressIPPool, ...]
    tunnel: GatewayTunnel
    reconcile: ReconcileSettings


def load_agent_config(path: Path = DEFAULT_PATH) -> AgentConfig:
    """Read and validate the file; raises ConfigError listing every problem with its line."""
    top = read_config(path)
    name = top.string("name")
    labels = top.string_map("labels")
    snapshot = read_snapshot_paths(top)
    state_directory = Path(top.string("stateDirectory", "/var/lib/gatewayd"))
    uplink = top.parsed("uplink", parse_interface_name, "an interface name")
    pools = []
    for pool in top.sections("egressIPPools"):
        cidr = pool.parsed("cidr", parse_network, "a CIDR without host bits")
        interface = pool.parsed("interface", parse_interface_name, "an interface name", uplink)
        pool.finish()
        if cidr is not None:
            pools.append(EgressIPPool(cidr=cidr, interface=interface))
    tunnel_section = top.section("tunnel", required=True)
    peers = []
    for peer in tunnel_section.sections("peers"):
        peers.append(
            TunnelPeer(
                name=peer.string("name"),
                public_key=peer.parsed("publicKey", parse_wireguard_key, "a WireGuard public key"),
                allowed_ips=peer.parsed_list("allowedIPs", parse_network, "a CIDR"),
                endpoint=peer.parsed("endpoint", parse_endpoint, "HOST:PORT", None),
                persistent_keepalive=peer.integer("persistentKeepalive", 25, 0, 65535) or None,
            )
        )
        peer.finish()
    tunnel = GatewayTunnel(
        interface=tunnel_section.parsed(
            "interface", parse_interface_name, "an interface name", "egress0"
        ),
        listen_port=tunnel_section.integer("listenPort", 51820, 1, 65535),
        private_key_file=Path(
            tunnel_section.string("privateKeyFile", str(state_directory / "wireguard.key"))
        ),
        mtu=tunnel_section.integer("mtu", 1420, 1280, 9000),
        address=tunnel_section.parsed("address", parse_interface_address, "ADDRESS/PREFIXLEN",
                                      DEFAULT_TUNNEL_ADDRESS),
        peers=tuple(peers),
    )
    tunnel_section.finish()
    tunnel_section.check_unique("peers", [p.name for p in peers])
    reconcile = read_reconcile(top.section("reconcile"))
    top.finish()
    top.raise_if_problems()
    return AgentConfig(
        path=path,
        name=name,
        labels=labels,
        snapshot=snapshot,
        state_directory=state_directory,
        uplink=uplink,
        egress_ip_pools=tuple(pools),
        tunnel=tunnel,
        reconcile=reconcile,
    )

