"""One Event recorder for every daemon: `events.k8s.io/v1` Events, repeats folded into a series.

As client-go's events recorder does, Events are grouped by what they say about what: the object
they regard, their type, reason and action, and who reports them. The first of a group creates
an Event; a repeat sets that Event's `series` (count and lastObservedTime) with a patch instead
of creating another object. Repeats are counted in memory and written at most once every
`series_interval` seconds per Event (by the next `record()` after that, or by `flush()`, which
the owner calls from its loop); a group not seen for `finish_after` seconds is forgotten, so its
next occurrence starts a new Event. A gateway that flaps a thousand times makes one Event with
`series.count` 1000, not a thousand objects.

Recording never raises and never blocks a daemon for long: a write the API refuses or does not
answer stays pending and is retried by the next `record()` or `flush()`; the count is kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes.client import ApiClient, EventsV1Api, EventsV1Event
from kubernetes.client.exceptions import ApiException

from gatewayd.kube.leases import micro_time
from gatewayd.kube.mergepatch import MERGE_PATCH

log = logging.getLogger(__name__)

EVENTS_NAMESPACE = "default"  # where Events about cluster-scoped objects go
NOTE_LIMIT = 1024  # bytes, the API server's limit on `note`
SERIES_INTERVAL = 30.0  # seconds between two writes of one Event's series
FINISH_AFTER = 360.0  # client-go's: a group quiet this long ends its series
REQUEST_TIMEOUT = (3.0, 5.0)
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)

# (regarding apiVersion, kind, namespace, name, uid), type, reason, action
_Key = tuple[tuple[str, str, str, str, str], str, str, str]


@dataclass
class _Series:
    body: dict[str, Any]  # the Event as first created
    count: int = 1
    last_observed: float = 0.0  # wall clock
    note: str = ""
    name: str | None = None  # once the API created it
    written: int = 0  # the count the API holds
    written_at: float = float("-inf")  # monotonic
    seen_at: float = 0.0  # monotonic
    failures: int = field(default=0, compare=False)

    @property
    def pending(self) -> bool:
        return self.name is None or self.written < self.count


class EventRecorder:
    """Records Events for one reporting component (thread-safe)."""

    def __init__(
        self,
        api: ApiClient,
        component: str,
        instance: str,
        *,
        namespace: str = EVENTS_NAMESPACE,
        series_interval: float = SERIES_INTERVAL,
        finish_after: float = FINISH_AFTER,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._events = EventsV1Api(api)
        self.component = component
        self.instance = instance
        self.namespace = namespace
        self.series_interval = series_interval
        self.finish_after = finish_after
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()  # one writer at a time: a series is never written twice
        self._series: dict[_Key, _Series] = {}
        self.writes = 0  # Events created and series written, for logs and tests

    def record(
        self,
        regarding: Mapping[str, Any],
        type_: str,
        reason: str,
        note: str,
        action: str | None = None,
    ) -> bool:
        """Record that `reason` (`note` says more) happened to `regarding` (the object as the
        API serves it: apiVersion, kind, metadata.name/namespace/uid); `type_` is "Normal" or
        "Warning"; `action` (what was done) defaults to `reason`. False when a write is left
        pending for later (the occurrence is counted either way)."""
        action = action or reason
        metadata = regarding.get("metadata")
        metadata = metadata if isinstance(metadata, Mapping) else {}
        reference = {
            "apiVersion": str(regarding.get("apiVersion") or ""),
            "kind": str(regarding.get("kind") or ""),
            "name": str(metadata.get("name") or ""),
            "namespace": str(metadata.get("namespace") or ""),
            "uid": str(metadata.get("uid") or ""),
        }
        key: _Key = (
            (reference["apiVersion"], reference["kind"], reference["namespace"],
             reference["name"], reference["uid"]),
            type_, reason, action,
        )
        note = _truncate(note)
        with self._lock:
            now, wall = self._monotonic(), self._wall()
            series = self._series.get(key)
            if series is None or now - series.seen_at >= self.finish_after:
                series = self._series[key] = _Series(
                    self._new_event(reference, type_, reason, action, note, wall),
                    last_observed=wall, note=note, seen_at=now,
                )
            else:
                series.count += 1
                series.last_observed, series.note, series.seen_at = wall, note, now
            return self._write_if_due(series, now)

    def flush(self) -> bool:
        """Write every pending series that is due; forget finished ones. False when a write
        is still pending."""
        with self._lock:
            now = self._monotonic()
            ok = True
            for key, series in list(self._series.items()):
                ok = self._write_if_due(series, now) and ok
                if not series.pending and now - series.seen_at >= self.finish_after:
                    del self._series[key]
            return ok

    @property
    def pending(self) -> bool:
        """Whether some occurrence is not written yet (a flush will be due)."""
        with self._lock:
            return any(s.pending for s in self._series.values())

    # --- the writes (under the lock) -------------------------------------------------------

    def _new_event(
        self, reference: dict[str, str], type_: str, reason: str, action: str, note: str,
        wall: float,
    ) -> dict[str, Any]:
        regarding = {k: v for k, v in reference.items() if v}
        return {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{reference['name'] or 'unnamed'}.",
                "namespace": reference["namespace"] or self.namespace,
            },
            "eventTime": micro_time(datetime.fromtimestamp(wall, UTC)),
            "reportingController": self.component,
            "reportingInstance": self.instance,
            "action": action,
            "reason": reason,
            "type": type_,
            "note": note,
            "regarding": regarding,
        }

    def _write_if_due(self, series: _Series, now: float) -> bool:
        if not series.pending:
            return True
        if series.name is not None and series.written > 1 and (
            now - series.written_at < self.series_interval
        ):
            return True  # a later record() or flush() writes it
        try:
            if series.name is None:
                self._create(series)
            else:
                self._patch_series(series)
        except API_ERRORS as error:
            series.failures += 1
            if series.failures == 1:
                log.warning("Event %s about %s %s not recorded yet (kept, retried): %s",
                            series.body["reason"], series.body["regarding"].get("kind"),
                            series.body["regarding"].get("name"), _brief(error))
            return False
        series.failures = 0
        series.written, series.written_at = series.count, now
        self.writes += 1
        body = series.body
        times = f" (seen {series.count} times)" if series.count > 1 else ""
        log.log(logging.WARNING if body["type"] == "Warning" else logging.INFO,
                "%s %s: %s: %s%s", body["regarding"].get("kind"), body["regarding"].get("name"),
                body["reason"], series.note, times)
        return True

    def _create(self, series: _Series) -> None:
        body = dict(series.body)
        if series.count > 1:  # repeats seen while the first write failed
            body["series"] = self._series_field(series)
            body["note"] = series.note
        event = EventsV1Event.from_dict(body)
        if event is None:
            raise ValueError(f"not an Event: {body}")
        # Not preloaded: the answer is read as JSON, for its generated name.
        answer: Any = self._events.create_namespaced_event(
            body["metadata"]["namespace"], event, _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        created = json.loads(answer.data)
        series.name = str(created["metadata"]["name"])

    def _patch_series(self, series: _Series) -> None:
        assert series.name is not None
        self._events.patch_namespaced_event(
            series.name, series.body["metadata"]["namespace"],
            {"series": self._series_field(series), "note": series.note},
            _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=REQUEST_TIMEOUT,
        )

    @staticmethod
    def _series_field(series: _Series) -> dict[str, Any]:
        observed = datetime.fromtimestamp(series.last_observed, UTC)
        return {"count": series.count, "lastObservedTime": micro_time(observed)}


def _truncate(note: str) -> str:
    data = note.encode()
    if len(data) <= NOTE_LIMIT:
        return note
    return data[: NOTE_LIMIT - 3].decode(errors="ignore") + "..."


def _brief(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"
