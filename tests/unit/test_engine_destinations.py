"""Destinations (§4), longest-prefix resolution across policies (§6), our tie-break, and the
cluster-internal exemption (DESIGN.md: never redirected, by address)."""

from __future__ import annotations

import pytest
from engine_fixtures import gateway, iface, ip, net, node, pod, policy, sel, snapshot

from gatewayd.policy.engine import EgressPlan, build_plan
from gatewayd.policy.model import GatewaySpec, Node, NodeAddress, Policy, Verdict

pytestmark = pytest.mark.unit

SRC = "10.0.0.1"
GATEWAYS = [
    gateway("gw-a", "192.0.2.1", labels={"egress.gatewayd.io/role": "gateway", "gw": "a"}),
    gateway("gw-b", "192.0.2.2", labels={"egress.gatewayd.io/role": "gateway", "gw": "b"}),
]


def only(gw: str) -> dict[str, object]:
    """Keyword arguments of `policy()` for a gateway entry that picks gateway `gw`."""
    return {"gateways": [GatewaySpec(sel({"gw": gw}))]}


def plan_of(*policies: Policy, pods: list[str] | None = None) -> EgressPlan:
    sources = [pod(f"p{i}", [a]) for i, a in enumerate(pods or [SRC, "fd00::1"])]
    return build_plan(snapshot(policies, sources, GATEWAYS))


def verdict(plan: EgressPlan, dst: str, src: str = SRC) -> tuple[str, str | None, str | None]:
    e = plan.explain(ip(src), ip(dst))
    return e.verdict.value, e.policy, str(e.cidr) if e.cidr else None


# --- §4: destinations of one policy ----------------------------------------------------------


def test_any_listed_cidr_matches_and_others_do_not() -> None:
    plan = plan_of(policy("p", ["198.51.100.0/24", "203.0.113.7/32"]))
    assert verdict(plan, "198.51.100.200") == ("snat", "p", "198.51.100.0/24")
    assert verdict(plan, "203.0.113.7") == ("snat", "p", "203.0.113.7/32")
    assert verdict(plan, "203.0.113.8")[0] == "no-policy"
    assert verdict(plan, "198.51.101.0")[0] == "no-policy"


def test_ipv6_destinations_need_an_ipv6_source() -> None:
    eth0 = iface("eth0", "192.0.2.1/24", "2001:db8::1/64", v4_default=True, v6_default=True)
    gw = gateway("gw-a", interfaces=[eth0])
    plan = build_plan(
        snapshot([policy("p", ["2001:db8:5::/48"])], [pod("a", [SRC, "fd00::1"])], [gw])
    )
    e = plan.explain(ip("fd00::1"), ip("2001:db8:5::9"))
    assert (e.verdict, e.egress_ip) == (Verdict.SNAT, ip("2001:db8::1"))
    assert plan.explain(ip(SRC), ip("198.51.100.1")).verdict is Verdict.NO_POLICY


def test_mixed_family_query_is_refused() -> None:
    with pytest.raises(ValueError, match="different families"):
        plan_of(policy("p")).explain(ip(SRC), ip("2001:db8::1"))


def test_exclusions_carve_out_of_destinations() -> None:
    plan = plan_of(policy("p", ["198.51.100.0/24"], exclusions=["198.51.100.128/25"]))
    assert verdict(plan, "198.51.100.1") == ("snat", "p", "198.51.100.0/24")
    assert verdict(plan, "198.51.100.200") == ("excluded", "p", "198.51.100.128/25")


def test_exclusion_outside_the_destinations_is_still_excluded() -> None:
    plan = plan_of(policy("p", ["198.51.100.0/24"], exclusions=["203.0.113.0/24"]))
    e = plan.explain(ip(SRC), ip("203.0.113.1"))
    assert (e.verdict, e.reason) == (Verdict.EXCLUDED, "excluded by policy p")


def test_empty_destination_list_has_no_effect() -> None:
    plan = plan_of(policy("p", []))
    e = plan.explain(ip(SRC), ip("198.51.100.1"))
    assert e.verdict is Verdict.NO_POLICY
    assert e.reason == "no destination or excluded CIDR of p contains 198.51.100.1"


# --- §6: one longest-prefix match across policies ------------------------------------------


def test_most_specific_cidr_wins_whichever_policy_it_comes_from() -> None:
    plan = plan_of(
        policy("broad", ["198.51.0.0/16"], **only("a")),  # type: ignore[arg-type]
        policy("narrow", ["198.51.100.0/24"], **only("b")),  # type: ignore[arg-type]
    )
    e = plan.explain(ip(SRC), ip("198.51.100.5"))
    assert (e.policy, e.gateway, str(e.cidr)) == ("narrow", "gw-b", "198.51.100.0/24")
    e = plan.explain(ip(SRC), ip("198.51.7.5"))
    assert (e.policy, e.gateway, str(e.cidr)) == ("broad", "gw-a", "198.51.0.0/16")
    assert any(
        "longest prefix wins: 198.51.100.0/24" in line
        for line in plan.explain(ip(SRC), ip("198.51.100.5")).details
    )


def test_exclusion_of_one_policy_shadows_another_policys_shorter_destination() -> None:
    plan = plan_of(
        policy("a", ["203.0.113.0/24"], exclusions=["198.51.100.0/24"]),
        policy("b", ["198.51.0.0/16"]),
    )
    assert verdict(plan, "198.51.100.9") == ("excluded", "a", "198.51.100.0/24")
    assert verdict(plan, "198.51.99.9") == ("snat", "b", "198.51.0.0/16")


def test_longer_destination_of_another_policy_overrides_an_exclusion() -> None:
    plan = plan_of(
        policy("a", ["198.51.0.0/16"], exclusions=["198.51.100.0/24"]),
        policy("b", ["198.51.100.64/26"]),
    )
    assert verdict(plan, "198.51.100.65") == ("snat", "b", "198.51.100.64/26")
    assert verdict(plan, "198.51.100.1") == ("excluded", "a", "198.51.100.0/24")
    assert verdict(plan, "198.51.1.1") == ("snat", "a", "198.51.0.0/16")


def test_policies_not_selecting_the_source_do_not_take_part() -> None:
    other = policy(
        "other",
        ["198.51.100.0/24"],
        exclusions=["198.51.100.0/25"],
        selectors=[sel({"app": "none"})],
    )
    plan = plan_of(policy("mine", ["198.51.0.0/16"]), other)
    assert verdict(plan, "198.51.100.1") == ("snat", "mine", "198.51.0.0/16")


# --- ties: same source, same CIDR from several entries --------------------------------------


def test_tie_exclusion_beats_destination_across_policies() -> None:
    plan = plan_of(
        policy("a-dest", ["198.51.100.0/24"]),
        policy("z-excl", ["203.0.113.0/24"], exclusions=["198.51.100.0/24"]),
    )
    e = plan.explain(ip(SRC), ip("198.51.100.1"))
    assert (e.verdict, e.policy) == (Verdict.EXCLUDED, "z-excl")
    assert any("it beats the destination of policy a-dest" in line for line in e.details)


def test_tie_exclusion_beats_destination_within_one_policy() -> None:
    plan = plan_of(policy("p", ["198.51.100.0/24"], exclusions=["198.51.100.0/24"]))
    assert verdict(plan, "198.51.100.1") == ("excluded", "p", "198.51.100.0/24")


def test_tie_between_destinations_goes_to_the_name_sorting_first_bytewise() -> None:
    # Byte-wise: "B" (0x42) < "a" (0x61) < "b"; a locale-aware sort would put "a" first.
    plan = plan_of(
        policy("a", ["198.51.100.0/24"], **only("a")),  # type: ignore[arg-type]
        policy("B", ["198.51.100.0/24"], **only("b")),  # type: ignore[arg-type]
    )
    e = plan.explain(ip(SRC), ip("198.51.100.1"))
    assert (e.policy, e.gateway) == ("B", "gw-b")
    assert any("it beats the destination of policy a" in line for line in e.details)


def test_tie_order_does_not_depend_on_snapshot_order() -> None:
    first = policy("alpha", ["198.51.100.0/24"], **only("a"))  # type: ignore[arg-type]
    second = policy("beta", ["198.51.100.0/24"], **only("b"))  # type: ignore[arg-type]
    for order in ((first, second), (second, first)):
        assert verdict(plan_of(*order), "198.51.100.1")[1] == "alpha"


# --- cluster-internal destinations -------------------------------------------------------------


def internal_plan() -> EgressPlan:
    nodes = [
        node("n1", "10.1.0.1", pod_cidrs=["10.244.1.0/24", "fd00:244:1::/64"]),
        node("n2", "10.1.0.2", pod_cidrs=["10.244.0.0/24"]),
    ]
    # ExternalIP and a Hostname address, which is not an IP.
    n3 = Node(
        "n3",
        {},
        (NodeAddress("ExternalIP", "198.51.100.33"), NodeAddress("Hostname", "n3.example")),
    )
    pods = [
        pod("src", ["10.244.1.5", "fd00:244:1::5"], node="n1"),
        pod("elsewhere", ["10.99.0.7"], node="n2"),  # pod IP outside any pod CIDR
        pod("host", ["10.1.0.2"], node="n2", host_network=True),
    ]
    snap = snapshot(
        [policy("all", ["0.0.0.0/0", "::/0"])],
        pods,
        [gateway("gw-a", "192.0.2.1")],
        nodes=[*nodes, n3],
        api_servers=["172.20.0.1", "fd00:ffff::1"],
    )
    return build_plan(snap)


@pytest.mark.parametrize(
    ("dst", "what"),
    [
        ("172.20.0.1", "API server address"),
        ("10.244.0.77", "pod CIDR 10.244.0.0/24 of node n2"),
        ("10.244.1.5", "IP of pod default/src"),
        ("10.99.0.7", "IP of pod default/elsewhere"),
        ("10.1.0.1", "InternalIP of node n1"),
        ("10.1.0.2", "InternalIP of node n2"),
        ("198.51.100.33", "ExternalIP of node n3"),
    ],
)
def test_cluster_internal_destinations_are_never_redirected(dst: str, what: str) -> None:
    e = internal_plan().explain(ip("10.244.1.5"), ip(dst))
    assert e.verdict is Verdict.NO_POLICY
    assert e.reason == f"cluster-internal destination ({what})"
    assert e.pod == "default/src"


def test_cluster_internal_ipv6() -> None:
    plan = internal_plan()
    for dst in ("fd00:ffff::1", "fd00:244:1::99"):
        assert plan.explain(ip("fd00:244:1::5"), ip(dst)).verdict is Verdict.NO_POLICY
    assert plan.explain(ip("fd00:244:1::5"), ip("2001:db8::1")).verdict is Verdict.DROP


def test_other_destinations_still_match_0_0_0_0_slash_0() -> None:
    e = internal_plan().explain(ip("10.244.1.5"), ip("198.51.100.34"))
    assert (e.verdict, str(e.cidr)) == (Verdict.SNAT, "0.0.0.0/0")


def test_cluster_internal_networks_are_collapsed_per_family() -> None:
    assert internal_plan().cluster_internal == tuple(
        net(n)
        for n in (
            "10.1.0.1/32",
            "10.1.0.2/32",
            "10.99.0.7/32",
            "10.244.0.0/23",  # two adjacent pod CIDRs, collapsed
            "172.20.0.1/32",
            "198.51.100.33/32",
            "fd00:244:1::/64",
            "fd00:ffff::1/128",
        )
    )
