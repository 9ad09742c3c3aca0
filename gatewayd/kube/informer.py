"""List+watch caches, one per resource type, that only mark their owner dirty.

An `Informer` lists its resource type once, then watches from the list's resourceVersion with
bookmarks, so a quiet type does not fall out of the server's history. When a watch stream
ends it watches again from the last version it saw: a reconnect replays only what changed.
A 410 Gone (that version is no longer in the server's history) makes it list again. Any other
error (server unreachable, 5xx, a cut stream) is retried with exponential back-off and jitter,
and the cache keeps serving what it last saw in the meantime. An outage is logged once, as a
warning when the first attempt fails and as a notice when the type is served again (the
retries in between at debug level): a daemon runs a few informers, and an API server outage
must not fill the journal with a warning per retry of each.

A connection can also die without a word (a NAT or firewall between an on-prem gateway and the
API server forgets it): no reset ever arrives. The API server sends a bookmark about once a
minute on every watch that allows them, so a watch that has been silent for `read_timeout`
seconds (90 by default) is dead: the informer drops it and watches again from the last
resourceVersion it saw (no list). TCP keepalive on the client's sockets (`kube/client.py`)
finds a dead connection on its own too, including one that is not watching.

The list is read in pages of `page_size` objects (`limit` and `continue`), from storage
(resourceVersion unset), so that neither the API server nor this process holds the whole list
as one response: a real server that serves a list from its watch cache (resourceVersion=0)
ignores `limit` and returns everything at once, tens of megabytes of JSON for 10,000 pods. A
continue token that expired (410 while paging) starts the list again.

Callers read the cache with `objects()`/`get()` and learn about changes from `on_change()`,
which carries no event: it should only mark the owner's state dirty (the controller reconciles
from the whole cache, rate-limited), never do the work itself. Objects are kept as the API
serves them, JSON objects with `kind` and `apiVersion` filled in, passed through the owner's
`transform` (if any) when they arrive, which keeps only what the owner reads; they must not be
mutated.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import urllib3
from kubernetes.client import (
    ApiClient,
    CoordinationV1Api,
    CoreV1Api,
    CustomObjectsApi,
    DiscoveryV1Api,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch

from gatewayd import metrics
from gatewayd.kube.resources import (
    ENDPOINT_SLICES,
    EVENTS,
    LEASES,
    NAMESPACES,
    NODES,
    PODS,
    Resource,
)

log = logging.getLogger(__name__)

# A typed client's list method (watch=True turns it into a watch), its path arguments bound.
ListFunction = Callable[..., object]
ObjectKey = tuple[str, str]  # (namespace, or "" for cluster-scoped objects; name)
# What the owner keeps of an object, given the object as the API serves it.
Transform = Callable[[dict[str, Any]], dict[str, Any]]

CONNECT_TIMEOUT_SECONDS = 10.0
# Objects per page of a list (client-go's pager uses 500 too).
PAGE_SIZE = 500
# How long a watch may stay silent before it counts as dead: a real API server sends a bookmark
# about every minute (allowWatchBookmarks=true), so 90 s of silence is not a quiet resource.
WATCH_READ_TIMEOUT_SECONDS = 90.0


@dataclass(frozen=True)
class Backoff:
    """Delays between retries after errors: exponential from `initial` to `maximum`, jittered
    down by up to half so that many clients do not retry in lockstep after an outage."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, failures: int) -> float:
        """The delay before the next attempt after `failures` consecutive failures (>= 1)."""
        ceiling = min(self.maximum, self.initial * self.factor ** (failures - 1))
        return ceiling * random.uniform(0.5, 1.0)


def list_function(api: ApiClient, resource: Resource, namespace: str | None = None) -> ListFunction:
    """The typed client's list method for `resource`, in `namespace` or across all of them."""
    if namespace is not None and not resource.namespaced:
        raise ValueError(f"{resource.name} are cluster-scoped: no namespace {namespace!r}")
    if resource in (PODS, EVENTS, NAMESPACES, NODES, LEASES, ENDPOINT_SLICES):
        core, coordination, discovery = CoreV1Api(api), CoordinationV1Api(api), DiscoveryV1Api(api)
        methods: dict[Resource, tuple[ListFunction, ListFunction]] = {
            PODS: (core.list_namespaced_pod, core.list_pod_for_all_namespaces),
            EVENTS: (core.list_namespaced_event, core.list_event_for_all_namespaces),
            NAMESPACES: (core.list_namespace, core.list_namespace),
            NODES: (core.list_node, core.list_node),
            LEASES: (
                coordination.list_namespaced_lease,
                coordination.list_lease_for_all_namespaces,
            ),
            ENDPOINT_SLICES: (
                discovery.list_namespaced_endpoint_slice,
                discovery.list_endpoint_slice_for_all_namespaces,
            ),
        }
        in_namespace, everywhere = methods[resource]
        if resource.namespaced and namespace is not None:
            return functools.partial(in_namespace, namespace)
        return everywhere
    if resource.group == "":
        raise ValueError(f"no list method known for core resource {resource.name!r}")
    objects = CustomObjectsApi(api)
    if not resource.namespaced:
        return functools.partial(
            objects.list_cluster_custom_object, resource.group, resource.version, resource.plural
        )
    if namespace is not None:
        return functools.partial(
            objects.list_namespaced_custom_object,
            resource.group,
            resource.version,
            namespace,
            resource.plural,
        )
    return functools.partial(
        objects.list_custom_object_for_all_namespaces,
        resource.group,
        resource.version,
        resource.plural,
    )


class Informer:
    """A list+watch cache of one resource type, kept current by a background thread."""

    def __init__(
        self,
        api: ApiClient,
        resource: Resource,
        on_change: Callable[[], None],
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout_seconds: int = 300,
        read_timeout: float = WATCH_READ_TIMEOUT_SECONDS,
        backoff: Backoff = Backoff(),
        transform: Transform | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.resource = resource
        self._list = list_function(api, resource, namespace)
        self._on_change = on_change
        self._selectors = {
            key: value
            for key, value in (
                ("label_selector", label_selector),
                ("field_selector", field_selector),
            )
            if value is not None
        }
        self._watch_timeout_seconds = watch_timeout_seconds
        self._read_timeout = read_timeout
        self._transform = transform
        self._page_size = page_size
        self._backoff = backoff
        self._lock = threading.Lock()
        self._cache: dict[ObjectKey, dict[str, Any]] = {}
        self._resource_version: str | None = None
        self._last_error: str | None = None
        self._failed_attempts = 0  # of the outage under way (for its end's log line)
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._watch = Watch(return_type=object)  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(
            target=self._run, name=f"informer-{resource.name}", daemon=True
        )

    # --- for the owner -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; the cache keeps its last contents."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Repeated: a stream opened just after one stop() call is cut by the next.
            self._watch.stop()  # type: ignore[no-untyped-call]
            self._thread.join(0.1)

    def wait_for_sync(self, timeout: float) -> bool:
        """Wait for the first complete list; False if it did not come within `timeout`."""
        return self._synced.wait(timeout)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def resource_version(self) -> str | None:
        """The last resourceVersion seen (from the list, an event or a bookmark)."""
        with self._lock:
            return self._resource_version

    @property
    def last_error(self) -> str | None:
        """Why the last list or watch failed; None once one succeeds again."""
        with self._lock:
            return self._last_error

    def objects(self) -> list[Mapping[str, Any]]:
        """Every cached object, sorted by namespace and name."""
        with self._lock:
            return [self._cache[key] for key in sorted(self._cache)]

    def get(self, name: str, namespace: str | None = None) -> Mapping[str, Any] | None:
        with self._lock:
            return self._cache.get((namespace or "", name))

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                if self.resource_version is None:
                    self._relist()
                self._watch_once()
                failures = 0
                self._restarted("ended")
            except ApiException as error:
                if error.status == HTTPStatus.GONE:
                    log.info(
                        "%s: watch history expired (410 Gone), listing again", self.resource.name
                    )
                    with self._lock:
                        self._resource_version = None
                    self._restarted("expired")
                    continue
                failures += 1
                self._pause(failures, f"API error {error.status} {error.reason}")
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
                failures += 1
                self._pause(failures, f"{type(error).__name__}: {error}")
            except Exception as error:  # a bug: keep the daemon alive, say it loudly, retry
                log.exception("%s: unexpected error in list+watch", self.resource.name)
                failures += 1
                self._pause(failures, f"{type(error).__name__}: {error}")

    def _restarted(self, reason: str) -> None:
        if not self._stopping.is_set():
            metrics.WATCH_RESTARTS.labels(self.resource.plural, reason).inc()

    def _pause(self, failures: int, reason: str) -> None:
        with self._lock:
            self._last_error = reason
            self._failed_attempts += 1
        if self._stopping.is_set():
            return
        metrics.API_ERRORS.labels(self.resource.plural, "list-watch").inc()
        self._restarted("error")
        delay = self._backoff.delay(failures)
        log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                "%s: %s; retrying in %.1fs", self.resource.name, reason, delay)
        self._stopping.wait(delay)

    def _served_again(self) -> None:
        """The lock held: an answer came; end the outage under way, if any."""
        self._last_error = None
        if self._failed_attempts:
            log.info("%s: served again after %d failed attempts", self.resource.name,
                     self._failed_attempts)
            self._failed_attempts = 0

    def _relist(self) -> None:
        cache: dict[ObjectKey, dict[str, Any]] = {}
        token: str | None = None
        while True:
            try:
                listed = self._list_page(token)
            except ApiException as error:
                if error.status != HTTPStatus.GONE or token is None:
                    raise
                log.info("%s: the list's continue token expired; listing again", self.resource.name)
                cache, token = {}, None
                continue
            for item in listed.get("items") or []:
                obj = self._arrived(item)
                cache[_key(obj)] = obj
            token = listed["metadata"].get("continue") or None
            if token is None:
                break
        with self._lock:
            changed = cache != self._cache or not self._synced.is_set()
            self._cache = cache
            self._resource_version = listed["metadata"]["resourceVersion"]
            self._served_again()
        self._synced.set()
        if changed:
            self._on_change()

    def _list_page(self, token: str | None) -> dict[str, Any]:
        """One page of the list: the first (token None) or the one `token` continues with."""
        paging: dict[str, Any] = {"limit": self._page_size}
        if token is not None:
            paging["_continue"] = token
        response = self._list(
            _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS * 6),
            **paging,
            **self._selectors,
        )
        if not isinstance(response, urllib3.BaseHTTPResponse):
            raise TypeError(f"list returned {type(response).__name__}, not an HTTP response")
        try:
            listed: dict[str, Any] = json.loads(response.data)
        finally:
            response.release_conn()
        return listed

    def _arrived(self, obj: dict[str, Any]) -> dict[str, Any]:
        """`obj` as the cache keeps it."""
        # Built-in types' lists leave kind and apiVersion out of their items.
        obj.setdefault("kind", self.resource.kind)
        obj.setdefault("apiVersion", self.resource.api_version)
        return obj if self._transform is None else self._transform(obj)

    def _watch_once(self) -> None:
        """Follow one watch stream until it ends; raises what ends it otherwise."""
        stream = self._watch.stream(  # type: ignore[no-untyped-call]
            self._list,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout_seconds,
            _request_timeout=(CONNECT_TIMEOUT_SECONDS, self._read_timeout),
            **self._selectors,
        )
        try:
            self._follow(stream)
        except urllib3.exceptions.ReadTimeoutError:
            log.warning(
                "%s: the watch was silent for %.0fs (no event, no bookmark): the connection is "
                "dead; watching again from resourceVersion %s",
                self.resource.name,
                self._read_timeout,
                self.resource_version,
            )

    def _follow(self, stream: Iterable[Mapping[str, Any]]) -> None:
        for event in stream:
            if self._stopping.is_set():
                return
            obj: dict[str, Any] = event["raw_object"]
            if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                obj = self._arrived(obj)
            changed = False
            with self._lock:
                self._served_again()
                if event["type"] in ("ADDED", "MODIFIED"):
                    changed = self._cache.get(_key(obj)) != obj
                    self._cache[_key(obj)] = obj
                elif event["type"] == "DELETED":
                    changed = self._cache.pop(_key(obj), None) is not None
                self._resource_version = obj["metadata"]["resourceVersion"]
            if changed:
                self._on_change()


def _key(obj: Mapping[str, Any]) -> ObjectKey:
    metadata = obj["metadata"]
    return metadata.get("namespace", ""), metadata["name"]
