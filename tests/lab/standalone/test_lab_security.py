"""The gateway is never an open relay, and its private key never leaks.

Each test forces traffic the policies do not allow at the gateway, past everything a cloud
node would normally do, and checks that the gateway drops and counts it: to destinations or
from sources outside every policy, out of an interface that is no uplink, to the gateway
host's own services, and for a policy whose egress IP the gateway could not add.
"""

from __future__ import annotations

import contextlib
import json
import stat
import sys
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network

import pytest

from gatewayd.dataplane.nft_render import (
    DROP_EGRESS_IP_NOT_HELD,
    DROP_TUNNEL_INPUT,
    DROP_TUNNEL_NOT_UPLINK,
    DROP_TUNNEL_UNKNOWN,
    DROP_UPLINK_FORWARD,
)
from gatewayd.lab.netns import Sandbox, run, wait_for
from gatewayd.lab.observe import GATEWAY_TABLE, drop_counters, nft_table
from gatewayd.lab.topology import (
    DAEMON_HOSTS,
    EXTERNAL,
    GATEWAYS,
    NODES,
    Lab,
    PodHost,
    lab_prefix,
)
from gatewayd.lab.verify import probe

pytestmark = pytest.mark.lab

ACTIVE = GATEWAYS[0]
NODE = NODES[0]
CHECKOUT, BATCH, WEB = NODE.pods
PAYMENT_GATEWAY, EXCLUDED_HOST, PAYMENT_GATEWAY6, EXCLUDED_HOST6 = EXTERNAL.addresses
FORCED_TABLE = "4242"  # a routing table of our own on the node


def counted(counter: str) -> int:
    """Like gateway_drops, 0 for a counter the table does not have (yet)."""
    table = nft_table(ACTIVE.netns, *GATEWAY_TABLE) or []
    return drop_counters(table).get(counter, 0)


def gateway_drops(counter: str) -> int:
    table = nft_table(ACTIVE.netns, *GATEWAY_TABLE)
    assert table is not None, "the gateway has no nftables table"
    counters = drop_counters(table)
    assert counter in counters, f"no drop rule counts into {counter}: {counters}"
    return counters[counter]


@contextlib.contextmanager
def forced_into_tunnel(source: str, destination: str) -> Iterator[None]:
    """On the node, send `source` -> `destination` into the active gateway's tunnel, with the
    pod's own address (exempt from the node's masquerade), whatever steer decided."""
    tunnel = NODE.tunnel_interface(ACTIVE)
    ns = NODE.netns
    family = f"-{ip_address(source).version}"
    ip = "ip" if family == "-4" else "ip6"
    rule = ["from", source, "to", destination, "lookup", FORCED_TABLE, "priority", "10"]
    route = ["default", "dev", tunnel, "table", FORCED_TABLE]
    run(["ip", family, "route", "add", *route], ns)
    run(["ip", family, "rule", "add", *rule], ns)
    added = json.loads(run(["nft", "-j", "-e", "-a", "insert", "rule", "inet", "cni-nat",
                            "postrouting", ip, "saddr", source, ip, "daddr", destination,
                            "accept"], ns).stdout)
    handle = added["nftables"][0]["insert"]["rule"]["handle"]
    try:
        yield
    finally:
        run(["nft", "delete", "rule", "inet", "cni-nat", "postrouting", "handle", str(handle)],
            ns)
        run(["ip", family, "rule", "del", *rule], ns)
        run(["ip", family, "route", "del", *route], ns)


@contextlib.contextmanager
def routed_via_gateway(prefix: str) -> Iterator[None]:
    """On the external host, use the gateway's uplink address as a router to `prefix`."""
    version = ip_network(prefix).version
    route = [prefix, "via", ACTIVE.address if version == 4 else ACTIVE.address6]
    run(["ip", f"-{version}", "route", "add", *route], EXTERNAL.netns)
    try:
        yield
    finally:
        run(["ip", f"-{version}", "route", "del", *route], EXTERNAL.netns)


@pytest.mark.parametrize(("pod", "destination"), [
    (WEB, PAYMENT_GATEWAY),  # a source no policy selects
    (CHECKOUT, EXCLUDED_HOST),  # a selected source, to a destination outside its policy
    (CHECKOUT, EXCLUDED_HOST6),
    (BATCH, EXCLUDED_HOST6),  # excluded from the source's policy
], ids=["unselected-source", "destination-outside-policy", "ipv6-destination-outside-policy",
        "ipv6-excluded-destination"])
def test_tunnel_traffic_outside_every_policy_is_dropped(lab: Lab, pod: PodHost,
                                                        destination: str) -> None:
    assert probe(CHECKOUT.netns, PAYMENT_GATEWAY) == "198.51.100.70"  # the tunnel works
    assert probe(CHECKOUT.netns, PAYMENT_GATEWAY6) == ACTIVE.address6
    before = gateway_drops(DROP_TUNNEL_UNKNOWN)
    with forced_into_tunnel(pod.address_of(ip_address(destination).version), destination):
        assert probe(pod.netns, destination) is None
    assert gateway_drops(DROP_TUNNEL_UNKNOWN) > before


@pytest.mark.parametrize(("prefix", "target"), [
    (NODE.pod_cidr, CHECKOUT.address), ("192.0.2.0/24", NODE.address),
    (NODE.pod_cidr6, CHECKOUT.address6), ("2001:db8:200::/64", NODE.address6),
], ids=["to-pod-cidr", "to-cloud-subnet", "to-ipv6-pod-cidr", "to-ipv6-cloud-subnet"])
def test_the_uplink_cannot_use_the_gateway_as_a_router(lab: Lab, prefix: str,
                                                       target: str) -> None:
    """Without the forward filter, ping would succeed: the gateway has a route to the pod
    CIDR through the tunnel and to the cloud subnet through its default route."""
    before = gateway_drops(DROP_UPLINK_FORWARD)
    with routed_via_gateway(prefix):
        ping = run(["ping", "-c", "3", "-i", "0.2", "-W", "1", target], EXTERNAL.netns,
                   check=False)
        assert ping.returncode != 0, ping.stdout
    assert gateway_drops(DROP_UPLINK_FORWARD) > before


def test_private_keys_are_0600_and_never_logged(lab: Lab) -> None:
    for host in DAEMON_HOSTS:
        key_file = lab.key_path(host)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
        key = key_file.read_text().strip()
        assert len(key) == 44
        written = [p for p in lab.directory.rglob("*") if p.is_file() and p != key_file]
        leaks = [p for p in written if key in p.read_text(errors="replace")]
        assert leaks == [], f"the private key of {host} is in {leaks}"
    # the search means something only if the daemons did log
    assert all(lab.log_path(host).stat().st_size > 0 for host in DAEMON_HOSTS)


def udp_burst(netns: str, destination: str, port: int, count: int = 20) -> None:
    """`count` datagrams, each from a new socket (a new connection for conntrack)."""
    code = (
        "import socket, sys, time\n"
        "for _ in range(int(sys.argv[3])):\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))\n"
        "    s.close()\n"
        "    time.sleep(0.01)\n"
    )
    run([sys.executable, "-c", code, destination, str(port), str(count)], netns)


@contextlib.contextmanager
def arrivals(netns: str, match: str) -> Iterator[Callable[[], int]]:
    """Count the packets that arrive in `netns` and match `match` (nft syntax, table ip)."""
    run(["nft", "-f", "-"], netns, input=(
        "table ip arrivals {\n"
        "  chain seen { type filter hook prerouting priority -300; policy accept;\n"
        f"    {match} counter\n"
        "  }\n"
        "}\n"))

    def count() -> int:
        listed = json.loads(run(["nft", "-j", "list", "table", "ip", "arrivals"],
                                netns).stdout)["nftables"]
        (rule,) = [o["rule"] for o in listed if "rule" in o]
        return sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)

    try:
        yield count
    finally:
        run(["nft", "delete", "table", "ip", "arrivals"], netns)


def test_pod_traffic_routed_out_another_interface_is_dropped(lab: Lab) -> None:
    """A management LAN on the gateway: batch-all (0.0.0.0/0) covers it, the gateway has a
    route to it, and it is not the uplink. Without the output-interface match the pod's
    packets would leave there, with the pod's own address."""
    management = "203.0.113.2"
    with Sandbox(lab_prefix() + "t") as sandbox:
        lan = sandbox.netns("mgmt")
        sandbox.veth(ACTIVE.netns, "mgmt0", lan, "eth0")
        run(["ip", "addr", "add", "203.0.113.1/24", "dev", "mgmt0"], ACTIVE.netns)
        run(["ip", "addr", "add", f"{management}/24", "dev", "eth0"], lan)
        before = counted(DROP_TUNNEL_NOT_UPLINK)
        with arrivals(lan, "udp dport 9") as arrived:
            udp_burst(BATCH.netns, management, 9)
            wait_for(lambda: counted(DROP_TUNNEL_NOT_UPLINK) > before or arrived() > 0, 10,
                     "the datagrams to be dropped or to arrive")
            assert arrived() == 0, "pod datagrams left through the management LAN"
        assert gateway_drops(DROP_TUNNEL_NOT_UPLINK) > before
    assert probe(BATCH.netns, PAYMENT_GATEWAY) == "198.51.100.71"  # the uplink still works


def test_a_tunnel_peer_cannot_reach_a_service_on_the_gateway_host(lab: Lab) -> None:
    """Like sshd: a TCP service listening on every address of the gateway host."""
    port = 2222
    with Sandbox(lab_prefix() + "t") as sandbox:
        sandbox.spawn(ACTIVE.netns, [sys.executable, "-m", "gatewayd.lab.echo",
                                     "--http-port", str(port), "--line-port", str(port + 1)])
        wait_for(lambda: bool(run(["ss", "-Htln", f"sport = :{port}"], ACTIVE.netns).stdout),
                 10, "the service on the gateway")
        assert probe(EXTERNAL.netns, ACTIVE.address, port) == PAYMENT_GATEWAY  # it listens
        before = counted(DROP_TUNNEL_INPUT)
        with forced_into_tunnel(CHECKOUT.address, ACTIVE.address):
            assert probe(CHECKOUT.netns, ACTIVE.address, port, seconds=2) is None
        assert gateway_drops(DROP_TUNNEL_INPUT) > before


CONFLICTED_IP = "198.51.100.72"
CONFLICTED_POLICY = f"""\
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata:
  name: web-conflicted
spec:
  selectors:
    - podSelector:
        matchLabels: {{app: web}}
  destinationCIDRs: [{PAYMENT_GATEWAY}/32]
  egressGateway:
    nodeSelector:
      matchLabels: {{egress.gatewayd.io/role: gateway}}
    egressIP: {CONFLICTED_IP}
"""


def test_a_policy_whose_egress_ip_could_not_be_added_sends_nothing(lab: Lab) -> None:
    """Another host on the segment holds the policy's egress IP: the gateway's ARP probe
    finds it and does not add the address. The policy's traffic must not leave at all: not
    with the pod's address, not SNATed to an address whose replies go elsewhere."""
    address = ["ip", "addr", "add", f"{CONFLICTED_IP}/24", "dev", "eth0"]
    run(address, EXTERNAL.netns)
    before = lab.generations([NODE.name])
    try:
        lab.write_snapshot_file("90-web-conflicted.yaml", CONFLICTED_POLICY)
        lab.wait_applied(before)  # the node steers web to the gateway

        def refused() -> bool:
            return CONFLICTED_IP in ((lab.status(ACTIVE.name) or {}).get("lastError") or "")

        wait_for(refused, 30, f"the gateway to report {CONFLICTED_IP} as refused")
        table = nft_table(ACTIVE.netns, *GATEWAY_TABLE) or []
        dropped = counted(DROP_EGRESS_IP_NOT_HELD)
        leaked = f"ip saddr {{ {CONFLICTED_IP}, {NODE.pod_cidr} }}"
        with arrivals(EXTERNAL.netns, leaked) as arrived:
            assert probe(WEB.netns, PAYMENT_GATEWAY, seconds=2) is None
            assert arrived() == 0, "the policy's traffic left the gateway"
        assert gateway_drops(DROP_EGRESS_IP_NOT_HELD) > dropped
        assert any(f"via {CONFLICTED_IP}: egress IP not held" in o["rule"].get("comment", "")
                   for o in table if "rule" in o)
    finally:
        run(["ip", "addr", "del", f"{CONFLICTED_IP}/24", "dev", "eth0"], EXTERNAL.netns)
        before = lab.generations([ACTIVE.name, NODE.name])
        (lab.snapshot_dir / "90-web-conflicted.yaml").unlink(missing_ok=True)
        lab.wait_applied(before, timeout=30)
