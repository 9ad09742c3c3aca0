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

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
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
    address_order,
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
    """Pods that get the same (policy, gateway entry) pairs, and their resolved destinations.

    The pods' addresses are kept current as pods come and go (`add`, `remove`); an address
    belongs to one pod at most, so plain sets stay exact."""

    def __init__(self, members: tuple[_Member, ...]) -> None:
        self.members = members
        self.pods = 0
        self.entries = tuple(_resolve_ties(members))
        self.tables = {
            version: lpm.RangeTable(
                version,
                lpm.flatten((e.cidr, e) for e in self.entries if e.cidr.version == version),
            )
            for version in (4, 6)
        }
        # Per family: the IPs of this class's pods.
        self.sources: dict[int, set[IPAddress]] = {4: set(), 6: set()}
        # Per node, per family: the IPs of this class's pods running there (nodes with some).
        self.sources_by_node: dict[str, dict[int, set[IPAddress]]] = {}

    def add(self, pod: Pod, owned: tuple[IPAddress, ...]) -> None:
        self.pods += 1
        for ip in owned:
            self.sources[ip.version].add(ip)
        if pod.node_name is not None:
            local = self.sources_by_node.setdefault(pod.node_name, {4: set(), 6: set()})
            for ip in owned:
                local[ip.version].add(ip)

    def remove(self, pod: Pod, owned: tuple[IPAddress, ...]) -> None:
        self.pods -= 1
        for ip in owned:
            self.sources[ip.version].discard(ip)
        if pod.node_name is not None:
            local = self.sources_by_node[pod.node_name]
            for ip in owned:
                local[ip.version].discard(ip)
            if not local[4] and not local[6]:
                del self.sources_by_node[pod.node_name]

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
    def gateways(self) -> frozenset[str]:
        """Gateways whose SNAT rules this class's sources appear in."""
        found: set[str] = set()
        for group in self.destinations:
            if group.outcome.verdict is Verdict.SNAT:
                found.update(g for g in (group.outcome.gateway, group.outcome.standby) if g)
        return frozenset(found)


@dataclass(frozen=True, slots=True)
class _Placed:
    """Where a candidate pod stands in the plan: the IPs it owns and its class."""

    pod: Pod
    owned: tuple[IPAddress, ...]
    cls: _SourceClass | None
    picks: tuple[tuple[int, int], ...]  # (policy index, gateway entry) it is counted under


class _SnatSources:
    """The sources of one SNAT rule of a gateway, kept current; the rule made on demand."""

    __slots__ = ("egress_ip", "ips", "made", "networks")

    def __init__(self, networks: tuple[IPNetwork, ...], egress_ip: IPAddress) -> None:
        self.networks = networks
        self.egress_ip = egress_ip
        self.ips: set[IPAddress] = set()
        self.made: SnatRule | None = None

    def add(self, ips: Iterable[IPAddress]) -> None:
        self.ips.update(ips)
        self.made = None

    def remove(self, ips: Iterable[IPAddress]) -> bool:
        """Whether any source is left."""
        self.ips.difference_update(ips)
        self.made = None
        return bool(self.ips)

    def rule(self, policy: str, role: Role) -> SnatRule:
        if self.made is None:
            self.made = SnatRule(policy, role, frozenset(self.ips), self.networks, self.egress_ip)
        return self.made


@dataclass
class PodChanges:
    """What an `EgressPlan.update_pods` call changed: whose plans to render again."""

    gateways: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    cluster_internal: bool = False  # every node plan's clusterInternal list


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


def _pod_key(pod: Pod) -> tuple[str, str]:
    return (pod.namespace, pod.name)


class EgressPlan:
    """Decisions for every (source pod, destination) and the plan of every gateway and node.

    Built whole from a snapshot (`build_plan`), then kept current pod by pod (`update_pods`):
    a pod of a known identity costs a few set operations, a new identity one match against
    the policies. Any other change (policies, namespaces, nodes, gateways, preferences) is a
    new plan built whole.
    """

    def __init__(
        self,
        snapshot: Snapshot,
        preferred_active: Mapping[tuple[str, int], str] | None = None,
    ) -> None:
        self._snapshot = snapshot  # its pods are those of the build: see `_pods`
        self.preferred_active = dict(preferred_active or {})
        self._policies = sorted(snapshot.policies, key=lambda p: p.name.encode())
        all_gateways = candidates(snapshot.gateways)
        preferred: dict[str, dict[int, str]] = defaultdict(dict)
        for (policy_name, entry), gateway in (preferred_active or {}).items():
            preferred[policy_name][entry] = gateway
        self._resolved = [
            resolve_gateways(p, all_gateways, preferred.get(p.name)) for p in self._policies
        ]
        self._matcher = _PolicyMatcher(self._policies, snapshot)
        self._classes: dict[tuple[tuple[int, int], ...], _SourceClass] = {}
        self._classes_on_node: dict[str, dict[tuple[tuple[int, int], ...], _SourceClass]] = (
            defaultdict(dict)
        )
        self._pods: dict[tuple[str, str], Pod] = {}  # every pod, current
        # IP -> the candidate pods showing it, in claim order: the first one owns it.
        self._claims: dict[IPAddress, list[Pod]] = {}
        self._placed: dict[tuple[str, str], _Placed] = {}  # candidate pods that own an IP
        # Source IP -> (pod, its class or None when no policy selects it).
        self._sources: dict[IPAddress, tuple[Pod, _SourceClass | None]] = {}
        self._counts = [[0] * len(p.gateways) for p in self._policies]
        self._results: Mapping[str, PolicyResult] | None = None
        # Per gateway whose plan was asked for: its SNAT rules, kept current from then on.
        self._snat: dict[str, dict[_SnatKey, _SnatSources]] = {}

        for pod in snapshot.pods:
            self._pods[_pod_key(pod)] = pod
        # In claim order, each pod's claims come after those of the pods before it: it owns
        # exactly the IPs no earlier pod showed.
        for pod in sorted(snapshot.pods, key=_claim_order):
            if _not_a_candidate(pod) is None:
                for ip in pod.ips:
                    self._claims.setdefault(ip, []).append(pod)
                self._place(pod, None)

    @property
    def built_from(self) -> Snapshot:
        """The snapshot this plan was built from; its pods are those of the build (the plan's
        own follow `update_pods`)."""
        return self._snapshot

    @property
    def policy_results(self) -> Mapping[str, PolicyResult]:
        if self._results is None:
            self._results = {
                p.name: PolicyResult(
                    policy=p.name,
                    selected_pods=sum(self._counts[i]),
                    entries=r.entries,
                    ring=tuple(a.entry for a in r.ring),
                    pods_per_entry=tuple(self._counts[i]),
                )
                for i, (p, r) in enumerate(zip(self._policies, self._resolved, strict=True))
            }
        return self._results

    # --- pods ---

    def update_pods(self, removed: Iterable[Pod], added: Iterable[Pod]) -> PodChanges:
        """The plan after `removed` pods left (each as this plan has it) and `added` came (a
        changed pod is both); what it changed. The result equals a plan built whole from the
        snapshot with the same pods."""
        changes = PodChanges()
        strays = self._strays  # taken before the pods change
        touched: set[IPAddress] = set()
        for pod in removed:
            key = _pod_key(pod)
            del self._pods[key]
            self._unplace(key, changes)
            if _not_a_candidate(pod) is None:
                for ip in pod.ips:
                    claims = self._claims[ip]
                    claims.remove(pod)
                    if not claims:
                        del self._claims[ip]
                    touched.add(ip)
            changes.cluster_internal |= self._count_strays(strays, pod, -1)
        for pod in added:
            self._pods[_pod_key(pod)] = pod
            if _not_a_candidate(pod) is None:
                for ip in pod.ips:
                    bisect.insort(self._claims.setdefault(ip, []), pod, key=_claim_order)
                    touched.add(ip)
            changes.cluster_internal |= self._count_strays(strays, pod, 1)
        # Whoever shows a touched IP may own more or less now.
        affected = {_pod_key(p): p for ip in touched for p in self._claims.get(ip, ())}
        for key in affected:
            self._unplace(key, changes)
        for pod in sorted(affected.values(), key=_claim_order):
            self._place(pod, changes)
        for name in ("_cluster_internal", "_claim_notes"):
            self.__dict__.pop(name, None)
        if changes.cluster_internal:
            self.__dict__.pop("cluster_internal", None)
        return changes

    def _place(self, pod: Pod, changes: PodChanges | None) -> None:
        """Give a candidate pod the IPs it owns, and its class."""
        owned = tuple(ip for ip in pod.ips if self._claims[ip][0] is pod)
        if not owned:  # every IP it shows is another pod's: it has no traffic of its own
            return
        cls = None
        picks: tuple[tuple[int, int], ...] = ()
        selected = self._matcher.policies_for(pod)
        if selected:
            assignments = [(i, self._resolved[i].for_pod(pod.uid)) for i in selected]
            picks = tuple((i, a.entry) for i, a in assignments)
            cls = self._classes.get(picks)
            if cls is None:
                members = tuple(
                    _Member(self._policies[i], self._resolved[i], a) for i, a in assignments
                )
                cls = self._classes[picks] = _SourceClass(members)
            cls.add(pod, owned)
            self._count_pod_snat(cls, owned, 1)
            if pod.node_name is not None:
                self._classes_on_node[pod.node_name][picks] = cls
            for i, entry in picks:
                self._counts[i][entry] += 1
            self._results = None
        for ip in owned:
            self._sources[ip] = (pod, cls)
        self._placed[_pod_key(pod)] = _Placed(pod, owned, cls, picks)
        if changes is not None and cls is not None:
            changes.gateways |= cls.gateways
            if pod.node_name is not None:
                changes.nodes.add(pod.node_name)

    def _count_pod_snat(self, cls: _SourceClass, owned: tuple[IPAddress, ...], step: int) -> None:
        """Follow a pod's IPs joining or leaving its class in the gateways' SNAT rules."""
        by_version: dict[int, list[IPAddress]] = {4: [], 6: []}
        for ip in owned:
            by_version[ip.version].append(ip)
        for gateway in cls.gateways:
            rules = self._snat.get(gateway)
            if rules is not None:
                self._count_snat(gateway, rules, cls, by_version, step)

    def _unplace(self, key: tuple[str, str], changes: PodChanges) -> None:
        placed = self._placed.pop(key, None)
        if placed is None:
            return
        pod, cls = placed.pod, placed.cls
        for ip in placed.owned:
            del self._sources[ip]
        if cls is None:
            return
        cls.remove(pod, placed.owned)
        self._count_pod_snat(cls, placed.owned, -1)
        node = pod.node_name
        if node is not None and node not in cls.sources_by_node:
            del self._classes_on_node[node][placed.picks]
        if cls.pods == 0:
            del self._classes[placed.picks]
        for i, entry in placed.picks:
            self._counts[i][entry] -= 1
        self._results = None
        changes.gateways |= cls.gateways
        if node is not None:
            changes.nodes.add(node)

    def _host_addresses(self) -> Iterator[tuple[IPAddress, str]]:
        """The API server's addresses and the nodes' Internal/ExternalIPs, each with what it
        is (node addresses that do not parse are skipped)."""
        for ip in self._snapshot.api_server_addresses:
            yield ip, "API server address"
        for node in self._snapshot.nodes:
            for address in node.addresses:
                if address.type in ("InternalIP", "ExternalIP"):
                    try:
                        ip = ip_address(address.address)
                    except ValueError:
                        continue
                    yield ip, f"{address.type} of node {node.name}"

    @cached_property
    def _internal_base(self) -> dict[int, lpm.RangeTable[None]]:
        """Per family: the cluster-internal addresses that are not pod IPs."""
        spans: list[tuple[int, int, int]] = [
            (ip.version, int(ip), int(ip)) for ip, _ in self._host_addresses()
        ]
        for node in self._snapshot.nodes:
            for cidr in node.pod_cidrs:
                spans.append(
                    (cidr.version, int(cidr.network_address), int(cidr.broadcast_address))
                )
        return {
            version: lpm.RangeTable(
                version, lpm.flatten_spans((f, la, None) for v, f, la in spans if v == version)
            )
            for version in (4, 6)
        }

    @cached_property
    def _strays(self) -> Counter[IPAddress]:
        """Pod IPs outside every other cluster-internal range (a pod CIDR, usually), with the
        number of pods showing each: only these change `cluster_internal`."""
        strays: Counter[IPAddress] = Counter()
        for pod in self._pods.values():
            self._count_strays(strays, pod, 1)
        return strays

    def _count_strays(self, strays: Counter[IPAddress], pod: Pod, step: int) -> bool:
        """Count `pod`'s stray IPs up or down by `step`; whether the set of strays changed."""
        if pod.finished:  # its IP is free (see `_not_a_candidate`)
            return False
        changed = False
        for ip in pod.ips:
            if self._internal_base[ip.version].lookup(ip) is None:
                before = strays[ip]
                strays[ip] = before + step
                if strays[ip] == 0:
                    del strays[ip]
                changed |= before == 0 or strays[ip] == 0
        return changed

    @cached_property
    def _claim_notes(self) -> tuple[dict[IPAddress, str], dict[IPAddress, list[str]]]:
        """For explain: (IPs of pods policies never apply to, with why; IP -> the pods that
        showed it too but lost it)."""
        other_pods: dict[IPAddress, str] = {}
        lost_claims: dict[IPAddress, list[str]] = defaultdict(list)
        for pod in sorted(self._pods.values(), key=_claim_order):
            why_not = _not_a_candidate(pod)
            if why_not is not None:
                for ip in pod.ips:
                    other_pods.setdefault(ip, f"pod {_pod_name(pod)} {why_not}")
                    if pod.finished:
                        lost_claims[ip].append(f"pod {_pod_name(pod)} {why_not}")
                continue
            for ip in pod.ips:
                owner = self._claims[ip][0]  # it owns the IP (see `_place`)
                if owner is not pod:
                    lost_claims[ip].append(
                        f"pod {_pod_name(pod)} shows it too, but pod "
                        f"{_pod_name(owner)} comes first: it is left out"
                    )
        return other_pods, lost_claims

    # --- cluster-internal destinations ---

    @cached_property
    def _cluster_internal(self) -> dict[int, lpm.RangeTable[str]]:
        """Per family: cluster-internal addresses, each with what it is (for explain)."""
        described: dict[tuple[int, int, int], str] = {}  # (version, first, last) -> what

        def add(version: int, first: int, last: int, what: str) -> None:
            described.setdefault((version, first, last), what)

        for ip, what in self._host_addresses():
            add(ip.version, int(ip), int(ip), what)
        for pod in sorted(self._pods.values(), key=_claim_order):
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
        rules = self._snat.get(gateway)
        if rules is None:
            rules = self._snat[gateway] = {}
            for cls in self._classes.values():
                self._count_snat(gateway, rules, cls, cls.sources, 1)
        return GatewayPlan(
            gateway=gateway,
            rules=tuple(
                entry.rule(policy, role) for (policy, role, *_), entry in _sorted_rules(rules)
            ),
        )

    def _count_snat(
        self,
        gateway: str,
        rules: dict[_SnatKey, _SnatSources],
        cls: _SourceClass,
        sources: Mapping[int, Iterable[IPAddress]],
        step: int,
    ) -> None:
        """Add (`step` 1) or take away (-1) a class's `sources` (per family) in the rules of
        `gateway` (merged across classes: a rule per policy, role, egress IP and
        destinations). A class's sources are no other class's, so sets stay exact."""
        for group in cls.destinations:
            outcome = group.outcome
            if outcome.verdict is not Verdict.SNAT:
                continue
            ips = sources.get(group.version, ())
            if not ips:
                continue
            for role, server, egress_ip in (
                (Role.ACTIVE, outcome.gateway, outcome.egress_ip),
                (Role.STANDBY, outcome.standby, outcome.standby_egress_ip),
            ):
                if server != gateway or egress_ip is None:
                    continue
                key = (outcome.policy, role, address_order(egress_ip), _spans_key(group))
                entry = rules.get(key)
                if step > 0:
                    if entry is None:
                        entry = rules[key] = _SnatSources(group.networks, egress_ip)
                    entry.add(ips)
                elif entry is not None and not entry.remove(ips):
                    del rules[key]

    def node_plan(self, node: str) -> NodePlan:
        """Steering rules for the pods running on `node`, one family per rule."""
        rules: dict[_SteerKey, tuple[Outcome, _Destinations, set[IPAddress]]] = {}
        for cls in self._classes_on_node.get(node, {}).values():
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

    # --- explain ---

    def explain(self, src: IPAddress, dst: IPAddress) -> Explanation:
        """Decide a new connection from `src` to `dst` like the data plane would, with reasons.

        Raises ValueError when `src` and `dst` are of different address families.
        """
        if src.version != dst.version:
            raise ValueError(f"source {src} and destination {dst} are of different families")
        found = self._sources.get(src)
        if found is None:
            other = self._claim_notes[0].get(src)
            return Explanation(
                Verdict.NO_POLICY,
                reason=f"source {src} is not the IP of a pod egress policies apply to",
                details=(other or f"no pod in the snapshot has the IP {src}",),
            )
        pod, cls = found
        details = [f"source {src} is pod {_pod_name(pod)} on node {pod.node_name or '(none)'}"]
        details += self._claim_notes[1].get(src, ())
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


def _spans_key(group: _Destinations) -> _Spans:
    return (group.version, group.spans)


REBUILD_AFTER = 1000  # pod changes at once (or a quarter of the pods, if more)


def same_but_pods(a: Snapshot, b: Snapshot) -> bool:
    """Whether two snapshots differ in their pods at most: then a plan of one is kept current
    for the other with `EgressPlan.update_pods`."""
    return (
        a.policies == b.policies
        and a.namespaces == b.namespaces
        and a.nodes == b.nodes
        and a.gateways == b.gateways
        and a.api_server_addresses == b.api_server_addresses
        and a.cluster_name == b.cluster_name
    )


def updated_plan(
    plan: EgressPlan | None,
    snapshot: Snapshot,
    preferred_active: Mapping[tuple[str, int], str] | None,
    removed: Iterable[Pod],
    added: Iterable[Pod],
) -> tuple[EgressPlan, PodChanges | None]:
    """The plan of `snapshot`: `plan` kept current when `snapshot` differs from the snapshot
    `plan` stands for only in the pods `removed` (as `plan` has them) and `added`, under the
    same `preferred_active`; otherwise a new plan (changes None: every plan is new)."""
    removed, added = list(removed), list(added)
    if (
        plan is not None
        and plan.preferred_active == dict(preferred_active or {})
        and same_but_pods(plan.built_from, snapshot)
        # Beyond this (a re-list, a node drained), building whole is the cheaper way there.
        and len(removed) + len(added) <= max(REBUILD_AFTER, len(snapshot.pods) // 4)
    ):
        return plan, plan.update_pods(removed, added)
    return build_plan(snapshot, preferred_active), None


def build_plan(
    snapshot: Snapshot, preferred_active: Mapping[tuple[str, int], str] | None = None
) -> EgressPlan:
    """Resolve every policy of `snapshot` (valid ones only) into decisions and plans.

    `preferred_active` maps (policy name, gateway entry index) to the entry's current active
    gateway, which then stays active while it is usable and matches (stickiness); entries not
    named, and every entry without it, get the first usable matching gateway by name.
    """
    return EgressPlan(snapshot, preferred_active)
