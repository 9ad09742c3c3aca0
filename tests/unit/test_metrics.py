"""gatewayd.metrics and the daemons' metric samples: names, labels, the exposition format as
promtool judges it, and counters that follow the journal's events."""

from __future__ import annotations

import ipaddress
import math
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_nft_render import GATEWAY_PLAN, SETTINGS, counters, gateway_table

from gatewayd import metrics, systemd
from gatewayd.agent.metrics import (
    NAT_TOP_DESTINATIONS,
    counter_samples,
    egress_ip_samples,
    nat_samples,
)
from gatewayd.controller.metrics import controller_samples
from gatewayd.dataplane.natstats import NatFlow
from gatewayd.dataplane.nft_render import snat_counter_rules
from gatewayd.healthz import HealthServer
from gatewayd.probe import Failover
from gatewayd.steer.metrics import gateway_samples

pytestmark = pytest.mark.unit

ip = ipaddress.ip_address


def exposition(samples: list[metrics.Sample]) -> str:
    state = metrics.StateMetrics()
    state.update(samples)
    registry = CollectorRegistry()
    registry.register(state)
    return generate_latest(registry).decode()


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (Debian package prometheus; scripts/setup)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def gateway_state() -> list[metrics.Sample]:
    now = 1_800_000_000.0
    return [
        *metrics.peer_samples({"node1": now - 12, "node2": 0}, {"node1"}, now, "egress0"),
        *egress_ip_samples({ip("198.51.100.10"), ip("2001:db8:1::10")},
                           {ip("198.51.100.10")}, {ip("2001:db8:1::10")}),
        *counter_samples(GATEWAY_PLAN, {"rule0": (7, 700), "rule1": (3, 300), "rule2": (1, 50),
                                        "drop_invalid": (4, 240)}),
    ]


def test_peers_up_and_the_age_of_their_last_handshake() -> None:
    got = values(exposition(gateway_state()))
    node1 = (("interface", "egress0"), ("peer", "node1"))
    node2 = (("interface", "egress0"), ("peer", "node2"))
    assert got[("gatewayd_wireguard_peer_up", node1)] == 1.0
    assert got[("gatewayd_wireguard_peer_up", node2)] == 0.0
    assert got[("gatewayd_wireguard_peer_last_handshake_age_seconds", node1)] == 12.0
    assert math.isinf(got[("gatewayd_wireguard_peer_last_handshake_age_seconds", node2)])


def test_egress_ips_expected_held_and_in_conflict() -> None:
    got = values(exposition(gateway_state()))
    v4, v6 = (("egress_ip", "198.51.100.10"),), (("egress_ip", "2001:db8:1::10"),)
    assert [got[(name, v4)] for name in ("gatewayd_egress_ip_expected",
            "gatewayd_egress_ip_held", "gatewayd_egress_ip_conflict")] == [1.0, 1.0, 0.0]
    assert [got[(name, v6)] for name in ("gatewayd_egress_ip_expected",
            "gatewayd_egress_ip_held", "gatewayd_egress_ip_conflict")] == [1.0, 0.0, 1.0]


def test_snat_counters_are_per_policy_and_egress_ip_never_per_pod() -> None:
    text = exposition(gateway_state())
    got = values(text)
    rules = snat_counter_rules(GATEWAY_PLAN)
    expected: dict[tuple[str, str], list[int]] = {}
    for name, (packets, size) in {"rule0": (7, 700), "rule1": (3, 300), "rule2": (1, 50)}.items():
        totals = expected.setdefault((rules[name].policy, str(rules[name].egress_ip)), [0, 0])
        totals[0] += packets
        totals[1] += size
    for (policy, egress_ip), (packets, size) in expected.items():
        labels = (("egress_ip", egress_ip), ("policy", policy))
        assert got[("gatewayd_snat_packets_total", labels)] == packets
        assert got[("gatewayd_snat_bytes_total", labels)] == size
    assert got[("gatewayd_dropped_packets_total", (("reason", "invalid"),))] == 4
    assert "10.244." not in text and "fd00:10:244" not in text  # pod IPs never become labels


def test_counter_names_match_the_rendered_table() -> None:
    """The counter of each SNAT rule is the one render_gateway_table names for it."""
    rendered = counters(gateway_table(GATEWAY_PLAN, SETTINGS))
    for name, rule in snat_counter_rules(GATEWAY_PLAN).items():
        assert rendered[name] == f"{rule.policy} ({rule.role.value}) via {rule.egress_ip}"


def test_steer_and_controller_samples() -> None:
    failover = Failover("payments", "gw-a", "gw-b", "2026-12-03T00:00:00Z")
    got = values(exposition([
        *gateway_samples({"gw-a": False, "gw-b": True, "gw-c": None}, [failover]),
        *controller_samples(True, {
            "payments": {"gateways": [{"entry": 0, "name": "gw-b", "role": "active"},
                                      {"entry": 0, "name": "gw-a", "role": "standby"}],
                         "conditions": [{"type": "Ready", "status": "True"}]},
            "reports": {"gateways": [], "conditions": [{"type": "Ready", "status": "False"}]},
        }),
    ]))
    assert got[("gatewayd_gateway_up", (("gateway", "gw-a"),))] == 0.0
    assert got[("gatewayd_gateway_up", (("gateway", "gw-b"),))] == 1.0
    assert ("gatewayd_gateway_up", (("gateway", "gw-c"),)) not in got  # not known yet
    assert got[("gatewayd_failover_active", (("gateway", "gw-a"), ("policy", "payments")))] == 1
    assert got[("gatewayd_controller_leader", ())] == 1.0
    assert got[("gatewayd_policy_active_gateways", (("policy", "payments"),))] == 1
    assert got[("gatewayd_policy_active_gateways", (("policy", "reports"),))] == 0
    assert got[("gatewayd_policy_ready", (("policy", "reports"),))] == 0.0


def test_events_count_drift_failovers_and_input_errors() -> None:
    def value(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("gatewayd_drift_repairs_total", target="sysctl"),
              value("gatewayd_failovers_total", policy="p1", gateway="gw-a", kind="fast"),
              value("gatewayd_input_errors_total", kind="policy"),
              value("gatewayd_events_total", event="plan-applied"))
    systemd.journal_event("drift-repaired", "drift repaired: sysctl", systemd.Priority.WARNING,
                          target="sysctl")
    systemd.journal_event("failover", "failover", systemd.Priority.WARNING, policy="p1",
                          gateway="gw-a", standby="gw-b")
    systemd.journal_event("policy-invalid", "bad", systemd.Priority.ERR, policy="P/x", file="f")
    systemd.journal_event("plan-applied", "applied", systemd.Priority.NOTICE, generation="1",
                          rules="0")
    after = (value("gatewayd_drift_repairs_total", target="sysctl"),
             value("gatewayd_failovers_total", policy="p1", gateway="gw-a", kind="fast"),
             value("gatewayd_input_errors_total", kind="policy"),
             value("gatewayd_events_total", event="plan-applied"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9641", ("127.0.0.1", 9641)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9641", ("::1", 9641)),
])
def test_metrics_address(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text", ["9641", "localhost", "127.0.0.1:", "127.0.0.1:0",
                                  "127.0.0.1:70000", ":9641"])
def test_bad_metrics_address_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        metrics.parse_address(text)


@pytest.fixture
def daemon_state() -> Iterator[None]:
    metrics.STATE.update(gateway_state())
    metrics.PLAN_APPLY_SECONDS.labels("change").observe(0.02)
    yield
    metrics.STATE.update([])


def test_the_whole_registry_passes_promtool(daemon_state: None) -> None:
    promtool_check(metrics.exposition().decode())


def test_metrics_server_answers_and_a_taken_address_is_not_fatal(daemon_state: None) -> None:
    server = metrics.MetricsServer(("127.0.0.1", 0))
    assert server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "gatewayd_egress_ip_held" in text and "gatewayd_plan_apply_duration_seconds" in text
        taken = metrics.MetricsServer(("127.0.0.1", server.port))
        assert not taken.start()  # logged; the daemon goes on without a listener
    finally:
        server.stop()


def test_controller_metrics_beside_the_probes(daemon_state: None) -> None:
    probes = HealthServer("127.0.0.1", 0, lambda: True, lambda: True, metrics.exposition)
    probes.start()
    try:
        url = f"http://127.0.0.1:{probes.port}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            promtool_check(answer.read().decode())
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
            assert answer.read() == b"ok\n"
    finally:
        probes.stop()


def test_textfile_for_node_exporter(daemon_state: None, tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.prom"
    metrics.write_textfile(path)
    text = path.read_text()
    assert "gatewayd_snat_bytes_total" in text
    promtool_check(text)


def test_nat_use_per_egress_ip_and_its_busiest_destinations() -> None:
    flows = [NatFlow("198.51.100.70", "203.0.113.5", 443, "tcp")] * 7 + [
        NatFlow("198.51.100.70", f"203.0.113.{n}", 80, "tcp") for n in range(10, 16)
    ] + [NatFlow("198.51.100.70", "203.0.113.9", None, "icmp")] * 2
    got = values(exposition(nat_samples(flows, ["198.51.100.70", "198.51.100.71"])))
    assert got[("gatewayd_nat_connections", (("egress_ip", "198.51.100.70"),))] == 15
    assert got[("gatewayd_nat_connections", (("egress_ip", "198.51.100.71"),))] == 0
    named = {labels: v for (name, labels), v in got.items()
             if name == "gatewayd_nat_destination_connections"}
    assert len(named) == NAT_TOP_DESTINATIONS
    assert named[(("destination", "203.0.113.5"), ("egress_ip", "198.51.100.70"),
                  ("port", "443"), ("protocol", "tcp"))] == 7
    assert named[(("destination", "203.0.113.9"), ("egress_ip", "198.51.100.70"),
                  ("port", ""), ("protocol", "icmp"))] == 2


def test_publisher_reads_the_state_at_most_every_interval_and_survives_a_failed_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gatewayd.prom"
    publisher = metrics.MetricsPublisher(metrics.MetricsOptions(None, path), interval=3600)
    reads: list[int] = []

    def read() -> list[metrics.Sample]:
        reads.append(1)
        return gateway_state()

    publisher.publish(read)
    publisher.publish(read)  # within the interval: not read again
    assert len(reads) == 1 and "gatewayd_egress_ip_held" in path.read_text()

    def broken() -> list[metrics.Sample]:
        raise RuntimeError("netlink went away")

    metrics.MetricsPublisher(metrics.MetricsOptions(None, path)).publish(broken)  # logged
    metrics.STATE.update([])
