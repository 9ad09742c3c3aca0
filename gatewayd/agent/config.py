"""The gateway agent's configuration (`/etc/gatewayd/gatewayd.yaml`).

Two modes: standalone (`snapshot:`, the tunnel's peers in `tunnel.peers`) and Kubernetes
(`kubernetes:`; the peers and the plan come from the gateway's EgressGateway spec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gatewayd.clustersettings import KubernetesSettings, read_mode, reject_outside_kubernetes
from gatewayd.configfile import (
    DEFAULT_TUNNEL_ADDRESS,
    ReconcileSettings,
    Section,
    parse_endpoint,
    parse_interface_address,
    parse_interface_name,
    parse_object_name,
    parse_path,
    parse_peer_network,
    parse_pool,
    parse_wireguard_key,
    peer_network_conflicts,
    read_config,
    read_metrics,
    read_reconcile,
    read_snapshot_paths,
)
from gatewayd.metrics import MetricsSettings
from gatewayd.policy.model import EgressIPPool, IPNetwork
from gatewayd.probe import GATEWAY_TUNNEL_ADDRESS

DEFAULT_PATH = Path("/etc/gatewayd/gatewayd.yaml")
# In Kubernetes mode every gateway has this address on its tunnel: the probes' destination.
KUBERNETES_TUNNEL_ADDRESS = f"{GATEWAY_TUNNEL_ADDRESS}/32"


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
    peers: tuple[TunnelPeer, ...]  # standalone mode only
    advertise_endpoint: str | None = None  # Kubernetes mode: HOST:PORT the nodes dial


@dataclass(frozen=True)
class FailoverSettings:
    """The gateway's side of the fast failover path (Kubernetes mode; see gatewayd.probe)."""

    # A provisioned egress IP is given up when no cloud node's probe arrived for this long.
    # Keep it below the nodes' (misses + 1) x probe interval + arpProbeSeconds ((3 + 1) x 0.05
    # + 0.03 by default): then a gateway cut off from everything has given its addresses up
    # before the standby the nodes moved to can have taken them.
    egress_ip_hold_seconds: float = 0.2
    # How long an ARP probe asks the segment whether another host holds an address first (two
    # rounds; answers to the second count). 0.02 s was tried: a handover in the lab then had
    # both gateways hold the address for a moment (bench/README.md, stop 33).
    arp_probe_seconds: float = 0.03
    # On stop, how long the agent still answers the nodes' probes, saying it is leaving, so
    # the egress IPs of policies the nodes moved to a standby are given up for it to claim.
    handover_seconds: float = 1.0


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    name: str
    labels: dict[str, str]
    snapshot: tuple[Path, ...]  # standalone mode; empty in Kubernetes mode
    state_directory: Path
    uplink: str
    egress_ip_pools: tuple[EgressIPPool, ...]
    tunnel: GatewayTunnel
    reconcile: ReconcileSettings
    kubernetes: KubernetesSettings | None = None
    failover: FailoverSettings = FailoverSettings()
    metrics: MetricsSettings = field(default_factory=MetricsSettings)  # the flags win


def load_agent_config(path: Path = DEFAULT_PATH, top: Section | None = None) -> AgentConfig:
    """Read and validate the file (or `top`, the file already read, e.g. from standard input);
    raises ConfigError listing every problem with its line."""
    top = read_config(path) if top is None else top
    name = top.parsed("name", parse_object_name, "the name of an EgressGateway")
    labels = top.string_map("labels")
    kubernetes = read_mode(top, in_cluster_allowed=False)
    snapshot = read_snapshot_paths(top) if kubernetes is None else ()
    state_directory = top.parsed("stateDirectory", parse_path, "a path",
                                 Path("/var/lib/gatewayd"))
    uplink = top.parsed("uplink", parse_interface_name, "an interface name")
    pools = []
    for pool in top.sections("egressIPPools"):
        cidr = pool.parsed("cidr", parse_pool, "a CIDR without host bits")
        interface = pool.parsed("interface", parse_interface_name, "an interface name", uplink)
        pool.finish()
        if cidr is not None:
            pools.append(EgressIPPool(cidr=cidr, interface=interface))
    tunnel_section = top.section("tunnel", required=True)
    peers = []
    if kubernetes is not None and "peers" in tunnel_section.data:
        tunnel_section.error("peers", "not used in Kubernetes mode: the peers come from the "
                                      "EgressGateway's spec.peers (remove it)")
    for peer in tunnel_section.sections("peers"):
        peers.append(
            TunnelPeer(
                name=peer.string("name"),
                public_key=peer.parsed("publicKey", parse_wireguard_key, "a WireGuard public key"),
                allowed_ips=peer.parsed_list("allowedIPs", parse_peer_network, "a CIDR"),
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
        private_key_file=tunnel_section.parsed(
            "privateKeyFile", parse_path, "a path", state_directory / "wireguard.key"
        ),
        mtu=tunnel_section.integer("mtu", 1420, 1280, 9000),
        address=tunnel_section.parsed(
            "address", parse_interface_address, "ADDRESS/PREFIXLEN",
            DEFAULT_TUNNEL_ADDRESS if kubernetes is None else KUBERNETES_TUNNEL_ADDRESS,
        ),
        peers=tuple(peers),
        advertise_endpoint=tunnel_section.parsed(
            "advertiseEndpoint", parse_endpoint, "HOST:PORT", None
        ),
    )
    if kubernetes is None and tunnel.advertise_endpoint is not None:
        tunnel_section.error("advertiseEndpoint", "only used in Kubernetes mode")
    tunnel_section.finish()
    tunnel_section.check_unique("peers", [p.name for p in peers])
    tunnel_section.check_unique("peers", [f"publicKey {p.public_key}" for p in peers
                                          if p.public_key is not None])
    for conflict in peer_network_conflicts([(p.name, p.allowed_ips) for p in peers]):
        tunnel_section.error("peers", f"allowedIPs: {conflict}")
    reconcile = read_reconcile(top.section("reconcile"))
    failover = _read_failover(top.section("failover"), kubernetes is not None)
    metrics = read_metrics(top.section("metrics"))
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
        kubernetes=kubernetes,
        failover=failover,
        metrics=metrics,
    )


def _read_failover(section: Section, kubernetes_mode: bool) -> FailoverSettings:
    reject_outside_kubernetes(section, kubernetes_mode)
    settings = FailoverSettings(
        egress_ip_hold_seconds=section.number(
            "egressIPHoldSeconds", FailoverSettings.egress_ip_hold_seconds, 0.01, 60),
        arp_probe_seconds=section.number("arpProbeSeconds", FailoverSettings.arp_probe_seconds,
                                         0.01, 10),
        handover_seconds=section.number("handoverSeconds", FailoverSettings.handover_seconds,
                                        0.01, 60),
    )
    section.finish()
    return settings

