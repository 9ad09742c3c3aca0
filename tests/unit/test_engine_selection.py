"""Source-pod selection (cilium-egress-semantics.md §3) as the engine applies it."""

from __future__ import annotations

import pytest
from engine_fixtures import (
    NS_LABEL,
    gateway,
    iface,
    in_namespace,
    ip,
    namespace,
    node,
    pod,
    policy,
    sel,
    snapshot,
)

from gatewayd.policy.engine import build_plan
from gatewayd.policy.model import LabelSelector, Operator, Pod, Policy, Snapshot, Verdict

pytestmark = pytest.mark.unit

DST = ip("198.51.100.7")


def selected(snap: Snapshot, p: Pod) -> bool:
    """Whether a policy sends `p`'s traffic to 198.51.100.7 through the gateway."""
    return build_plan(snap).explain(p.ips[0], DST).verdict is Verdict.SNAT


def one_policy(p: Pod, policy_: Policy, **kwargs: object) -> Snapshot:
    return snapshot([policy_], [p], [gateway("gw-1")], **kwargs)  # type: ignore[arg-type]


# --- candidates (§3.1) --------------------------------------------------------------------------


def test_a_policy_selecting_everything_selects_an_ordinary_pod() -> None:
    p = pod("a", ["10.0.0.1"])
    assert selected(one_policy(p, policy("all")), p)


@pytest.mark.parametrize(
    ("candidate", "why"),
    [
        (pod("host", ["10.0.0.2"], host_network=True), "uses the host network"),
        (pod("no-uid", ["10.0.0.2"], uid=""), "has no UID"),
    ],
)
def test_host_network_and_uid_less_pods_are_never_selected(candidate: Pod, why: str) -> None:
    plan = build_plan(one_policy(candidate, policy("all")))
    explanation = plan.explain(ip("10.0.0.2"), DST)
    assert explanation.verdict is Verdict.NO_POLICY
    assert explanation.details == (f"pod default/{candidate.name} {why}",)
    assert plan.policy_results["all"].selected_pods == 0


def test_pod_without_ip_is_not_counted() -> None:
    plan = build_plan(one_policy(pod("pending", []), policy("all")))
    assert plan.policy_results["all"].selected_pods == 0


def test_unknown_source_is_no_policy_not_an_error() -> None:
    explanation = build_plan(snapshot([policy("all")])).explain(ip("10.9.9.9"), DST)
    assert explanation.verdict is Verdict.NO_POLICY
    assert explanation.reason == "source 10.9.9.9 is not the IP of a pod egress policies apply to"
    assert explanation.pod is None


def test_every_ip_of_a_dual_stack_pod_is_a_source() -> None:
    p = pod("a", ["10.0.0.1", "fd00::1"])
    eth0 = iface("eth0", "192.0.2.1/24", "2001:db8::1/64", v4_default=True, v6_default=True)
    gw6 = gateway("gw-1", interfaces=[eth0])
    snap = snapshot([policy("all", ["198.51.100.0/24", "2001:db8:1::/48"])], [p], [gw6])
    plan = build_plan(snap)
    assert plan.explain(ip("10.0.0.1"), DST).verdict is Verdict.SNAT
    six = plan.explain(ip("fd00::1"), ip("2001:db8:1::5"))
    assert six.verdict is Verdict.SNAT
    assert six.gateway == "gw-1"


# --- identity labels in selectors (§3.1) -------------------------------------------------------


def test_pod_template_hash_never_matches() -> None:
    p = pod("a", ["10.0.0.1"], labels={"pod-template-hash": "abc", "app": "x"})
    assert not selected(
        one_policy(p, policy("p", selectors=[sel({"pod-template-hash": "abc"})])), p
    )
    assert selected(one_policy(p, policy("p", selectors=[sel({"app": "x"})])), p)


def test_pod_selector_may_use_namespace_service_account_and_cluster_labels() -> None:
    p = pod("a", ["10.0.0.1"], namespace="shop", service_account="checkout")
    for selector in (
        sel({"io.kubernetes.pod.namespace": "shop"}),
        sel({"io.cilium.k8s.policy.serviceaccount": "checkout"}),
        sel({"io.cilium.k8s.policy.cluster": "default"}),
        sel({NS_LABEL + "team": "payments"}),
    ):
        snap = one_policy(
            p, policy("p", selectors=[selector]), namespaces=[namespace("shop", team="payments")]
        )
        assert selected(snap, p), selector


def test_spoofed_service_account_label_does_not_match() -> None:
    p = pod("a", ["10.0.0.1"], labels={"io.cilium.k8s.policy.serviceaccount": "admin"})
    selector = sel({"io.cilium.k8s.policy.serviceaccount": "admin"})
    assert not selected(one_policy(p, policy("p", selectors=[selector])), p)


def test_spoofed_namespace_label_does_not_match() -> None:
    p = pod("a", ["10.0.0.1"], namespace="web", labels={"io.kubernetes.pod.namespace": "shop"})
    assert not selected(one_policy(p, policy("p", selectors=[in_namespace("shop")])), p)
    assert not selected(
        one_policy(p, policy("p", selectors=[sel({"io.kubernetes.pod.namespace": "shop"})])), p
    )


# --- operators (§3.2) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "values", "labels", "matches"),
    [
        (Operator.IN, ["a", "b"], {"k": "b"}, True),
        (Operator.IN, ["a", "b"], {"k": "c"}, False),
        (Operator.IN, ["a"], {}, False),
        (Operator.NOT_IN, ["a"], {"k": "b"}, True),
        (Operator.NOT_IN, ["a"], {"k": "a"}, False),
        (Operator.NOT_IN, ["a"], {}, True),  # an absent key is "not in"
        (Operator.EXISTS, [], {"k": ""}, True),
        (Operator.EXISTS, [], {}, False),
        (Operator.DOES_NOT_EXIST, [], {}, True),
        (Operator.DOES_NOT_EXIST, [], {"k": "a"}, False),
    ],
)
def test_operators(
    operator: Operator, values: list[str], labels: dict[str, str], matches: bool
) -> None:
    p = pod("a", ["10.0.0.1"], labels=labels)
    selector = sel(None, ("k", operator, values))
    assert selected(one_policy(p, policy("p", selectors=[selector])), p) is matches


def test_requirements_of_one_selector_are_anded() -> None:
    both = sel({"app": "x"}, ("tier", Operator.IN, ["web"]))
    web = pod("web", ["10.0.0.1"], labels={"app": "x", "tier": "web"})
    api = pod("api", ["10.0.0.2"], labels={"app": "x", "tier": "api"})
    snap = snapshot([policy("p", selectors=[both])], [web, api], [gateway("gw-1")])
    assert selected(snap, web)
    assert not selected(snap, api)


def test_selector_entries_are_ored() -> None:
    either = [sel({"app": "x"}), sel({"app": "y"})]
    pods = [pod(n, [f"10.0.0.{i}"], labels={"app": n}) for i, n in enumerate("xyz", 1)]
    snap = snapshot([policy("p", selectors=either)], pods, [gateway("gw-1")])
    assert [selected(snap, p) for p in pods] == [True, True, False]
    assert build_plan(snap).policy_results["p"].selected_pods == 2


def test_empty_selector_list_selects_nothing() -> None:
    p = pod("a", ["10.0.0.1"])
    assert not selected(one_policy(p, policy("p", selectors=[])), p)


# --- namespace / pod / node selector combinations (§3.4) --------------------------------------


SHOP = namespace("shop", team="payments")
WEB = namespace("web", team="frontend")


def combos() -> tuple[list[Pod], list[object]]:
    pods = [
        pod("shop-x", ["10.0.0.1"], namespace="shop", labels={"app": "x"}),
        pod("shop-y", ["10.0.0.2"], namespace="shop", labels={"app": "y"}),
        pod("web-x", ["10.0.0.3"], namespace="web", labels={"app": "x"}),
    ]
    return pods, [SHOP, WEB]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        # namespaceSelector + podSelector in one entry: ANDed
        (sel({NS_LABEL + "team": "payments", "app": "x"}), [True, False, False]),
        # namespaceSelector alone: every pod of matching namespaces
        (sel({NS_LABEL + "team": "payments"}), [True, True, False]),
        # namespaceSelector {} becomes "io.kubernetes.pod.namespace Exists": every namespace
        (sel(None, ("io.kubernetes.pod.namespace", Operator.EXISTS, [])), [True, True, True]),
        # podSelector alone: every namespace
        (sel({"app": "x"}), [True, False, True]),
        # podSelector naming a namespace ANDed with a namespaceSelector of another one
        (sel({"io.kubernetes.pod.namespace": "web", NS_LABEL + "team": "payments"}), [False] * 3),
        # namespace by name, with NotIn on the team
        (
            sel(
                {"io.kubernetes.pod.namespace": "web"}, (NS_LABEL + "team", Operator.NOT_IN, ["x"])
            ),
            [False, False, True],
        ),
    ],
)
def test_namespace_and_pod_selectors(selector: LabelSelector, expected: list[bool]) -> None:
    pods, namespaces = combos()
    snap = snapshot(
        [policy("p", selectors=[selector])],
        pods,
        [gateway("gw-1")],
        namespaces=namespaces,  # type: ignore[arg-type]
    )
    assert [selected(snap, p) for p in pods] == expected


def node_pods() -> tuple[list[Pod], list[object]]:
    nodes = [
        node("cloud-a", "10.1.0.1", labels={"zone": "a"}),
        node("cloud-b", "10.1.0.2", labels={"zone": "b"}),
    ]
    pods = [
        pod("on-a", ["10.0.0.1"], labels={"app": "x"}, node="cloud-a"),
        pod("on-b", ["10.0.0.2"], labels={"app": "x"}, node="cloud-b"),
        pod("unknown-node", ["10.0.0.3"], labels={"app": "x"}, node="gone"),
        pod("unscheduled", ["10.0.0.4"], labels={"app": "x"}, node=None),
    ]
    return pods, nodes


@pytest.mark.parametrize(
    ("node_selectors", "expected"),
    [
        ([], [True, True, True, True]),
        ([sel({"zone": "a"})], [True, False, False, False]),
        ([sel({"zone": "a"}), sel({"zone": "b"})], [True, True, False, False]),  # ORed
        ([sel()], [True, True, True, True]),  # {} matches every node, even unknown ones
        # A pod whose node is unknown is matched against empty labels.
        ([sel(None, ("zone", Operator.DOES_NOT_EXIST, []))], [False, False, True, True]),
        ([sel(None, ("zone", Operator.NOT_IN, ["a"]))], [False, True, True, True]),
    ],
)
def test_node_selector(node_selectors: list[LabelSelector], expected: list[bool]) -> None:
    pods, nodes = node_pods()
    snap = snapshot(
        [policy("p", selectors=[sel({"app": "x"})], node_selectors=node_selectors)],
        pods,
        [gateway("gw-1")],
        nodes=nodes,  # type: ignore[arg-type]
    )
    assert [selected(snap, p) for p in pods] == expected


def test_node_selector_of_one_entry_restricts_the_other_entries_too() -> None:
    """Quirk (§3.4): `selectors: [{podSelector: app=x, nodeSelector: zone=a}, {podSelector:
    app=y}]` compiles to endpoint selectors (x, y) and the policy-wide node selector (zone=a),
    so app=y pods on zone b are not selected although their entry has no nodeSelector."""
    pods, nodes = node_pods()
    y_on_b = pod("y-on-b", ["10.0.0.9"], labels={"app": "y"}, node="cloud-b")
    y_on_a = pod("y-on-a", ["10.0.0.8"], labels={"app": "y"}, node="cloud-a")
    snap = snapshot(
        [
            policy(
                "p",
                selectors=[sel({"app": "x"}), sel({"app": "y"})],
                node_selectors=[sel({"zone": "a"})],
            )
        ],
        [*pods, y_on_b, y_on_a],
        [gateway("gw-1")],
        nodes=nodes,  # type: ignore[arg-type]
    )
    assert not selected(snap, y_on_b)
    assert selected(snap, y_on_a)


def test_node_selector_matches_the_node_not_the_gateway_or_the_pod() -> None:
    nodes = [node("cloud-a", "10.1.0.1", labels={"zone": "a"})]
    p = pod("x", ["10.0.0.1"], labels={"zone": "a"}, node="elsewhere")
    snap = snapshot(
        [policy("p", node_selectors=[sel({"zone": "a"})])],
        [p],
        [gateway("gw-1", labels={"egress.gatewayd.io/role": "gateway", "zone": "a"})],
        nodes=nodes,
    )
    assert not selected(snap, p)


def test_pods_of_one_identity_on_different_nodes_are_told_apart() -> None:
    # The engine caches selector matches per (identity, node): the node must be part of it.
    pods, nodes = node_pods()
    snap = snapshot(
        [policy("p", selectors=[sel({"app": "x"})], node_selectors=[sel({"zone": "b"})])],
        pods,
        [gateway("gw-1")],
        nodes=nodes,  # type: ignore[arg-type]
    )
    plan = build_plan(snap)
    verdicts = [plan.explain(p.ips[0], DST).verdict for p in pods]
    assert verdicts == [Verdict.NO_POLICY, Verdict.SNAT, Verdict.NO_POLICY, Verdict.NO_POLICY]


def test_policies_without_an_in_requirement_are_still_checked() -> None:
    # Selectors with only NotIn / Exists cannot be indexed by a label pair.
    p = pod("a", ["10.0.0.1"], labels={"tier": "web"})
    only_exists = sel(None, ("tier", Operator.EXISTS, []))
    only_not_in = sel(None, ("app", Operator.NOT_IN, ["db"]))
    for selector in (only_exists, only_not_in, sel()):
        assert selected(one_policy(p, policy("p", selectors=[selector])), p)


def test_in_requirement_with_several_values_is_indexed_under_each() -> None:
    pods = [pod(n, [f"10.0.0.{i}"], labels={"app": n}) for i, n in enumerate("abc", 1)]
    snap = snapshot(
        [policy("p", selectors=[sel(None, ("app", Operator.IN, ["a", "c"]))])],
        pods,
        [gateway("gw-1")],
    )
    assert [selected(snap, p) for p in pods] == [True, False, True]
