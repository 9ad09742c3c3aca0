"""The lab in Kubernetes mode: the same namespaces, hosts and pods as the standalone lab, but
the daemons follow the API instead of snapshot files.

    api (198.51.100.6): the API server (a test double), the controller
    gw1, gw2:           `gatewayd agent` in Kubernetes mode
    node1, node2:       `gatewayd steer` in Kubernetes mode

The API server is an object the caller provides (the in-repo fake, `FakeApiServer`),
served from the caller's process: its listening socket is opened inside the `api` host's
namespace, on its loopback, and the lab DNATs 198.51.100.6:6443 there. Nothing listens
outside the lab's namespaces, and the caller keeps direct control of the server (it can take
it down for an outage test). The lab writes what kubelets and the scheduler would (Namespaces,
Nodes, Pods, the `kubernetes` EndpointSlice, from the lab's example snapshot); agents and
steer create their EgressGateway and EgressNode; the controller (`gatewayd controller`, a
process in the `api` host) plans. Policies are created through the API, as `kubectl` would.

Only tests and benchmarks build it (the fake API server is testkit/fakecluster, not shipped).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import yaml
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.config import new_client_from_config_dict
from pyroute2 import IPRoute
from pyroute2.netlink import NETLINK_ROUTE
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP

from gatewayd.dataplane.addresses import AddressDriver
from gatewayd.lab.holder import read_held
from gatewayd.lab.image import ImageRoot
from gatewayd.lab.netns import entered, run, start_process, stop_process, wait_for
from gatewayd.lab.topology import (
    API_SERVER,
    EXAMPLE_SNAPSHOT,
    GATEWAY_LISTEN_PORT,
    GATEWAYS,
    KEEPALIVE_SECONDS,
    NODES,
    ONPREM_ROUTER,
    ONPREM_ROUTER6,
    POLL_SECONDS,
    REPAIR_SECONDS,
    WIREGUARD_MTU,
    CloudNode,
    GatewayHost,
    Lab,
    LabError,
    egress_ip_pools,
    lab_up,
)

API_PORT = 6443
NAMESPACE = "gatewayd-system"
GROUP, VERSION = "egress.gatewayd.io", "v1alpha1"
CLUSTER_FILES = ("00-cluster.yaml", "10-pods.yaml")  # what kubelets and the scheduler write
API_NAT_TABLE = "gwdlab-api"

# The controller's /healthz, /readyz and /metrics, in the api host's namespace.
CONTROLLER_HEALTH_PORT = 18081


class ApiServer(Protocol):
    """What the lab needs of the API server it is given (the tests' FakeApiServer has it)."""

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def go_down(self) -> None: ...

    def come_up(self) -> None: ...

    def kubeconfig_dict(self) -> dict[str, Any]: ...

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    def get(self, resource: str, name: str, namespace: str | None = None) -> Any: ...

    def list(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]: ...


class Identities(Protocol):
    """Who each daemon is, on an API server that authenticates and authorizes (the tests'
    fake with testkit/fakecluster/fakeauth.py): the cluster's RBAC and admission objects, and a
    token per daemon, as a real cluster hands them out."""

    def install(self, gateways: Iterable[str]) -> None:
        """Apply packaging/kubernetes and each gateway's credentials (the admin's job)."""

    def token(self, role: str, name: str) -> str:
        """A token for `role` ("controller", "agent" or "steer") on host `name`: the gateway's
        service account token, the steer pod's projected token with its node's claim."""


class KubeLab(Lab):
    """A lab whose daemons run in Kubernetes mode against `api`; with `image`, the cluster
    side (controller and steer) runs from the container image's root file system."""

    def __init__(self, directory: Path, api: ApiServer, timing: Mapping[str, float],
                 identities: Identities | None = None, image: ImageRoot | None = None) -> None:
        super().__init__(directory)
        self.api = api
        self.timing = dict(timing)
        self.identities = identities
        self.image = image
        self._controller: subprocess.Popen[bytes] | None = None

    # --- the API server ---------------------------------------------------------------------

    @property
    def api_port(self) -> int:
        port = urlsplit(self.api.url).port
        if port is None:
            raise LabError(f"API server URL {self.api.url} has no port")
        return port

    def kubeconfig_path(self, inside: bool) -> Path:
        """The kubeconfig for the lab's hosts (198.51.100.6:6443), or for processes inside
        the `api` host (its loopback, where the server listens)."""
        return self.directory / ("kubeconfig-local" if inside else "kubeconfig")

    def daemon_kubeconfig(self, host: str) -> Path:
        """The kubeconfig a daemon uses: its own identity's, or the shared admin one when the
        lab has no identities."""
        if self.identities is None:
            return self.kubeconfig_path(inside=host == "controller")
        return self.directory / f"kubeconfig-{host}"

    def api_down(self) -> None:
        self.api.go_down()

    def api_up(self) -> None:
        with entered(API_SERVER.netns):  # the listening socket belongs to that namespace
            self.api.come_up()

    @contextlib.contextmanager
    def client(self) -> Iterator[ApiClient]:
        """A Kubernetes client of the test's own, as `kubectl` on an admin's machine; use it
        only inside the block (its connections are opened in the `api` host's namespace)."""
        with entered(API_SERVER.netns):
            client: ApiClient = new_client_from_config_dict(  # type: ignore[no-untyped-call]
                self.api.kubeconfig_dict(), persist_config=False
            )
            try:
                yield client
            finally:
                client.close()  # type: ignore[no-untyped-call]

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST a cluster-scoped object of ours (a policy), as `kubectl create` would."""
        plural = {"EgressGatewayPolicy": "egressgatewaypolicies"}[obj["kind"]]
        with self.client() as client:
            created = CustomObjectsApi(client).create_cluster_custom_object(
                GROUP, VERSION, plural, dict(obj)
            )
        if not isinstance(created, dict):
            raise LabError(f"the API answered {created!r}")
        return created

    def object(self, plural: str, name: str) -> dict[str, Any]:
        found = self.api.get(plural, name)
        return found if isinstance(found, dict) else {}

    # --- the controller ---------------------------------------------------------------------

    def start_controller(self) -> None:
        if self._controller is not None and self._controller.poll() is None:
            raise LabError("the controller is already running")
        kubeconfig = self.daemon_kubeconfig("controller")
        if self.image is not None:  # the image's user reads it, as a pod reads its token
            given = self.directory / "controller-image" / kubeconfig.name
            given.parent.mkdir(exist_ok=True)
            shutil.copyfile(kubeconfig, given)
            uid, gid = (int(part) for part in self.image.user.split(":"))
            os.chown(given, uid, gid)
            given.chmod(0o600)
            kubeconfig = given
        args = ["controller", "--kubeconfig", str(kubeconfig), "--namespace", NAMESPACE,
                "--hold-down", str(self.timing["hold_down"]),
                "--health-port", str(CONTROLLER_HEALTH_PORT)]
        if self.image is None:
            argv = [sys.executable, "-m", "gatewayd.cli.gatewayd", *args]
        else:
            argv = self.image.argv(args, binds=[kubeconfig.parent])
        self._controller = start_process(API_SERVER.netns, argv,
                                         self.directory / "controller.log",
                                         {"PYTHONUNBUFFERED": "1"})

    def daemon_argv(self, host: str) -> list[str]:
        if self.image is None or host not in {n.name for n in NODES}:
            return super().daemon_argv(host)
        # steer's DaemonSet runs it as root; its config and state are the lab's files
        return self.image.argv(["steer", "--config", str(self.config_path(host))],
                               binds=[self.directory], user="0:0")

    @property
    def controller_pid(self) -> int | None:
        if self._controller is None or self._controller.poll() is not None:
            return None
        return self._controller.pid

    def stop_controller(self) -> None:
        if self._controller is not None:
            stop_process(self._controller)
            self._controller = None

    def wait_joined(self, timeout: float) -> None:
        """Wait until every node has its tunnel address and both gateways in its spec, has
        applied it, and its probes reach both gateways."""
        try:
            wait_for(lambda: _joined(self), timeout, "the nodes to reach both gateways", 0.2)
        except TimeoutError:
            state = {n.name: self.object("egressnodes", n.name) for n in NODES}
            raise LabError("not joined: " + json.dumps(state)[:4000]) from None

    # --- gateways going away and coming back ---------------------------------------------------

    def cut(self, gateway: GatewayHost, power_loss: bool = False) -> float:
        """Cut the gateway off its network (eth0 and its tunnel down); with `power_loss`, its
        agent and wireguard-go are killed too. Returns the time (time.time()) by which eth0
        was down: nothing the gateway sends after it leaves the host."""
        run(["ip", "link", "set", "eth0", "down"], gateway.netns)
        cut_at = time.time()
        run(["ip", "link", "set", gateway.tunnel_interface, "down"], gateway.netns)
        if power_loss:
            self.stop_daemon(gateway.name, signal.SIGKILL)
            run(["pkill", "-KILL", "-x", "-f", f"wireguard-go {gateway.tunnel_interface}"],
                check=False)
        return cut_at

    def restore(self, gateway: GatewayHost) -> None:
        """Bring a cut gateway back. After a power loss this is a boot: a namespace keeps its
        kernel state, so the addresses the agent had added (its egress IPs) and the connection
        tracking table go first, as a rebooted host has neither, and the agent starts before
        the uplink comes up, as services start before the network is reachable."""
        if self.daemon_pid(gateway.name) is None:
            with entered(gateway.netns):
                AddressDriver().remove_all()
            run(["conntrack", "-F"], gateway.netns, check=False)
            started = time.time()
            self.start_daemon(gateway.name)
            self.wait_ready([gateway.name], since=started)
        else:
            run(["ip", "link", "set", gateway.tunnel_interface, "up"], gateway.netns)
        run(["ip", "link", "set", "eth0", "up"], gateway.netns)
        for router in (ONPREM_ROUTER, ONPREM_ROUTER6):  # a link that went down lost them
            run(["ip", "route", "replace", "default", "via", router], gateway.netns)

    # --- removing ---------------------------------------------------------------------------

    def down(self, *, remove_directory: bool = True) -> list[str]:
        self.stop_controller()
        with contextlib.suppress(Exception):
            self.api.stop()
        return super().down(remove_directory=remove_directory)


# --- watching traffic and egress IPs --------------------------------------------------------------


@contextlib.contextmanager
def pinging(netns: str, target: str, out: Path, interval: float = 0.02,
            timeout: float = 0.9) -> Iterator[Path]:
    """The probing client (`gatewayd.lab.pinger`) in `netns` for the block; its outcomes are
    in `out` (JSON lines). The timeout stays under TCP's first SYN retransmission (1 s), so a
    lost SYN is a failed request, while a busy host's scheduling delays are not."""
    argv = [sys.executable, "-m", "gatewayd.lab.pinger", "--target", target,
            "--interval", str(interval), "--timeout", str(timeout), "--out", str(out)]
    proc = start_process(netns, argv, out.with_suffix(".log"))
    try:
        wait_for(lambda: out.exists() and out.stat().st_size > 0, 10, f"pinger in {netns}")
        yield out
    finally:
        stop_process(proc)


@contextlib.contextmanager
def holding(netns: str, target: str, out: Path, connections: int = 20,
            interval: float = 0.05, download: str | None = None) -> Iterator[Path]:
    """Long-lived connections (`gatewayd.lab.holder`) from `netns` for the block, each
    echoing a line every `interval`, and with `download` (an echo host's HOST:PORT) an HTTP
    download beside them; their records are in `out` (`read_held`). Waits until every
    connection got its first echo (the download its first chunk)."""
    argv = [sys.executable, "-m", "gatewayd.lab.holder", "--target", target,
            "--connections", str(connections), "--interval", str(interval), "--out", str(out),
            *(["--download", download] if download else [])]
    total = connections + (1 if download else 0)
    proc = start_process(netns, argv, out.with_suffix(".log"))
    try:
        wait_for(lambda: len(held := read_held(out)) == total
                 and all(h.echoes > 0 or h.error for h in held), 20,
                 f"{total} connections from {netns} to echo")
        yield out
    finally:
        stop_process(proc)


class EgressIPWatch:
    """Checks, whenever a gateway's links or addresses change (its netlink events), which
    gateways hold each of `addresses` on an uplink that is up (so the segment can hear them
    answer for it). `overlaps` are the checks that found two gateways at once: what must never
    happen. An overlap is caught if it lasts longer than one check (about a millisecond), where
    sampling every 10 ms missed shorter ones and took a sixth of a core of the lab's two from
    the daemons it measures. `checks` counts them."""

    def __init__(self, addresses: Iterable[str], netns: Mapping[str, str] | None = None) -> None:
        """`netns`: each gateway's network namespace, by name (default: the lab's)."""
        self.addresses = frozenset(addresses)
        self.overlaps: list[tuple[float, str, tuple[str, ...]]] = []
        self.checks = 0
        self._stop = threading.Event()
        self._sockets: dict[str, tuple[IPRoute, int]] = {}  # with the uplink's index
        self._events: list[socket.socket] = []
        for name, namespace in (netns or {g.name: g.netns for g in GATEWAYS}).items():
            # pyroute2 opens a socket for each thread that uses it, in the namespace that
            # thread is in unless it is named here: created in `entered`, it looked at the
            # host's links from the watch's thread, and never saw an egress IP at all.
            ipr = IPRoute(netns=namespace)
            with entered(namespace):  # a plain socket stays in its namespace
                events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                       NETLINK_ROUTE)
            events.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self._events.append(events)
            self._sockets[name] = (ipr, ipr.link_lookup(ifname="eth0")[0])
        self._thread = threading.Thread(target=self._run, name="egress-ip-watch", daemon=True)

    def __enter__(self) -> EgressIPWatch:
        self._check()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock, _ in self._sockets.values():
            sock.close()
        for events in self._events:
            events.close()

    def holders(self) -> dict[str, set[str]]:
        """address -> gateways holding it on an uplink that is up, now."""
        found: dict[str, set[str]] = {a: set() for a in self.addresses}
        for name, (ipr, uplink) in self._sockets.items():
            if not ipr.get_links(uplink)[0]["flags"] & IFF_UP:
                continue
            for msg in ipr.get_addr(index=uplink):
                address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
                if address in found:
                    found[address].add(name)
        return found

    def _check(self) -> None:
        for address, holders in self.holders().items():
            if len(holders) > 1:
                self.overlaps.append((time.time(), address, tuple(sorted(holders))))
        self.checks += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select(self._events, [], [], 0.1)
            for events in readable:
                _drain(events)
            if readable:
                self._check()


def _drain(sock: socket.socket) -> None:
    """Read what is queued: what changed is read from the kernel, not from the events."""
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:  # an overrun: the check follows all the same
                raise


# --- building ------------------------------------------------------------------------------------


DEFAULT_TIMING = {
    "lease_duration": 4.0,  # gateways' Lease
    "lease_renew": 1.0,
    "hold_down": 3.0,  # the controller's, for a recovered gateway
    # the fast path, at the product's defaults
    "probe_interval": 0.05,  # steer's probeIntervalSeconds
    "probe_misses": 3,  # steer's missesBeforeDown
    "egress_ip_hold": 0.2,  # the agents' egressIPHoldSeconds
    "arp_probe": 0.03,  # the agents' arpProbeSeconds
    "handover": 1.0,  # the agents' handoverSeconds (the product's default)
}


def kube_lab_up(
    directory: Path,
    api: ApiServer,
    *,
    controller: bool = True,
    timing: Mapping[str, float] | None = None,
    ready_timeout: float = 60,
    identities: Identities | None = None,
    image: ImageRoot | None = None,
) -> KubeLab:
    """Build the lab in `directory`, serve `api` from the `api` host, put the cluster's
    objects, start the controller and the daemons in Kubernetes mode; wait until the daemons
    are ready and every node has a tunnel address and its gateways. With `identities`, every
    daemon has its own (see `Identities`). A failure removes it."""
    lab = lab_up(directory, start_daemons=False)  # network, echo servers, keys
    kube = KubeLab(lab.directory, api, {**DEFAULT_TIMING, **(timing or {})}, identities,
                   image)
    kube._echo_servers = lab._echo_servers
    try:
        _serve_api(kube)
        _put_cluster(api)
        if identities is not None:
            _give_identities(kube, identities)
        _write_configs(kube)
        if controller:
            kube.start_controller()
        kube.start_daemons(ready_timeout)
        if controller:
            kube.wait_joined(ready_timeout)
    except BaseException:
        kube.down(remove_directory=False)
        raise
    return kube


@contextlib.contextmanager
def kube_lab_session(directory: Path, api: ApiServer, **options: Any) -> Iterator[KubeLab]:
    """A Kubernetes-mode lab for the duration of the block, removed afterwards even on failure
    (its files stay in `directory` for the post-mortem)."""
    lab = kube_lab_up(directory, api, **options)
    try:
        yield lab
    finally:
        lab.down(remove_directory=False)


def _serve_api(lab: KubeLab) -> None:
    with entered(API_SERVER.netns):
        lab.api.start()
    port = lab.api_port
    run(["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1",
         "net.ipv4.conf.eth0.route_localnet=1"], API_SERVER.netns)
    address = API_SERVER.addresses[0]
    rules = f"ip daddr {address} tcp dport {API_PORT} dnat to 127.0.0.1:{port}"
    run(["nft", "-f", "-"], API_SERVER.netns, input=f"""
table ip {API_NAT_TABLE} {{
    chain prerouting {{ type nat hook prerouting priority dstnat; {rules}; }}
    chain output {{ type nat hook output priority -100; {rules}; }}
}}
""")
    config = lab.api.kubeconfig_dict()
    lab.kubeconfig_path(inside=True).write_text(yaml.safe_dump(config))
    config["clusters"][0]["cluster"]["server"] = f"http://{address}:{API_PORT}"
    lab.kubeconfig_path(inside=False).write_text(yaml.safe_dump(config))


def _put_cluster(api: ApiServer) -> None:
    for name in CLUSTER_FILES:
        for obj in yaml.safe_load_all((EXAMPLE_SNAPSHOT / name).read_text()):
            if obj:
                api.put(obj)


GATEWAY_LABELS = {"egress.gatewayd.io/role": "gateway"}


def _give_identities(lab: KubeLab, identities: Identities) -> None:
    """As the administrator: the manifests and each gateway's credentials applied, the
    gateways labelled (what policies select; the gateways cannot), and a kubeconfig per
    daemon with its own token."""
    identities.install(g.name for g in GATEWAYS)
    for gateway in GATEWAYS:
        obj = lab.api.get("egressgateways", gateway.name)
        obj["metadata"].setdefault("labels", {}).update(GATEWAY_LABELS)
        lab.api.put(obj)
    daemons = [("agent", g.name) for g in GATEWAYS] + [("steer", n.name) for n in NODES]
    for role, host in [*daemons, ("controller", "controller")]:
        config = yaml.safe_load(lab.kubeconfig_path(inside=host == "controller").read_text())
        config["users"][0]["user"] = {"token": identities.token(role, host)}
        path = lab.daemon_kubeconfig(host)
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)


def agent_config(lab: KubeLab, gateway: GatewayHost) -> dict[str, Any]:
    return {
        "name": gateway.name,
        "labels": GATEWAY_LABELS,
        "kubernetes": {
            "kubeconfig": str(lab.daemon_kubeconfig(gateway.name)),
            "namespace": NAMESPACE,
            "leaseDurationSeconds": int(lab.timing["lease_duration"]),
            "leaseRenewSeconds": lab.timing["lease_renew"],
        },
        "stateDirectory": str(lab.state_dir(gateway.name)),
        "uplink": "eth0",
        "egressIPPools": egress_ip_pools(),
        "tunnel": {
            "interface": gateway.tunnel_interface,
            "listenPort": GATEWAY_LISTEN_PORT,
            "mtu": WIREGUARD_MTU,
            "privateKeyFile": str(lab.key_path(gateway.name)),
        },
        "reconcile": {"pollSeconds": POLL_SECONDS, "repairSeconds": REPAIR_SECONDS},
        "failover": {"egressIPHoldSeconds": lab.timing["egress_ip_hold"],
                     "arpProbeSeconds": lab.timing["arp_probe"],
                     "handoverSeconds": lab.timing["handover"]},
    }


def steer_config(lab: KubeLab, node: CloudNode) -> dict[str, Any]:
    return {
        "node": node.name,
        "kubernetes": {
            "kubeconfig": str(lab.daemon_kubeconfig(node.name)),
            "namespace": NAMESPACE,
        },
        "stateDirectory": str(lab.state_dir(node.name)),
        "tunnel": {
            "privateKeyFile": str(lab.key_path(node.name)),
            "mtu": WIREGUARD_MTU,
            # wireguard-go's sockets are shared by every namespace: names unique per node
            "interfacePrefix": node.tunnel_prefix,
            "listenPort": GATEWAY_LISTEN_PORT + 1,
            "persistentKeepalive": KEEPALIVE_SECONDS,
        },
        "reconcile": {"pollSeconds": POLL_SECONDS, "repairSeconds": REPAIR_SECONDS},
        "failover": {"probeIntervalSeconds": lab.timing["probe_interval"],
                     "missesBeforeDown": int(lab.timing["probe_misses"])},
    }


def _write_configs(lab: KubeLab) -> None:
    configs = {g.name: agent_config(lab, g) for g in GATEWAYS}
    configs.update({n.name: steer_config(lab, n) for n in NODES})
    for host, config in configs.items():
        lab.config_path(host).write_text(yaml.safe_dump(config, sort_keys=False))


# --- waiting for the cluster ---------------------------------------------------------------------


def _joined(lab: KubeLab) -> bool:
    for node in NODES:
        obj = lab.object("egressnodes", node.name)
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        gateways = {g.get("name") for g in spec.get("gateways") or []}
        if not spec.get("tunnelAddress") or gateways != {g.name for g in GATEWAYS}:
            return False
        if status.get("observedGeneration") != obj["metadata"].get("generation"):
            return False
        if not all(g.get("reachable") for g in status.get("gateways") or [{}]):
            return False
    return True


def policy_status(lab: KubeLab, name: str) -> dict[str, Any]:
    status = lab.object("egressgatewaypolicies", name).get("status")
    return status if isinstance(status, dict) else {}


def daemon_events(lab: Lab, host: str, event: str) -> int:
    """How many journal events of kind `event` the host's daemon logged (the lab's daemons log
    events to their log file)."""
    try:
        text = lab.log_path(host).read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return text.count(f"[event={event} ") + text.count(f"[event={event}]")
