"""`gatewayd controller`: informers, leader election and one rate-limited reconcile loop.

The loop follows Cilium's egress gateway manager: informer handlers only mark the state dirty;
one reconcile over the whole cache runs at most every `min_interval` (a burst of events is one
run), only after every cache has synced, and never crashes: a failed write is logged, the other
writes go on, and the run is retried with back-off. Every replica keeps its caches, the policies'
last valid versions and gateway health current; only the leader plans and writes.

A Lease renewal (every gateway renews one every few seconds) only costs a full reconcile when it
changes whether a gateway is usable; an unchanged cluster costs no engine run and no write.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from types import FrameType
from typing import Any

from kubernetes.client import ApiClient

from gatewayd import metrics
from gatewayd.clustersettings import DEFAULT_NAMESPACE
from gatewayd.controller.cached import pod_fields, without_managed_fields
from gatewayd.controller.leader import LEASE_DURATION, LeaderElector
from gatewayd.controller.metrics import controller_samples
from gatewayd.controller.reconcile import PEER_CONDITION, Decisions, Reconciler
from gatewayd.controller.skew import SKEW_FIELD
from gatewayd.controller.slicing import slice_object
from gatewayd.controller.snapshots import Cluster
from gatewayd.controller.tunnels import DEFAULT_TUNNEL_CIDR
from gatewayd.controller.writer import Outcome, Writer
from gatewayd.healthz import HealthServer
from gatewayd.kube.client import KubeConfigError, client_from_kubeconfig, client_in_cluster
from gatewayd.kube.informer import Backoff, Informer
from gatewayd.kube.leases import LeaseObserver
from gatewayd.kube.resources import (
    CILIUM_EGRESS_GATEWAY_POLICIES,
    EGRESS_GATEWAY_POLICIES,
    EGRESS_GATEWAYS,
    EGRESS_NODES,
    EGRESS_SOURCE_SLICES,
    ENDPOINT_SLICES,
    LEASES,
    NAMESPACES,
    NODES,
    PODS,
    Resource,
)
from gatewayd.runtime import rfc3339

log = logging.getLogger(__name__)

COMPONENT = "gatewayd-controller"
# The API server's EndpointSlice, by name: RBAC grants the controller that one object only
# (resourceNames), which a list or watch matches through its metadata.name field selector.
API_SERVER_SLICE = "metadata.name=kubernetes"
# /healthz fails when the loop has not come round for this long (it does every resync).
STALL_SECONDS = 120.0
API_BACKOFF = Backoff(initial=0.2, maximum=10.0)


@dataclass(frozen=True)
class ControllerOptions:
    namespace: str = DEFAULT_NAMESPACE  # of the Leases (the controller's and the gateways')
    identity: str = field(default_factory=socket.gethostname)  # the leader Lease's holder
    cilium_policies: bool = False  # follow cilium.io/v2 CiliumEgressGatewayPolicies too
    lease_duration: int = LEASE_DURATION  # of the leader Lease, seconds (client-go's default)
    renew_deadline: float | None = None  # None: client-go's proportion (10 s of 15 s)
    retry_period: float | None = None  # None: client-go's proportion (2 s of 15 s)
    hold_down: float = 30.0  # a recovered gateway's healthy time before it is used again
    tunnel_cidr: IPv4Network = DEFAULT_TUNNEL_CIDR
    min_interval: float = 0.1  # between two reconciles
    resync_interval: float = 30.0  # reconcile at least this often, changes or not
    backoff: Backoff = API_BACKOFF  # after API errors: watches and writes


class Controller:
    """The controller, run in threads: `start()`, then `stop()`."""

    def __init__(
        self,
        api: ApiClient,
        options: ControllerOptions,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock`: the wall clock (for timestamps written); `monotonic`: the clock gateway
        health and Lease freshness are judged on."""
        self.options = options
        self._clock = clock
        self._monotonic = monotonic
        # Writes and leader election get their own connection pool: they never queue behind
        # the watches' long-lived connections.
        writes = ApiClient(api.configuration)
        self._writer = Writer(writes, COMPONENT, options.identity)
        self._elector = LeaderElector(
            writes,
            options.namespace,
            options.identity,
            options.lease_duration,
            self.mark_dirty,
            renew_deadline=options.renew_deadline,
            retry_period=options.retry_period,
        )
        self._reconciler = Reconciler(
            options.hold_down, options.tunnel_cidr, LeaseObserver(monotonic, clock)
        )

        def informer(resource: Resource, **kwargs: Any) -> Informer:
            kwargs.setdefault("transform", without_managed_fields)
            return Informer(api, resource, self.mark_dirty, backoff=options.backoff, **kwargs)

        policies = [EGRESS_GATEWAY_POLICIES]
        if options.cilium_policies:
            policies.append(CILIUM_EGRESS_GATEWAY_POLICIES)
        self._policies = [informer(resource) for resource in policies]
        self._pods = informer(PODS, transform=pod_fields)
        self._namespaces = informer(NAMESPACES)
        self._nodes = informer(NODES)
        self._gateways = informer(EGRESS_GATEWAYS)
        self._egress_nodes = informer(EGRESS_NODES)
        self._source_slices = informer(EGRESS_SOURCE_SLICES)
        self._endpoint_slices = informer(
            ENDPOINT_SLICES, namespace="default", field_selector=API_SERVER_SLICE
        )
        self._leases = Informer(
            api,
            LEASES,
            self._leases_changed,
            namespace=options.namespace,
            backoff=options.backoff,
            transform=without_managed_fields,
        )
        self._informers = [
            *self._policies,
            self._pods,
            self._namespaces,
            self._nodes,
            self._gateways,
            self._egress_nodes,
            self._source_slices,
            self._endpoint_slices,
            self._leases,
        ]

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._full = True  # something besides Leases changed since the last reconcile
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._trusted_since: float | None = float("-inf")
        # Monotonic deadlines: a full reconcile (resync, retry), a look at gateway health.
        self._next_full = 0.0
        self._next_check = 0.0
        self._last_run = float("-inf")
        self._heartbeat = time.monotonic()
        self._failures = 0
        self._reconciles = 0
        self._was_leader = False
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)

    # --- for the owner ---------------------------------------------------------------------

    def start(self) -> None:
        for informer in self._informers:
            informer.start()
        self._elector.start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop reconciling, hand the leader Lease back, stop the informers."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        self._elector.stop(release=True)
        for informer in self._informers:
            informer.stop()

    def mark_dirty(self) -> None:
        with self._lock:
            self._full = True
        self._wake.set()

    @property
    def ready(self) -> bool:
        """Every cache has synced (the replica could lead)."""
        return self._synced.is_set()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and time.monotonic() - self._heartbeat < STALL_SECONDS

    @property
    def is_leader(self) -> bool:
        return self._elector.is_leader

    @property
    def reconciles(self) -> int:
        """How many full reconciles (plans) this replica has run."""
        return self._reconciles

    @property
    def writes(self) -> int:
        """How many specs, statuses and Events this replica has written."""
        return self._writer.writes + self._writer.events.writes

    # --- the loop ----------------------------------------------------------------------------

    def _leases_changed(self) -> None:
        # Seen here, in the watch's thread, so that when a renewal was seen (and the writer's
        # clock skew measured) does not wait for a reconcile that may be busy.
        cluster = Cluster(leases={o["metadata"]["name"]: o for o in self._leases.objects()})
        for gateway in self._gateways.objects():
            self._reconciler.observe_lease(cluster, _name(gateway))
        # Not `mark_dirty`: a renewal needs a full reconcile only if usability changes.
        self._wake.set()

    def _run(self) -> None:
        for informer in self._informers:
            while not informer.wait_for_sync(0.2):
                self._heartbeat = time.monotonic()
                if self._stopping.is_set():
                    return
        log.info("caches synced")
        self._synced.set()
        while not self._stopping.is_set():
            self._heartbeat = time.monotonic()
            self._wake.wait(max(0.0, min(self._next_full, self._next_check) - time.monotonic()))
            if self._stopping.is_set():
                return
            # A burst of events becomes one reconcile: wait out the rest of the interval.
            pause = self._last_run + self.options.min_interval - time.monotonic()
            if pause > 0 and self._stopping.wait(pause):
                return
            self._wake.clear()
            with self._lock:
                full, self._full = self._full, False
            self._last_run = time.monotonic()
            try:
                self._step(full or self._last_run >= self._next_full)
            except Exception:  # a bug: say it loudly, keep the controller alive, retry
                log.exception("reconcile failed")
                self._retry(failed=True)

    def _step(self, full: bool) -> None:
        now = self._monotonic()
        cluster = self._cluster()
        trusted_since = self._view_trusted_since(now)
        leader = self._elector.is_leader
        if leader != self._was_leader:
            self._was_leader = leader
            self._reconciler.forget_decisions()
            full = True
        if not leader:
            metrics.STATE.update(controller_samples(False, {}))
            self._reconciler.observe(cluster, now, trusted_since)
            self._next_full = time.monotonic() + self.options.resync_interval
            self._next_check = self._next_full
            return
        if (
            not full
            and not self._reconciler.usability_changed(cluster, now, trusted_since)
            and not self._reconciler.skew_changed(cluster)
        ):
            self._check_at(self._reconciler.health.next_change, now)
            return
        started = time.monotonic()
        decisions = self._reconciler.plan(cluster, now, trusted_since, rfc3339(self._clock()))
        planned = time.monotonic()
        writes_before = self.writes
        failed, conflicts = self._apply(cluster, decisions)
        self._reconciles += 1
        metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        metrics.OBJECTS_WRITTEN.inc(self.writes - writes_before)
        metrics.STATE.update(controller_samples(True, decisions.policy_statuses))
        if self._reconciles == 1:
            # The caches and the first plan are most of what this process will ever hold:
            # the cyclic garbage collector need not walk them again and again.
            gc.freeze()
        log.debug(
            "reconcile: plan %.3fs, writes %.3fs", planned - started, time.monotonic() - planned
        )
        self._check_at(decisions.wake_at, now)
        if failed or conflicts:
            self._retry(failed=failed > 0)
        else:
            self._failures = 0
            self._next_full = time.monotonic() + self.options.resync_interval

    def _check_at(self, wake_at: float | None, now: float) -> None:
        """Look at gateway health again at `wake_at` (monotonic, like `now`), if it comes
        before a resync."""
        delay = self.options.resync_interval if wake_at is None else max(0.0, wake_at - now)
        self._next_check = time.monotonic() + delay

    def _retry(self, failed: bool) -> None:
        """Reconcile again soon: after back-off when the API failed, shortly after a conflict
        (the watch brings the newer object)."""
        self._failures = self._failures + 1 if failed else 1
        self._next_full = time.monotonic() + self.options.backoff.delay(self._failures)

    def _view_trusted_since(self, now: float) -> float | None:
        """Since when the controller has seen the API without a break; None while it cannot
        (its Lease and EgressGateway watches fail, or the API does not answer at all)."""
        broken = not self._elector.api_reachable or any(
            i.last_error is not None for i in (self._leases, self._gateways)
        )
        if broken:
            if self._trusted_since is not None:
                log.warning("the view of the API is broken: gateway Leases are not trusted")
            self._trusted_since = None
        elif self._trusted_since is None:
            log.info("the view of the API is restored")
            self._trusted_since = now
        return self._trusted_since

    def _cluster(self) -> Cluster:
        writer = self._writer
        return Cluster(
            policies=[writer.current(i.resource, o) for i in self._policies for o in i.objects()],
            pods=self._pods.objects(),
            namespaces=self._namespaces.objects(),
            nodes=self._nodes.objects(),
            gateways=[writer.current(EGRESS_GATEWAYS, o) for o in self._gateways.objects()],
            egress_nodes=[writer.current(EGRESS_NODES, o) for o in self._egress_nodes.objects()],
            leases={o["metadata"]["name"]: o for o in self._leases.objects()},
            endpoint_slices=self._endpoint_slices.objects(),
            source_slices={_name(o): o for o in self._source_slices.objects()},
        )

    def _apply(self, cluster: Cluster, decisions: Decisions) -> tuple[int, int]:
        """Write what differs: the gateways' source slices, then their specs (make-before-break:
        nodes only ever name gateways already programmed), then nodes, statuses and Events, and
        last delete the slices no spec names any more; stop at the first write the API does not
        answer. (failed, conflicts)."""
        outcomes: list[Outcome] = []
        for name, wanted in decisions.source_slices.items():
            if not self._elector.is_leader:
                break
            outcome = self._writer.write_object(
                EGRESS_SOURCE_SLICES, cluster.source_slices.get(name), slice_object(wanted)
            )
            outcomes.append(outcome)
            if outcome in (Outcome.FAILED, Outcome.UNREACHABLE):
                metrics.API_ERRORS.labels(EGRESS_SOURCE_SLICES.plural, "write").inc()
            if outcome is Outcome.UNREACHABLE:
                return 1, 0
        writes: list[tuple[Resource, Any, str, Any]] = [
            *(
                (EGRESS_GATEWAYS, o, "spec", decisions.gateway_specs.get(_name(o)))
                for o in cluster.gateways
            ),
            *(
                (EGRESS_NODES, o, "spec", decisions.node_specs.get(_name(o)))
                for o in cluster.egress_nodes
            ),
            *(
                (EGRESS_NODES, o, PEER_CONDITION, decisions.node_conditions.get(_name(o)))
                for o in cluster.egress_nodes
                if _name(o) in decisions.node_conditions
            ),
            *(
                (EGRESS_GATEWAY_POLICIES, o, "status", decisions.policy_statuses.get(_name(o)))
                for o in cluster.policies
                if o.get("kind") == EGRESS_GATEWAY_POLICIES.kind
            ),
            *(
                (EGRESS_GATEWAYS, o, "skew", {SKEW_FIELD: decisions.gateway_skews[_name(o)]})
                for o in cluster.gateways
                if _name(o) in decisions.gateway_skews
            ),
        ]
        for resource, obj, part, content in writes:
            if not self._elector.is_leader or (content is None and part != PEER_CONDITION):
                continue
            if part == PEER_CONDITION:
                outcome = self._writer.write_condition(resource, obj, part, content)
            elif part == "spec":
                outcome = self._writer.write_spec(resource, obj, content)
                if outcome is Outcome.WRITTEN:
                    self._reconciler.record_written(self._writer.current(resource, obj))
            elif part == "skew":
                outcome = self._writer.merge_status(resource, obj, content)
            else:
                outcome = self._writer.write_status(resource, obj, content)
            outcomes.append(outcome)
            if outcome in (Outcome.FAILED, Outcome.UNREACHABLE):
                metrics.API_ERRORS.labels(resource.plural, "write").inc()
            if outcome is Outcome.UNREACHABLE:
                return 1, 0
        for event in decisions.events:
            if self._elector.is_leader:
                if event.reason == "GatewayFailover":
                    metrics.count_planned_failover(_name(event.involved), event.gateway or "")
                self._writer.record_event(event.involved, event.type, event.reason, event.message)
        if self._elector.is_leader:
            self._writer.events.flush()  # repeats counted since the last write of their series
        if all(o in (Outcome.UNCHANGED, Outcome.WRITTEN) for o in outcomes):
            # Only once every spec names its new slices: a gateway whose spec still named an
            # old one would wait for it.
            for name, obj in cluster.source_slices.items():
                if name not in decisions.source_slices and self._elector.is_leader:
                    outcomes.append(self._writer.delete(EGRESS_SOURCE_SLICES, obj))
            self._writer.forget_deleted(EGRESS_SOURCE_SLICES, cluster.source_slices)
        failed = sum(1 for o in outcomes if o is Outcome.FAILED)
        conflicts = sum(1 for o in outcomes if o is Outcome.CONFLICT)
        return failed, conflicts


def _name(obj: Any) -> str:
    return str(obj["metadata"]["name"])


def probe_server(controller: Controller, host: str, port: int) -> HealthServer:
    """/healthz, /readyz and /metrics of the controller, on one port."""
    return HealthServer(host, port, lambda: controller.healthy, lambda: controller.ready,
                        metrics.exposition)


def run_controller(kubeconfig: Path | None, options: ControllerOptions, health_port: int) -> int:
    """Run until SIGTERM or SIGINT; 2 when the API credentials cannot be used."""
    try:
        api = client_from_kubeconfig(kubeconfig) if kubeconfig else client_in_cluster()
    except KubeConfigError as error:
        log.error("%s", error)
        return 2
    controller = Controller(api, options)
    probes = probe_server(controller, "", health_port)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "controller %s starting: namespace %s, Cilium policies %s, hold-down %ss",
        options.identity,
        options.namespace,
        "followed" if options.cilium_policies else "ignored",
        options.hold_down,
    )
    probes.start()
    controller.start()
    stop.wait()
    log.info("stopping")
    controller.stop()
    probes.stop()
    return 0
