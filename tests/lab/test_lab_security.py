"""The gateway is never an open relay, and its private key never leaks.

Each test forces traffic the policies do not allow at the gateway, past everything a cloud
node would normally do, and checks that the gateway drops and counts it.
"""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import Iterator

import pytest

from gatewayd.dataplane.nft_render import DROP_TUNNEL_UNKNOWN, DROP_UPLINK_FORWARD
from gatewayd.lab.netns import run
from gatewayd.lab.observe import GATEWAY_TABLE, drop_counters, nft_table
from gatewayd.lab.topology import DAEMON_HOSTS, EXTERNAL, GATEWAYS, NODES, Lab, PodHost
from gatewayd.lab.verify import probe

pytestmark = pytest.mark.lab

ACTIVE = GATEWAYS[0]
NODE = NODES[0]
CHECKOUT, _, WEB = NODE.pods
PAYMENT_GATEWAY, EXCLUDED_HOST = EXTERNAL.addresses
FORCED_TABLE = "4242"  # a routing table of our own on the node


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
    rule = ["from", source, "to", destination, "lookup", FORCED_TABLE, "priority", "10"]
    run(["ip", "route", "add", "default", "dev", tunnel, "table", FORCED_TABLE], ns)
    run(["ip", "rule", "add", *rule], ns)
    added = json.loads(run(["nft", "-j", "-e", "-a", "insert", "rule", "ip", "cni-nat",
                            "postrouting", "ip", "saddr", source, "ip", "daddr", destination,
                            "accept"], ns).stdout)
    handle = added["nftables"][0]["insert"]["rule"]["handle"]
    try:
        yield
    finally:
        run(["nft", "delete", "rule", "ip", "cni-nat", "postrouting", "handle", str(handle)], ns)
        run(["ip", "rule", "del", *rule], ns)
        run(["ip", "route", "del", "default", "table", FORCED_TABLE], ns)


@contextlib.contextmanager
def routed_via_gateway(prefix: str) -> Iterator[None]:
    """On the external host, use the gateway's uplink address as a router to `prefix`."""
    route = [prefix, "via", ACTIVE.address]
    run(["ip", "route", "add", *route], EXTERNAL.netns)
    try:
        yield
    finally:
        run(["ip", "route", "del", *route], EXTERNAL.netns)


@pytest.mark.parametrize(("pod", "destination"), [
    (WEB, PAYMENT_GATEWAY),  # a source no policy selects
    (CHECKOUT, EXCLUDED_HOST),  # a selected source, to a destination outside its policy
], ids=["unselected-source", "destination-outside-policy"])
def test_tunnel_traffic_outside_every_policy_is_dropped(lab: Lab, pod: PodHost,
                                                        destination: str) -> None:
    assert probe(CHECKOUT.netns, PAYMENT_GATEWAY) == "198.51.100.70"  # the tunnel works
    before = gateway_drops(DROP_TUNNEL_UNKNOWN)
    with forced_into_tunnel(pod.address, destination):
        assert probe(pod.netns, destination) is None
    assert gateway_drops(DROP_TUNNEL_UNKNOWN) > before


@pytest.mark.parametrize(("prefix", "target"), [
    (NODE.pod_cidr, CHECKOUT.address), ("192.0.2.0/24", NODE.address),
], ids=["to-pod-cidr", "to-cloud-subnet"])
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
