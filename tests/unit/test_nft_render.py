"""The pure nftables renderers: plans in, table content (nft JSON) out.

Golden files in tests/unit/golden/ hold the full rendering of two representative plans;
regenerate them after an intended change with GATEWAYD_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gatewayd.dataplane.nft_render import (
    COMMENT_MAX,
    DROP_EGRESS_IP_INBOUND,
    DROP_EGRESS_IP_NOT_HELD,
    DROP_INVALID,
    DROP_NOT_TRANSLATED,
    DROP_TUNNEL_INPUT,
    DROP_TUNNEL_NOT_UPLINK,
    DROP_TUNNEL_UNKNOWN,
    DROP_UPLINK_FORWARD,
    GUARD_MARK,
    GatewayTableSettings,
    RenderedTable,
    SetSpec,
    SteerTableSettings,
    element_commands,
    element_from_json,
    element_to_json,
    network_element,
    render_gateway_table,
    render_steer_table,
    replace_commands,
    update_commands,
)
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

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
ip = ipaddress.ip_address
net = ipaddress.ip_network

SETTINGS = GatewayTableSettings("egress0", ("eth0",), probe_port=51871,
                                dedicated_egress_ips=frozenset({ip("198.51.100.10"),
                                                                ip("2001:db8:1::10")}))
STEER = SteerTableSettings(
    gateway_marks={"gw-a": 0x100, "gw-b": 0x200},
    tunnel_interfaces={"gw-a": "egw-gw-a", "gw-b": "egw-gw-b"},
    mark_mask=0xFF00,
)


def snat(policy: str, egress: str, sources: list[str], destinations: list[str],
         role: Role = Role.ACTIVE) -> SnatRule:
    return SnatRule(policy, role, frozenset(ip(s) for s in sources),
                    tuple(net(d) for d in destinations), ip(egress))


GATEWAY_PLAN = GatewayPlan("gw-a", rules=(
    snat("payments", "198.51.100.10", ["10.244.1.5", "10.244.2.7"],
         ["192.0.2.0/24", "203.0.113.7/32"]),
    snat("payments", "2001:db8:1::10", ["fd00:10:244:1::5"], ["2001:db8:2::/48"]),
    snat("reports.nightly", "198.51.100.11", ["10.244.3.3"], ["0.0.0.0/0"], Role.STANDBY),
))

NODE_PLAN = NodePlan("node-1", cluster_internal=(
    net("10.244.0.0/16"), net("10.244.1.5/32"), net("10.96.0.0/12"), net("fd00:10:244::/56"),
), rules=(
    SteerRule("payments", SteerAction.TUNNEL,
              frozenset({ip("10.244.1.5"), ip("fd00:10:244:1::5")}),
              (net("192.0.2.0/24"), net("2001:db8:2::/48")), gateway="gw-a", standby="gw-b"),
    SteerRule("reports.nightly", SteerAction.DROP, frozenset({ip("10.244.1.9")}),
              (net("0.0.0.0/0"),), reason=DropReason.NO_EGRESS_GATEWAY),
))


def gateway_table(plan: GatewayPlan, settings: GatewayTableSettings) -> RenderedTable:
    """The table of a host that holds every egress IP of the plan, the standby's too."""
    return render_gateway_table(plan, settings, held={r.egress_ip for r in plan.rules})


def as_json(table: RenderedTable) -> dict[str, Any]:
    return {
        "family": table.family,
        "name": table.name,
        "sets": {
            name: {"type": s.type, "flags": list(s.flags), "elements": sorted(s.elements)}
            for name, s in table.sets.items()
        },
        "body": list(table.body),
    }


@pytest.mark.parametrize("name, table", [
    # The standby's egress IP is not held (in Kubernetes mode it follows the traffic).
    ("gateway_table.json", render_gateway_table(
        GATEWAY_PLAN, SETTINGS, held={ip("198.51.100.10"), ip("2001:db8:1::10")})),
    ("steer_table.json", render_steer_table(NODE_PLAN, STEER)),
])
def test_golden(name: str, table: RenderedTable) -> None:
    path = GOLDEN / name
    text = json.dumps(as_json(table), indent=1, sort_keys=True) + "\n"
    if os.environ.get("GATEWAYD_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def rules(table: RenderedTable, chain: str) -> list[dict[str, Any]]:
    return [obj["rule"] for obj in table.body if obj.get("rule", {}).get("chain") == chain]


def snat_rules(table: RenderedTable) -> list[dict[str, Any]]:
    """The gateway's SNAT rules: its postrouting chain without the guard that ends it."""
    nat = rules(table, "postrouting")
    assert nat[-1]["expr"][-2:] == [{"counter": DROP_NOT_TRANSLATED}, {"drop": None}]
    return nat[:-1]


def counters(table: RenderedTable) -> dict[str, str]:
    return {o["counter"]["name"]: o["counter"]["comment"] for o in table.body if "counter" in o}


def verdict(rule: dict[str, Any]) -> str:
    (key,) = rule["expr"][-1]
    return str(key)


# --- gateway table -------------------------------------------------------------------------


def test_gateway_rules_get_indexed_sets_counters_and_snat() -> None:
    table = gateway_table(GATEWAY_PLAN, SETTINGS)
    assert table.sets["rule0_src"] == SetSpec("ipv4_addr", (), frozenset({"10.244.1.5",
                                                                           "10.244.2.7"}))
    assert table.sets["rule0_dst"] == SetSpec("ipv4_addr", ("interval",),
                                              frozenset({"192.0.2.0/24", "203.0.113.7"}))
    assert table.sets["rule1_src"].type == "ipv6_addr"
    assert counters(table) == {
        DROP_INVALID: "invalid conntrack state",
        DROP_TUNNEL_UNKNOWN: "from the tunnel, no rule allows source and destination",
        DROP_UPLINK_FORWARD: "forwarding not from the tunnel",
        DROP_TUNNEL_NOT_UPLINK: "from the tunnel to an interface that is no uplink",
        DROP_EGRESS_IP_NOT_HELD: "the rule's egress IP is not held by this host",
        DROP_TUNNEL_INPUT: "from the tunnel to the host, not the probe port",
        DROP_NOT_TRANSLATED: "from the tunnel to an uplink, no SNAT rule matched",
        DROP_EGRESS_IP_INBOUND: "from an uplink to an egress IP, no connection",
        "rule0": "payments (active) via 198.51.100.10",
        "rule1": "payments (active) via 2001:db8:1::10",
        "rule2": "reports.nightly (standby) via 198.51.100.11",
    }
    nat = snat_rules(table)
    assert [r["expr"][-1]["snat"] for r in nat] == [
        {"family": "ip", "addr": "198.51.100.10"},
        {"family": "ip6", "addr": "2001:db8:1::10"},
        {"family": "ip", "addr": "198.51.100.11"},  # standby: ready for failover
    ]
    assert all(r["expr"][0]["match"]["right"] == "eth0" for r in nat)
    assert nat[1]["expr"][1]["match"]["left"] == {"payload": {"protocol": "ip6",
                                                              "field": "saddr"}}


TUNNEL = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "egress0"}}
TO_UPLINK = {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}}


def test_forward_chain_is_no_open_relay() -> None:
    table = gateway_table(GATEWAY_PLAN, SETTINGS)
    (chain,) = [o["chain"] for o in table.body if o.get("chain", {}).get("name") == "forward"]
    assert (chain["hook"], chain["policy"]) == ("forward", "drop")
    forward = rules(table, "forward")
    verdicts = [verdict(r) for r in forward]
    assert verdicts == (["drop"] + ["mangle"] * 4 + ["accept"] * 3
                        + ["accept", "drop", "drop", "drop"])
    accepts = forward[5:8]
    # Every accept names the uplink: pod traffic routed out another interface is dropped.
    assert all(r["expr"][:2] == [TUNNEL, TO_UPLINK] for r in accepts)
    assert [r["expr"][4] for r in accepts] == [{"counter": f"rule{i}"} for i in range(3)]
    assert forward[-3]["expr"] == [
        TUNNEL,
        {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}},
        {"counter": DROP_TUNNEL_NOT_UPLINK}, {"drop": None},
    ]
    assert forward[-2]["expr"] == [TUNNEL, {"counter": DROP_TUNNEL_UNKNOWN}, {"drop": None}]
    assert forward[-1]["expr"] == [{"counter": DROP_UPLINK_FORWARD}, {"drop": None}]


def test_no_pod_address_leaves_untranslated() -> None:
    """Whatever the forward chain let through: a new connection from the tunnel that reaches
    an uplink without an SNAT is dropped, after every SNAT rule."""
    for plan in (GATEWAY_PLAN, GatewayPlan("gw")):
        guard = rules(gateway_table(plan, SETTINGS), "postrouting")[-1]
        assert guard["expr"] == [TUNNEL, TO_UPLINK, {"counter": DROP_NOT_TRANSLATED},
                                 {"drop": None}]


def test_a_rule_whose_egress_ip_is_not_held_drops_instead_of_snat() -> None:
    held = {ip("198.51.100.10")}  # not 2001:db8:1::10, not the standby's 198.51.100.11
    table = render_gateway_table(GATEWAY_PLAN, SETTINGS, held=held)
    assert [r["expr"][-1]["snat"]["addr"] for r in snat_rules(table)] == [
        "198.51.100.10"]
    forward = rules(table, "forward")[5:8]
    assert [(r["expr"][-2], verdict(r)) for r in forward] == [
        ({"counter": "rule0"}, "accept"),
        ({"counter": DROP_EGRESS_IP_NOT_HELD}, "drop"),
        ({"counter": DROP_EGRESS_IP_NOT_HELD}, "drop"),
    ]
    assert forward[1]["comment"] == "payments (active) via 2001:db8:1::10: egress IP not held"
    assert "rule1" in counters(table)  # the rule's own counter stays declared


def test_tunnel_peers_reach_only_the_probe_port_on_the_host() -> None:
    table = gateway_table(GATEWAY_PLAN, SETTINGS)
    (chain,) = [o["chain"] for o in table.body if o.get("chain", {}).get("name") == "input"]
    assert (chain["hook"], chain["policy"]) == ("input", "accept")  # only the tunnel is ours
    probe_port = {"match": {"op": "==", "left": {"payload": {"protocol": "udp",
                                                             "field": "dport"}},
                            "right": 51871}}
    assert [r["expr"] for r in rules(table, "input")] == [
        [TUNNEL, {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                            "right": ["established", "related"]}}, {"accept": None}],
        [TUNNEL, {"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6",
                                                             "field": "type"}},
                            "right": {"set": ["nd-neighbor-solicit", "nd-neighbor-advert"]}}},
         {"accept": None}],
        [TUNNEL, probe_port, {"accept": None}],
        [TUNNEL, {"counter": DROP_TUNNEL_INPUT}, {"drop": None}],
        *([{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}},
           {"match": {"op": "==", "left": {"payload": {"protocol": family, "field": "daddr"}},
                      "right": {"set": [address]}}},
           {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                      "right": ["new", "invalid"]}},
           {"counter": DROP_EGRESS_IP_INBOUND}, {"drop": None}]
          for family, address in (("ip", "198.51.100.10"), ("ip6", "2001:db8:1::10"))),
    ]
    closed = gateway_table(GATEWAY_PLAN, GatewayTableSettings("egress0", ("eth0",)))
    assert [verdict(r) for r in rules(closed, "input")] == ["accept", "accept", "drop"]


def test_tunnel_traffic_is_marked_for_the_routing_guard() -> None:
    table = gateway_table(GatewayPlan("gw"), SETTINGS)
    (chain,) = [o["chain"] for o in table.body if o.get("chain", {}).get("name") == "prerouting"]
    assert chain["prio"] == -90  # after destination NAT: replies carry the pod's address
    mark = {"meta": {"key": "mark"}}
    set_mark = {"mangle": {"key": mark, "value": {"|": [mark, GUARD_MARK]}}}
    into_tunnel = {"match": {"op": "==", "left": {"fib": {"result": "oifname",
                                                          "flags": ["daddr"]}},
                             "right": "egress0"}}
    assert [r["expr"] for r in rules(table, "prerouting")] == [
        [TUNNEL, set_mark], [into_tunnel, set_mark]]


@pytest.mark.parametrize("mtu", [1420, 1280, 9000])
def test_mss_is_clamped_to_the_tunnel_mtu_both_ways(mtu: int) -> None:
    table = gateway_table(GatewayPlan("gw"), GatewayTableSettings("wg0", (), mtu))
    clamps = {
        (r["expr"][0]["match"]["left"]["meta"]["key"], r["expr"][1]["match"]["right"]):
        r["expr"][3]["mangle"]["value"]
        for r in rules(table, "forward") if verdict(r) == "mangle"
    }
    assert clamps == {("iifname", "ipv4"): mtu - 40, ("oifname", "ipv4"): mtu - 40,
                      ("iifname", "ipv6"): mtu - 60, ("oifname", "ipv6"): mtu - 60}


@pytest.mark.parametrize("uplinks, expected", [
    ((), {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "egress0"}),
    (("eth1", "bond0", "eth1"), {"op": "==", "left": {"meta": {"key": "oifname"}},
                                 "right": {"set": ["bond0", "eth1"]}}),
])
def test_snat_leaves_through_the_uplinks(uplinks: tuple[str, ...], expected: Any) -> None:
    table = gateway_table(GATEWAY_PLAN, GatewayTableSettings("egress0", uplinks))
    assert {json.dumps(r["expr"][0]["match"]) for r in snat_rules(table)} == {
        json.dumps(expected)}


def test_empty_gateway_plan_still_filters() -> None:
    table = gateway_table(GatewayPlan("gw"), SETTINGS)
    assert table.sets == {}
    assert snat_rules(table) == []
    assert [verdict(r) for r in rules(table, "forward")] == (
        ["drop"] + ["mangle"] * 4 + ["accept", "drop", "drop", "drop"])


def test_rendering_is_deterministic() -> None:
    shuffled = list(GATEWAY_PLAN.rules)
    random.Random(7).shuffle(shuffled)
    rebuilt = GatewayPlan("gw-a", rules=tuple(
        SnatRule(r.policy, r.role, frozenset(sorted(r.sources, key=str, reverse=True)),
                 r.destinations, r.egress_ip) for r in shuffled))
    first = replace_commands(gateway_table(GATEWAY_PLAN, SETTINGS))
    assert json.dumps(first) == json.dumps(replace_commands(gateway_table(rebuilt,
                                                                                 SETTINGS)))


def test_long_policy_names_fit_in_comments() -> None:
    long_name = "team." + "x" * 240
    table = gateway_table(GatewayPlan("gw", rules=(
        snat(long_name, "198.51.100.1", ["10.0.0.1"], ["192.0.2.0/24"]),)), SETTINGS)
    comment = counters(table)["rule0"]
    assert len(comment.encode()) <= COMMENT_MAX and comment.startswith("team.xxx")
    assert all(len(r.get("comment", "")) <= COMMENT_MAX for r in rules(table, "forward"))


@pytest.mark.parametrize("settings, rule, message", [
    (SETTINGS, snat("mixed", "198.51.100.1", ["fd00::1"], ["192.0.2.0/24"]),
     "policy 'mixed'.*one address family"),
    (SETTINGS, snat("v6", "198.51.100.1", ["fd00::1"], ["2001:db8::/32"]),
     "policy 'v6'.*IPv4 but 2001:db8::/32, fd00::1 is not"),
    (GatewayTableSettings("a-name-longer-than-15", ()), None, "tunnel_interface"),
    (GatewayTableSettings("egress0", ("eth 0",)), None, "uplink_interfaces"),
    (GatewayTableSettings("egress0", (), 1000), None, "tunnel_mtu.*1280"),
])
def test_bad_gateway_input_is_named(settings: GatewayTableSettings, rule: SnatRule | None,
                                    message: str) -> None:
    plan = GatewayPlan("gw", rules=(rule,) if rule else ())
    with pytest.raises(ValueError, match=message):
        gateway_table(plan, settings)


# --- steer table ---------------------------------------------------------------------------


def test_cluster_internal_is_merged_and_returns_first() -> None:
    table = render_steer_table(NODE_PLAN, STEER)
    assert table.sets["cluster4"].elements == {"10.244.0.0/16", "10.96.0.0/12"}
    assert table.sets["cluster6"].elements == {"fd00:10:244::/56"}
    first = rules(table, "prerouting")[:3]
    assert [r["expr"][0]["match"]["right"] for r in first] == ["@cluster4", "@cluster6", "reply"]
    assert all(verdict(r) == "return" for r in first)


def test_tunnel_rules_mark_new_connections_and_established_ones_keep_their_mark() -> None:
    table = render_steer_table(NODE_PLAN, STEER)
    pre = rules(table, "prerouting")
    restores = [r for r in pre if r.get("comment", "").startswith("established via")]
    assert [r["expr"][0]["match"]["right"] for r in restores] == [0x100, 0x200]
    tunnels = [r for r in pre if r.get("comment") == "payments -> gw-a"]
    assert len(tunnels) == 2  # one per address family
    for rule in tunnels:
        assert rule["expr"][0] == {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                             "right": "new"}}
        meta, ct = rule["expr"][4]["mangle"], rule["expr"][5]["mangle"]
        assert meta["key"] == {"meta": {"key": "mark"}} and ct["key"] == {"ct": {"key": "mark"}}
        # Only the mask's bits change: the CNI's mark bits survive.
        assert meta["value"] == {"|": [{"&": [{"meta": {"key": "mark"}}, 0xFFFF00FF]}, 0x100]}
        assert ct["value"] == {"|": [{"&": [{"ct": {"key": "mark"}}, 0xFFFF00FF]}, 0x100]}
    assert pre.index(restores[-1]) < pre.index(tunnels[0])


def test_drop_rules_drop_and_count() -> None:
    table = render_steer_table(NODE_PLAN, STEER)
    (drop,) = [r for r in rules(table, "prerouting") if verdict(r) == "drop"]
    name = drop["expr"][2]["counter"]
    assert counters(table)[name] == "reports.nightly drop (no-egress-gateway)"
    assert table.sets[f"{name}_src"].elements == {"10.244.1.9"}
    assert table.sets[f"{name}_dst"].elements == {"0.0.0.0/0"}


def test_null_snat_keeps_the_pod_source_on_each_tunnel_before_the_cni() -> None:
    table = render_steer_table(NODE_PLAN, STEER)
    (chain,) = [o["chain"] for o in table.body if o.get("chain", {}).get("name") ==
                "postrouting"]
    assert (chain["type"], chain["hook"], chain["prio"]) == ("nat", "postrouting", 90)
    seen = [(r["expr"][1]["match"]["right"], r["expr"][2]["match"]["right"],
             r["expr"][3]["snat"]) for r in rules(table, "postrouting")]
    v4 = {"family": "ip", "addr": {"payload": {"protocol": "ip", "field": "saddr"}}}
    v6 = {"family": "ip6", "addr": {"payload": {"protocol": "ip6", "field": "saddr"}}}
    assert seen == [(0x100, "egw-gw-a", v4), (0x100, "egw-gw-a", v6),
                    (0x200, "egw-gw-b", v4), (0x200, "egw-gw-b", v6)]


def test_active_override_moves_only_that_policys_new_connections() -> None:
    other = SteerRule("billing", SteerAction.TUNNEL, frozenset({ip("10.244.1.8")}),
                      (net("198.51.100.0/24"),), gateway="gw-a")
    plan = NodePlan("n", rules=(*NODE_PLAN.rules, other))
    table = render_steer_table(plan, STEER, active={"payments": "gw-b",
                                                    "reports.nightly": "gw-b"})
    marks = {r["comment"]: r["expr"][4]["mangle"]["value"]["|"][1]
             for r in rules(table, "prerouting") if "->" in r.get("comment", "")}
    assert marks == {"payments -> gw-b": 0x200, "billing -> gw-a": 0x100}
    assert any(verdict(r) == "drop" for r in rules(table, "prerouting"))


def test_established_connections_of_a_follow_take_the_new_gateways_mark_first() -> None:
    """A policy's answered connections on the gateway it left go on through the one it uses
    now with their next packet: ct mark and packet mark, before the rule that would keep
    them on the old gateway. Other policies' connections, and follows of gateways or
    policies the node does not know, get no rule."""
    other = SteerRule("billing", SteerAction.TUNNEL, frozenset({ip("10.244.1.8")}),
                      (net("198.51.100.0/24"),), gateway="gw-a")
    plan = NodePlan("n", rules=(*NODE_PLAN.rules, other))
    follows = {ConnectionFollow("gw-a", "payments", "gw-b"),
               ConnectionFollow("gw-c", "payments", "gw-b"),
               ConnectionFollow("gw-a", "reports.nightly", "gw-b")}
    table = render_steer_table(plan, STEER, active={"payments": "gw-b"}, follows=follows)
    pre = rules(table, "prerouting")
    moved = [r for r in pre if "follow" in r.get("comment", "")]
    assert [r["comment"] for r in moved] == ["payments: established via gw-a follow to gw-b"] * 2
    payments = [r for r in pre if r.get("comment") == "payments -> gw-b"]
    for move, tunnel in zip(moved, payments, strict=True):  # one per address family
        match_mark, answered, src, dst, ct, meta, accept = move["expr"]
        assert match_mark == {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}},
                                                                    0xFF00]}, "right": 0x100}}
        assert answered["match"]["right"] == "seen-reply"
        assert (src, dst) == (tunnel["expr"][1], tunnel["expr"][2])  # the policy's own sets
        assert ct == {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {
            "|": [{"&": [{"ct": {"key": "mark"}}, 0xFFFF00FF]}, 0x200]}}}
        assert meta["mangle"]["key"] == {"meta": {"key": "mark"}}
        assert meta["mangle"]["value"]["|"][1] == 0x200 and accept == {"accept": None}
    restores = [r for r in pre if r.get("comment", "").startswith("established via")]
    assert max(map(pre.index, moved)) < pre.index(restores[0])
    assert render_steer_table(plan, STEER, active={"payments": "gw-b"}).sets == table.sets


def test_full_mask_sets_plain_marks() -> None:
    settings = SteerTableSettings({"gw-a": 7}, {"gw-a": "egw-a"})
    table = render_steer_table(NODE_PLAN, settings, active={"payments": "gw-a"})
    (tunnel, _) = [r for r in rules(table, "prerouting") if r.get("comment") == "payments -> gw-a"]
    assert tunnel["expr"][4] == {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 7}}


def test_empty_node_plan() -> None:
    table = render_steer_table(NodePlan("n"), STEER)
    assert set(table.sets) == {"cluster4", "cluster6"}
    assert all(not s.elements for s in table.sets.values())
    assert counters(table) == {}


@pytest.mark.parametrize("settings, message", [
    (SteerTableSettings({"gw-a": 0}, {"gw-a": "egw-a"}), "non-zero"),
    (SteerTableSettings({"gw-a": 0x1000}, {"gw-a": "egw-a"}, 0xF00), "inside mark_mask"),
    (SteerTableSettings({"gw-a": 1, "gw-b": 1}, {"gw-a": "a", "gw-b": "b"}), "share mark"),
    (SteerTableSettings({"gw-a": 1}, {"gw-b": "egw-b"}), "same gateways"),
    (SteerTableSettings({"gw-b": 1}, {"gw-b": "egw-b"}), "'gw-a' has no mark"),
])
def test_bad_steer_input_is_named(settings: SteerTableSettings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_steer_table(NODE_PLAN, settings)


# --- elements and transactions --------------------------------------------------------------


@pytest.mark.parametrize("listed, canonical", [
    ("10.0.0.1", "10.0.0.1"),
    ({"prefix": {"addr": "10.0.0.0", "len": 8}}, "10.0.0.0/8"),
    ({"prefix": {"addr": "10.0.0.1", "len": 32}}, "10.0.0.1"),
    ({"range": ["10.0.0.1", "10.0.0.9"]}, "10.0.0.1-10.0.0.9"),
    ("2001:0db8::0001", "2001:db8::1"),
    ({"prefix": {"addr": "2001:db8::", "len": 32}}, "2001:db8::/32"),
    ({"elem": {"val": "10.0.0.2", "counter": {"packets": 1, "bytes": 2}}}, "10.0.0.2"),
])
def test_listed_elements_are_canonical(listed: Any, canonical: str) -> None:
    assert element_from_json(listed) == canonical
    assert element_from_json(element_to_json(canonical)) == canonical


def test_network_elements() -> None:
    assert network_element(net("192.0.2.7/32")) == "192.0.2.7"
    assert network_element(net("2001:db8::/128")) == "2001:db8::"
    assert network_element(net("192.0.2.0/24")) == "192.0.2.0/24"


def test_replace_is_one_batch_that_swaps_the_table() -> None:
    table = gateway_table(GATEWAY_PLAN, SETTINGS)
    commands = replace_commands(table)["nftables"]
    ref = {"family": "inet", "name": "gatewayd"}
    assert commands[:3] == [{"add": {"table": ref}}, {"delete": {"table": ref}},
                            {"add": {"table": ref}}]
    kinds = [next(iter(c["add"])) for c in commands[3:]]
    assert kinds == sorted(kinds, key=["set", "element", "counter", "chain", "rule"].index)
    elements = [c["add"]["element"] for c in commands if "element" in c.get("add", {})]
    assert {e["name"] for e in elements} == set(table.sets)
    assert {"prefix": {"addr": "192.0.2.0", "len": 24}} in elements[0]["elem"]


def verbs(commands: Any) -> list[tuple[str, str, str]]:
    """(verb, kind, name or chain) of each command."""
    result = []
    for command in commands:
        ((verb, value),) = command.items()
        ((kind, obj),) = value.items()
        result.append((verb, kind, obj.get("chain") if kind == "rule" else obj["name"]))
    return result


def test_a_failover_changes_rules_and_counters_in_place_and_keeps_every_set() -> None:
    before = render_steer_table(NODE_PLAN, STEER)
    after = render_steer_table(NODE_PLAN, STEER, active={"payments": "gw-b"})
    update = update_commands(after, before.sets, before.body)
    assert update is not None and update.prepare == ()
    steps = verbs(update.swap)
    assert steps[:2] == [("flush", "chain", "prerouting"), ("flush", "chain", "postrouting")]
    assert not any(kind in ("set", "element") for _, kind, _ in steps)
    # the counters whose comment names the gateway are made anew, after the flush
    changed = {obj["counter"]["name"] for obj in after.body
               if "counter" in obj and obj not in before.body}
    assert changed and [s for s in steps if s[1] == "counter"] == [
        *(("delete", "counter", n) for n in sorted(changed)),
        *(("add", "counter", n) for n in sorted(changed))]
    rules = [c["add"] for c in update.swap if "rule" in c.get("add", {})]
    assert rules == [obj for obj in after.body if "rule" in obj]


def test_new_sets_are_filled_before_the_rules_that_use_them() -> None:
    one = render_steer_table(replace(NODE_PLAN, rules=NODE_PLAN.rules[:1]), STEER)
    two = render_steer_table(NODE_PLAN, STEER)
    update = update_commands(two, one.sets, one.body)
    assert update is not None
    new_sets = set(two.sets) - set(one.sets)
    assert new_sets and {n for v, k, n in verbs(update.prepare) if k == "set"} == new_sets
    filled = {c["add"]["element"]["name"] for c in update.prepare if "element" in c["add"]}
    assert filled == {n for n in new_sets if two.sets[n].elements}
    assert not any(k == "set" for _, k, _ in verbs(update.swap))
    made = {(k, n) for v, k, n in verbs(update.prepare) if v == "add" and k != "element"}
    assert {(k, n) for v, k, n in verbs(update.unprepare) if v == "delete"} == made
    # and back: the rules that used them go first (the flush), then the sets
    back = update_commands(one, two.sets, two.body)
    assert back is not None and back.prepare == ()
    steps = verbs(back.swap)
    deleted = [i for i, (v, k, n) in enumerate(steps) if (v, k) == ("delete", "set")]
    assert {steps[i][2] for i in deleted} == new_sets
    assert max(i for i, s in enumerate(steps) if s[0] == "flush") < min(deleted)


def test_kept_sets_get_element_changes_and_redeclared_ones_are_made_anew() -> None:
    table = gateway_table(GATEWAY_PLAN, SETTINGS)
    current = dict(table.sets)
    current["rule0_src"] = replace(current["rule0_src"],
                                   elements=frozenset({"10.244.1.5", "10.244.9.9"}))
    current["rule1_dst"] = replace(current["rule1_dst"], flags=())
    update = update_commands(table, current, table.body)
    assert update is not None and update.prepare == ()
    steps = verbs(update.swap)
    assert ("delete", "element", "rule0_src") in steps and ("add", "element", "rule0_src") \
        in steps
    assert steps.index(("delete", "set", "rule1_dst")) < steps.index(("add", "set", "rule1_dst"))
    assert ("add", "element", "rule1_dst") in steps


def test_a_change_of_chains_needs_a_new_table() -> None:
    table = gateway_table(GATEWAY_PLAN, SETTINGS)
    body = [obj for obj in table.body if obj.get("chain", {}).get("name") != "postrouting"]
    assert update_commands(table, table.sets, body) is None
    other = [{"chain": {**obj["chain"], "prio": 5}} if "chain" in obj else obj
             for obj in table.body]
    assert update_commands(table, table.sets, other) is None
    assert update_commands(table, table.sets, table.body) is not None


def test_element_updates_delete_before_they_add() -> None:
    table = gateway_table(GATEWAY_PLAN, SETTINGS)
    commands = element_commands(
        table, removed={"rule0_src": frozenset({"10.244.1.5"}), "rule1_src": frozenset()},
        added={"rule0_src": frozenset({"10.244.9.9", "10.244.8.8"})},
    )
    assert commands == [
        {"delete": {"element": {"family": "inet", "table": "gatewayd", "name": "rule0_src",
                                "elem": ["10.244.1.5"]}}},
        {"add": {"element": {"family": "inet", "table": "gatewayd", "name": "rule0_src",
                             "elem": ["10.244.8.8", "10.244.9.9"]}}},
    ]


def test_a_table_rendered_from_the_previous_one_equals_one_rendered_whole() -> None:
    """The agent renders each plan on the last table, writing only the addresses that changed
    as text; random plans in a row (rules coming, going, changing family, sources and
    destinations changing a little or a lot) must give exactly the table rendered alone."""
    rng = random.Random(7)
    v4 = [ip("10.244.0.0") + i for i in range(400)]
    v6 = [ip("fd00:10:244::") + i for i in range(400)]
    destinations = [net(f"198.51.{i}.0/24") for i in range(40)] + [net("2001:db8::/48")]

    def random_plan() -> GatewayPlan:
        rules = []
        for index in range(rng.randint(0, 4)):
            family = rng.choice((4, 6))
            pool = v4 if family == 4 else v6
            choices = [d for d in destinations if d.version == family]
            rules.append(SnatRule(
                policy=f"p{index}", role=rng.choice((Role.ACTIVE, Role.STANDBY)),
                sources=frozenset(rng.sample(pool, rng.randint(0, 300))),
                destinations=tuple(rng.sample(choices, rng.randint(1, min(4, len(choices))))),
                egress_ip=ip("198.51.100.10") if family == 4 else ip("2001:db8:1::10"),
            ))
        return GatewayPlan("gw", tuple(rules))

    previous = None
    for _ in range(300):
        if previous is None or rng.random() < 0.3:
            plan = random_plan()
        else:  # one pod more or less in each rule
            plan = GatewayPlan("gw", tuple(
                replace(r, sources=r.sources ^ {rng.choice(v4 if r.egress_ip.version == 4
                                                           else v6)})
                for r in plan.rules))
        held = {ip("198.51.100.10"), ip("2001:db8:1::10")}
        incremental = render_gateway_table(plan, SETTINGS, held=held, previous=previous)
        assert incremental == render_gateway_table(plan, SETTINGS, held=held)
        previous = incremental
