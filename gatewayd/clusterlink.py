"""What both daemons share in Kubernetes mode: the API client, their own object's spec as the
source of their plan, and a reporter thread that joins, heartbeats, publishes status and records
Events (the settings are in `clustersettings`).

The daemons never wait for the API server: the data plane is restored from disk and kept in
force whatever the API does. Everything that talks to the API runs in the `Reporter` thread
with short timeouts, retries what failed, and logs an outage once (and its end), not every
attempt.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import urllib3
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from gatewayd.clustersettings import KubernetesSettings
from gatewayd.follower import InputError, PlanSource, PlanT
from gatewayd.kube.client import (
    client_from_kubeconfig,
    client_from_token_file,
    client_in_cluster,
)
from gatewayd.kube.events import EventRecorder
from gatewayd.kube.informer import Informer
from gatewayd.kube.mergepatch import MERGE_PATCH, merge_patch_to
from gatewayd.kube.resources import EGRESS_GROUP, EGRESS_VERSION, Resource

log = logging.getLogger("gatewayd")

# (connect, read) seconds for every request the reporter makes: an unreachable API server
# must not hold a heartbeat back for long.
REQUEST_TIMEOUT = (3.0, 5.0)
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
Status = dict[str, Any]
Timeout = tuple[float, float]


class OwnObjectSource(PlanSource[PlanT]):
    """A daemon's own object (its EgressGateway or EgressNode): its spec, through a list+watch
    of that one object, turned into a plan by `parse` (which raises InputError)."""

    def __init__(
        self, api: ApiClient, resource: Resource, name: str,
        parse: Callable[[Mapping[str, Any]], PlanT],
    ) -> None:
        self.informer = Informer(api, resource, self._changed,
                                 field_selector=f"metadata.name={name}")
        self.kind = resource.kind
        self.name = name
        self.parse = parse
        self.problems = []
        self._dirty = threading.Event()
        self._dirty.set()
        self._wake: Callable[[], None] = lambda: None
        # Until the reporter joined (created the object), a missing object is no news.
        self.joined: Callable[[], bool] = lambda: True

    def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.informer.start()

    def stop(self) -> None:
        self.informer.stop(timeout=2)

    def _changed(self) -> None:
        self._dirty.set()
        self._wake()

    def changed(self) -> bool:
        if not self.informer.synced or not self._dirty.is_set():
            return False
        if self.informer.get(self.name) is None and not self.joined():
            return False
        self._dirty.clear()
        return True

    def status(self) -> Mapping[str, Any]:
        """The object's status as last seen (empty before it is seen)."""
        status = (self.informer.get(self.name) or {}).get("status")
        return status if isinstance(status, Mapping) else {}

    def desired(self, previous: PlanT | None) -> PlanT:
        obj = self.informer.get(self.name)
        if obj is None:
            raise InputError(f"{self.kind.lower()}-missing",
                             f"{self.kind} {self.name} does not exist (yet); keeping the last "
                             "applied plan", object=f"{self.kind}/{self.name}")
        return self.parse(obj)


def api_client(settings: KubernetesSettings) -> ApiClient:
    """A client for the settings; raises KubeConfigError naming the file or setting."""
    if settings.kubeconfig is not None:
        return client_from_kubeconfig(settings.kubeconfig)
    if settings.server is not None and settings.token_file is not None \
            and settings.ca_file is not None:
        return client_from_token_file(settings.server, settings.token_file, settings.ca_file)
    return client_in_cluster()


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str = ""


def conditions(
    new: Sequence[Condition], previous: Sequence[Mapping[str, Any]], generation: int, now: str
) -> list[dict[str, Any]]:
    """Conditions as the API carries them; a condition whose status did not change keeps its
    lastTransitionTime."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    result = []
    for condition in new:
        status = "True" if condition.status else "False"
        old = before.get(condition.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        result.append({
            "type": condition.type,
            "status": status,
            "reason": condition.reason,
            "message": condition.message,
            "observedGeneration": generation,
            "lastTransitionTime": since or now,
        })
    return result


def status_patch(status: Status, *before: Mapping[str, Any] | None) -> Status:
    """The merge patch that writes `status`, also over each of `before` (what this daemon
    wrote last, what the object held when last seen): a field the new status no longer has
    (unknown now) is sent as null and removed, not left stale. Conditions of types the daemon
    does not write (the controller's `PeerAccepted` on an EgressNode) are kept as `before[-1]`
    holds them."""
    live = before[-1] if before else None
    ours = {c.get("type") for c in status.get("conditions") or () if isinstance(c, Mapping)}
    theirs = [
        c for c in (live or {}).get("conditions") or ()
        if isinstance(c, Mapping) and c.get("type") not in ours
    ]
    patch: Status = dict(status)
    if theirs and "conditions" in patch:
        patch["conditions"] = [*patch["conditions"], *theirs]
    for previous in before:
        patch = merge_patch_to(patch, previous)
    return patch


class CustomObject:
    """One cluster-scoped object of ours (an EgressGateway or an EgressNode)."""

    def __init__(self, api: ApiClient, plural: str, kind: str, name: str) -> None:
        self.api = api
        self.plural = plural
        self.kind = kind
        self.name = name
        self._objects = CustomObjectsApi(api)
        self.recorder: EventRecorder | None = None  # made by the first Event

    def get(self) -> dict[str, Any] | None:
        try:
            found = self._objects.get_cluster_custom_object(
                EGRESS_GROUP, EGRESS_VERSION, self.plural, self.name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == HTTPStatus.NOT_FOUND:
                return None
            raise
        return _object(found)

    def create(self, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create the object with an empty spec; None when it exists already."""
        body = {
            "apiVersion": f"{EGRESS_GROUP}/{EGRESS_VERSION}",
            "kind": self.kind,
            "metadata": {**metadata, "name": self.name},
            "spec": {},
        }
        try:
            created = self._objects.create_cluster_custom_object(
                EGRESS_GROUP, EGRESS_VERSION, self.plural, body, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == HTTPStatus.CONFLICT:
                return None
            raise
        return _object(created)

    def patch_labels(self, labels: Mapping[str, str]) -> None:
        self._objects.patch_cluster_custom_object(
            EGRESS_GROUP, EGRESS_VERSION, self.plural, self.name,
            {"metadata": {"labels": dict(labels)}},
            _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT,
        )

    def patch_status(self, status: Mapping[str, Any], timeout: Timeout = REQUEST_TIMEOUT) -> None:
        self._objects.patch_cluster_custom_object_status(
            EGRESS_GROUP, EGRESS_VERSION, self.plural, self.name, {"status": dict(status)},
            _content_type=MERGE_PATCH, _request_timeout=timeout,
        )

    def record_event(
        self, component: str, reason: str, message: str, warning: bool, uid: str | None = None
    ) -> None:
        """An Event about this object, in `default` (where Events about cluster-scoped objects
        go, as the controller's do), through the daemon's one recorder (repeats become a
        series); a write that fails stays pending in the recorder, which retries it."""
        if self.recorder is None:
            self.recorder = EventRecorder(self.api, component, self.name)
        regarding = {
            "apiVersion": f"{EGRESS_GROUP}/{EGRESS_VERSION}",
            "kind": self.kind,
            "metadata": {"name": self.name, "uid": uid},
        }
        self.recorder.record(regarding, "Warning" if warning else "Normal", reason, message)


@dataclass(frozen=True)
class PendingEvent:
    reason: str
    message: str
    warning: bool


class Reporter:
    """The thread that talks to the API for a daemon.

    `join()` runs first, until it succeeds (creating or adopting the daemon's object);
    `heartbeat()` (a Lease renewal, or None) every `heartbeat_seconds`; the status given to
    `publish()` is written whenever it differs from the last one written; Events are recorded
    in order. Failures are retried every `retry_seconds`.
    """

    MAX_PENDING_EVENTS = 100

    def __init__(
        self,
        what: str,
        join: Callable[[], None],
        write_status: Callable[[Status, Timeout], None],
        record_event: Callable[[PendingEvent], None] | None = None,
        heartbeat: Callable[[], None] | None = None,
        heartbeat_seconds: float = 2.0,
        retry_seconds: float = 1.0,
        recorder: Callable[[], EventRecorder | None] = lambda: None,
    ) -> None:
        """`recorder`: the Event recorder `record_event` uses, once it has one; the thread
        flushes its pending series."""
        self.what = what
        self._recorder = recorder
        self._join = join
        self._write_status = write_status
        self._record_event = record_event
        self._heartbeat = heartbeat
        self._heartbeat_seconds = heartbeat_seconds
        self._retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._status: Status | None = None
        self._written: Status | None = None
        self._events: list[PendingEvent] = []
        self.joined = threading.Event()
        self._failing: str | None = None  # the error of the ongoing outage, logged once
        self._thread = threading.Thread(target=self._run, name=f"reporter-{what}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def publish(self, status: Status) -> None:
        with self._lock:
            self._status = status
        self._wake.set()

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        if self._record_event is None:
            return
        with self._lock:
            if len(self._events) < self.MAX_PENDING_EVENTS:
                self._events.append(PendingEvent(reason, message, warning))
        self._wake.set()

    @property
    def failing(self) -> str | None:
        """The error of the ongoing outage (what failed and why), None while the API answers."""
        return self._failing

    @property
    def written(self) -> Status | None:
        """The status last written successfully."""
        with self._lock:
            return self._written

    def stop(self, final: Status | None = None, timeout: float = 2.0) -> bool:
        """Stop the thread; then write `final` (best effort, within `timeout` seconds).
        Returns whether `final` was written."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if final is None or not self.joined.is_set():
            return False
        try:
            self._write_status(final, (min(timeout, REQUEST_TIMEOUT[0]), timeout))
        except API_ERRORS as exc:
            log.warning("%s: could not write the final status: %s", self.what, _brief(exc))
            return False
        return True

    def _run(self) -> None:
        next_heartbeat = time.monotonic()
        while not self._stopping.is_set():
            failed = False
            if not self.joined.is_set():
                failed = not self._attempt("join", self._join)
                if not failed:
                    self.joined.set()
            if self.joined.is_set():
                if self._heartbeat is not None and time.monotonic() >= next_heartbeat:
                    # A failed renewal is retried at the next beat, not sooner: the Lease
                    # duration allows for it.
                    self._attempt("heartbeat", self._heartbeat)
                    next_heartbeat = time.monotonic() + self._heartbeat_seconds
                failed = not self._flush() or failed
            recorder = self._recorder()
            if recorder is not None:
                recorder.flush()
            events_pending = recorder is not None and recorder.pending
            wait = self._retry_seconds if failed or events_pending else 3600.0
            if self._heartbeat is not None:
                wait = min(wait, max(0.0, next_heartbeat - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()

    def _flush(self) -> bool:
        with self._lock:
            status = self._status
            changed = status is not None and status != self._written
        if changed and status is not None:
            if not self._attempt("status", lambda: self._write_status(status, REQUEST_TIMEOUT)):
                return False
            with self._lock:
                self._written = status
        while self._record_event is not None:
            with self._lock:
                if not self._events:
                    return True
                pending = self._events[0]
            if not self._attempt("event", functools.partial(self._record_event, pending)):
                return False
            with self._lock:
                self._events.pop(0)
        return True

    def _attempt(self, what: str, action: Callable[[], None]) -> bool:
        try:
            action()
        except API_ERRORS as exc:
            detail = f"{what}: {_brief(exc)}"
            if self._failing is None:
                log.warning("%s: the API server is unreachable or refuses (%s); the data plane "
                            "stays as it is, retrying", self.what, detail)
            self._failing = detail
            return False
        except Exception:
            log.exception("%s: %s failed", self.what, what)
            return False
        if self._failing is not None:
            log.info("%s: the API server answers again", self.what)
            self._failing = None
        return True


def _object(answer: object) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise TypeError(f"the API answered {type(answer).__name__}, not an object")
    return answer


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
