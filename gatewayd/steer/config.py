"""The steer agent's configuration on a cloud node.

Two modes: standalone (`snapshot:`, the gateways in `tunnel.gateways`) and Kubernetes
(`kubernetes:`; the gateways and the plan come from the node's EgressNode spec, and each
gateway gets a slot: its fwmark, routing table, interface and listen port, see `slots.py`).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from gatewayd.clustersettings import (
    DEFAULT_NAMESPACE,
    KubernetesSettings,
    read_mode,
    reject_outside_kubernetes,
)
from gatewayd.configfile import (
    DEFAULT_TUNNEL_ADDRESS,
    ConfigError,
    ReconcileSettings,
    Section,
    parse_endpoint,
    parse_interface_address,
    parse_interface_name,
    parse_object_name,
    parse_path,
    parse_wireguard_key,
    read_config,
    read_metrics,
    read_reconcile,
    read_snapshot_paths,
)
from gatewayd.metrics import MetricsSettings

DEFAULT_PATH = Path("/etc/gatewayd/steer.yaml")
# One fwmark per gateway inside MARK_MASK, and one routing table. The default mask keeps
# clear of the marks others use on nodes: kube-proxy 0x4000/0x8000, Calico 0xffff0000,
# Cilium 0x0f00 (and its identity bits in the upper half), Weave 0x60000.
MARK_MASK = 0x000000F0
FIRST_TABLE = 26700
DEFAULT_INTERFACE_PREFIX = "egw-"
DEFAULT_LISTEN_PORT = 51821
NODE_NAME_ENV = "GATEWAYD_NODE_NAME"
DEFAULT_HEALTH_PORT = 9441  # the DaemonSet's probes
# The DaemonSet mounts the node's /proc/sys/net here: a container's own /proc/sys is read-only.
HOST_PROC_SYS = Path("/host/proc/sys")


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
class FailoverSettings:
    """The node's side of the fast failover path (Kubernetes mode; see gatewayd.probe)."""

    probe_interval_seconds: float = 0.05
    misses: int = 3  # unanswered probes in a row before a gateway counts as down
    recoveries: int = 3  # answered probes in a row before a down gateway counts as up
    # After a failover, the standby gets this long to serve the policy (claim its egress IP)
    # before a recovered gateway may take the traffic back.
    claim_grace_seconds: float = 2.0


@dataclass(frozen=True)
class SteerConfig:
    path: Path
    node: str
    snapshot: tuple[Path, ...]  # standalone mode; empty in Kubernetes mode
    state_directory: Path
    private_key_file: Path
    mtu: int
    mark_mask: int
    gateways: tuple[GatewayTunnelEnd, ...]  # standalone mode; from the plan in Kubernetes mode
    reconcile: ReconcileSettings
    kubernetes: KubernetesSettings | None = None
    interface_prefix: str = DEFAULT_INTERFACE_PREFIX
    listen_port: int = DEFAULT_LISTEN_PORT  # the first gateway slot's; slot i uses + i
    advertise_address: str | None = None  # where gateways reach this node (default: see status)
    persistent_keepalive: int = 25
    failover: FailoverSettings = FailoverSettings()
    proc_sys: Path = Path("/proc/sys")  # where net.* sysctls are written
    health_port: int = 0  # /healthz and /readyz over HTTP on the node; 0: none
    metrics: MetricsSettings = field(default_factory=MetricsSettings)  # the flags win


def load_steer_config(path: Path = DEFAULT_PATH, top: Section | None = None) -> SteerConfig:
    """Read and validate the file (or `top`, the file already read, e.g. from standard input);
    raises ConfigError listing every problem with its line.

    In a pod (the DaemonSet) without a config file at the default path, steer runs in
    Kubernetes mode with every default: the pod's service account, the node from
    $GATEWAYD_NODE_NAME, sysctls under /host/proc/sys when the node's are mounted there.
    """
    if top is None:
        if path == DEFAULT_PATH and not path.exists() and os.environ.get(
            "KUBERNETES_SERVICE_HOST"
        ):
            return in_cluster_defaults(path)
        top = read_config(path)
    kubernetes = read_mode(top, in_cluster_allowed=True)
    if kubernetes is not None and "node" not in top.data and os.environ.get(NODE_NAME_ENV):
        node = os.environ[NODE_NAME_ENV]
    else:
        node = top.parsed("node", parse_object_name, "the name of a Node")
    snapshot = read_snapshot_paths(top) if kubernetes is None else ()
    state_directory = top.parsed("stateDirectory", parse_path, "a path",
                                 Path("/var/lib/gatewayd-steer"))
    tunnel = top.section("tunnel", required=kubernetes is None)
    private_key_file = tunnel.parsed("privateKeyFile", parse_path, "a path",
                                     state_directory / "wireguard.key")
    mtu = tunnel.integer("mtu", 1420, 1280, 9000)
    mark_mask = tunnel.integer("markMask", MARK_MASK, 1, 2**32 - 1)
    lowest_bit = (mark_mask & -mark_mask) if mark_mask else 1
    gateways = []
    if kubernetes is not None and "gateways" in tunnel.data:
        tunnel.error("gateways", "not used in Kubernetes mode: the gateways come from the "
                                 "EgressNode's spec.gateways (remove it)")
    for index, gw in enumerate(tunnel.sections("gateways")):
        name = gw.parsed("name", parse_object_name, "the name of an EgressGateway")
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
    kubernetes_only = {"interfacePrefix", "listenPort", "advertiseAddress"}
    if kubernetes is None:
        for key in sorted(kubernetes_only & set(tunnel.data)):
            tunnel.error(key, "only used in Kubernetes mode (in standalone mode each gateway "
                              "names its own)")
    prefix = tunnel.parsed("interfacePrefix", _parse_prefix, "1 to 8 characters of an "
                           "interface name", DEFAULT_INTERFACE_PREFIX)
    listen_port = tunnel.integer("listenPort", DEFAULT_LISTEN_PORT, 1, 65535 - 64)
    advertise_address = tunnel.parsed("advertiseAddress", _parse_host, "an IP address", None)
    keepalive = tunnel.integer("persistentKeepalive", 25, 0, 65535)
    tunnel.finish()
    tunnel.check_unique("gateways", [g.name for g in gateways])
    tunnel.check_unique("gateways", [g.interface for g in gateways])
    tunnel.check_unique("gateways", [f"mark {g.mark:#x}" for g in gateways])
    tunnel.check_unique("gateways", [f"publicKey {g.public_key}" for g in gateways
                                     if g.public_key is not None])
    reconcile = read_reconcile(top.section("reconcile"))
    failover = _read_failover(top.section("failover"), kubernetes is not None)
    proc_sys = top.parsed("procSys", parse_path, "a path", Path("/proc/sys"))
    health_port = top.integer("healthPort", DEFAULT_HEALTH_PORT if kubernetes else 0, 0, 65535)
    metrics = read_metrics(top.section("metrics"))
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
        kubernetes=kubernetes,
        proc_sys=proc_sys,
        health_port=health_port,
        interface_prefix=prefix,
        listen_port=listen_port,
        advertise_address=advertise_address,
        persistent_keepalive=keepalive,
        failover=failover,
        metrics=metrics,
    )


def in_cluster_defaults(path: Path) -> SteerConfig:
    node = os.environ.get(NODE_NAME_ENV)
    if not node:
        raise ConfigError([f"{path}: no config file, and ${NODE_NAME_ENV} is not set: cannot "
                           "tell which node this is"])
    state_directory = Path("/var/lib/gatewayd-steer")
    return SteerConfig(
        path=path, node=node, snapshot=(), state_directory=state_directory,
        private_key_file=state_directory / "wireguard.key", mtu=1420, mark_mask=MARK_MASK,
        gateways=(), reconcile=ReconcileSettings(), kubernetes=KubernetesSettings(
            namespace=os.environ.get("GATEWAYD_NAMESPACE", DEFAULT_NAMESPACE)),
        proc_sys=HOST_PROC_SYS if (HOST_PROC_SYS / "net").is_dir() else Path("/proc/sys"),
        health_port=DEFAULT_HEALTH_PORT,
    )


def _read_failover(section: Section, kubernetes_mode: bool) -> FailoverSettings:
    reject_outside_kubernetes(section, kubernetes_mode)
    defaults = FailoverSettings()
    settings = FailoverSettings(
        probe_interval_seconds=section.number("probeIntervalSeconds",
                                              defaults.probe_interval_seconds, 0.01, 10),
        misses=section.integer("missesBeforeDown", defaults.misses, 1, 100),
        recoveries=section.integer("answersBeforeUp", defaults.recoveries, 1, 100),
        claim_grace_seconds=section.number("claimGraceSeconds", defaults.claim_grace_seconds,
                                           0.01, 600),
    )
    section.finish()
    return settings


def _parse_prefix(text: str) -> str:
    parse_interface_name(text)
    if len(text) > 8:
        raise ValueError("at most 8 characters, so that a gateway's name fits after it")
    return text


def _parse_host(text: str) -> str:
    return str(ipaddress.ip_address(text))
