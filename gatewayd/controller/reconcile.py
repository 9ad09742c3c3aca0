"""The controller's decisions: everything it wants written, from the cached objects (no I/O).

`Reconciler.plan()` is the one reconcile function. It builds the engine's Snapshot from the
caches (`snapshots.py`), keeps the last valid version of invalid policies (`lastgood`), replaces
each gateway's readiness with the health verdict (`health.py`), asks the engine for the plan with
each policy's current active gateways as preferences (stickiness), and turns the plan into the
EgressGateway and EgressNode specs (`specs.py`, with make-before-break), the policies' status
(`status.py`) and Events. Running it again on the same caches gives the same result; the
controller writes only what differs from what it reads.

Stickiness, a deliberate difference from Cilium (which always takes the first matching node by
name): an entry's active gateway stays active while it is usable and matches; a gateway that
comes back after a failover becomes the standby. The current active gateway is the controller's
previous decision, or, after a restart or a leader change, the one the policy's status records
(`gateways[].role=active`). Cilium policies have no status, so for them it lasts as long as the
leader runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from gatewayd.api.sourceslices import SourceSlice
from gatewayd.controller.generations import GenerationLog, ObjectId
from gatewayd.controller.health import (
    GatewaySignals,
    Health,
    HealthTracker,
    lease_name,
    read_signals,
)
from gatewayd.controller.skew import skew_reports
from gatewayd.controller.slicing import Slicer, inline_rules, reads_slices
from gatewayd.controller.snapshots import Cluster, SnapshotCache, resource_version
from gatewayd.controller.specs import (
    PeerProblem,
    Rule,
    SpecForms,
    active_egress_ips,
    failed_over_everywhere,
    gateway_policies,
    hold_back_moves,
    node_gateways,
    peer_problems,
    peers,
    retained_rules,
    spec_rules,
    steered_pairs,
)
from gatewayd.controller.status import Status, active_gateways_of, policy_status
from gatewayd.controller.tunnels import allocate_tunnel_addresses
from gatewayd.controller.versions import skew_problem
from gatewayd.kube.leases import Freshness, LeaseObserver
from gatewayd.policy.engine import EgressPlan, PodChanges, same_but_pods, updated_plan
from gatewayd.policy.lastgood import PolicyMemory
from gatewayd.policy.model import FieldError, Policy, Snapshot
from gatewayd.policy.snapshot import LoadedSnapshot
from gatewayd.version import VERSION

log = logging.getLogger(__name__)

Object = Mapping[str, Any]
Spec = dict[str, Any]
POLICY_KIND = "EgressGatewayPolicy"


PEER_CONDITION = "PeerAccepted"
Condition = dict[str, Any]


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to record about an object of ours (a policy, a gateway, a node)."""

    involved: Object  # the object, as cached
    type: str  # Normal or Warning
    reason: str
    message: str
    gateway: str | None = None  # a GatewayFailover's gateway that was left (for metrics)


@dataclass(frozen=True)
class _Skews:
    values: dict[str, int]
    events: list[Event]


@dataclass
class Decisions:
    """What the controller wants the cluster to hold after one reconcile."""

    gateway_specs: dict[str, Spec] = field(default_factory=dict)  # by EgressGateway name
    # The EgressSourceSlices the gateway specs name, by name; the cluster's others go.
    source_slices: dict[str, SourceSlice] = field(default_factory=dict)
    node_specs: dict[str, Spec] = field(default_factory=dict)  # by EgressNode name
    # The controller's PeerAccepted condition per EgressNode (None: it has none).
    node_conditions: dict[str, Condition | None] = field(default_factory=dict)
    policy_statuses: dict[str, Status] = field(default_factory=dict)  # by policy name
    events: list[Event] = field(default_factory=list)
    wake_at: float | None = None  # when to decide again even if nothing changes
    # status.clockSkewSeconds to write, by EgressGateway name (see `skew.py`)
    gateway_skews: dict[str, int] = field(default_factory=dict)


def _name(obj: Object) -> str:
    return str(obj["metadata"]["name"])


def _object_id(obj: Object) -> ObjectId:
    return (_name(obj), str(obj["metadata"].get("uid", "")))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _generations(obj: Object) -> tuple[int, int | None]:
    """(metadata.generation, status.observedGeneration or None)."""
    status = obj.get("status")
    observed = _int(status.get("observedGeneration")) if isinstance(status, Mapping) else None
    return _int(obj["metadata"].get("generation")) or 0, observed


class Reconciler:
    """The controller's memory between reconciles, and the reconcile function itself."""

    def __init__(
        self, hold_down: float, tunnel_cidr: IPv4Network, leases: LeaseObserver | None = None,
        version: str = VERSION,
    ) -> None:
        """`leases`: when this process saw each gateway's Lease change; its monotonic clock
        is the clock of every `now` given to this reconciler. `version`: the controller's,
        which the daemons' are checked against."""
        self.tunnel_cidr = tunnel_cidr
        self.version = version
        self.health = HealthTracker(hold_down)
        self.leases = leases if leases is not None else LeaseObserver()
        self._snapshots = SnapshotCache()
        self._policy_memory = PolicyMemory()
        self._policies_seen: LoadedSnapshot | None = None
        self._policies: tuple[Policy, ...] = ()  # the versions in force
        self._problems: dict[tuple[str, str], list[FieldError]] = {}  # of the newest versions
        # (policy, entry) -> the active gateway decided last (None: none was usable).
        self._actives: dict[tuple[str, int], str | None] = {}
        self._gateway_specs: GenerationLog[str] = GenerationLog()  # policies with rules
        self._node_specs: GenerationLog[tuple[str, str]] = GenerationLog()  # (policy, gateway)
        self._rejected: set[tuple[str, str, int]] = set()  # (kind, name, generation) reported
        self._bad_peers: dict[str, PeerProblem] = {}  # EgressNode -> the problem reported
        # (kind, name) -> the daemon version last seen outside the skew rule (versions.py)
        self._skewed_versions: dict[tuple[str, str], str] = {}
        self._planned_usable: dict[str, bool] = {}  # gateway usability the last plan used
        # The last plan, kept current pod by pod while nothing else in the snapshot and no
        # preference changes, and its rules in spec form (rendered again only for the gateways
        # and nodes a change touched).
        self._plan: EgressPlan | None = None
        self._plan_preferences: set[tuple[tuple[tuple[str, int], str], ...]] = set()
        self._rules: dict[tuple[str, str], Any] = {}
        # The engine's rules each spec form in `_rules` came from, and those a pod change
        # made stale (their forms are forgotten once the new ones are made).
        self._rendered: dict[tuple[str, str], tuple[object, ...]] = {}
        self._stale: dict[tuple[str, str], tuple[object, ...]] = {}
        self._forms = SpecForms()
        self._slicer = Slicer()
        # Each node's rules after `hold_back_moves`, while its planned rules (the same list),
        # its object and the gateways' programmed policies and usability stay.
        self._held_for: tuple[Mapping[str, frozenset[str]], Mapping[str, bool]] = ({}, {})
        self._held: dict[str, tuple[list[Rule], str, list[Rule]]] = {}
        self._steered: dict[str, tuple[list[Rule], frozenset[tuple[str, str]]]] = {}

    # --- what every replica keeps current, leading or not ------------------------------------

    def observe(self, cluster: Cluster, now: float, trusted_since: float | None) -> None:
        """Follow what needs history: the last valid version of each policy, gateway health."""
        self._resolve_policies(self._snapshots.policies(cluster.policies))
        self.health.update(self._signals(cluster), now, trusted_since)

    def _signals(self, cluster: Cluster) -> dict[str, GatewaySignals]:
        self.leases.forget_all_but(lease_name(_name(g)) for g in cluster.gateways)
        return {
            _name(g): read_signals(g, self.observe_lease(cluster, _name(g)))
            for g in cluster.gateways
        }

    def observe_lease(self, cluster: Cluster, gateway: str) -> Freshness | None:
        """What the controller knows of a gateway's Lease (None: it has none)."""
        name = lease_name(gateway)
        lease = cluster.leases.get(name)
        return self.leases.observe(name, lease) if lease is not None else None

    def forget_decisions(self) -> None:
        """On a change of leader: another replica may have decided meanwhile, so the current
        active gateways are read from the policies' status again."""
        self._actives = {}

    def usability_changed(self, cluster: Cluster, now: float, trusted_since: float | None) -> bool:
        """After Lease changes alone: whether a gateway's usability differs from the last plan's
        (only then is a new plan needed)."""
        health = self.health.update(self._signals(cluster), now, trusted_since)
        return {name: h.usable for name, h in health.items()} != self._planned_usable

    def _resolve_policies(self, loaded: LoadedSnapshot) -> None:
        if loaded is self._policies_seen:
            return
        self._policies_seen = loaded
        resolved = self._policy_memory.resolve(loaded)
        # A kept Cilium policy must not come back beside an EgressGatewayPolicy of its name.
        ours = {p.name for p in resolved.snapshot.policies if p.kind == POLICY_KIND}
        self._policies = tuple(
            p for p in resolved.snapshot.policies if p.kind == POLICY_KIND or p.name not in ours
        )
        self._problems = {}
        for problem in loaded.problems:
            self._problems.setdefault((problem.kind, problem.name), []).append(problem.error)
        for kept in resolved.kept:
            log.warning("%s is invalid; its last valid version stays in force", kept)

    # --- the reconcile function --------------------------------------------------------------

    def plan(
        self, cluster: Cluster, now: float, trusted_since: float | None, now_text: str
    ) -> Decisions:
        """Everything the cluster should hold, from `cluster` at `now` (wall clock).

        `trusted_since`: since when the view of the API has been unbroken (None: broken now);
        `now_text`: `now` in RFC 3339, for conditions.
        """
        self._resolve_policies(self._snapshots.policies(cluster.policies))
        health = self.health.update(self._signals(cluster), now, trusted_since)
        usable = {name: verdict.usable for name, verdict in health.items()}
        self._planned_usable = usable
        parsed = self._snapshots.build(cluster)
        snapshot = replace(
            parsed,
            policies=self._policies,
            gateways=tuple(replace(g, ready=usable[g.name]) for g in parsed.gateways),
        )
        previous = self._previous_actives(cluster.policies)
        adopted = failed_over_everywhere(cluster.egress_nodes)
        plan = self._engine(snapshot, {k: adopted.get((k[0], v), v)
                                       for k, v in previous.items() if v is not None})

        self._log_generations(cluster)
        programmed = {_name(g): self._programmed(g) for g in cluster.gateways}
        tunnel = self._tunnel_addresses(cluster.egress_nodes)
        node_specs = self._node_specs_of(cluster, plan, tunnel, programmed, usable)
        skews = self._skews(cluster)
        bad_peers = peer_problems(cluster.egress_nodes)
        gateway_specs, source_slices = self._gateway_specs_of(
            cluster, plan, snapshot, tunnel, node_specs, bad_peers
        )
        return Decisions(
            gateway_specs=gateway_specs,
            source_slices=source_slices,
            node_specs=node_specs,
            node_conditions={
                _name(n): peer_condition(n, bad_peers.get(_name(n)), now_text)
                for n in cluster.egress_nodes
            },
            policy_statuses=self._statuses(cluster, plan, programmed, now_text),
            events=[
                *self._active_changes(cluster.policies, previous, plan, health, adopted),
                *self._rejections(cluster.policies),
                *skews.events,
                *self._peer_rejections(cluster.egress_nodes, bad_peers),
                *self._version_skews([*cluster.gateways, *cluster.egress_nodes]),
            ],
            wake_at=self.health.next_change,
            gateway_skews=skews.values,
        )

    def skew_changed(self, cluster: Cluster) -> bool:
        """After Lease changes alone: whether a gateway's clock skew is to be reported (only
        then is a reconcile needed for it)."""
        return bool(skew_reports(cluster.gateways, self._measured_skews(cluster)))

    def _measured_skews(self, cluster: Cluster) -> dict[str, float | None]:
        measured = {}
        for gateway in cluster.gateways:
            freshness = self.observe_lease(cluster, _name(gateway))
            measured[_name(gateway)] = freshness.skew if freshness is not None else None
        return measured

    def _skews(self, cluster: Cluster) -> _Skews:
        """The gateways' clock skew to report (see `skew.py`)."""
        reports = skew_reports(cluster.gateways, self._measured_skews(cluster))
        objects = {_name(g): g for g in cluster.gateways}
        for report in reports:
            if report.warning:
                log.warning("%s", report.message)
        return _Skews(
            values={r.gateway: r.seconds for r in reports},
            events=[
                Event(objects[r.gateway], "Warning", "ClockSkew", r.message)
                for r in reports
                if r.warning
            ],
        )

    def _engine(self, snapshot: Snapshot, preferred: Mapping[tuple[str, int], str]) -> EgressPlan:
        wanted = tuple(sorted(preferred.items()))
        if (
            self._plan is not None
            and wanted in self._plan_preferences
            and same_but_pods(self._plan.built_from, snapshot)
        ):
            # On the plan's own snapshot, these preferences give the plan it was built with.
            preferred = self._plan.preferred_active
        removed, added = self._snapshots.pod_changes
        plan, changes = updated_plan(self._plan, snapshot, preferred, removed, added)
        if changes is not None:
            self._pods_changed(changes)
            return plan
        # Preferring exactly the gateways a plan chose gives that plan again, and that is
        # what the next reconcile prefers: it needs no engine run of its own.
        chosen = tuple(
            sorted(
                ((name, entry.entry), entry.gateway)
                for name, result in plan.policy_results.items()
                for entry in result.entries
                if entry.gateway is not None
            )
        )
        self._plan = plan
        self._plan_preferences = {wanted, chosen}
        self._rules, self._rendered, self._stale = {}, {}, {}
        self._forms.next_plan()
        return plan

    def _pods_changed(self, changes: PodChanges) -> None:
        """Render again only the plans the pods changed."""
        keys = [("gateway", g) for g in changes.gateways]
        if changes.cluster_internal:
            keys += [key for key in self._rules if key[0] == "node"]
        else:
            keys += [("node", n) for n in changes.nodes]
        for key in keys:
            if key in self._rules:
                del self._rules[key]
                self._stale[key] = self._stale.get(key, ()) + self._rendered.pop(key)

    def _rendered_again(self, key: tuple[str, str], rules: tuple[object, ...]) -> None:
        self._rendered[key] = rules
        kept = set(rules)
        self._forms.forget(r for r in self._stale.pop(key, ()) if r not in kept)

    def _gateway_rules(self, plan: EgressPlan, gateway: str) -> list[Rule]:
        key = ("gateway", gateway)
        if key not in self._rules:
            planned = plan.gateway_plan(gateway)
            self._rules[key] = self._forms.gateway_rules(planned)
            self._rendered_again(key, planned.rules)
        rules: list[Rule] = self._rules[key]
        return rules

    def _node_rules(self, plan: EgressPlan, node: str) -> tuple[list[Rule], list[str]]:
        key = ("node", node)
        if key not in self._rules:
            planned = plan.node_plan(node)
            self._rules[key] = self._forms.node_rules(planned)
            self._rendered_again(key, planned.rules)
        rules: tuple[list[Rule], list[str]] = self._rules[key]
        return rules

    def record_written(self, obj: Object) -> None:
        """Remember what a spec the controller wrote holds (the API's answer to the write)."""
        generation, _ = _generations(obj)
        if obj.get("kind") == "EgressGateway":
            self._gateway_specs.record(_object_id(obj), generation, gateway_policies(obj))
        elif obj.get("kind") == "EgressNode":
            self._node_specs.record(_object_id(obj), generation, steered_pairs(spec_rules(obj)))

    # --- stickiness and Events ---------------------------------------------------------------

    def _previous_actives(self, policies: Sequence[Object]) -> dict[tuple[str, int], str | None]:
        """(policy, entry) -> current active gateway: the last decision, else the status; only
        for entries the policies in force have."""
        entries = {p.name: len(p.gateways) for p in self._policies}
        previous: dict[tuple[str, int], str | None] = {}
        for obj in policies:
            if obj.get("kind") == POLICY_KIND:
                for entry, gateway in active_gateways_of(obj).items():
                    previous[(_name(obj), entry)] = gateway
        previous.update(self._actives)
        return {k: v for k, v in previous.items() if k[1] < entries.get(k[0], 0)}

    def _active_changes(
        self,
        policies: Sequence[Object],
        previous: Mapping[tuple[str, int], str | None],
        plan: EgressPlan,
        health: Mapping[str, Health],
        adopted: Mapping[tuple[str, str], str],
    ) -> list[Event]:
        """Events for every entry whose active gateway changed; remembers the new ones.
        `adopted`: the nodes' failovers the plan took over."""
        objects = {_name(o): o for o in policies if o.get("kind") != POLICY_KIND}
        objects.update({_name(o): o for o in policies if o.get("kind") == POLICY_KIND})
        self._actives = {}
        events = []
        for name, result in plan.policy_results.items():
            for entry in result.entries:
                before = previous.get((name, entry.entry))
                self._actives[(name, entry.entry)] = entry.gateway
                if before != entry.gateway and name in objects:
                    followed = before is not None and adopted.get((name, before)) == entry.gateway
                    events.append(_change_event(objects[name], entry.entry, before,
                                                entry.gateway, health, followed))
        return events

    def _rejections(self, policies: Sequence[Object]) -> list[Event]:
        """One Warning per invalid policy version; none for one whose status already reports
        it (after a controller restart)."""
        in_force = {(p.kind, p.name) for p in self._policies}
        events = []
        rejected = set()
        for obj in policies:
            kind, name = str(obj.get("kind")), _name(obj)
            errors = self._problems.get((kind, name))
            if not errors:
                continue
            generation, observed = _generations(obj)
            rejected.add((kind, name, generation))
            status = obj.get("status")
            in_status = isinstance(status, Mapping) and isinstance(status.get("lastError"), Mapping)
            reported = (kind, name, generation) in self._rejected or (
                in_status and observed == generation
            )
            if not reported:
                verdict = (
                    "the last valid version stays in force"
                    if (kind, name) in in_force
                    else "the policy has no effect"
                )
                message = f"{'; '.join(str(e) for e in errors)}; {verdict}"
                events.append(Event(obj, "Warning", "PolicyRejected", message))
        self._rejected = rejected
        return events

    def _peer_rejections(
        self, egress_nodes: Sequence[Object], bad_peers: Mapping[str, PeerProblem]
    ) -> list[Event]:
        """One Warning per problem newly found with a node's tunnel end; none for one its
        PeerAccepted condition already reports (after a controller restart)."""
        events = []
        for node in egress_nodes:
            name = _name(node)
            problem = bad_peers.get(name)
            if problem is None or self._bad_peers.get(name) == problem:
                continue
            reported = _condition_of(node, PEER_CONDITION)
            if (reported.get("reason"), reported.get("message")) != (
                problem.reason,
                problem.message,
            ):
                message = f"{problem.message}; this node is left out of every gateway's peers"
                events.append(Event(node, "Warning", "PeerRejected", message))
        self._bad_peers = dict(bad_peers)
        return events

    def _version_skews(self, daemons: Sequence[Object]) -> list[Event]:
        """One Warning per EgressGateway or EgressNode whose daemon's `status.version` is newly
        outside the version-skew rule (`versions.py`); none while it stays the same."""
        events = []
        skewed = {}
        for obj in daemons:
            status = obj.get("status")
            version = status.get("version") if isinstance(status, Mapping) else None
            if not isinstance(version, str):
                continue  # a daemon from before versions were reported, or not started yet
            problem = skew_problem(self.version, version)
            if problem is None:
                continue
            key = (str(obj.get("kind")), _name(obj))
            skewed[key] = version
            if self._skewed_versions.get(key) != version:
                message = f"{key[0]} {key[1]}: {problem}"
                log.warning("%s", message)
                events.append(Event(obj, "Warning", "VersionSkew", message))
        self._skewed_versions = skewed
        return events

    # --- make-before-break bookkeeping -------------------------------------------------------

    def _log_generations(self, cluster: Cluster) -> None:
        for gateway in cluster.gateways:
            generation, _ = _generations(gateway)
            if not self._gateway_specs.knows(_object_id(gateway), generation):
                policies = gateway_policies(gateway)
                self._gateway_specs.record(_object_id(gateway), generation, policies)
        for node in cluster.egress_nodes:
            generation, _ = _generations(node)
            if not self._node_specs.knows(_object_id(node), generation):
                pairs = steered_pairs(spec_rules(node))
                self._node_specs.record(_object_id(node), generation, pairs)
        self._gateway_specs.keep_only(_object_id(g) for g in cluster.gateways)
        self._node_specs.keep_only(_object_id(n) for n in cluster.egress_nodes)

    def _programmed(self, gateway: Object) -> frozenset[str]:
        """Policies whose rules the gateway surely has in its data plane."""
        _, observed = _generations(gateway)
        return self._gateway_specs.surely_applied(_object_id(gateway), observed)

    # --- specs -------------------------------------------------------------------------------

    def _tunnel_addresses(self, egress_nodes: Sequence[Object]) -> dict[str, IPv4Address]:
        current = {}
        for node in egress_nodes:
            spec = node.get("spec")
            address = spec.get("tunnelAddress") if isinstance(spec, Mapping) else None
            current[_name(node)] = address if isinstance(address, str) else None
        assigned, left_out = allocate_tunnel_addresses(current, self.tunnel_cidr)
        for name in left_out:
            log.error("no tunnel address left in %s for node %s", self.tunnel_cidr, name)
        return assigned

    def _node_specs_of(
        self,
        cluster: Cluster,
        plan: EgressPlan,
        tunnel: Mapping[str, IPv4Address],
        programmed: Mapping[str, frozenset[str]],
        usable: Mapping[str, bool],
    ) -> dict[str, Spec]:
        gateways = node_gateways(cluster.gateways)
        if programmed != self._held_for[0] or usable != self._held_for[1]:
            self._held_for = (programmed, usable)
            self._held = {}
        specs = {}
        for node in cluster.egress_nodes:
            name = _name(node)
            rules, cluster_internal = self._node_rules(plan, name)
            held = self._held.get(name)
            version = resource_version(node)
            if held is None or held[0] is not rules or held[1] != version:
                kept = hold_back_moves(
                    rules, spec_rules(node), lambda g: programmed.get(g, frozenset()), usable
                )
                held = self._held[name] = (rules, version, kept)
            spec: Spec = {
                "gateways": gateways,
                "clusterInternal": cluster_internal,
                "rules": held[2],
            }
            if name in tunnel:
                spec["tunnelAddress"] = str(tunnel[name])
            specs[name] = spec
        if len(self._held) > len(specs):  # nodes left
            self._held = {name: self._held[name] for name in specs if name in self._held}
        return specs

    def _gateway_specs_of(
        self,
        cluster: Cluster,
        plan: EgressPlan,
        snapshot: Snapshot,
        tunnel: Mapping[str, IPv4Address],
        node_specs: Mapping[str, Spec],
        bad_peers: Mapping[str, PeerProblem],
    ) -> tuple[dict[str, Spec], dict[str, SourceSlice]]:
        """The gateways' specs, and the EgressSourceSlices they name."""
        # (policy, gateway) pairs nodes may send traffic along, now or once their new plans
        # are written; None when some node's is unknown, so anything may be in use.
        pairs: set[tuple[str, str]] = set()
        known = self._steered
        self._steered = {}
        for name, spec in node_specs.items():
            rules = spec["rules"]
            found = known.get(name)
            if found is None or found[0] is not rules:
                found = (rules, frozenset(steered_pairs(rules)))
            self._steered[name] = found
            pairs |= found[1]
        steered: set[tuple[str, str]] | None = pairs
        for node in cluster.egress_nodes:
            _, observed = _generations(node)
            in_use = self._node_specs.maybe_in_use(_object_id(node), observed)
            if in_use is None:
                steered = None
                break
            pairs |= in_use

        def may_send(policy: str, gateway: str) -> bool:
            return steered is None or (policy, gateway) in steered

        pod_cidrs = {n.name: [str(c) for c in n.pod_cidrs] for n in snapshot.nodes}
        planned: dict[str, list[Rule]] = {
            _name(g): self._gateway_rules(plan, _name(g)) for g in cluster.gateways
        }
        elsewhere = active_egress_ips(planned)
        gateway_peers = peers(cluster.egress_nodes, pod_cidrs, tunnel, planned, bad_peers.keys())
        specs = {}
        slices: dict[str, SourceSlice] = {}
        self._slicer.next_round()
        for gateway in cluster.gateways:
            name = _name(gateway)
            current = spec_rules(gateway)
            rules = retained_rules(name, planned[name], current, may_send, elsewhere[name])
            if reads_slices(gateway):
                rules, made = self._slicer.spec_rules(
                    name, rules, current, cluster.source_slices
                )
                slices.update((s.name, s) for s in made)
            else:
                rules = inline_rules(rules, cluster.source_slices)
            specs[name] = {"peers": gateway_peers[name], "rules": rules}
        return specs, slices

    # --- policy status -----------------------------------------------------------------------

    def _statuses(
        self,
        cluster: Cluster,
        plan: EgressPlan,
        programmed: Mapping[str, frozenset[str]],
        now_text: str,
    ) -> dict[str, Status]:
        in_force = {p.name: p for p in self._policies if p.kind == POLICY_KIND}
        statuses = {}
        for obj in cluster.policies:
            if obj.get("kind") != POLICY_KIND:
                continue  # Cilium's policies have no status
            name = _name(obj)
            result = plan.policy_results.get(name)
            not_programmed = {}
            for entry in result.entries if result is not None else ():
                gateway = entry.gateway
                if gateway is not None and name not in programmed.get(gateway, frozenset()):
                    # No generation numbers: they change with every plan and would rewrite
                    # the status each time.
                    not_programmed[gateway] = (
                        f"gateway {gateway} has not yet reported a plan with this policy's rules "
                        "as applied"
                    )
            statuses[name] = policy_status(
                obj,
                in_force.get(name),
                result,
                self._problems.get((POLICY_KIND, name), []),
                not_programmed,
                now_text,
            )
        return statuses


def _condition_of(obj: Object, kind: str) -> Mapping[str, Any]:
    status = obj.get("status")
    listed = status.get("conditions") if isinstance(status, Mapping) else None
    for condition in listed if isinstance(listed, list) else ():
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return {}


def peer_condition(node: Object, problem: PeerProblem | None, now_text: str) -> Condition | None:
    """The EgressNode's PeerAccepted condition: False with the reason when its tunnel end is
    left out of the gateways' peers, True when it is in them, none before it published a key;
    the transition time stays while the status does."""
    status = node.get("status")
    key = status.get("publicKey") if isinstance(status, Mapping) else None
    if not key:
        return None
    if problem is None:
        verdict = ("True", "Accepted", "the gateways have this node as a WireGuard peer")
    else:
        verdict = ("False", problem.reason, problem.message)
    before = _condition_of(node, PEER_CONDITION)
    since = before.get("lastTransitionTime") if before.get("status") == verdict[0] else None
    return {
        "type": PEER_CONDITION,
        "status": verdict[0],
        "reason": verdict[1],
        "message": verdict[2],
        "lastTransitionTime": since or now_text,
    }


def _change_event(
    policy: Object,
    entry: int,
    before: str | None,
    after: str | None,
    health: Mapping[str, Health],
    followed_nodes: bool = False,
) -> Event:
    """Why an entry's active gateway changed from `before` to `after` (`followed_nodes`: every
    node had failed it over already)."""
    if followed_nodes:
        message = (f"entry {entry}: every node failed over from {before} to {after} (no answer "
                   f"to their probes through {before}'s tunnel); {after} is active")
        return Event(policy, "Warning", "GatewayFailover", message, gateway=before)
    if before is not None and not (before in health and health[before].usable):
        why = health[before].reason if before in health else "its EgressGateway is gone"
        then = (
            f"{after} takes over"
            if after is not None
            else "no other usable gateway matches, so its traffic is dropped"
        )
        message = f"entry {entry}: gateway {before} is unusable ({why}); {then}"
        return Event(policy, "Warning", "GatewayFailover", message, gateway=before)
    if after is None:
        message = f"entry {entry}: no usable gateway matches any more ({before} no longer does)"
        return Event(policy, "Warning", "GatewayFailover", message, gateway=before)
    was = f" (was {before})" if before is not None else ""
    return Event(policy, "Normal", "GatewayPromoted", f"entry {entry}: {after} is active{was}")
