"""The policy engine: a snapshot in, per-packet decisions and per-host plans out.

Semantics are those of cilium-egress-semantics.md: source selection by identity labels (§3),
destinations (§4), gateway choice and egress IPs (§5, in `gateways.py`) and one longest-prefix
match over (source, destination) shared by all policies (§6, §7). Where we differ on purpose:

* Gateways are Ready EgressGateway objects; each gateway entry also gets a standby.
* Stickiness (optional): `build_plan(snapshot, preferred_active)` keeps each entry's current
  active gateway while it is usable and matches, instead of going back to the first by name
  (see `gateways.py`). Without `preferred_active` the choice is Cilium's name order.
* Cluster-internal destinations are never redirected, by address: every node's pod CIDRs, every
  pod IP, every node InternalIP/ExternalIP and every API server address.
* Ties, which Cilium leaves undefined: when the same CIDR reaches one source from several
  entries (several policies, or one policy listing it twice), an exclusion beats a destination
  (a CIDR excluded by any policy that selects the source is excluded for it), and among
  destinations the policy whose name sorts first byte-wise wins.

How the plan is built: candidate pods are grouped by (identity labels, node), and selectors are
matched once per group. A pod's *source class* is the set of (policy, gateway entry) pairs it
gets; pods of one class decide every packet alike. Each class resolves its policies' CIDRs by
longest prefix into disjoint ranges per family (`lpm.py`): `explain` bisects them, and the
gateway and node plans are the same ranges written as CIDRs, merged across classes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from ipaddress import ip_address
from typing import TypeVar

from gatewayd.policy import lpm
from gatewayd.policy.gateways import (
    GatewayAssignment,
    PolicyGateways,
    candidates,
    resolve_gateways,
)
from gatewayd.policy.identity import identity_labels
from gatewayd.policy.model import (
    DropReason,
    GatewayPlan,
    IPAddress,
    IPNetwork,
    Namespace,
    NodePlan,
    Operator,
    Outcome,
    Pod,
    Policy,
    Requirement,
    Role,
    Snapshot,
    SnatRule,
    SteerAction,
    SteerRule,
    Verdict,
)

# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyResult:
    """What one policy resolved to: for status and `gatewayctl status`."""

    policy: str
    selected_pods: int
    entries: tuple[GatewayAssignment, ...]  # one per gateway entry, in spec order
    ring: tuple[int, ...]  # entry indices in the order pods are hashed over (by gateway IPv4)
    pods_per_entry: tuple[int, ...]  # aligned with `entries`


@dataclass(frozen=True)
class Explanation:
    """What happens to a new connection from `src` to `dst`, and why."""

    verdict: Verdict
    policy: str | None = None
    gateway: str | None = None
    egress_ip: IPAddress | None = None
    reason: str | None = None  # a DropReason value for drops, free text otherwise
    cidr: IPNetwork | None = None  # the longest matching prefix that decided
    pod: str | None = None  # "namespace/name" of the source pod
    standby: str | None = None
    details: tuple[str, ...] = ()  # human lines: the pod, the policies, the CIDR, the gateway


# --- source classes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Resolved:
    """The winning entry of one CIDR for one source class."""

    cidr: IPNetwork
    outcome: Outcome
    losers: tuple[str, ...] = ()  # the tied entries it beat ("destination of policy b")

    @property
    def what(self) -> str:
        kind = "exclusion" if self.outcome.verdict is Verdict.EXCLUDED else "destination"
        return f"{kind} of policy {self.outcome.policy}"


@dataclass(frozen=True, slots=True)
class _Member:
    policy: Policy
    gateways: PolicyGateways
    assignment: GatewayAssignment


def _destination_outcome(policy: str, assignment: GatewayAssignment, version: int) -> Outcome:
    if assignment.gateway is None:
        return Outcome(Verdict.DROP, policy, reason=DropReason.NO_EGRESS_GATEWAY)
    egress_ip = assignment.egress.for_version(version)
    if egress_ip is None:
        return Outcome(
            Verdict.DROP, policy, gateway=assignment.gateway, reason=DropReason.NO_EGRESS_IP
        )
    standby_ip = (
        assignment.standby_egress.for_version(version) if assignment.standby_egress else None
    )
    return Outcome(
        Verdict.SNAT,
        policy,
        gateway=assignment.gateway,
        egress_ip=egress_ip,
        standby=assignment.standby if standby_ip is not None else None,
        standby_egress_ip=standby_ip,
    )


def _resolve_ties(members: Iterable[_Member]) -> list[_Resolved]:
    """One winner per CIDR: exclusions first, then the policy name that sorts first."""
    offers: dict[IPNetwork, list[tuple[int, bytes, Outcome]]] = defaultdict(list)
    for member in members:
        name = member.policy.name
        key = name.encode()
        for cidr in member.policy.exclusions:
            offers[cidr].append((0, key, Outcome(Verdict.EXCLUDED, name)))
        for cidr in member.policy.destinations:
            outcome = _destination_outcome(name, member.assignment, cidr.version)
            offers[cidr].append((1, key, outcome))
    resolved = []
    for cidr, offered in offers.items():
        rank, key, outcome = min(offered, key=lambda o: (o[0], o[1]))
        losers = sorted(
            {
                ("exclusion" if r == 0 else "destination") + f" of policy {o.policy}"
                for r, k, o in offered
                if (r, k) != (rank, key)
            }
        )
        resolved.append(_Resolved(cidr, outcome, tuple(losers)))
    return resolved


@dataclass(frozen=True, slots=True)
class _Destinations:
    """The destinations of one outcome for one source class, in one family."""

    outcome: Outcome
    version: int
    spans: tuple[tuple[int, int], ...]  # the same addresses as integers: a cheap key to merge on
    networks: tuple[IPNetwork, ...]


class _SourceClass:
    """Pods that get the same (policy, gateway entry) pairs, and their resolved destinations."""

    def __init__(self, members: tuple[_Member, ...]) -> None:
        self.members = members
        self.pods: list[tuple[Pod, tuple[IPAddress, ...]]] = []  # with the IPs the pod owns
        self.entries = tuple(_resolve_ties(members))
        self.tables = {
            version: lpm.RangeTable(
                version,
                lpm.flatten((e.cidr, e) for e in self.entries if e.cidr.version == version),
            )
            for version in (4, 6)
        }

    @cached_property
    def destinations(self) -> list[_Destinations]:
        """Every outcome's destinations, per family; excluded ranges produce nothing."""
        spans: dict[tuple[Outcome, int], list[tuple[int, int]]] = defaultdict(list)
        for version, table in self.tables.items():
            for r in table.ranges:
                if r.value.outcome.verdict is not Verdict.EXCLUDED:
                    spans[(r.value.outcome, version)].append((r.first, r.last))
        return [
            _Destinations(outcome, version, lpm.merge(ranges), lpm.to_networks(ranges, version))
            for (outcome, version), ranges in spans.items()
        ]

    @cached_property
    def sources(self) -> dict[int, frozenset[IPAddress]]:
        """Per family: the IPs of this class's pods."""
        return {
            version: frozenset(ip for _, ips in self.pods for ip in ips if ip.version == version)
            for version in (4, 6)
        }

    @cached_property
    def sources_by_node(self) -> dict[str, dict[int, frozenset[IPAddress]]]:
        """Per node, per family: the IPs of this class's pods running there."""
        found: dict[str, dict[int, set[IPAddress]]] = defaultdict(lambda: {4: set(), 6: set()})
        for pod, ips in self.pods:
            if pod.node_name is not None:
                for ip in ips:
                    found[pod.node_name][ip.version].add(ip)
        return {
            node: {version: frozenset(ips) for version, ips in by_version.items()}
            for node, by_version in found.items()
        }


# --- the plan ----------------------------------------------------------------------------------


# Rules are merged across source classes on everything but their sources; destinations are
# compared by their integer spans (hashing many IPv4Network objects is slow).
_Spans = tuple[int, tuple[tuple[int, int], ...]]
_SnatKey = tuple[str, Role, tuple[int, int], _Spans]
# (policy, action, gateway, standby, drop reason, destinations); "" for None, to sort
_SteerKey = tuple[str, SteerAction, str, str, str, _Spans]
_K = TypeVar("_K", _SnatKey, _SteerKey)
_R = TypeVar("_R")


def _sorted_rules(rules: dict[_K, _R]) -> list[tuple[_K, _R]]:
    """Rules in a stable order: by policy name (byte-wise), then the rest of the key."""
    return sorted(rules.items(), key=lambda item: (item[0][0].encode(), item[0][1:]))


def _pod_name(pod: Pod) -> str:
    return f"{pod.namespace}/{pod.name}"


def _not_a_candidate(pod: Pod) -> str | None:
    """Why egress policies never apply to this pod (Cilium: it has no CiliumEndpoint)."""
    if pod.finished:
        # Cilium drops a finished pod's IP from its ipcache and garbage-collects its
        # CiliumEndpoint: the IP is free, and the CNI may already have handed it to a new pod.
        return f"has finished (phase {pod.phase}): its IP is no longer its own"
    if pod.host_network:
        return "uses the host network"
    if not pod.uid:
        return "has no UID"
    if not pod.ips:
        return "has no IP"
    return None


def _claim_order(pod: Pod) -> tuple[bool, bool, bool, str, str]:
    """The order in which pods claim their IPs; where two claim one IP, the first wins.

    Two pods show one IP when the CNI gave a finished or departing pod's IP to a new one
    before the old Pod object is gone: a running pod that is not being deleted wins over one
    in its deletion grace period, which wins over one that is not running (yet); ties go by
    namespace and name, so the answer never depends on the order objects arrived in.
    """
    return (pod.finished, pod.deleting, pod.phase != "Running", pod.namespace, pod.name)


class EgressPlan:
    """Decisions for every (source pod, destination) and the plan of every gateway and node."""

    def __init__(
        self,
        snapshot: Snapshot,
        preferred_active: Mapping[tuple[str, int], str] | None = None,
    ) -> None:
        self._snapshot = snapshot
        policies = sorted(snapshot.policies, key=lambda p: p.name.encode())
        all_gateways = candidates(snapshot.gateways)
        preferred: dict[str, dict[int, str]] = defaultdict(dict)
        for (policy_name, entry), gateway in (preferred_active or {}).items():
            preferred[policy_name][entry] = gateway
        resolved = [resolve_gateways(p, all_gateways, preferred.get(p.name)) for p in policies]
        self._classes: dict[tuple[tuple[int, int], ...], _SourceClass] = {}
        # Source IP -> (pod, its class or None when no policy selects it).
        self._sources: dict[IPAddress, tuple[Pod, _SourceClass | None]] = {}
        self._other_pods: dict[IPAddress, str] = {}  # IPs of pods policies never apply to
        # IP -> the pods that showed it too but lost it (finished, or later in claim order).
        self._lost_claims: dict[IPAddress, list[str]] = defaultdict(list)
        counts = [[0] * len(p.gateways) for p in policies]

        matcher = _PolicyMatcher(policies, snapshot)
        for pod in sorted(snapshot.pods, key=_claim_order):
            why_not = _not_a_candidate(pod)
            if why_not is not None:
                for ip in pod.ips:
                    self._other_pods.setdefault(ip, f"pod {_pod_name(pod)} {why_not}")
                    if pod.finished:
                        self._lost_claims[ip].append(f"pod {_pod_name(pod)} {why_not}")
                continue
            owned = tuple(ip for ip in pod.ips if ip not in self._sources)
            for ip in pod.ips:
                if ip in self._sources:
                    self._lost_claims[ip].append(
                        f"pod {_pod_name(pod)} shows it too, but pod "
                        f"{_pod_name(self._sources[ip][0])} comes first: it is left out"
                    )
            if not owned:  # every IP it shows is another pod's: it has no traffic of its own
                continue
            selected = matcher.policies_for(pod)
            cls = None
            if selected:
                picks = [(i, resolved[i].for_pod(pod.uid)) for i in selected]
                key = tuple((i, a.entry) for i, a in picks)
                cls = self._classes.get(key)
                if cls is None:
                    members = tuple(_Member(policies[i], resolved[i], a) for i, a in picks)
                    cls = self._classes[key] = _SourceClass(members)
                cls.pods.append((pod, owned))
                for i, assignment in picks:
                    counts[i][assignment.entry] += 1
            for ip in owned:
                self._sources[ip] = (pod, cls)

        self.policy_results: Mapping[str, PolicyResult] = {
            p.name: PolicyResult(
                policy=p.name,
                selected_pods=sum(counts[i]),
                entries=r.entries,
                ring=tuple(a.entry for a in r.ring),
                pods_per_entry=tuple(counts[i]),
            )
            for i, (p, r) in enumerate(zip(policies, resolved, strict=True))
        }

    # --- cluster-internal destinations ---

    @cached_property
    def _cluster_internal(self) -> dict[int, lpm.RangeTable[str]]:
        """Per family: cluster-internal addresses, each with what it is (for explain)."""
        described: dict[tuple[int, int, int], str] = {}  # (version, first, last) -> what

        def add(version: int, first: int, last: int, what: str) -> None:
            described.setdefault((version, first, last), what)

        for ip in self._snapshot.api_server_addresses:
            add(ip.version, int(ip), int(ip), "API server address")
        for node in self._snapshot.nodes:
            for address in node.addresses:
                if address.type in ("InternalIP", "ExternalIP"):
                    try:
                        ip = ip_address(address.address)
                    except ValueError:
                        continue
                    add(ip.version, int(ip), int(ip), f"{address.type} of node {node.name}")
        for pod in self._snapshot.pods:
            if pod.finished:  # its IP is free (see `_not_a_candidate`)
                continue
            for ip in pod.ips:
                add(ip.version, int(ip), int(ip), f"IP of pod {_pod_name(pod)}")
        for node in self._snapshot.nodes:
            for cidr in node.pod_cidrs:
                first, last = int(cidr.network_address), int(cidr.broadcast_address)
                add(cidr.version, first, last, f"pod CIDR {cidr} of node {node.name}")
        return {
            version: lpm.RangeTable(
                version,
                lpm.flatten_spans(
                    (f, la, d) for (v, f, la), d in described.items() if v == version
                ),
            )
            for version in (4, 6)
        }

    @cached_property
    def cluster_internal(self) -> tuple[IPNetwork, ...]:
        """Destinations never steered to a gateway, collapsed; IPv4 first."""
        return tuple(
            net
            for version, table in self._cluster_internal.items()
            for net in lpm.to_networks(((r.first, r.last) for r in table.ranges), version)
        )

    # --- plans ---

    def gateway_plan(self, gateway: str) -> GatewayPlan:
        """SNAT rules of `gateway`, as active and as standby, one family per rule."""
        rules: dict[_SnatKey, tuple[_Destinations, IPAddress, set[IPAddress]]] = {}
        for cls in self._classes.values():
            for group in cls.destinations:
                outcome = group.outcome
                if outcome.verdict is not Verdict.SNAT:
                    continue
                sources = cls.sources[group.version]
                for role, server, egress_ip in (
                    (Role.ACTIVE, outcome.gateway, outcome.egress_ip),
                    (Role.STANDBY, outcome.standby, outcome.standby_egress_ip),
                ):
                    if server != gateway or egress_ip is None or not sources:
                        continue
                    key = (outcome.policy, role, _address_key(egress_ip), _spans_key(group))
                    rules.setdefault(key, (group, egress_ip, set()))[2].update(sources)
        return GatewayPlan(
            gateway=gateway,
            rules=tuple(
                SnatRule(policy, role, frozenset(ips), group.networks, egress_ip)
                for (policy, role, *_), (group, egress_ip, ips) in _sorted_rules(rules)
            ),
        )

    def node_plan(self, node: str) -> NodePlan:
        """Steering rules for the pods running on `node`, one family per rule."""
        rules: dict[_SteerKey, tuple[Outcome, _Destinations, set[IPAddress]]] = {}
        for cls in self._classes_on_node.get(node, ()):
            local = cls.sources_by_node[node]
            for group in cls.destinations:
                sources = local[group.version]
                if sources:
                    o = group.outcome
                    key = (
                        (o.policy, SteerAction.TUNNEL, o.gateway or "", o.standby or "", "")
                        if o.verdict is Verdict.SNAT
                        else (o.policy, SteerAction.DROP, "", "", o.reason or "")
                    )
                    rules.setdefault((*key, _spans_key(group)), (o, group, set()))[2].update(
                        sources
                    )
        steer = []
        for (policy, action, *_), (outcome, group, ips) in _sorted_rules(rules):
            if action is SteerAction.TUNNEL:
                rule = SteerRule(
                    policy,
                    action,
                    frozenset(ips),
                    group.networks,
                    gateway=outcome.gateway,
                    standby=outcome.standby,
                )
            else:
                rule = SteerRule(
                    policy, action, frozenset(ips), group.networks, reason=outcome.reason
                )
            steer.append(rule)
        return NodePlan(node=node, rules=tuple(steer), cluster_internal=self.cluster_internal)

    @cached_property
    def _classes_on_node(self) -> dict[str, list[_SourceClass]]:
        on_node: dict[str, list[_SourceClass]] = defaultdict(list)
        for cls in self._classes.values():
            for node in cls.sources_by_node:
                on_node[node].append(cls)
        return on_node

    # --- explain ---

    def explain(self, src: IPAddress, dst: IPAddress) -> Explanation:
        """Decide a new connection from `src` to `dst` like the data plane would, with reasons.

        Raises ValueError when `src` and `dst` are of different address families.
        """
        if src.version != dst.version:
            raise ValueError(f"source {src} and destination {dst} are of different families")
        found = self._sources.get(src)
        if found is None:
            other = self._other_pods.get(src)
            return Explanation(
                Verdict.NO_POLICY,
                reason=f"source {src} is not the IP of a pod egress policies apply to",
                details=(other or f"no pod in the snapshot has the IP {src}",),
            )
        pod, cls = found
        details = [f"source {src} is pod {_pod_name(pod)} on node {pod.node_name or '(none)'}"]
        details += self._lost_claims.get(src, ())
        name = _pod_name(pod)
        internal = self._cluster_internal[dst.version].lookup(dst)
        if internal is not None:
            return Explanation(
                Verdict.NO_POLICY,
                reason=f"cluster-internal destination ({internal.value})",
                pod=name,
                details=(*details, f"{dst} is cluster-internal: it is never redirected"),
            )
        if cls is None:
            return Explanation(
                Verdict.NO_POLICY,
                reason=f"no policy selects pod {name}",
                pod=name,
                details=tuple(details),
            )
        details.append(
            "selected by: "
            + ", ".join(
                f"{m.policy.name} (entry {m.assignment.entry}: "
                f"{m.assignment.gateway or 'no gateway'})"
                for m in cls.members
            )
        )
        hit = cls.tables[dst.version].lookup(dst)
        if hit is None:
            policies = ", ".join(m.policy.name for m in cls.members)
            return Explanation(
                Verdict.NO_POLICY,
                reason=f"no destination or excluded CIDR of {policies} contains {dst}",
                pod=name,
                details=tuple(details),
            )
        winner = hit.value
        matching = sorted(
            (e for e in cls.entries if dst in e.cidr), key=lambda e: -e.cidr.prefixlen
        )
        details.append(
            f"CIDRs containing {dst}: " + "; ".join(f"{e.cidr} ({e.what})" for e in matching)
        )
        details.append(f"longest prefix wins: {winner.cidr} ({winner.what})")
        if winner.losers:
            details.append(
                f"tie on {winner.cidr}: it beats the {', '.join(winner.losers)} "
                "(an exclusion beats a destination; then the policy name sorting first wins)"
            )
        outcome = winner.outcome
        explanation = Explanation(
            outcome.verdict,
            policy=outcome.policy,
            cidr=winner.cidr,
            pod=name,
            gateway=outcome.gateway,
            egress_ip=outcome.egress_ip,
            standby=outcome.standby,
        )
        if outcome.verdict is Verdict.EXCLUDED:
            reason = f"excluded by policy {outcome.policy}"
            return replace(explanation, reason=reason, details=tuple(details))
        member = next(m for m in cls.members if m.policy.name == outcome.policy)
        details.extend(_gateway_details(member, pod, dst.version))
        drop = outcome.reason.value if outcome.reason is not None else None
        return replace(explanation, reason=drop, details=tuple(details))


def _gateway_details(member: _Member, pod: Pod, version: int) -> list[str]:
    ring = member.gateways.ring
    assignment = member.assignment
    lines = list(assignment.notes)
    if len(ring) > 1:
        index = ring.index(assignment)
        names = ", ".join(a.gateway or "none" for a in ring)
        lines.append(
            f"{len(ring)} gateways sorted by IPv4 ({names}); fnv1a32(uid {pod.uid}) "
            f"% {len(ring)} = {index}, so {assignment.gateway}"
        )
    if assignment.gateway is not None:
        lines.extend(assignment.egress.notes)
        if assignment.egress.for_version(version) is None:
            family = "IPv4" if version == 4 else "IPv6"
            lines.append(f"no {family} egress IP on {assignment.gateway}: traffic is dropped")
    return lines


class _PolicyMatcher:
    """Which policies select a pod, matching selectors once per (identity labels, node)."""

    def __init__(self, policies: list[Policy], snapshot: Snapshot) -> None:
        self._policies = policies
        self._namespaces: dict[str, Namespace] = {n.name: n for n in snapshot.namespaces}
        self._node_labels = {n.name: n.labels for n in snapshot.nodes}
        self._cluster = snapshot.cluster_name
        # Most selectors require some `key In (values)`; index policies by those pairs so a pod
        # is only checked against policies that can match it.
        self._by_label: dict[tuple[str, str], list[int]] = defaultdict(list)
        self._always: list[int] = []
        for index, policy in enumerate(policies):
            anchors = [_anchor(s.requirements) for s in policy.endpoint_selectors]
            if any(a is None for a in anchors):
                self._always.append(index)
                continue
            for pair in {pair for a in anchors if a is not None for pair in a}:
                self._by_label[pair].append(index)
        self._by_identity: dict[tuple[object, ...], list[int]] = {}
        self._by_group: dict[tuple[tuple[object, ...], str | None], tuple[int, ...]] = {}
        self._node_match: dict[tuple[int, str | None], bool] = {}

    def policies_for(self, pod: Pod) -> tuple[int, ...]:
        """Indices of the policies selecting `pod`, in policy order."""
        identity = (pod.namespace, pod.service_account, frozenset(pod.labels.items()))
        group = (identity, pod.node_name)
        selected = self._by_group.get(group)
        if selected is None:
            by_labels = self._by_identity.get(identity)
            if by_labels is None:
                by_labels = self._by_identity[identity] = self._match_labels(pod)
            selected = tuple(i for i in by_labels if self._matches_node(i, pod.node_name))
            self._by_group[group] = selected
        return selected

    def _match_labels(self, pod: Pod) -> list[int]:
        labels = identity_labels(pod, self._namespaces.get(pod.namespace), self._cluster)
        maybe = set(self._always)
        for pair in labels.items():
            maybe.update(self._by_label.get(pair, ()))
        return [
            i
            for i in sorted(maybe)
            if any(s.matches(labels) for s in self._policies[i].endpoint_selectors)
        ]

    def _matches_node(self, index: int, node: str | None) -> bool:
        selectors = self._policies[index].node_selectors
        if not selectors:
            return True
        key = (index, node)
        if key not in self._node_match:
            # A pod whose node is unknown is matched against empty labels (spec §3.4).
            labels = self._node_labels.get(node, {}) if node is not None else {}
            self._node_match[key] = any(s.matches(labels) for s in selectors)
        return self._node_match[key]


def _anchor(requirements: Iterable[Requirement]) -> list[tuple[str, str]] | None:
    """(key, value) pairs one of which a label set must contain to match, or None."""
    best: list[tuple[str, str]] | None = None
    for r in requirements:
        if r.operator is Operator.IN:
            pairs = [(r.key, v) for v in r.values]
            if best is None or len(pairs) < len(best):
                best = pairs
    return best


def _address_key(ip: IPAddress) -> tuple[int, int]:
    return (ip.version, int(ip))


def _spans_key(group: _Destinations) -> _Spans:
    return (group.version, group.spans)


def build_plan(
    snapshot: Snapshot, preferred_active: Mapping[tuple[str, int], str] | None = None
) -> EgressPlan:
    """Resolve every policy of `snapshot` (valid ones only) into decisions and plans.

    `preferred_active` maps (policy name, gateway entry index) to the entry's current active
    gateway, which then stays active while it is usable and matches (stickiness); entries not
    named, and every entry without it, get the first usable matching gateway by name.
    """
    return EgressPlan(snapshot, preferred_active)
