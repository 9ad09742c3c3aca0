"""The lab's promise: every pod leaves with the source IP its policies say, end to end."""

from __future__ import annotations

import pytest

from gatewayd.lab.netns import run
from gatewayd.lab.observe import has_address
from gatewayd.lab.topology import EXAMPLE_SNAPSHOT, GATEWAYS, NODES, Lab
from gatewayd.lab.verify import expectations, render_text, verify
from gatewayd.policy.snapshot import load_snapshot

pytestmark = pytest.mark.lab

PAYMENT_GATEWAY, EXCLUDED_HOST, API_SERVER = "198.51.100.10", "198.51.100.11", "198.51.100.6"
GATEWAYS_FILE = "20-gateways.yaml"
PAYMENT_GATEWAY6, EXCLUDED_HOST6, API_SERVER6 = "2001:db8:100::10", "2001:db8:100::11", \
    "2001:db8:100::6"


def test_every_pod_sees_the_source_ip_the_engine_expects(lab: Lab) -> None:
    rows = verify(lab.snapshot_dir)
    print(render_text(rows))
    assert [row for row in rows if not row.ok] == []


def test_the_expected_table_holds_every_case_the_lab_is_meant_to_show() -> None:
    """The table above proves something only if it covers these cases; values come from the
    snapshot's objects, so a wrong engine decision cannot hide here."""
    snapshot = load_snapshot([EXAMPLE_SNAPSHOT]).snapshot
    egress_ip = {p.name: str(p.gateways[0].egress_ip) for p in snapshot.policies}
    expected = {(e.pod, e.destination): e.expected for e in expectations(snapshot)}
    for node in NODES:
        n = node.number
        # a selected pod leaves with its policy's egress IP; the second policy has its own
        assert expected[(f"checkout-{n}", PAYMENT_GATEWAY)] == egress_ip["payment-gateway"]
        assert expected[(f"batch-{n}", PAYMENT_GATEWAY)] == egress_ip["batch-all"]
        assert egress_ip["batch-all"] != egress_ip["payment-gateway"]
        # not a destination of its policy, excluded, cluster-internal, not selected:
        # the node's own masquerade, i.e. not through the gateway
        for pod, destination in ((f"checkout-{n}", EXCLUDED_HOST), (f"batch-{n}", EXCLUDED_HOST),
                                 (f"batch-{n}", API_SERVER), (f"web-{n}", PAYMENT_GATEWAY)):
            assert expected[(pod, destination)] == node.address, (pod, destination)
        # IPv6: an IPv4 egressIP takes the IPv6 address of its interface on the active
        # gateway; an IPv6 egressIP is used as it is
        active = GATEWAYS[0].address6
        assert expected[(f"checkout-{n}", PAYMENT_GATEWAY6)] == active
        assert expected[(f"batch-{n}", PAYMENT_GATEWAY6)] == active
        assert expected[(f"web-{n}", PAYMENT_GATEWAY6)] == egress_ip["reports-ipv6"]
        for pod, destination in ((f"checkout-{n}", EXCLUDED_HOST6),
                                 (f"batch-{n}", EXCLUDED_HOST6), (f"batch-{n}", API_SERVER6)):
            assert expected[(pod, destination)] == node.address6, (pod, destination)


def test_egress_ips_are_held_by_the_active_gateway_only(lab: Lab) -> None:
    active, standby = GATEWAYS
    for address in ("198.51.100.70", "198.51.100.71", "2001:db8:100::72"):
        assert has_address(active.netns, "eth0", address)
        assert not has_address(standby.netns, "eth0", address)


@pytest.mark.parametrize("version", [4, 6], ids=["ipv4", "ipv6"])
def test_steered_traffic_reaches_the_gateway_with_the_pod_ip(lab: Lab, version: int) -> None:
    """The node masquerades its pods (like flannel); steered flows must not be masqueraded."""
    pod = NODES[0].pods[0]
    source = pod.address_of(version)
    destination = PAYMENT_GATEWAY if version == 4 else PAYMENT_GATEWAY6
    verify(lab.snapshot_dir, [pod])
    flows = run(["conntrack", "-L", "-f", f"ipv{version}", "-p", "tcp", "--orig-src", source,
                 "--orig-dst", destination], GATEWAYS[0].netns).stdout
    assert f"src={source}" in flows


def test_a_family_missing_on_the_egress_interface_drops_only_that_family(lab: Lab) -> None:
    """gw1's uplink without an IPv6 address: the policies with an IPv4 egressIP have no IPv6
    egress IP there, so their IPv6 traffic is dropped, while their IPv4 traffic and the IPv6
    egressIP of another policy are not touched (Cilium >= 1.20 with the #48660 fix)."""
    gateways = (lab.snapshot_dir / GATEWAYS_FILE).read_text()
    without_v6 = gateways.replace(f', "{GATEWAYS[0].address6}/64"', "", 1)
    assert without_v6 != gateways
    before = lab.generations()
    lab.write_snapshot_file(GATEWAYS_FILE, without_v6)
    try:
        lab.wait_applied(before)
        rows = {(r.pod, r.destination): r for r in verify(lab.snapshot_dir)}
        print(render_text(list(rows.values())))
        assert [row for row in rows.values() if not row.ok] == []
        for node in NODES:
            n = node.number
            assert rows[(f"checkout-{n}", PAYMENT_GATEWAY6)].expected is None  # dropped
            assert rows[(f"batch-{n}", PAYMENT_GATEWAY6)].expected is None
            assert rows[(f"checkout-{n}", PAYMENT_GATEWAY)].seen == "198.51.100.70"
            assert rows[(f"batch-{n}", PAYMENT_GATEWAY)].seen == "198.51.100.71"
            assert rows[(f"web-{n}", PAYMENT_GATEWAY6)].seen == "2001:db8:100::72"
    finally:
        before = lab.generations()
        lab.write_snapshot_file(GATEWAYS_FILE, gateways)
        lab.wait_applied(before)
