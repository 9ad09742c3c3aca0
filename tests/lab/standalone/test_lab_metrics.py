"""Each daemon's `/metrics` in the standalone lab: what promtool accepts, and values that
follow the traffic, the egress IPs and the tunnels."""

from __future__ import annotations

import pytest

from gatewayd.lab.netns import wait_for
from gatewayd.lab.scrape import metrics_text, parse_samples, promtool_check, value
from gatewayd.lab.topology import GATEWAYS, HTTP_PORT, NODES, CloudNode, GatewayHost, Lab
from gatewayd.lab.verify import probe

pytestmark = pytest.mark.lab

ACTIVE, STANDBY = GATEWAYS
CHECKOUT = NODES[0].pods[0]
PAYMENT, PAYMENT_IP = "payment-gateway", "198.51.100.70"
TIMEOUT = 30.0


@pytest.mark.parametrize("host", [*GATEWAYS, *NODES], ids=lambda h: h.name)
def test_every_daemon_serves_metrics_promtool_accepts(
    lab: Lab, host: GatewayHost | CloudNode,
) -> None:
    netns = host.netns
    role = "agent" if host in GATEWAYS else "steer"
    # The state behind /metrics is refreshed every few seconds: it follows status.json.
    wait_for(lambda: value(parse_samples(metrics_text(netns)), "gatewayd_ready",
                           role=role) == 1.0, TIMEOUT, "the daemon ready in its metrics")
    text = metrics_text(netns)
    assert promtool_check(text) == ""
    samples = parse_samples(text)
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


def test_a_node_reports_its_tunnel_to_the_active_gateway(lab: Lab) -> None:
    node = NODES[0]

    def peer_up() -> float | None:
        return value(parse_samples(metrics_text(node.netns)), "gatewayd_wireguard_peer_up",
                     peer=ACTIVE.name)

    assert probe(node.pods[0].netns, "198.51.100.10") == PAYMENT_IP  # through the tunnel
    wait_for(lambda: peer_up() == 1.0, TIMEOUT, f"{ACTIVE.name} up on {node.name}")
    age = value(parse_samples(metrics_text(node.netns)),
                "gatewayd_wireguard_peer_last_handshake_age_seconds", peer=ACTIVE.name)
    assert age is not None and 0 <= age < 180
    # Standalone mode has no fast failover: no probes, so no gateway_up either.
    assert value(parse_samples(metrics_text(node.netns)), "gatewayd_gateway_up",
                 gateway=ACTIVE.name) is None


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
