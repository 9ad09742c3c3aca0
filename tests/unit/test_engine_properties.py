"""Property: for random small snapshots, `explain` (source classes, flattened LPM ranges, bisect)
agrees with a naive per-packet evaluation written straight from the pseudocode of
cilium-egress-semantics.md §7, with our differences (Ready EgressGateways, cluster-internal
destinations by address, the documented tie-break, standbys)."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address, ip_network

import pytest
from engine_fixtures import iface
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gatewayd.policy.engine import build_plan
from gatewayd.policy.gateways import (
    derive_egress_ips,
    first_ipv4,
    fnv1a32,
    standby_egress_ips,
)
from gatewayd.policy.identity import identity_labels
from gatewayd.policy.model import (
    EgressGateway,
    EgressIPPool,
    GatewaySpec,
    IPAddress,
    IPNetwork,
    LabelSelector,
    Namespace,
    Node,
    NodeAddress,
    Operator,
    Pod,
    Policy,
    Requirement,
    Snapshot,
    Verdict,
)

pytestmark = pytest.mark.unit

CIDRS = [
    "0.0.0.0/0",
    "198.51.100.0/24",
    "198.51.100.0/25",
    "198.51.100.128/26",
    "198.51.100.7/32",
    "10.0.0.0/8",
    "::/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
]
DESTINATIONS = [
    "198.51.100.7",
    "198.51.100.8",
    "198.51.100.130",
    "198.51.100.200",
    "198.51.101.1",
    "10.0.0.3",
    "10.0.0.200",
    "10.1.0.1",
    "172.20.0.1",
    "2001:db8:1::1",
    "2001:db8:2::1",
    "fd00::3",
]
LABELS = {"app": ["a", "b", "c"], "tier": ["x", "y"], "zone": ["e", "w"]}


def ip(text: str) -> IPAddress:
    return ip_address(text)


def cidr(text: str) -> IPNetwork:
    return ip_network(text)


# --- strategies -------------------------------------------------------------------------------


@st.composite
def requirements(draw: st.DrawFn, keys: list[str]) -> Requirement:
    key = draw(st.sampled_from(keys))
    operator = draw(st.sampled_from(list(Operator)))
    values: frozenset[str] = frozenset()
    if operator in (Operator.IN, Operator.NOT_IN):
        pool = LABELS.get(key.rsplit(".", 1)[-1], ["ns1", "ns2", "t1", "t2"])
        values = frozenset(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2)))
    return Requirement(key, operator, values)


def selectors(keys: list[str]) -> st.SearchStrategy[LabelSelector]:
    return st.builds(LabelSelector, st.lists(requirements(keys), max_size=2).map(tuple))


POD_KEYS = [
    "app",
    "tier",
    "io.kubernetes.pod.namespace",
    "io.cilium.k8s.namespace.labels.team",
    "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
]


@st.composite
def gateway_specs(draw: st.DrawFn) -> GatewaySpec:
    mode = draw(st.sampled_from(["default", "interface", "egress-ip"]))
    node_selector = LabelSelector(tuple(draw(st.lists(requirements(["zone", "tier"]), max_size=1))))
    if mode == "interface":
        return GatewaySpec(node_selector, interface=draw(st.sampled_from(["eth0", "up", "eth9"])))
    if mode == "egress-ip":
        address = draw(
            st.sampled_from(["192.0.2.11", "203.0.113.5", "203.0.113.66", "2001:db8::11"])
        )
        return GatewaySpec(node_selector, egress_ip=ip(address))
    return GatewaySpec(node_selector)


@st.composite
def policies(draw: st.DrawFn, name: str) -> Policy:
    return Policy(
        name=name,
        kind="EgressGatewayPolicy",
        endpoint_selectors=tuple(draw(st.lists(selectors(POD_KEYS), min_size=1, max_size=2))),
        node_selectors=tuple(draw(st.lists(selectors(["zone"]), max_size=1))),
        destinations=tuple(cidr(c) for c in draw(st.lists(st.sampled_from(CIDRS), max_size=3))),
        exclusions=tuple(cidr(c) for c in draw(st.lists(st.sampled_from(CIDRS), max_size=2))),
        gateways=tuple(draw(st.lists(gateway_specs(), min_size=1, max_size=3))),
    )


@st.composite
def gateways(draw: st.DrawFn, index: int, name: str) -> EgressGateway:
    v4 = f"192.0.2.{11 + index}"
    addresses = [NodeAddress("InternalIP", v4)]
    if draw(st.booleans()) and index == 3:
        addresses = [NodeAddress("InternalIP", "2001:db8::99")]  # no IPv4: never chosen
    eth0 = [f"{v4}/24"] + ([f"2001:db8::{11 + index}/64"] if draw(st.booleans()) else [])
    v4_default = draw(st.integers(0, 3)) > 0
    interfaces = [
        iface("eth0", *eth0, v4_default=v4_default, v6_default=draw(st.booleans())),
        iface("eth1", f"203.0.113.{5 + index * 16}/28", "fe80::1/64", altnames=["up"],
              v6_default=draw(st.booleans())),
    ]  # fmt: skip
    pools = [EgressIPPool(cidr("203.0.113.64/28"), "eth1")] if draw(st.booleans()) else []
    return EgressGateway(
        name=name,
        labels={k: draw(st.sampled_from(LABELS[k])) for k in ("zone", "tier")},
        addresses=tuple(addresses),
        interfaces=tuple(interfaces),
        egress_ip_pools=tuple(pools),
        ready=draw(st.integers(0, 3)) > 0,
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    nodes = [
        Node("n1", {"zone": "e"}, (NodeAddress("InternalIP", "10.1.0.1"),), (cidr("10.0.0.0/28"),)),
        Node("n2", {"zone": "w"}, (NodeAddress("InternalIP", "10.1.0.2"),), ()),
    ]
    namespaces = [
        Namespace("ns1", {"kubernetes.io/metadata.name": "ns1", "team": "t1"}),
        Namespace("ns2", {"kubernetes.io/metadata.name": "ns2", "team": "t2"}),
    ]
    pods = []
    for i in range(draw(st.integers(1, 6))):
        addresses = [ip(f"10.0.0.{i + 1}" if draw(st.booleans()) else f"10.0.0.{200 + i}")]
        if draw(st.booleans()):
            addresses.append(ip(f"fd00::{i + 1}"))
        uid = draw(st.sampled_from(["", "u"])) + draw(st.text("0123456789abcdef-", max_size=12))
        labels = {k: draw(st.sampled_from(v)) for k, v in LABELS.items() if draw(st.booleans())}
        pods.append(
            Pod(
                name=f"pod-{i}",
                namespace=draw(st.sampled_from(["ns1", "ns2", "ns3"])),
                uid=uid,
                labels=labels,
                node_name=draw(st.sampled_from(["n1", "n2", "ghost", None])),
                host_network=draw(st.integers(0, 9)) == 0,
                ips=tuple(addresses),
            )
        )
    names = draw(
        st.lists(st.sampled_from(["a", "b", "B", "c"]), unique=True, min_size=1, max_size=4)
    )
    gw_names = draw(
        st.lists(
            st.sampled_from(["gw-1", "gw-10", "gw-9", "gw-a"]), unique=True, min_size=1, max_size=4
        )
    )
    return Snapshot(
        policies=tuple(draw(policies(n)) for n in names),
        pods=tuple(pods),
        namespaces=tuple(namespaces),
        nodes=tuple(nodes),
        gateways=tuple(draw(gateways(i, n)) for i, n in enumerate(gw_names)),
        api_server_addresses=(ip("172.20.0.1"),),
    )  # fmt: skip


# --- the naive evaluation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    policy: str | None = None
    gateway: str | None = None
    egress_ip: IPAddress | None = None
    cidr: IPNetwork | None = None
    standby: str | None = None


def naive(snap: Snapshot, src: IPAddress, dst: IPAddress) -> Decision:
    candidates = [
        p
        for p in sorted(snap.pods, key=lambda p: (p.namespace, p.name))
        if not p.host_network and p.uid and p.ips
    ]
    owner = next((p for p in candidates if src in p.ips), None)
    if owner is None:
        return Decision(Verdict.NO_POLICY)
    internal = (
        dst in snap.api_server_addresses
        or any(dst in p.ips for p in snap.pods)
        or any(dst == ip(a.address) for n in snap.nodes for a in n.addresses)
        or any(dst in c for n in snap.nodes for c in n.pod_cidrs)
    )
    if internal:
        return Decision(Verdict.NO_POLICY)
    namespace = next((n for n in snap.namespaces if n.name == owner.namespace), None)
    labels = identity_labels(owner, namespace, snap.cluster_name)
    node_labels = next((n.labels for n in snap.nodes if n.name == owner.node_name), {})
    offers = []  # (cidr, rank: 0 exclusion / 1 destination, policy, decision)
    for policy in snap.policies:
        if not any(s.matches(labels) for s in policy.endpoint_selectors):
            continue
        if policy.node_selectors and not any(s.matches(node_labels) for s in policy.node_selectors):
            continue
        for x in policy.exclusions:
            if dst in x:
                offers.append((x, 0, policy.name, Decision(Verdict.EXCLUDED, policy.name, cidr=x)))
        for d in policy.destinations:
            if dst in d:
                offers.append((d, 1, policy.name, naive_gateway(snap, policy, owner, dst, d)))
    if not offers:
        return Decision(Verdict.NO_POLICY)
    longest = max(o[0].prefixlen for o in offers)
    best = min(
        (o for o in offers if o[0].prefixlen == longest), key=lambda o: (o[1], o[2].encode())
    )
    return best[3]


def naive_gateway(
    snap: Snapshot, policy: Policy, pod: Pod, dst: IPAddress, d: IPNetwork
) -> Decision:
    usable = sorted(
        (g for g in snap.gateways if g.ready and first_ipv4(g.addresses) is not None),
        key=lambda g: g.name.encode(),
    )
    resolved = []
    for spec in policy.gateways:
        matching = [g for g in usable if spec.node_selector.matches(g.labels)]
        resolved.append((matching, spec))
    actives = {m[0].name for m, _ in resolved if m}
    if len(resolved) > 1:
        resolved = [r for r in resolved if r[0]] or resolved[:1]

    def ring_key(entry: tuple[list[EgressGateway], GatewaySpec]) -> int:
        address = first_ipv4(entry[0][0].addresses) if entry[0] else IPv4Address(0)
        return int(address) if address else 0

    resolved.sort(key=ring_key)
    matching, spec = resolved[fnv1a32(pod.uid) % len(resolved)]
    if not matching:
        return Decision(Verdict.DROP, policy.name, cidr=d)
    v4 = any(c.version == 4 for c in policy.destinations)
    v6 = any(c.version == 6 for c in policy.destinations)
    egress = derive_egress_ips(matching[0], spec, v4, v6).for_version(dst.version)
    if egress is None:
        return Decision(Verdict.DROP, policy.name, matching[0].name, cidr=d)
    standby = None
    if len(matching) > 1 and matching[1].name not in actives:
        ips = standby_egress_ips(matching[1], spec, v4, v6)
        standby = matching[1].name if ips.for_version(dst.version) else None
    return Decision(Verdict.SNAT, policy.name, matching[0].name, egress, d, standby)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_explain_agrees_with_naive_evaluation(snap: Snapshot) -> None:
    plan = build_plan(snap)
    seen = set()
    for pod in snap.pods:
        for src in pod.ips:
            for text in DESTINATIONS:
                dst = ip(text)
                if dst.version != src.version:
                    continue
                e = plan.explain(src, dst)
                got = Decision(e.verdict, e.policy, e.gateway, e.egress_ip, e.cidr, e.standby)
                assert got == naive(snap, src, dst), (str(src), text)
                seen.add(f"{e.verdict.value} {e.reason if e.verdict is Verdict.DROP else ''}")
    for outcome in seen:
        event(outcome)
