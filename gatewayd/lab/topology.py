"""The lab: gatewayd end to end on real kernel networking, in network namespaces.

    ext, api, gw1, gw2 ── br-onprem ── router ── br-cloud ── node1 ── cni0 ── 3 pods
                                                          └─ node2 ── cni0 ── 3 pods
                          198.51.100.0/24        192.0.2.0/24
                          2001:db8:100::/64      2001:db8:200::/64

Every host and every pod is a namespace of its own, `gwdlab-<name>`; a lab built while
another runs on the machine takes the next free prefix (`gwdlabb-`, `gwdlabc-`, ...) and tags
its WireGuard interfaces likewise, since their control sockets are shared by all namespaces.
A process works on one lab at a time: building or opening a lab makes its names the ones the
hosts below answer with.

The lab is dual-stack: every link, pod and echo host has an address of each family, and the
gateways have a pool of egress IPs of each. The WireGuard underlay is IPv4 only, like Cilium's
(its gateway IP is the node's IPv4): IPv6 pod traffic rides inside IPv4 tunnels, which is what
such clusters run. The router knows only those subnets: a pod IP that leaks un-NATed gets no
reply, so a broken data plane makes the checks fail loudly instead of passing by accident. Each
cloud node masquerades its pods like flannel does, so the lab also proves that steered traffic
keeps the pod's source IP. Gateways run `gatewayd agent`, nodes `gatewayd steer`, both in
standalone mode from a copy of the snapshot kept in the lab directory (tests edit that copy).

A lab outlives the process that built it (`gatewayctl lab up` returns). Everything needed to
remove it again is on disk: `lab.json` lists the namespaces it created, pid files name its
processes, so `gatewayctl lab down` works from any process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import yaml
from pyroute2 import netns as pyroute2_netns

from gatewayd.lab.netns import (
    Sandbox,
    delete_netns,
    run,
    start_process,
    wait_for,
)

NAMESPACE_STEM = "gwdlab"
# A lab's tag makes its names unique on the machine: "" for the first, then one letter each.
TAGS: tuple[str, ...] = ("", *"bcdefghijklmnopqrstuvwxyz")
NAMES_LOCK = Path("/run/gatewayd-lab.lock")  # held while a lab picks its tag and builds
DEFAULT_DIRECTORY = Path("/run/gatewayd-lab")
EXAMPLE_SNAPSHOT = Path(__file__).resolve().parents[2] / "examples" / "lab"

ONPREM_BRIDGE, ONPREM_ROUTER, ONPREM_ROUTER6 = "br-onprem", "198.51.100.1", "2001:db8:100::1"
CLOUD_BRIDGE, CLOUD_ROUTER, CLOUD_ROUTER6 = "br-cloud", "192.0.2.1", "2001:db8:200::1"
EGRESS_IP_POOLS = ("198.51.100.64/27", "2001:db8:100::40/122")
POD_SUPERNET, POD_SUPERNET6 = "10.244.0.0/16", "fd00:10:244::/48"
HTTP_PORT = 8080  # every echo host: GET answers with the client's source IP
LINE_PORT = 9000  # every echo host: line echo, prefixed with the client's source IP
GATEWAY_LISTEN_PORT = 51820
WIREGUARD_MTU = 1420
KEEPALIVE_SECONDS = 25
POLL_SECONDS = 0.2
REPAIR_SECONDS = 1.0


@dataclass
class _Names:
    """The tag of the lab this process works on (see the module docstring)."""

    tag: str = ""


_names = _Names()


def lab_prefix() -> str:
    """The namespace prefix of this process's lab."""
    return f"{NAMESPACE_STEM}{_names.tag}-"


@dataclass(frozen=True)
class GatewayHost:
    name: str  # the EgressGateway's name in the snapshot
    address: str  # on br-onprem, /24
    address6: str  # on br-onprem, /64
    tunnel_address: str

    @property
    def netns(self) -> str:
        return lab_prefix() + self.name

    @property
    def tunnel_interface(self) -> str:
        """Unique on the machine: wireguard-go's sockets are shared."""
        return f"wg{_names.tag}-{self.name}"


@dataclass(frozen=True)
class PodHost:
    name: str  # the Pod's name in the snapshot
    address: str
    address6: str

    def address_of(self, version: int) -> str:
        return self.address if version == 4 else self.address6

    @property
    def netns(self) -> str:
        return lab_prefix() + self.name


@dataclass(frozen=True)
class CloudNode:
    name: str  # the Node's name in the snapshot
    number: int  # short tag for interface names
    address: str  # on br-cloud, /24
    address6: str  # on br-cloud, /64
    pod_cidr: str
    pod_cidr6: str
    bridge_address: str  # cni0's addresses: the pods' default gateways
    bridge_address6: str
    pods: tuple[PodHost, ...]

    @property
    def netns(self) -> str:
        return lab_prefix() + self.name

    @property
    def tunnel_prefix(self) -> str:
        """Its tunnel interfaces are this and the gateway's name."""
        return f"n{_names.tag}{self.number}-"

    def tunnel_interface(self, gateway: GatewayHost) -> str:
        return self.tunnel_prefix + gateway.name

    def listen_port(self, gateway: GatewayHost) -> int:
        return GATEWAY_LISTEN_PORT + 1 + GATEWAYS.index(gateway)


@dataclass(frozen=True)
class EchoHost:
    name: str
    addresses: tuple[str, ...]  # on br-onprem: IPv4 /24, IPv6 /64

    @property
    def netns(self) -> str:
        return lab_prefix() + self.name


GATEWAYS = (
    GatewayHost("gw1", "198.51.100.2", "2001:db8:100::2", "100.64.1.1/24"),
    GatewayHost("gw2", "198.51.100.3", "2001:db8:100::3", "100.64.2.1/24"),
)
NODES = (
    CloudNode("node1", 1, "192.0.2.21", "2001:db8:200::21", "10.244.1.0/24",
              "fd00:10:244:1::/64", "10.244.1.1", "fd00:10:244:1::1", (
                  PodHost("checkout-1", "10.244.1.10", "fd00:10:244:1::10"),
                  PodHost("batch-1", "10.244.1.11", "fd00:10:244:1::11"),
                  PodHost("web-1", "10.244.1.12", "fd00:10:244:1::12"),
              )),
    CloudNode("node2", 2, "192.0.2.22", "2001:db8:200::22", "10.244.2.0/24",
              "fd00:10:244:2::/64", "10.244.2.1", "fd00:10:244:2::1", (
                  PodHost("checkout-2", "10.244.2.10", "fd00:10:244:2::10"),
                  PodHost("batch-2", "10.244.2.11", "fd00:10:244:2::11"),
                  PodHost("web-2", "10.244.2.12", "fd00:10:244:2::12"),
              )),
)
# The external world: the payment gateway (.10) and a host in an excluded CIDR (.11).
EXTERNAL = EchoHost("ext", ("198.51.100.10", "198.51.100.11",
                            "2001:db8:100::10", "2001:db8:100::11"))
# Stands for the kube-apiserver endpoint in the snapshot's `kubernetes` EndpointSlices.
API_SERVER = EchoHost("api", ("198.51.100.6", "2001:db8:100::6"))
ECHO_HOSTS = (EXTERNAL, API_SERVER)
PODS = tuple(pod for node in NODES for pod in node.pods)
DAEMON_HOSTS = tuple(g.name for g in GATEWAYS) + tuple(n.name for n in NODES)
# wireguard-go leaves its control socket behind when killed; the names are ours.
WIREGUARD_SOCKETS = Path("/var/run/wireguard")


def router_netns() -> str:
    return lab_prefix() + "router"


def tunnel_interfaces() -> tuple[str, ...]:
    return tuple(g.tunnel_interface for g in GATEWAYS) + tuple(
        n.tunnel_interface(g) for n in NODES for g in GATEWAYS)


def egress_ip_pools() -> list[dict[str, str]]:
    """The gateways' `egressIPPools`, in either mode."""
    return [{"cidr": pool, "interface": "eth0"} for pool in EGRESS_IP_POOLS]


CNI_MASQUERADE = f"""
table inet cni-nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {POD_SUPERNET} ip daddr != {POD_SUPERNET} masquerade
        ip6 saddr {POD_SUPERNET6} ip6 daddr != {POD_SUPERNET6} masquerade
    }}
}}
"""


class LabError(RuntimeError):
    pass


class Lab:
    """A lab directory: the record of what was created, configs, state, logs, pid files."""

    def __init__(self, directory: Path) -> None:
        """Opening an existing lab makes its names this process's (see the module)."""
        self.directory = directory.absolute()  # configs name files by absolute path
        # Daemons this process started: waiting on them reaps them and gives the exit code.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._echo_servers: list[subprocess.Popen[bytes]] = []
        if self.exists():
            self.use_names()

    def use_names(self) -> None:
        """Make this lab's names the ones the hosts answer with."""
        _names.tag = self.record().get("tag", "")

    # --- paths ------------------------------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.directory / "lab.json"

    @property
    def snapshot_dir(self) -> Path:
        return self.directory / "snapshot"

    def host_dir(self, host: str) -> Path:
        return self.directory / host

    def config_path(self, host: str) -> Path:
        return self.host_dir(host) / "config.yaml"

    def state_dir(self, host: str) -> Path:
        return self.host_dir(host) / "state"

    def key_path(self, host: str) -> Path:
        return self.state_dir(host) / "wireguard.key"

    def status_path(self, host: str) -> Path:
        return self.state_dir(host) / "status.json"

    def log_path(self, host: str) -> Path:
        return self.host_dir(host) / "daemon.log"

    def pid_path(self, host: str) -> Path:
        return self.host_dir(host) / "daemon.pid"

    def exists(self) -> bool:
        return self.record_path.exists()

    def record(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab in {self.directory} (no {self.record_path.name})") from None
        return data

    def _write_record(self, data: Mapping[str, Any]) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.record_path)

    # --- daemons ----------------------------------------------------------------------------

    def daemon_argv(self, host: str) -> list[str]:
        role = "agent" if any(g.name == host for g in GATEWAYS) else "steer"
        return [sys.executable, "-m", "gatewayd.cli.gatewayd", role,
                "--config", str(self.config_path(host))]

    def start(self, timeout: float = 60) -> None:
        """Start every daemon and wait until the lab carries traffic: each daemon ready and
        each node tunnel through its first handshake."""
        self.start_daemons(timeout)
        self.wait_tunnels(timeout)

    def start_daemons(self, timeout: float = 60) -> None:
        """Start every daemon and wait until all of them report ready."""
        started = time.time()
        for host in DAEMON_HOSTS:
            self.start_daemon(host)
        self.wait_ready(timeout=timeout, since=started)

    def wait_tunnels(self, timeout: float) -> None:
        """Wait until every node's tunnel to every gateway had a handshake. The daemons start
        together, so a node's first handshake can reach a gateway before that gateway knows
        the node's key; WireGuard tries again only 5 s later, and until then the node's
        steered traffic goes nowhere."""
        pending = [(node, gateway) for node in NODES for gateway in GATEWAYS]

        def handshaken(node: CloudNode, gateway: GatewayHost) -> bool:
            out = run(["wg", "show", node.tunnel_interface(gateway), "latest-handshakes"],
                      node.netns).stdout.split()
            return len(out) == 2 and out[1] != "0"

        def all_up() -> bool:
            pending[:] = [(n, g) for n, g in pending if not handshaken(n, g)]
            return not pending

        try:
            wait_for(all_up, timeout, "the tunnels' first handshakes", interval=0.1)
        except TimeoutError:
            tunnels = ", ".join(f"{n.tunnel_interface(g)} in {n.netns}" for n, g in pending)
            raise LabError(f"no handshake after {timeout:.0f}s on {tunnels}") from None

    def start_daemon(self, host: str) -> None:
        """Start the host's daemon, detached, logging to its daemon.log (appended)."""
        if self.daemon_pid(host) is not None:
            raise LabError(f"the daemon of {host} is already running")
        proc = start_process(lab_prefix() + host, self.daemon_argv(host), self.log_path(host),
                             {"PYTHONUNBUFFERED": "1"})
        self._children[host] = proc
        self.pid_path(host).write_text(f"{proc.pid}\n")

    def daemon_pid(self, host: str) -> int | None:
        """The pid of the host's running daemon, if one is running."""
        child = self._children.get(host)
        if child is not None:  # its command line may still be ours for a moment after fork
            return child.pid if child.poll() is None else None
        return _running_pid(self.pid_path(host), str(self.config_path(host)))

    def stop_daemon(
        self, host: str, sig: signal.Signals = signal.SIGTERM, timeout: float = 15
    ) -> int | None:
        """Signal the daemon (only it: its wireguard-go must survive) and wait until it is gone.

        Returns its exit status when this process started it (negative: killed by a signal).
        """
        pid = self.daemon_pid(host)
        child = self._children.pop(host, None)
        if pid is None:
            return child.poll() if child else None
        os.kill(pid, sig)
        if child is not None:
            try:
                return child.wait(timeout)
            except subprocess.TimeoutExpired:
                raise LabError(f"the daemon of {host} (pid {pid}) ignored {sig.name} "
                               f"for {timeout:.0f}s") from None
        wait_for(lambda: not _alive(pid), timeout, f"the daemon of {host} (pid {pid}) to exit")
        return None

    def status(self, host: str) -> dict[str, Any] | None:
        """The daemon's status.json, or None while there is none (or it is being replaced)."""
        try:
            data: dict[str, Any] = json.loads(self.status_path(host).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data

    def wait_ready(
        self, hosts: Iterable[str] = DAEMON_HOSTS, timeout: float = 30, since: float = 0
    ) -> None:
        """Wait until every host's daemon wrote a status with ready: true (after `since`,
        a time.time() value, so a status left by an earlier run does not count)."""
        pending = list(hosts)

        def all_ready() -> bool:
            pending[:] = [h for h in pending if not self._ready_since(h, since)]
            dead = [h for h in pending if self.daemon_pid(h) is None]
            if dead:
                raise LabError("exited: " + "; ".join(self.describe_daemon(h) for h in dead))
            return not pending

        try:
            wait_for(all_ready, timeout, "the daemons to report ready", interval=0.1)
        except TimeoutError:
            raise LabError(
                f"not ready after {timeout:.0f}s: "
                + "; ".join(self.describe_daemon(h) for h in pending)
            ) from None

    def _ready_since(self, host: str, since: float) -> bool:
        try:
            written = self.status_path(host).stat().st_mtime
        except FileNotFoundError:
            return False
        status = self.status(host)
        return written >= since and status is not None and status.get("ready") is True

    def generations(self, hosts: Iterable[str] = DAEMON_HOSTS) -> dict[str, object]:
        """Each daemon's current status generation, to wait for the next apply with."""
        return {host: (self.status(host) or {}).get("generation") for host in hosts}

    def wait_applied(self, before: Mapping[str, object], timeout: float = 15) -> float:
        """Wait until each daemon in `before` applied a new generation and is ready again;
        returns the seconds it took."""
        def applied(host: str) -> bool:
            status = self.status(host) or {}
            return status.get("generation") != before[host] and status.get("ready") is True

        return wait_for(lambda: all(applied(h) for h in before), timeout,
                        f"{', '.join(before)} to apply a new generation")

    def write_snapshot_file(self, name: str, text: str) -> None:
        """Replace one file of the lab's snapshot atomically: a daemon never reads half of it."""
        target = self.snapshot_dir / name
        tmp = target.with_name(f".{name}.tmp")  # not a snapshot suffix: never read
        tmp.write_text(text)
        tmp.replace(target)

    def describe_daemon(self, host: str) -> str:
        """One line for error messages: running or not, lastError, the log's last line."""
        status = self.status(host) or {}
        running = "running" if self.daemon_pid(host) else "NOT running"
        last_line = _last_line(self.log_path(host))
        return (f"{host} ({running}, ready={status.get('ready')}, "
                f"lastError={status.get('lastError')!r}, log {self.log_path(host)}: "
                f"{last_line!r})")

    # --- the echo servers -------------------------------------------------------------------

    def start_echo(self, host: EchoHost) -> None:
        """Start the echo servers; they end with the host's namespace."""
        argv = [sys.executable, "-m", "gatewayd.lab.echo",
                "--http-port", str(HTTP_PORT), "--line-port", str(LINE_PORT)]
        self.host_dir(host.name).mkdir(parents=True, exist_ok=True)
        log = self.host_dir(host.name) / "echo.log"
        self._echo_servers.append(start_process(host.netns, argv, log))

    # --- removing ---------------------------------------------------------------------------

    def down(self, *, remove_directory: bool = True) -> list[str]:
        """Stop the daemons, delete the namespaces (and whatever still runs inside them).

        Idempotent: returns the namespaces deleted, nothing when there is no lab.
        """
        if not self.exists():
            return []
        self.use_names()
        for host in DAEMON_HOSTS:
            try:
                self.stop_daemon(host, timeout=10)
            except (LabError, TimeoutError):
                pid = self.daemon_pid(host)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
        existing = set(pyroute2_netns.listnetns())
        deleted = [ns for ns in reversed(self.record()["namespaces"]) if ns in existing]
        for ns in deleted:
            delete_netns(ns)
        for proc in [*self._children.values(), *self._echo_servers]:
            proc.wait(5)  # reap: they ended with their namespace
        self._children.clear()
        self._echo_servers.clear()
        for name in tunnel_interfaces():
            (WIREGUARD_SOCKETS / f"{name}.sock").unlink(missing_ok=True)
        self.record_path.unlink()
        if remove_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        return deleted


# --- building ------------------------------------------------------------------------------------


def lab_up(
    directory: Path = DEFAULT_DIRECTORY,
    snapshot: Path = EXAMPLE_SNAPSHOT,
    *,
    start_daemons: bool = True,
    ready_timeout: float = 60,
) -> Lab:
    """Build the lab in `directory` and start its daemons; wait until all report ready.

    `directory` must be new or empty. The lab takes the first tag no other lab on the machine
    uses. A failure while building removes everything built so far. A daemon that does not
    become ready leaves the lab in place for inspection (the LabError names it and its log;
    `lab_down` removes the lab).
    """
    lab = Lab(directory)
    if lab.exists():
        raise LabError(f"a lab already exists in {directory}; remove it first with "
                       f"`gatewayctl lab down --dir {directory}`")
    if not snapshot.exists():
        raise LabError(f"snapshot {snapshot} does not exist")
    if directory.exists() and any(directory.iterdir()):
        raise LabError(f"{directory} is not empty; give the lab a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "snapshotSource": str(snapshot),
        "namespaces": [],
    }
    lab._write_record(record)
    box: Sandbox | None = None
    try:
        def make_netns(name: str) -> str:
            assert box is not None
            full = box.netns(name)
            record["namespaces"].append(full)
            lab._write_record(record)
            return full

        _copy_snapshot(snapshot, lab.snapshot_dir)
        with _names_lock():  # until its namespaces exist, another lab could take the tag
            record["tag"] = _names.tag = _free_tag()
            lab._write_record(record)
            box = Sandbox(lab_prefix())
            _build_network(box, make_netns)
        for host in ECHO_HOSTS:
            lab.start_echo(host)
        public_keys = {host: _generate_key(lab.key_path(host)) for host in DAEMON_HOSTS}
        _write_configs(lab, public_keys)
        for host in ECHO_HOSTS:
            _wait_listening(host)
    except BaseException:
        try:
            if box is not None:
                box.close()
        finally:
            shutil.rmtree(lab.directory, ignore_errors=True)  # it was new or empty
        raise
    box.release()  # from here on lab.json owns it
    if start_daemons:
        lab.start(ready_timeout)
    return lab


@contextlib.contextmanager
def _names_lock() -> Iterator[None]:
    with NAMES_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _free_tag() -> str:
    """The first tag whose namespaces do not exist: no other lab uses it."""
    existing = pyroute2_netns.listnetns()
    for tag in TAGS:
        prefix = f"{NAMESPACE_STEM}{tag}-"
        if not any(name.startswith(prefix) for name in existing):
            return tag
    raise LabError(f"{len(TAGS)} labs run on this machine already; remove one with "
                   "`gatewayctl lab down --dir ITS_DIR`")


def lab_down(directory: Path = DEFAULT_DIRECTORY) -> list[str]:
    """Remove the lab in `directory` (see `Lab.down`), from any process."""
    return Lab(directory).down()


def _copy_snapshot(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.mkdir()
        shutil.copy2(source, target / source.name)


def _build_network(box: Sandbox, make_netns: Callable[[str], str]) -> None:
    router = make_netns("router")
    for bridge, addresses in ((ONPREM_BRIDGE, (ONPREM_ROUTER, ONPREM_ROUTER6)),
                              (CLOUD_BRIDGE, (CLOUD_ROUTER, CLOUD_ROUTER6))):
        run(["ip", "link", "add", bridge, "type", "bridge"], router)
        _add_addresses(router, bridge, addresses, {4: 24, 6: 64})
        run(["ip", "link", "set", bridge, "up"], router)
    _forwarding(router)

    def uplink(name: str, bridge: str, addresses: Iterable[str], via: tuple[str, str]) -> str:
        ns = make_netns(name)
        box.veth(ns, "eth0", router, name)
        run(["ip", "link", "set", name, "master", bridge], router)
        _add_addresses(ns, "eth0", addresses, {4: 24, 6: 64})
        for router_address in via:
            run(["ip", "route", "add", "default", "via", router_address], ns)
        return ns

    onprem, cloud = (ONPREM_ROUTER, ONPREM_ROUTER6), (CLOUD_ROUTER, CLOUD_ROUTER6)
    for echo in ECHO_HOSTS:
        uplink(echo.name, ONPREM_BRIDGE, echo.addresses, onprem)
    # Forwarding on the gateways is the agent's job: the lab proves it does it.
    for gateway in GATEWAYS:
        ns = uplink(gateway.name, ONPREM_BRIDGE, [gateway.address, gateway.address6], onprem)
        # The lab cuts a gateway off by setting its uplink down, which would remove its IPv6
        # addresses; a pulled cable (or a dead switch port) keeps them.
        run(["sysctl", "-q", "-w", "net.ipv6.conf.eth0.keep_addr_on_down=1"], ns)
        _loose_reverse_path_filter(ns)
    for node in NODES:
        ns = uplink(node.name, CLOUD_BRIDGE, [node.address, node.address6], cloud)
        _loose_reverse_path_filter(ns)
        _forwarding(ns)
        run(["ip", "link", "add", "cni0", "type", "bridge"], ns)
        prefixes = {4: int(node.pod_cidr.split("/")[1]), 6: int(node.pod_cidr6.split("/")[1])}
        _add_addresses(ns, "cni0", [node.bridge_address, node.bridge_address6], prefixes)
        run(["ip", "link", "set", "cni0", "up"], ns)
        run(["nft", "-f", "-"], ns, input=CNI_MASQUERADE)
        for pod in node.pods:
            pod_ns = make_netns(pod.name)
            port = f"v{pod.name}"
            box.veth(pod_ns, "eth0", ns, port)
            run(["ip", "link", "set", port, "master", "cni0"], ns)
            _add_addresses(pod_ns, "eth0", [pod.address, pod.address6], prefixes)
            for router_address in (node.bridge_address, node.bridge_address6):
                run(["ip", "route", "add", "default", "via", router_address], pod_ns)


def _add_addresses(
    ns: str, interface: str, addresses: Iterable[str], prefixes: Mapping[int, int]
) -> None:
    """The lab's own addresses skip duplicate address detection: in a segment it built
    itself none can be taken, and DAD would keep an IPv6 address unusable for a second."""
    for address in addresses:
        prefix = prefixes[ip_address(address).version]
        run(["ip", "addr", "add", f"{address}/{prefix}", "dev", interface, "nodad"], ns)


def _forwarding(ns: str) -> None:
    run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"], ns)


def _loose_reverse_path_filter(ns: str) -> None:
    """What systemd sets on nearly every distribution (50-default.conf); a fresh namespace
    has 0. With `all` at 2 no interface can opt out, so the daemons must cope with it."""
    run(["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=2",
         "net.ipv4.conf.default.rp_filter=2"], ns)


def _generate_key(path: Path) -> str:
    """Write a new WireGuard private key (0600, in a 0700 directory); return its public key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = run(["wg", "genkey"]).stdout.strip()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(private + "\n")
    return run(["wg", "pubkey"], input=private + "\n").stdout.strip()


def agent_config(lab: Lab, gateway: GatewayHost, public_keys: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": gateway.name,
        "snapshot": str(lab.snapshot_dir),
        "stateDirectory": str(lab.state_dir(gateway.name)),
        "uplink": "eth0",
        "egressIPPools": egress_ip_pools(),
        "tunnel": {
            "interface": gateway.tunnel_interface,
            "listenPort": GATEWAY_LISTEN_PORT,
            "address": gateway.tunnel_address,
            "mtu": WIREGUARD_MTU,
            "privateKeyFile": str(lab.key_path(gateway.name)),
            "peers": [
                {
                    "name": node.name,
                    "publicKey": public_keys[node.name],
                    "endpoint": f"{node.address}:{node.listen_port(gateway)}",
                    "allowedIPs": [node.pod_cidr, node.pod_cidr6],
                    "persistentKeepalive": KEEPALIVE_SECONDS,
                }
                for node in NODES
            ],
        },
        "reconcile": {"pollSeconds": POLL_SECONDS, "repairSeconds": REPAIR_SECONDS},
    }


def steer_config(lab: Lab, node: CloudNode, public_keys: Mapping[str, str]) -> dict[str, Any]:
    return {
        "node": node.name,
        "snapshot": str(lab.snapshot_dir),
        "stateDirectory": str(lab.state_dir(node.name)),
        "tunnel": {
            "privateKeyFile": str(lab.key_path(node.name)),
            "mtu": WIREGUARD_MTU,
            "gateways": [
                {
                    "name": gateway.name,
                    "interface": node.tunnel_interface(gateway),
                    "listenPort": node.listen_port(gateway),
                    "publicKey": public_keys[gateway.name],
                    "endpoint": f"{gateway.address}:{GATEWAY_LISTEN_PORT}",
                    "persistentKeepalive": KEEPALIVE_SECONDS,
                }
                for gateway in GATEWAYS
            ],
        },
        "reconcile": {"pollSeconds": POLL_SECONDS, "repairSeconds": REPAIR_SECONDS},
    }


def _write_configs(lab: Lab, public_keys: Mapping[str, str]) -> None:
    configs = {g.name: agent_config(lab, g, public_keys) for g in GATEWAYS}
    configs.update({n.name: steer_config(lab, n, public_keys) for n in NODES})
    for host, config in configs.items():
        lab.config_path(host).write_text(yaml.safe_dump(config, sort_keys=False))


def _wait_listening(host: EchoHost) -> None:
    def listening() -> bool:
        out = run(["ss", "-Htln", f"sport = :{LINE_PORT} or sport = :{HTTP_PORT}"],
                  host.netns).stdout
        return len(out.splitlines()) == 2

    wait_for(listening, 10, f"the echo servers on {host.name}")


# --- processes by pid file -----------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether `pid` still runs; a zombie does not. Never reaps: a Popen must get the status."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _running_pid(pid_file: Path, marker: str) -> int | None:
    """The pid in `pid_file` if that process runs and its command line contains `marker`
    (a recycled pid of some other process is never signalled)."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid if marker in cmdline and _alive(pid) else None


def _last_line(path: Path) -> str:
    with contextlib.suppress(FileNotFoundError):
        lines = path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    return "(no log)"


@contextlib.contextmanager
def lab_session(
    directory: Path, snapshot: Path = EXAMPLE_SNAPSHOT, *, start_daemons: bool = True
) -> Iterator[Lab]:
    """A lab for the duration of the block, removed afterwards even on failure (its files
    stay in `directory` for the post-mortem)."""
    lab = lab_up(directory, snapshot, start_daemons=False)
    try:
        if start_daemons:
            lab.start()
        yield lab
    finally:
        lab.down(remove_directory=False)
