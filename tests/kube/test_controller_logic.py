"""The controller's pure parts, without an API server: health with hold-down, tunnel addresses,
generation bookkeeping, make-before-break rules, policy status, and the reconcile function over
in-memory caches. (Unit tests; they live beside the controller's other tests.)"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakecluster.crdcheck import CustomResourceValidator

from gatewayd.controller.generations import GenerationLog
from gatewayd.controller.health import GatewaySignals, Health, HealthTracker, read_signals
from gatewayd.controller.reconcile import Reconciler
from gatewayd.controller.snapshots import Cluster
from gatewayd.controller.specs import (
    active_egress_ips,
    failed_over_everywhere,
    hold_back_moves,
    retained_rules,
)
from gatewayd.controller.tunnels import allocate_tunnel_addresses
from gatewayd.kube.leases import Freshness, LeaseObserver

pytestmark = pytest.mark.unit

CIDR = IPv4Network("100.127.0.0/16")
T0 = 1_000_000.0


# --- health ------------------------------------------------------------------------------------


def alive(now: float, ready: bool = True) -> GatewaySignals:
    return GatewaySignals(ready, f"Ready={ready}", now + 6, 6.0)


def dead(now: float) -> GatewaySignals:
    return GatewaySignals(True, "Ready=True", now - 1, 6.0)


def test_a_gateway_seen_for_the_first_time_needs_no_hold_down() -> None:
    tracker = HealthTracker(hold_down=30)
    verdicts = tracker.update({"gw-1": alive(T0)}, T0, float("-inf"))
    assert verdicts["gw-1"].usable
    assert tracker.next_change == T0 + 6  # when the Lease would expire


def test_a_gateway_still_starting_when_first_seen_needs_no_hold_down() -> None:
    tracker = HealthTracker(hold_down=30)
    starting = tracker.update({"gw-1": alive(T0, ready=False)}, T0, float("-inf"))["gw-1"]
    assert not starting.usable and starting.reason == "Ready=False"
    assert tracker.update({"gw-1": alive(T0 + 5)}, T0 + 5, float("-inf"))["gw-1"].usable
    # once it carried traffic, a failure and a recovery cost the hold-down
    tracker.update({"gw-1": alive(T0 + 6, ready=False)}, T0 + 6, float("-inf"))
    back = tracker.update({"gw-1": alive(T0 + 7)}, T0 + 7, float("-inf"))["gw-1"]
    assert not back.usable and "hold-down" in back.reason


def test_a_recovered_gateway_waits_for_the_hold_down() -> None:
    tracker = HealthTracker(hold_down=30)
    tracker.update({"gw-1": alive(T0)}, T0, float("-inf"))
    lost = tracker.update({"gw-1": dead(T0 + 10)}, T0 + 10, float("-inf"))["gw-1"]
    assert not lost.usable and "expired 1.0s ago" in lost.reason
    back = tracker.update({"gw-1": alive(T0 + 20)}, T0 + 20, float("-inf"))["gw-1"]
    assert not back.usable and "hold-down" in back.reason
    assert tracker.next_change == T0 + 26  # the Lease, before the hold-down's end at T0 + 50
    assert not tracker.update({"gw-1": alive(T0 + 49)}, T0 + 49, float("-inf"))["gw-1"].usable
    assert tracker.update({"gw-1": alive(T0 + 50)}, T0 + 50, float("-inf"))["gw-1"].usable


def test_a_flap_during_hold_down_starts_it_again() -> None:
    tracker = HealthTracker(hold_down=30)
    tracker.update({"gw-1": alive(T0)}, T0, float("-inf"))
    tracker.update({"gw-1": alive(T0, ready=False)}, T0 + 1, float("-inf"))
    tracker.update({"gw-1": alive(T0 + 2)}, T0 + 2, float("-inf"))
    tracker.update({"gw-1": alive(T0 + 20, ready=False)}, T0 + 20, float("-inf"))
    tracker.update({"gw-1": alive(T0 + 21)}, T0 + 21, float("-inf"))
    assert not tracker.update({"gw-1": alive(T0 + 40)}, T0 + 40, float("-inf"))["gw-1"].usable
    assert tracker.update({"gw-1": alive(T0 + 51)}, T0 + 51, float("-inf"))["gw-1"].usable


def test_ready_false_counts_at_once_even_while_the_view_is_broken() -> None:
    tracker = HealthTracker(hold_down=30)
    tracker.update({"gw-1": alive(T0)}, T0, float("-inf"))
    verdict = tracker.update({"gw-1": alive(T0, ready=False)}, T0 + 1, None)["gw-1"]
    assert (verdict.usable, verdict.reason) == (False, "Ready=False")


def test_an_expired_lease_is_not_believed_while_the_view_is_broken_and_just_after() -> None:
    tracker = HealthTracker(hold_down=30)
    tracker.update({"gw-1": alive(T0), "gw-2": alive(T0)}, T0, float("-inf"))
    # gw-2 died before the break.
    tracker.update({"gw-1": alive(T0), "gw-2": dead(T0)}, T0 + 1, float("-inf"))
    during = tracker.update({"gw-1": dead(T0 + 30), "gw-2": dead(T0 + 30)}, T0 + 30, None)
    assert during["gw-1"].usable and "view of the API is broken" in during["gw-1"].reason
    assert not during["gw-2"].usable  # the break does not bring a dead gateway back
    restored = T0 + 40
    just_after = tracker.update({"gw-1": dead(restored)}, restored + 1, restored)
    assert just_after["gw-1"].usable
    assert tracker.next_change == restored + 6  # the grace: one lease duration
    later = tracker.update({"gw-1": dead(restored)}, restored + 6, restored)
    assert not later["gw-1"].usable


def test_signals_are_read_from_the_objects() -> None:
    gateway = {
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "TunnelsDown",
                    "message": "no handshake",
                }
            ]
        }
    }
    lease = Freshness("gw-1", True, T0 + 10, 10.0, skew=-3.0)
    signals = read_signals(gateway, lease)
    assert signals == GatewaySignals(
        False, "Ready=False (TunnelsDown: no handshake)", T0 + 10, 10.0
    )
    assert read_signals({}, None) == GatewaySignals(False, "no Ready condition", None, 0.0)
    nobody = Freshness(None, False, None, 0.0, None)
    assert read_signals(gateway, nobody).lease_expires_at is None


class Clocks:
    """The controller's clocks: monotonic and wall, moved together by the test."""

    def __init__(self) -> None:
        self.monotonic = 500.0
        self.wall = T0

    def tick(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds


@pytest.mark.parametrize("gateway_clock_offset", [-30.0, -4.0, 4.0, 30.0])
def test_a_gateway_with_a_skewed_clock_is_healthy_while_it_renews_and_dead_after(
    gateway_clock_offset: float,
) -> None:
    """Its Lease's renewTime is written with its own clock, `gateway_clock_offset` s off ours;
    the Lease lasts 4 s and is renewed every second."""
    clocks = Clocks()
    observer = LeaseObserver(lambda: clocks.monotonic, lambda: clocks.wall)
    tracker = HealthTracker(hold_down=30)
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}

    def renewed_now() -> dict[str, Any]:
        renew_time = datetime.fromtimestamp(clocks.wall + gateway_clock_offset, UTC)
        return {"spec": {"holderIdentity": "gw-1", "leaseDurationSeconds": 4,
                         "renewTime": renew_time.isoformat()}}

    def verdict(lease: dict[str, Any]) -> Health:
        signals = read_signals(ready, observer.observe("egressgateway-gw-1", lease))
        return tracker.update({"gw-1": signals}, clocks.monotonic, float("-inf"))["gw-1"]

    for _ in range(60):
        clocks.tick(1)
        last = renewed_now()
        assert verdict(last).usable
    assert observer.observe("egressgateway-gw-1", last).skew == pytest.approx(gateway_clock_offset)
    clocks.tick(3.9)  # it stopped renewing
    assert verdict(last).usable
    clocks.tick(0.1)
    dead = verdict(last)
    assert not dead.usable and "expired" in dead.reason


# --- tunnel addresses --------------------------------------------------------------------------


def test_tunnel_addresses_keep_what_specs_hold_and_fill_the_lowest_free() -> None:
    assigned, full = allocate_tunnel_addresses(
        {
            "node-b": "100.127.0.7",
            "node-a": "100.127.0.7",  # claimed twice: node-a sorts first and keeps it
            "node-c": "100.127.0.1",  # the gateways' address
            "node-d": "10.0.0.5",  # outside the CIDR
            "node-e": "not an address",
            "node-f": None,
        },
        CIDR,
    )
    assert full == []
    assert {n: str(a) for n, a in assigned.items()} == {
        "node-a": "100.127.0.7",
        "node-b": "100.127.0.2",
        "node-c": "100.127.0.3",
        "node-d": "100.127.0.4",
        "node-e": "100.127.0.5",
        "node-f": "100.127.0.6",
    }


def test_tunnel_addresses_run_out() -> None:
    assigned, full = allocate_tunnel_addresses(
        {"a": None, "b": None, "c": None}, IPv4Network("100.127.0.0/29")
    )
    # .0 network, .1 gateways, .7 broadcast: .2-.6 for nodes.
    assert sorted(map(str, assigned.values())) == ["100.127.0.2", "100.127.0.3", "100.127.0.4"]
    assigned, full = allocate_tunnel_addresses({"a": None, "b": None}, IPv4Network("10.0.0.0/30"))
    assert (assigned, full) == ({"a": IPv4Address("10.0.0.2")}, ["b"])


# --- generations ------------------------------------------------------------------------------


def test_generation_log_knows_what_is_surely_applied_and_what_may_be_in_use() -> None:
    log: GenerationLog[str] = GenerationLog()
    gw = ("gw-1", "uid-1")
    log.record(gw, 3, frozenset({"a", "b"}))
    log.record(gw, 4, frozenset({"b", "c"}))
    assert log.surely_applied(gw, None) == frozenset()  # never reported: nothing programmed
    assert log.maybe_in_use(gw, None) == frozenset()
    assert log.surely_applied(gw, 2) == frozenset()  # generation 2 is unknown
    assert log.maybe_in_use(gw, 2) is None
    assert log.surely_applied(gw, 3) == {"b"}  # at 3, or already at 4
    assert log.maybe_in_use(gw, 3) == {"a", "b", "c"}
    assert log.surely_applied(gw, 4) == {"b", "c"}
    # Reported generations only grow: once 4 is reported, 3 is forgotten.
    assert log.maybe_in_use(gw, 3) is None
    log.record(gw, 6, frozenset({"c"}))  # 5 was never seen
    assert log.surely_applied(gw, 4) == frozenset()
    assert log.maybe_in_use(gw, 4) is None
    assert log.surely_applied(gw, 6) == {"c"}
    log.keep_only([])
    assert log.surely_applied(gw, 6) == frozenset()


# --- make-before-break -------------------------------------------------------------------------


def tunnel(policy: str, gateway: str, *sources: str, standby: str | None = None) -> dict[str, Any]:
    rule = {
        "policy": policy,
        "action": "tunnel",
        "gateway": gateway,
        "sources": list(sources),
        "destinations": ["198.51.100.0/24"],
    }
    if standby is not None:
        rule["standby"] = standby
    return rule


def test_a_node_keeps_its_gateway_until_the_new_one_is_programmed() -> None:
    desired = [tunnel("pay", "gw-2", "10.0.0.1", "10.0.0.2", "10.0.0.3", standby="gw-3")]
    current = [tunnel("pay", "gw-1", "10.0.0.1", "10.0.0.2")]  # 10.0.0.3 is a new pod
    usable = {"gw-1": True, "gw-2": True, "gw-3": True}
    held = hold_back_moves(desired, current, lambda g: frozenset(), usable)
    assert held == [
        tunnel("pay", "gw-1", "10.0.0.1", "10.0.0.2", standby="gw-3"),
        tunnel("pay", "gw-2", "10.0.0.3", standby="gw-3"),
    ]
    programmed = hold_back_moves(desired, current, lambda g: frozenset({"pay"}), usable)
    assert programmed == desired
    failover = hold_back_moves(desired, current, lambda g: frozenset(), {**usable, "gw-1": False})
    assert failover == desired


def test_drop_rules_and_other_policies_are_not_held_back() -> None:
    drop = {
        "policy": "pay",
        "action": "drop",
        "reason": "no-egress-gateway",
        "sources": ["10.0.0.1"],
        "destinations": ["198.51.100.0/24"],
    }
    current = [tunnel("pay", "gw-1", "10.0.0.1"), tunnel("other", "gw-9", "10.0.0.1")]
    assert hold_back_moves([drop], current, lambda g: frozenset(), {"gw-1": True}) == [drop]
    desired = [tunnel("other", "gw-2", "10.0.0.1")]
    # `other` went to gw-9 before, which is unusable now: it moves at once.
    assert hold_back_moves(desired, current, lambda g: frozenset(), {"gw-9": False}) == desired


def snat(policy: str, role: str, egress_ip: str) -> dict[str, Any]:
    return {
        "policy": policy,
        "role": role,
        "egressIP": egress_ip,
        "sources": ["10.0.0.1"],
        "destinations": ["198.51.100.0/24"],
    }


def test_a_gateway_keeps_rules_a_node_may_still_use_and_gives_up_a_moved_egress_ip() -> None:
    current = [
        snat("pay", "active", "203.0.113.5"),
        snat("web", "active", "192.0.2.1"),
        snat("old", "standby", "192.0.2.1"),
    ]
    planned = [snat("db", "active", "192.0.2.1")]

    def may_send(policy: str, gateway: str) -> bool:
        return policy in ("pay", "web")

    rules = retained_rules("gw-1", planned, current, may_send, frozenset({"203.0.113.5"}))
    assert rules == [
        snat("db", "active", "192.0.2.1"),
        snat("pay", "standby", "203.0.113.5"),  # gw-2 is active with it now
        snat("web", "active", "192.0.2.1"),
    ]


def test_active_egress_ips_elsewhere() -> None:
    planned = {
        "gw-1": [snat("pay", "active", "203.0.113.5")],
        "gw-2": [snat("pay", "standby", "203.0.113.5"), snat("web", "active", "192.0.2.2")],
    }
    assert active_egress_ips(planned) == {
        "gw-1": frozenset({"192.0.2.2"}),
        "gw-2": frozenset({"203.0.113.5"}),
    }


def egress_node(name: str, rules: list[dict[str, Any]], *failovers: tuple[str, str, str],
                ) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"rules": rules}, "status": {"failovers": [
        {"policy": p, "from": f, "to": t, "time": NOW_TEXT} for p, f, t in failovers]}}


def test_a_failover_every_node_made_is_adopted() -> None:
    pay = [tunnel("pay", "gw-1", "10.244.1.10/32", standby="gw-2")]
    web = [tunnel("web", "gw-3", "10.244.1.11/32", standby="gw-2")]
    both = ("pay", "gw-1", "gw-2")
    assert failed_over_everywhere([
        egress_node("node-1", pay + web, both),
        egress_node("node-2", pay, both),
        egress_node("node-3", []),  # no rule for pay: not asked
    ]) == {("pay", "gw-1"): "gw-2"}


def test_a_failover_only_some_nodes_made_or_to_another_standby_is_not_adopted() -> None:
    pay = [tunnel("pay", "gw-1", "10.244.1.10/32", standby="gw-2")]
    assert failed_over_everywhere([
        egress_node("node-1", pay, ("pay", "gw-1", "gw-2")),
        egress_node("node-2", pay),
    ]) == {}
    # a status from before the plan named gw-2 the standby
    assert failed_over_everywhere([egress_node("node-1", pay, ("pay", "gw-1", "gw-3"))]) == {}
    # a rule without a standby is never failed over
    assert failed_over_everywhere([
        egress_node("node-1", [tunnel("pay", "gw-1", "10.244.1.10/32")], ("pay", "gw-1", "gw-2")),
    ]) == {}


def test_malformed_failover_reports_are_skipped() -> None:
    pay = [tunnel("pay", "gw-1", "10.244.1.10/32", standby="gw-2")]
    for status in ({"failovers": "gw-2"}, {"failovers": ["gw-2", {"policy": "pay"}]}, "x", None):
        node = {"metadata": {"name": "node-1"}, "spec": {"rules": pay}, "status": status}
        assert failed_over_everywhere([node]) == {}


# --- the reconcile function over in-memory caches ---------------------------------------------

NOW = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
NOW_TEXT = "2026-11-01T00:00:00Z"


def gateway_object(index: int, generation: int = 1, observed: int | None = None) -> dict[str, Any]:
    address = f"192.0.2.{index}"
    status: dict[str, Any] = {
        "publicKey": "A" * 43 + "=",
        "addresses": [{"type": "InternalIP", "address": address}],
        "interfaces": [{"name": "eth0", "addresses": [f"{address}/24"], "defaultRouteV4": True}],
        "conditions": [{"type": "Ready", "status": "True"}],
        "features": ["sourceSlices"],
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "apiVersion": "egress.gatewayd.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {
            "name": f"gw-{index}",
            "uid": f"uid-gw-{index}",
            "generation": generation,
            "resourceVersion": str(generation),
            "labels": {"role": "gateway"},
        },
        "spec": {},
        "status": status,
    }


def lease(index: int) -> dict[str, Any]:
    return {
        "spec": {
            "holderIdentity": f"gw-{index}",
            "leaseDurationSeconds": 10,
            "renewTime": datetime.fromtimestamp(NOW, UTC).isoformat(),
        }
    }


def cluster(**changes: Any) -> Cluster:
    values: dict[str, Any] = {
        "policies": [
            {
                "apiVersion": "egress.gatewayd.io/v1alpha1",
                "kind": "EgressGatewayPolicy",
                "metadata": {"name": "pay", "generation": 1, "resourceVersion": "1"},
                "spec": {
                    "selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "destinationCIDRs": ["198.51.100.0/24"],
                    "egressGateway": {
                        "nodeSelector": {"matchLabels": {"role": "gateway"}},
                        "egressIP": "203.0.113.5",
                    },
                },
            }
        ],
        "pods": [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "web",
                    "namespace": "default",
                    "uid": "u1",
                    "labels": {"app": "web"},
                    "resourceVersion": "1",
                },
                "spec": {"nodeName": "node-1"},
                "status": {"podIP": "10.244.1.10"},
            }
        ],
        "gateways": [gateway_object(1), gateway_object(2)],
        "egress_nodes": [
            {
                "apiVersion": "egress.gatewayd.io/v1alpha1",
                "kind": "EgressNode",
                "metadata": {"name": "node-1", "uid": "uid-n1", "generation": 1},
            }
        ],
        "leases": {"egressgateway-gw-1": lease(1), "egressgateway-gw-2": lease(2)},
    }
    values.update(changes)
    return Cluster(**values)


def test_status_reports_no_egress_ip_when_no_gateway_may_hold_it() -> None:
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    decisions = reconciler.plan(cluster(), NOW, float("-inf"), NOW_TEXT)
    (accepted, ready) = decisions.policy_statuses["pay"]["conditions"]
    assert accepted["status"] == "True"
    assert (ready["status"], ready["reason"]) == ("False", "NoEgressIP")
    assert ready["message"].startswith("entry 0: gateway gw-1 has no IPv4 egress IP (egressIP")
    assert decisions.node_specs["node-1"]["rules"][0]["action"] == "drop"


def test_a_second_plan_keeps_transition_times_and_needs_no_engine_run() -> None:
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    first = reconciler.plan(cluster(), NOW, float("-inf"), NOW_TEXT)
    policy = copy.deepcopy(cluster().policies[0])
    policy["status"] = first.policy_statuses["pay"]
    later = reconciler.plan(
        cluster(policies=[policy]), NOW + 5, float("-inf"), "2026-11-01T00:00:05Z"
    )
    assert later.policy_statuses == first.policy_statuses
    assert later.node_specs == first.node_specs
    assert later.gateway_specs == first.gateway_specs
    assert later.events == []  # the GatewayPromoted of the first plan is not repeated


def test_the_active_gateway_recorded_in_the_status_is_kept() -> None:
    policy = copy.deepcopy(cluster().policies[0])
    del policy["spec"]["egressGateway"]["egressIP"]
    policy["status"] = {"gateways": [{"entry": 0, "name": "gw-2", "role": "active"}]}
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    decisions = reconciler.plan(cluster(policies=[policy]), NOW, float("-inf"), NOW_TEXT)
    assert [(g["name"], g["role"]) for g in decisions.policy_statuses["pay"]["gateways"]] == [
        ("gw-2", "active"),
        ("gw-1", "standby"),
    ]
    assert decisions.events == []
    fresh = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    without = copy.deepcopy(policy)
    del without["status"]
    decisions = fresh.plan(cluster(policies=[without]), NOW, float("-inf"), NOW_TEXT)
    assert decisions.policy_statuses["pay"]["activeGateways"] == "gw-1"
    assert [e.reason for e in decisions.events] == ["GatewayPromoted"]


def test_an_unreadable_object_is_left_out_and_the_rest_is_planned() -> None:
    bad = copy.deepcopy(cluster().pods[0])
    bad["metadata"] |= {"name": "broken", "uid": "u2"}
    bad["status"] = {"podIP": "10.244.1.999"}
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    policy = copy.deepcopy(cluster().policies[0])
    del policy["spec"]["egressGateway"]["egressIP"]
    decisions = reconciler.plan(
        cluster(pods=[*cluster().pods, bad], policies=[policy]), NOW, float("-inf"), NOW_TEXT
    )
    assert decisions.policy_statuses["pay"]["selectedPods"] == 1
    assert decisions.node_specs["node-1"]["rules"][0]["sources"] == ["10.244.1.10"]


def test_what_the_controller_writes_fits_the_crds() -> None:
    crds = Path(__file__).parents[2] / "packaging" / "kubernetes" / "crds"

    def validator(plural: str) -> CustomResourceValidator:
        return CustomResourceValidator(yaml.safe_load((crds / f"{plural}.yaml").read_text()))

    node = {
        "apiVersion": "egress.gatewayd.io/v1alpha1",
        "kind": "EgressNode",
        "metadata": {"name": "node-1", "uid": "uid-n1", "generation": 1},
        "status": {"publicKey": "B" * 42 + "A=", "endpoint": "10.0.0.1:51820"},
    }
    invalid = copy.deepcopy(cluster().policies[0])
    invalid["metadata"]["name"] = "invalid"
    invalid["spec"]["destinationCIDRs"] = ["198.51.100.0/33"]
    state = cluster(egress_nodes=[node], policies=[*cluster().policies, invalid])
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    decisions = reconciler.plan(state, NOW, float("-inf"), NOW_TEXT)
    assert decisions.gateway_specs["gw-1"]["peers"][0]["allowedIPs"] == ["100.127.0.2/32"]
    checks = [
        ("egressgateways", g, {"spec": decisions.gateway_specs[g["metadata"]["name"]]}, False)
        for g in state.gateways
    ]
    checks.append(("egressnodes", node, {"spec": decisions.node_specs["node-1"]}, False))
    checks += [
        ("egresssourceslices", {"metadata": {"name": s.name}}, {"spec": s.spec()}, False)
        for s in decisions.source_slices.values()
    ]
    checks += [
        ("egressgatewaypolicies", p, {"status": decisions.policy_statuses[p["metadata"]["name"]]},
         True)
        for p in state.policies
    ]  # fmt: skip
    valid_spec = cluster().policies[0]["spec"]
    for plural, obj, written, status_update in checks:
        body = {**obj, **written}
        body["metadata"] = {"name": obj["metadata"]["name"]}
        if status_update:  # the API server would never have taken the invalid spec
            body["spec"] = valid_spec
        assert validator(plural).errors(body, status_update=status_update) == []


def test_a_daemon_outside_the_version_skew_rule_gets_one_warning_event() -> None:
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW),
                            version="1.4.0")

    def with_versions(gateway: str, node: str) -> Cluster:
        base = cluster()
        gateways = copy.deepcopy(base.gateways)
        gateways[0]["status"]["version"] = gateway
        nodes = copy.deepcopy(base.egress_nodes)
        nodes[0]["status"] = {"version": node}
        return cluster(gateways=gateways, egress_nodes=nodes)

    def skew_events(state: Cluster) -> list[tuple[str, str, str]]:
        decisions = reconciler.plan(state, NOW, float("-inf"), NOW_TEXT)
        return [(e.involved["metadata"]["name"], e.type, e.message) for e in decisions.events
                if e.reason == "VersionSkew"]

    assert skew_events(with_versions("1.3.2", "1.4.1")) == []
    [(name, kind, message)] = skew_events(with_versions("1.5.0", "1.4.1"))
    assert (name, kind) == ("gw-1", "Warning")
    assert message.startswith("EgressGateway gw-1: version 1.5.0 is not supported by "
                              "controller 1.4.0: upgrade the controller first")
    assert skew_events(with_versions("1.5.0", "1.4.1")) == []  # said once, not every reconcile
    [(name, _, message)] = skew_events(with_versions("1.5.0", "1.2.0"))
    assert name == "node-1" and "more than 1 minor version behind" in message


def web_pod(name: str, ip: str, app: str = "web", node: str = "node-1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"uid-{name}",
            "labels": {"app": app},
            "resourceVersion": f"{name}-{ip}-{app}-{node}",
        },
        "spec": {"nodeName": node},
        "status": {"podIP": ip, "phase": "Running"},
    }


def test_no_object_written_grows_with_the_selected_pods() -> None:
    """12,000 selected pods: once in one EgressGateway spec, 190 KiB; a real cluster's etcd
    refuses an object over 1.5 MiB, about 100,000 pods. Their addresses go to slices of at most
    1,000, which hold each of them once; the spec names the slices."""
    pods = [web_pod(f"w{i}", str(IPv4Address("10.244.0.0") + 1 + i)) for i in range(12_000)]
    policy = copy.deepcopy(cluster().policies[0])
    del policy["spec"]["egressGateway"]["egressIP"]  # SNAT to the gateways' own address
    reconciler = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    decisions = reconciler.plan(cluster(pods=pods, policies=[policy]), NOW, float("-inf"),
                                NOW_TEXT)
    assert max(len(json.dumps(spec)) for spec in decisions.gateway_specs.values()) < 8 * 1024
    slices = decisions.source_slices.values()
    assert max(len(s.addresses) for s in slices) <= 1000
    expected = sorted(p["status"]["podIP"] for p in pods)
    for gateway in ("gw-1", "gw-2"):
        (rule,) = decisions.gateway_specs[gateway]["rules"]
        assert "sources" not in rule
        held = [a for s in slices if s.gateway == gateway for a in s.addresses]
        assert sorted(held) == expected
        assert {e["name"] for e in rule["sourceSlices"]} == {
            s.name for s in slices if s.gateway == gateway
        }


def test_a_reconciler_kept_current_pod_by_pod_decides_what_a_fresh_one_decides() -> None:
    """Pod events take the incremental path (the plan kept current, only touched specs
    rendered again); a fresh reconciler plans the same caches whole."""
    policy = copy.deepcopy(cluster().policies[0])
    del policy["spec"]["egressGateway"]["egressIP"]  # SNAT to the gateways' own address
    nodes = [
        {
            "apiVersion": "egress.gatewayd.io/v1alpha1",
            "kind": "EgressNode",
            "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1},
        }
        for name in ("node-1", "node-2")
    ]
    steps = [
        [web_pod("a", "10.244.1.10")],
        [web_pod("a", "10.244.1.10"), web_pod("b", "10.244.2.10", node="node-2")],  # new pod
        [web_pod("a", "10.244.1.10", app="db"), web_pod("b", "10.244.2.10", node="node-2")],
        [web_pod("b", "10.244.2.10", node="node-2")],  # deleted
        [web_pod("b", "10.244.2.10", node="node-2"), web_pod("c", "10.9.0.1")],  # outside CIDRs
        [web_pod("b", "10.244.2.10", node="node-2"), web_pod("a", "10.244.2.10")],  # one IP, two
        [web_pod("a", "10.244.2.10")],
    ]
    kept = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
    for pods in steps:
        caches = cluster(pods=pods, policies=[policy], egress_nodes=nodes)
        got = kept.plan(caches, NOW, float("-inf"), NOW_TEXT)
        fresh = Reconciler(hold_down=30, tunnel_cidr=CIDR, leases=LeaseObserver(lambda: NOW))
        whole = fresh.plan(caches, NOW, float("-inf"), NOW_TEXT)
        assert got.node_specs == whole.node_specs, [p["metadata"]["name"] for p in pods]
        assert got.gateway_specs == whole.gateway_specs
        assert got.source_slices == whole.source_slices
        assert got.policy_statuses == whole.policy_statuses
