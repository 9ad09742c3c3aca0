"""NftablesDriver with the gateway and steer tables, on real traffic between namespaces.

Gateway: pod ns --(gwtun, stands in for the tunnel)-- router ns --(gwup)-- server ns.
Steer:   pod ns -- node ns --(egw-a / egw-b, stand in for tunnels)-- gateway ns(s) -- server ns,
         and node ns --(nodeup, masqueraded by a CNI-like rule in another table)-- server ns.
The server answers every connection with the source address it sees, then echoes lines.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pytest
from pyroute2.netns import setns

from gatewayd.dataplane.nft_render import (
    DROP_EGRESS_IP_INBOUND,
    DROP_NOT_TRANSLATED,
    DROP_TUNNEL_UNKNOWN,
    DROP_UPLINK_FORWARD,
    GatewayTableSettings,
    RenderedTable,
    SteerTableSettings,
    render_gateway_table,
    render_steer_table,
)
from gatewayd.dataplane.nftables import FlaggedTableError, NftablesDriver, NftablesError
from gatewayd.dataplane.routing import PolicyRoutingDriver
from gatewayd.lab.netns import Sandbox, entered, run, wait_for
from gatewayd.policy.model import (
    ConnectionFollow,
    DropReason,
    GatewayPlan,
    NodePlan,
    Role,
    SnatRule,
    SteerAction,
    SteerRule,
)
from gatewayd.steer.conntrack import parse_flows

pytestmark = pytest.mark.lab

PORT = 7000
ip = ipaddress.ip_address
net = ipaddress.ip_network


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"drvnft{secrets.token_hex(2)}-") as box:
        yield box


# --- a server that tells each client its source address ------------------------------------


@dataclass
class SourceServer:
    """Listens in a namespace (v4 and v6); first line to each client: the source it saw."""

    sock: socket.socket
    mss: dict[str, int] = field(default_factory=dict)  # client address -> MSS of its socket

    def serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn, peer[0]), daemon=True).start()

    def _talk(self, conn: socket.socket, peer: str) -> None:
        address = ip(peer)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        self.mss[str(address)] = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        with conn, contextlib.suppress(OSError):
            conn.sendall(f"{address}\n".encode())
            while data := conn.recv(4096):
                conn.sendall(data)


@contextlib.contextmanager
def source_server(netns: str) -> Iterator[SourceServer]:
    with entered(netns):
        sock = socket.create_server(("::", PORT), family=socket.AF_INET6, dualstack_ipv6=True)
    server = SourceServer(sock)
    threading.Thread(target=server.serve, daemon=True).start()
    try:
        yield server
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class Client:
    """One TCP connection from a namespace; `seen` is the source address the server saw."""

    def __init__(self, netns: str, server: str, source: str | None = None) -> None:
        family = socket.AF_INET6 if ip(server).version == 6 else socket.AF_INET
        with entered(netns):
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((server, PORT))
        self.reader = self.sock.makefile("r")
        self.seen = self.reader.readline().strip()

    def echo(self, text: str) -> str:
        self.sock.sendall(f"{text}\n".encode())
        return self.reader.readline().strip()

    def mss(self) -> int:
        return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def syn_only(netns: str, server: str, source: str) -> socket.socket:
    """Start a connection without waiting for it (for traffic that is meant to be dropped)."""
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    sock.connect_ex((server, PORT))
    return sock


def counter_rises(driver: NftablesDriver, netns: str, name: str, before: int) -> None:
    def risen() -> bool:
        with entered(netns):
            return driver.counters()[name][0] > before

    wait_for(risen, 5, f"counter {name} to count a packet")


def counter_named(table: RenderedTable, comment: str) -> str:
    (name,) = [obj["counter"]["name"] for obj in table.body
               if obj.get("counter", {}).get("comment") == comment]
    return str(name)


def sh(netns: str, *commands: str) -> None:
    for command in commands:
        run(command.split(), netns)


# --- gateway table -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayLab:
    pod: str
    router: str
    server: str


def gateway_lab(box: Sandbox) -> GatewayLab:
    pod, router, server = box.netns("pod"), box.netns("router"), box.netns("server")
    box.veth(pod, "pod0", router, "gwtun")
    box.veth(router, "gwup", server, "srv0")
    sh(pod,
       "ip addr add 10.99.0.5/24 dev pod0", "ip addr add 10.99.0.6/24 dev pod0",
       "ip addr add fd00:99::5/64 dev pod0 nodad",
       "ip route add default via 10.99.0.1", "ip -6 route add default via fd00:99::1")
    sh(router,
       "ip addr add 10.99.0.1/24 dev gwtun", "ip addr add fd00:99::1/64 dev gwtun nodad",
       "ip addr add 192.0.2.1/24 dev gwup", "ip addr add 2001:db8::1/64 dev gwup nodad",
       "ip addr add 192.0.2.10/32 dev gwup", "ip addr add 2001:db8::10/128 dev gwup nodad",
       "sysctl -qw net.ipv4.ip_forward=1", "sysctl -qw net.ipv6.conf.all.forwarding=1")
    sh(server,
       "ip addr add 192.0.2.2/24 dev srv0", "ip addr add 2001:db8::2/64 dev srv0 nodad",
       # Routes back to the pods, so that the server can try to reach them (must be dropped).
       "ip route add 10.99.0.0/24 via 192.0.2.1", "ip -6 route add fd00:99::/64 via 2001:db8::1")
    return GatewayLab(pod, router, server)


def held_table(plan: GatewayPlan, settings: GatewayTableSettings) -> RenderedTable:
    """The table of a host that holds every egress IP of `plan`."""
    return render_gateway_table(plan, settings, held={r.egress_ip for r in plan.rules})


SETTINGS = GatewayTableSettings(tunnel_interface="gwtun", uplink_interfaces=("gwup",),
                                dedicated_egress_ips=frozenset({ip("192.0.2.10"),
                                                                ip("2001:db8::10")}))


def gateway_plan(*sources: str) -> GatewayPlan:
    v4 = frozenset(ip(s) for s in sources if ":" not in s)
    v6 = frozenset(ip(s) for s in sources if ":" in s)
    return GatewayPlan("gw", rules=(
        SnatRule("team.payments", Role.ACTIVE, v4, (net("192.0.2.0/24"),), ip("192.0.2.10")),
        SnatRule("team.payments", Role.ACTIVE, v6, (net("2001:db8::/64"),), ip("2001:db8::10")),
    ))


def test_gateway_table_snats_filters_and_counts(sandbox: Sandbox) -> None:
    lab = gateway_lab(sandbox)
    driver = NftablesDriver("inet", "gatewayd")
    table = held_table(gateway_plan("10.99.0.5", "fd00:99::5"), SETTINGS)
    with entered(lab.router):
        assert driver.observe() is None
        assert driver.ensure(table).action == "replace"
        assert driver.ensure(table).action == "none"
        assert driver.ensure(table, verify=True).action == "none"
    with source_server(lab.server) as server:
        v4 = Client(lab.pod, "192.0.2.2")
        v6 = Client(lab.pod, "2001:db8::2")
        assert (v4.seen, v6.seen) == ("192.0.2.10", "2001:db8::10")
        # MSS clamped to the tunnel MTU (1420) both ways: 1380 minus 12 bytes of timestamps.
        assert v4.mss() <= 1368 and server.mss["192.0.2.10"] <= 1368
        assert v6.mss() <= 1348 and server.mss["2001:db8::10"] <= 1348
        v4.close()
        v6.close()

        # An unknown source from the tunnel is dropped and counted.
        with entered(lab.router):
            before = driver.counters()[DROP_TUNNEL_UNKNOWN][0]
        stray = syn_only(lab.pod, "192.0.2.2", source="10.99.0.6")
        counter_rises(driver, lab.router, DROP_TUNNEL_UNKNOWN, before)
        stray.close()

        # Never an open relay: the uplink side cannot reach the pods.
        with entered(lab.router):
            before = driver.counters()[DROP_UPLINK_FORWARD][0]
        with entered(lab.server):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.sendto(b"x", ("10.99.0.5", 9))
        udp.close()
        counter_rises(driver, lab.router, DROP_UPLINK_FORWARD, before)

        # A new pod is one element: the fast path, and it works at once.
        grown = held_table(gateway_plan("10.99.0.5", "10.99.0.6", "fd00:99::5"), SETTINGS)
        with entered(lab.router):
            result = driver.ensure(grown)
            observed = driver.observe()
        assert (result.action, result.added, result.removed) == ("elements", 1, 0)
        assert observed is not None
        assert observed.sets["rule0_src"].elements == {"10.99.0.5", "10.99.0.6"}
        assert observed.counters["rule0"][0] > 0  # the accepted v4 connection above
        second = Client(lab.pod, "192.0.2.2", source="10.99.0.6")
        assert second.seen == "192.0.2.10"
        second.close()


def test_a_connection_let_through_untranslated_is_dropped_at_the_uplink(
        sandbox: Sandbox) -> None:
    """The forward chain and the SNAT rules look into the sets at two moments. Should the
    forward chain let a connection through that no SNAT rule translates (here a rule added by
    hand stands in for that), it is dropped before the uplink, never sent with the pod's
    address."""
    lab = gateway_lab(sandbox)
    driver = NftablesDriver("inet", "gatewayd")
    with entered(lab.router):
        driver.ensure(held_table(gateway_plan("10.99.0.5"), SETTINGS))
        before = driver.counters()[DROP_NOT_TRANSLATED][0]
    run(["nft", "insert rule inet gatewayd forward iifname gwtun accept"], lab.router)
    arrived = arrivals(lab.server, "10.99.0.6")
    stray = syn_only(lab.pod, "192.0.2.2", source="10.99.0.6")
    counter_rises(driver, lab.router, DROP_NOT_TRANSLATED, before)
    stray.close()
    assert arrived() == [0]


@pytest.mark.parametrize("server", ["192.0.2.2", "2001:db8::2"])
def test_a_packet_to_the_egress_ip_without_nat_state_is_dropped_not_answered(
        sandbox: Sandbox, server: str) -> None:
    """A gateway that takes an egress IP over before it has a connection's NAT state (a
    standby that just booted, its conntrack sync not done yet) must not answer that
    connection's packets itself: the host's TCP stack answers a packet to a local address
    without a socket with a reset, and the far end closes the connection (the failover bench
    lost connections so). Dropped, the packet is sent again after the pod's next packet,
    which the rules translate anew (the kernel picks a connection up in mid-stream)."""
    lab = gateway_lab(sandbox)
    driver = NftablesDriver("inet", "gatewayd")
    with entered(lab.router):
        driver.ensure(held_table(gateway_plan("10.99.0.5", "fd00:99::5"), SETTINGS))
    with entered(lab.server):
        listener = socket.create_server(("::", PORT + 1), family=socket.AF_INET6,
                                        dualstack_ipv6=True)
    with entered(lab.pod):
        client = socket.create_connection((server, PORT + 1), timeout=5)
    with listener, client:
        conn, (seen, *_) = listener.accept()
        assert ip(seen) in (ip("192.0.2.10"), ip("::ffff:192.0.2.10"), ip("2001:db8::10"))
        conn.settimeout(5)
        with conn:
            run(["conntrack", "-F"], lab.router)  # the gateway knows nothing of it now
            with entered(lab.router):
                before = driver.counters()[DROP_EGRESS_IP_INBOUND][0]
            conn.sendall(b"hello\n")
            counter_rises(driver, lab.router, DROP_EGRESS_IP_INBOUND, before)
            client.sendall(b"ping\n")
            assert conn.recv(5) == b"ping\n"  # a reset would raise here
            # "hello" comes with the server's next retransmission: its backoff may have grown
            # to several seconds on a loaded machine.
            client.settimeout(30)
            assert client.recv(6) == b"hello\n"


def arrivals(netns: str, *sources: str) -> Callable[[], list[int]]:
    """Count the packets that reach `netns` from each of `sources`; returns the reader."""
    rules = "".join(f"; add rule ip seen input ip saddr {s} counter" for s in sources)
    run(["nft", "add table ip seen; add chain ip seen input { type filter hook prerouting "
         f"priority 0; }}{rules}"], netns)
    return lambda: [int(n) for n in re.findall(
        r"packets (\d+)", run(["nft", "list table ip seen"], netns).stdout)]


def test_established_snat_connection_survives_a_change_of_the_rules(sandbox: Sandbox) -> None:
    lab = gateway_lab(sandbox)
    driver = NftablesDriver("inet", "gatewayd")
    plan = gateway_plan("10.99.0.5", "fd00:99::5")
    with entered(lab.router):
        driver.ensure(held_table(plan, SETTINGS))
    with source_server(lab.server):
        client = Client(lab.pod, "192.0.2.2")
        assert client.seen == "192.0.2.10"
        assert client.echo("before") == "before"
        changed = GatewayTableSettings("gwtun", ("gwup",), tunnel_mtu=1400)  # new rules
        with entered(lab.router):
            assert driver.ensure(held_table(plan, changed)).action == "update"
        assert client.echo("after") == "after"
        client.close()
        assert Client(lab.pod, "192.0.2.2").seen == "192.0.2.10"


def test_drift_is_detected_and_repaired(sandbox: Sandbox) -> None:
    lab = gateway_lab(sandbox)
    driver = NftablesDriver("inet", "gatewayd")
    table = held_table(gateway_plan("10.99.0.5", "fd00:99::5"), SETTINGS)
    with entered(lab.router):
        driver.ensure(table)

        run(["nft", "delete element inet gatewayd rule0_src { 10.99.0.5 }"], lab.router)
        assert driver.ensure(table).action == "none"  # memory only: cheap, blind
        result = driver.ensure(table, verify=True)
        assert (result.action, result.drift, result.added) == ("elements", True, 1)

        run(["nft", "flush chain inet gatewayd postrouting"], lab.router)
        result = driver.ensure(table, verify=True)
        assert (result.action, result.drift) == ("update", True)

        run(["nft", "add set inet gatewayd stray { type ipv4_addr; }"], lab.router)
        result = driver.ensure(table, verify=True)
        assert (result.action, result.drift) == ("update", True)
        observed = driver.observe()
        assert observed is not None and set(observed.sets) == set(table.sets)

        # A chain that is not ours any more: only a new table restores it.
        run(["nft", "flush chain inet gatewayd postrouting; "
             "delete chain inet gatewayd postrouting"], lab.router)
        result = driver.ensure(table, verify=True)
        assert (result.action, result.drift) == ("replace", True)

        run(["nft", "delete table inet gatewayd"], lab.router)
        result = driver.ensure(table, verify=True)
        assert (result.action, result.drift) == ("replace", True)
        assert driver.ensure(table, verify=True).action == "none"

        # Stale memory on the fast path: the element to delete is already gone by hand.
        run(["nft", "delete element inet gatewayd rule0_src { 10.99.0.5 }"], lab.router)
        emptier = held_table(gateway_plan("fd00:99::5"), SETTINGS)
        result = driver.ensure(emptier)
        assert (result.action, result.drift) == ("none", True)
        observed = driver.observe()
        assert observed is not None and observed.sets["rule0_src"].elements == frozenset()

        assert driver.delete() is True
        assert driver.observe() is None
        assert driver.delete() is False
    with source_server(lab.server):  # without the table the router forwards as it likes
        assert Client(lab.pod, "192.0.2.2").seen == "10.99.0.5"


def test_an_update_the_kernel_refuses_leaves_the_table_in_force(sandbox: Sandbox) -> None:
    """A new rule that needs a new set, and one the kernel refuses (its counter does not
    exist): nothing of the update stays, the sets made for it neither, and the table the
    driver installed last still filters (`intact`)."""
    lab = gateway_lab(sandbox)
    driver = NftablesDriver("inet", "gatewayd")
    plan = gateway_plan("10.99.0.5", "fd00:99::5")
    table = held_table(plan, SETTINGS)
    bigger = held_table(replace(plan, rules=(*plan.rules, SnatRule(
        "team.reports", Role.ACTIVE, frozenset({ip("10.99.0.6")}), (net("192.0.2.0/24"),),
        ip("192.0.2.10")))), SETTINGS)
    assert set(bigger.sets) > set(table.sets)
    refused = replace(bigger, body=(*bigger.body, {"rule": {
        "family": "inet", "table": "gatewayd", "chain": "forward",
        "expr": [{"counter": "no_such_counter"}, {"drop": None}]}}))
    with entered(lab.router):
        driver.ensure(table)
        with pytest.raises(NftablesError, match="refused the update"):
            driver.ensure(refused)
        observed = driver.observe()
        assert observed is not None and set(observed.sets) == set(table.sets)
        assert driver.intact()
        assert driver.ensure(bigger).action == "update"
    with source_server(lab.server):
        assert Client(lab.pod, "192.0.2.2").seen == "192.0.2.10"


def test_a_table_with_flags_is_replaced_or_reported_never_listed(sandbox: Sandbox) -> None:
    """nft 1.0.6 corrupts the heap of a process that lists a table with one flag as JSON (the
    agent aborted). A table made dormant by hand (its rules off) is replaced; one another
    process owns is reported: the kernel lets nobody else change it."""
    lab = gateway_lab(sandbox)
    driver = NftablesDriver("inet", "gatewayd")
    table = held_table(gateway_plan("10.99.0.5", "fd00:99::5"), SETTINGS)
    with entered(lab.router):
        driver.ensure(table)
        run(["nft", "add table inet gatewayd { flags dormant; }"], lab.router)
        assert not driver.intact()
        assert driver.counters() == {}
        result = driver.ensure(table, verify=True)
        assert (result.action, result.drift) == ("replace", True)
        assert driver.intact()
        run(["nft", "delete table inet gatewayd"], lab.router)
    with source_server(lab.server), owned_table(lab.router, "inet", "gatewayd"):
        with entered(lab.router):
            with pytest.raises(FlaggedTableError, match=r"flags owner \(another process owns"):
                driver.observe()
            with pytest.raises(FlaggedTableError, match="flags owner"):
                driver.ensure(table, verify=True)
            assert not driver.intact()
        assert Client(lab.pod, "192.0.2.2").seen == "10.99.0.5"  # the owner's empty table
    with entered(lab.router):  # gone with its owner
        assert driver.ensure(table, verify=True).action == "replace"
    with source_server(lab.server):
        assert Client(lab.pod, "192.0.2.2").seen == "192.0.2.10"


@contextlib.contextmanager
def owned_table(netns: str, family: str, name: str) -> Iterator[None]:
    """An empty table that an `nft -i` process owns while the context lasts."""
    owner = subprocess.Popen(["ip", "netns", "exec", netns, "nft", "-i"], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        assert owner.stdin is not None
        owner.stdin.write(f"add table {family} {name} {{ flags owner; }}\n")
        owner.stdin.flush()
        wait_for(lambda: f"table {family} {name}" in run(["nft", "list", "tables"],
                                                         netns).stdout,
                 10, "the owned table")
        yield
    finally:
        owner.kill()  # the kernel removes an owned table with its owner
        owner.wait(5)
        wait_for(lambda: f"table {family} {name}" not in run(["nft", "list", "tables"],
                                                             netns).stdout,
                 10, "the owned table gone")


# --- steer table -------------------------------------------------------------------------------

NODE_SETTINGS = SteerTableSettings(
    gateway_marks={"gw-a": 0x100, "gw-b": 0x200},
    tunnel_interfaces={"gw-a": "egw-a", "gw-b": "egw-b"},
    mark_mask=0xFF00,
)
CLUSTER = (net("10.244.0.0/16"), net("192.0.2.0/24"))
SERVICE = "203.0.113.50"  # reached only through a gateway
NODE_NETWORK_HOST = "192.0.2.2"  # cluster-internal: reached directly, masqueraded by the "CNI"


def node_plan(*rules: SteerRule) -> NodePlan:
    return NodePlan("node", rules=rules, cluster_internal=CLUSTER)


def tunnel_rule(gateway: str = "gw-a") -> SteerRule:
    return SteerRule("team.payments", SteerAction.TUNNEL, frozenset({ip("10.244.1.5")}),
                     (net("0.0.0.0/0"),), gateway=gateway, standby="gw-b")


@dataclass(frozen=True)
class SteerLab:
    pod: str
    node: str
    server: str


# gateway -> (node's tunnel address, gateway's tunnel address, egress/uplink address, server)
GATEWAY_LINKS = {
    "gw-a": ("10.98.1.1/30", "10.98.1.2/30", "198.51.100.1/25", "198.51.100.2/25"),
    "gw-b": ("10.98.2.1/30", "10.98.2.2/30", "198.51.100.129/25", "198.51.100.130/25"),
}


def steer_lab(box: Sandbox, gateway_snat: bool) -> SteerLab:
    """Gateways gw-a and gw-b each reach the server on their own link. With `gateway_snat`
    they run the gateway table (SNAT to their uplink address, for pod 10.244.1.5 only);
    without it they just route, so the server sees the source that arrives."""
    pod, node, server = box.netns("pod"), box.netns("node"), box.netns("server")
    box.veth(pod, "eth0", node, "pod0")
    box.veth(node, "nodeup", server, "srvnode")
    sh(pod,
       "ip addr add 10.244.1.5/24 dev eth0", "ip addr add 10.244.1.6/24 dev eth0",
       "ip route add default via 10.244.1.1")
    sh(node,
       "ip addr add 10.244.1.1/24 dev pod0", "ip addr add 192.0.2.1/24 dev nodeup",
       "ip route add default via 192.0.2.2", "sysctl -qw net.ipv4.ip_forward=1")
    sh(server,
       "ip addr add 192.0.2.2/24 dev srvnode", f"ip addr add {SERVICE}/32 dev lo")
    # The node's CNI masquerades pod traffic leaving the pod network, in its own table.
    run(["nft", "add table ip cni; add chain ip cni post { type nat hook postrouting priority "
         "srcnat; }; add rule ip cni post ip saddr 10.244.0.0/16 oifname != pod0 masquerade"],
        node)
    for name, (node_end, gateway_end, uplink, server_end) in GATEWAY_LINKS.items():
        gw, letter = box.netns(name), name[-1]
        box.veth(node, f"egw-{letter}", gw, "tun")
        box.veth(gw, "uplink", server, f"srv{letter}")
        sh(node, f"ip addr add {node_end} dev egw-{letter}")
        sh(server, f"ip addr add {server_end} dev srv{letter}")
        sh(gw,
           f"ip addr add {gateway_end} dev tun", f"ip addr add {uplink} dev uplink",
           f"ip route add default via {server_end.split('/')[0]}",
           f"ip route add 10.244.0.0/16 via {node_end.split('/')[0]}",
           "sysctl -qw net.ipv4.ip_forward=1",
           # The node sends to any destination straight onto this link, like into a tunnel.
           "sysctl -qw net.ipv4.conf.tun.proxy_arp=1")
        if gateway_snat:
            plan = GatewayPlan(name, rules=(SnatRule(
                "team.payments", Role.ACTIVE, frozenset({ip("10.244.1.5")}),
                (net(f"{SERVICE}/32"),), ip(uplink.split("/")[0])),))
            with entered(gw):
                NftablesDriver("inet", "gatewayd").ensure(
                    held_table(plan, GatewayTableSettings("tun", ("uplink",))))
    # Answers to pods (and to a masqueraded node) go back through gw-a.
    sh(server, "ip route add 10.244.0.0/16 via 198.51.100.1",
       "ip route add 10.98.0.0/16 via 198.51.100.1")
    with entered(node):
        PolicyRoutingDriver(mark_mask=0xFF00, families=(4,)).ensure(
            {0x100: (100, "egw-a"), 0x200: (101, "egw-b")})
    return SteerLab(pod, node, server)


def test_steered_traffic_keeps_the_pod_ip_despite_the_cni_masquerade(sandbox: Sandbox) -> None:
    lab = steer_lab(sandbox, gateway_snat=False)
    driver = NftablesDriver("inet", "gatewayd-steer")
    drop = SteerRule("team.blocked", SteerAction.DROP, frozenset({ip("10.244.1.6")}),
                     (net("0.0.0.0/0"),), reason=DropReason.NO_EGRESS_GATEWAY)
    table = render_steer_table(node_plan(tunnel_rule(), drop), NODE_SETTINGS)
    with source_server(lab.server):
        assert Client(lab.pod, SERVICE).seen == "192.0.2.1"  # not steered yet: masqueraded
        with entered(lab.node):
            assert driver.ensure(table).action == "replace"
            assert driver.ensure(table, verify=True).action == "none"
        assert Client(lab.pod, SERVICE).seen == "10.244.1.5"  # marked: the pod IP arrives
        # Cluster-internal destinations are never steered (and the CNI masquerades them).
        assert Client(lab.pod, NODE_NETWORK_HOST).seen == "192.0.2.1"
        assert Client(lab.pod, NODE_NETWORK_HOST, source="10.244.1.6").seen == "192.0.2.1"

        blocked_counter = counter_named(table, "team.blocked drop (no-egress-gateway)")
        with entered(lab.node):
            before = driver.counters()[blocked_counter][0]
        blocked = syn_only(lab.pod, SERVICE, source="10.244.1.6")
        counter_rises(driver, lab.node, blocked_counter, before)
        blocked.close()

        # Without the null binding the CNI's masquerade would win: take it away by hand...
        run(["nft", "flush chain inet gatewayd-steer postrouting"], lab.node)
        assert Client(lab.pod, SERVICE).seen == "10.98.1.1"
        with entered(lab.node):
            result = driver.ensure(table, verify=True)
        assert (result.action, result.drift) == ("update", True)
        assert Client(lab.pod, SERVICE).seen == "10.244.1.5"


def steered_via_gw_a(sandbox: Sandbox, gateway_snat: bool
                     ) -> tuple[SteerLab, NftablesDriver, NodePlan]:
    """The steer lab with the payments policy's table in force, through gw-a."""
    lab = steer_lab(sandbox, gateway_snat)
    driver = NftablesDriver("inet", "gatewayd-steer")
    plan = node_plan(tunnel_rule("gw-a"))
    with entered(lab.node):
        driver.ensure(render_steer_table(plan, NODE_SETTINGS))
    return lab, driver, plan


def test_failover_moves_new_connections_and_keeps_established_ones(sandbox: Sandbox) -> None:
    lab, driver, plan = steered_via_gw_a(sandbox, gateway_snat=True)
    with source_server(lab.server):
        established = Client(lab.pod, SERVICE)
        assert established.seen == "198.51.100.1"
        with entered(lab.node):
            failover = render_steer_table(plan, NODE_SETTINGS, active={"team.payments": "gw-b"})
            assert driver.ensure(failover).action == "update"
        # gw-b has no conntrack entry for it: had it moved, gw-b would SNAT it anew and the
        # server would reset it.
        assert established.echo("still via gw-a") == "still via gw-a"
        assert Client(lab.pod, SERVICE).seen == "198.51.100.129"
        established.close()


def test_an_established_connection_follows_its_policy_with_its_next_packet(
        sandbox: Sandbox) -> None:
    """gw-a dies and the policy's failover follows it to gw-b (which, in a cluster, has the
    connection's state from conntrackd; here both gateways only route). The connection's
    next packet goes through gw-b, with nothing listing or rewriting conntrack entries, and
    it stays there once the follow's rule is gone."""
    lab, driver, plan = steered_via_gw_a(sandbox, gateway_snat=False)
    with source_server(lab.server):
        established = Client(lab.pod, SERVICE)
        assert established.seen == "10.244.1.5"
        # gw-a is gone, and the server's answers to the pods come through gw-b now.
        run(["ip", "link", "set", "tun", "down"], f"{sandbox.prefix}gw-a")
        run(["ip", "route", "replace", "10.244.0.0/16", "via", "198.51.100.129"], lab.server)
        active = {"team.payments": "gw-b"}
        follow = ConnectionFollow("gw-a", "team.payments", "gw-b")
        with entered(lab.node):
            driver.ensure(render_steer_table(plan, NODE_SETTINGS, active, follows={follow}))
        assert established.echo("through gw-b") == "through gw-b"
        assert connection_marks(lab.node) == {0x200}
        with entered(lab.node):
            driver.ensure(render_steer_table(plan, NODE_SETTINGS, active))
        assert established.echo("still through gw-b") == "still through gw-b"
        established.close()


def connection_marks(netns: str) -> set[int]:
    """The steering bits of the marks of the node's connections to the service."""
    listed = run(["conntrack", "-L", "-o", "extended", "-p", "tcp", "-d", SERVICE], netns,
                 check=False).stdout
    return {flow.mark & NODE_SETTINGS.mark_mask for flow in parse_flows(listed)}


def test_no_new_connection_leaves_unsteered_while_the_rules_change(sandbox: Sandbox) -> None:
    """Failovers back and forth under a stream of new flows (a UDP datagram from a new port
    each): every one goes through a gateway, none leaves through the node's masquerade.
    A table re-created per change let about one flow in two changes out with the node IP."""
    lab = steer_lab(sandbox, gateway_snat=False)
    driver = NftablesDriver("inet", "gatewayd-steer")
    plan = node_plan(tunnel_rule("gw-a"))
    tables = [render_steer_table(plan, NODE_SETTINGS, active={"team.payments": gateway})
              for gateway in ("gw-a", "gw-b")]
    with entered(lab.node):
        driver.ensure(tables[0])
    with flood(lab.pod, lab.server) as outcome, entered(lab.node):
        for change in range(200):
            assert driver.ensure(tables[(change + 1) % 2]).action == "update"
    outcome.check()


@dataclass
class Flood:
    """New flows from the pod to the service: how many were sent, and how many arrived
    with the pod's address (through a gateway) or the node's (unsteered, masqueraded)."""

    arrived: Callable[[], list[int]]  # from the node's address, from the pod's
    sent: int = 0

    def check(self) -> None:
        leaked, steered = self.arrived()
        assert self.sent > 2_000 and steered > self.sent // 2, (self.sent, steered)
        assert leaked == 0, f"{leaked} of {self.sent} new flows left with the node's address"


@contextlib.contextmanager
def flood(pod: str, server: str) -> Iterator[Flood]:
    """UDP datagrams to the service, each from a new port (a new conntrack entry), from a
    thread in `pod` until the block ends; the server's counters tell where they came from."""
    outcome = Flood(arrivals(server, "192.0.2.1", "10.244.1.5"))
    stop = threading.Event()

    def send() -> None:
        # This thread alone moves into the pod's namespace, for good: `entered` keeps one
        # stack of saved namespaces for the whole process, which two threads would mix up
        # (the main thread left in a namespace its sandbox then kills every process of).
        setns(pod)
        while not stop.is_set():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"x", (SERVICE, 9999))
            outcome.sent += 1

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield outcome
    finally:
        stop.set()
        sender.join()

