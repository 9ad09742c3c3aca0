"""Each daemon's `/metrics` in the standalone lab: what promtool accepts, and values that
follow the traffic, the egress IPs and the tunnels."""

from __future__ import annotations

import pytest

from gatewayd.lab.netns import wait_for
from gatewayd.lab.scrape import metrics_text, parse_samples, promtool_check, value
from gatewayd.lab.topology import GATEWAYS, HTTP_PORT, NODES, Lab
from gatewayd.lab.verify import probe

pytestmark = pytest.mark.lab

ACTIVE, STANDBY = GATEWAYS
CHECKOUT = NODES[0].pods[0]
PAYMENT, PAYMENT_IP = "payment-gateway", "198.51.100.70"
TIMEOUT = 30.0


@pytest.mark.parametrize("host", [*GATEWAYS, *NODES], ids=lambda h: h.name)
def test_every_daemon_serves_metrics_promtool_accepts(lab: Lab, host: object) -> None:
    netns = host.netns
    text = metrics_text(netns)
    assert promtool_check(text) == ""
    samples = parse_samples(text)
    role = "agent" if host in GATEWAYS else "steer"
    assert value(samples, "gatewayd_ready", role=role) == 1.0
    assert value(samples, "gatewayd_plan_generation_applied", role=role) == value(
        samples, "gatewayd_plan_generation_desired", role=role) >= 1


def test_gateway_metrics_follow_traffic_egress_ips_and_peers(lab: Lab) -> None:
    def snat_packets() -> float:
        samples = parse_samples(metrics_text(ACTIVE.netns))
        return value(samples, "gatewayd_snat_packets_total", policy=PAYMENT,
                     egress_ip=PAYMENT_IP) or 0.0

    before = snat_packets()
    assert probe(CHECKOUT.netns, "198.51.100.10") == PAYMENT_IP
    wait_for(lambda: snat_packets() > before, TIMEOUT, "the SNAT counter to count the request")

    samples = parse_samples(metrics_text(ACTIVE.netns))
    assert value(samples, "gatewayd_egress_ip_expected", egress_ip=PAYMENT_IP) == 1.0
    assert value(samples, "gatewayd_egress_ip_held", egress_ip=PAYMENT_IP) == 1.0
    assert value(samples, "gatewayd_egress_ip_conflict", egress_ip=PAYMENT_IP) == 0.0
    node = NODES[0].name
    wait_for(lambda: value(parse_samples(metrics_text(ACTIVE.netns)),
                           "gatewayd_wireguard_peer_up", interface=ACTIVE.tunnel_interface,
                           peer=node) == 1.0, TIMEOUT, f"{node} up on {ACTIVE.name}")
    age = value(parse_samples(metrics_text(ACTIVE.netns)),
                "gatewayd_wireguard_peer_last_handshake_age_seconds",
                interface=ACTIVE.tunnel_interface, peer=node)
    assert age is not None and 0 <= age < 180
    # The standby holds the rules but not the payment policy's egress IP.
    standby = parse_samples(metrics_text(STANDBY.netns))
    assert value(standby, "gatewayd_egress_ip_held", egress_ip=PAYMENT_IP) in (None, 0.0)
    # Pod IPs never become labels.
    assert all(pod.address not in metrics_text(ACTIVE.netns) for pod in NODES[0].pods)


def test_a_node_reports_its_tunnels_and_probes(lab: Lab) -> None:
    node = NODES[0]

    def gateways_up() -> dict[str, float | None]:
        samples = parse_samples(metrics_text(node.netns))
        return {g.name: value(samples, "gatewayd_gateway_up", gateway=g.name) for g in GATEWAYS}

    wait_for(lambda: gateways_up() == {g.name: 1.0 for g in GATEWAYS}, TIMEOUT,
             "both gateways up on the node")
    samples = parse_samples(metrics_text(node.netns))
    for gateway in GATEWAYS:
        assert (value(samples, "gatewayd_probes_total", gateway=gateway.name) or 0) > 0


def test_nat_use_per_egress_ip_and_destination(lab: Lab) -> None:
    def connections() -> float:
        samples = parse_samples(metrics_text(ACTIVE.netns))
        return value(samples, "gatewayd_nat_destination_connections", egress_ip=PAYMENT_IP,
                     destination="198.51.100.10", port=str(HTTP_PORT), protocol="tcp") or 0.0

    assert probe(CHECKOUT.netns, "198.51.100.10") == PAYMENT_IP
    # conntrack keeps the closed connection (TIME_WAIT) for minutes; it is read every 30 s.
    wait_for(lambda: connections() >= 1, 90, "the connection counted for its egress IP")
    samples = parse_samples(metrics_text(ACTIVE.netns))
    assert (value(samples, "gatewayd_nat_connections", egress_ip=PAYMENT_IP) or 0) >= 1
