"""Writes the controller's decisions, only where they differ from what the cluster holds.

Specs are replaced and statuses written through the status subresource, each carrying the
resourceVersion it was computed from: if anyone wrote in between, the API answers 409 Conflict
and the write is tried again from fresh caches at the next reconcile. The informers see a write
only when its watch event arrives; until then the answer to the write stands in for the cached
object, so the next reconcile does not write the same thing again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import Enum
from http import HTTPStatus
from typing import Any

import urllib3
from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from gatewayd.kube.events import EventRecorder
from gatewayd.kube.resources import Resource

log = logging.getLogger(__name__)

Object = Mapping[str, Any]
REQUEST_TIMEOUT = (10.0, 30.0)  # connect, read (seconds)
MERGE_PATCH = "application/merge-patch+json"


class Outcome(Enum):
    UNCHANGED = "unchanged"
    WRITTEN = "written"
    CONFLICT = "conflict"  # someone wrote in between: try again from fresh caches
    GONE = "gone"  # the object was deleted meanwhile
    FAILED = "failed"  # the API refused the write: back off and retry
    UNREACHABLE = "unreachable"  # no answer: the other writes would fail too


def _metadata(obj: Object) -> Mapping[str, Any]:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, Mapping) else {}


class Writer:
    def __init__(self, api: ApiClient, component: str, instance: str) -> None:
        self._objects = CustomObjectsApi(api)
        self.events = EventRecorder(api, component, instance)
        # (plural, name) -> (resourceVersion written against, the API's answer)
        self._written: dict[tuple[str, str], tuple[str, Object]] = {}
        self.writes = 0  # successful writes of specs and statuses (Events: `events.writes`)

    def current(self, resource: Resource, obj: Object) -> Object:
        """`obj` as the cache holds it, or the controller's own newer write of it."""
        key = (resource.plural, str(_metadata(obj).get("name")))
        written = self._written.get(key)
        if written is None:
            return obj
        version = _metadata(obj).get("resourceVersion")
        if version == written[0]:
            return written[1]  # the cache has not seen the write yet
        del self._written[key]
        return obj

    def write_spec(self, resource: Resource, obj: Object, spec: Mapping[str, Any]) -> Outcome:
        """Replace the spec of `obj` (as cached) with `spec` unless it holds that already;
        after WRITTEN, `current()` gives the API's answer."""
        return self._replace(resource, obj, "spec", spec)

    def write_status(self, resource: Resource, obj: Object, status: Mapping[str, Any]) -> Outcome:
        return self._replace(resource, obj, "status", status)

    def merge_status(self, resource: Resource, obj: Object, fields: Mapping[str, Any]) -> Outcome:
        """Set `fields` in the status of `obj` (as cached) with a JSON merge patch of just those
        keys, unless it holds them already: the status's other keys, written by the object's
        own daemon, stay as they are, so the patch needs no resourceVersion."""
        current = self.current(resource, obj)
        status = current.get("status")
        status = status if isinstance(status, Mapping) else {}
        if all(status.get(key) == value for key, value in fields.items()):
            return Outcome.UNCHANGED
        name = str(_metadata(current).get("name"))
        what = f"{resource.kind} {name} status {', '.join(fields)}"
        try:
            answer = self._objects.patch_cluster_custom_object_status(
                resource.group, resource.version, resource.plural, name,
                {"status": dict(fields)},
                _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status == HTTPStatus.NOT_FOUND:
                log.info("%s: deleted meanwhile", what)
                return Outcome.GONE
            log.warning("%s: the API refused the write: %s %s", what, error.status, error.reason)
            return Outcome.FAILED
        except (urllib3.exceptions.HTTPError, OSError) as error:
            log.warning("%s: the API is unreachable: %s", what, error)
            return Outcome.UNREACHABLE
        if isinstance(answer, Mapping):
            self._written[(resource.plural, name)] = (
                str(_metadata(obj).get("resourceVersion")),
                answer,
            )
        self.writes += 1
        log.info("%s written", what)
        return Outcome.WRITTEN

    def _replace(
        self, resource: Resource, cached: Object, part: str, content: Mapping[str, Any]
    ) -> Outcome:
        obj = self.current(resource, cached)
        if obj.get(part) == content:
            return Outcome.UNCHANGED
        name = str(_metadata(obj).get("name"))
        what = f"{resource.kind} {name} {part}"
        body = {**obj, part: content}
        args = (resource.group, resource.version, resource.plural, name, body)
        try:
            if part == "status":
                answer = self._objects.replace_cluster_custom_object_status(
                    *args, _request_timeout=REQUEST_TIMEOUT
                )
            else:
                answer = self._objects.replace_cluster_custom_object(
                    *args, _request_timeout=REQUEST_TIMEOUT
                )
        except ApiException as error:
            if error.status == HTTPStatus.CONFLICT:
                log.info("%s: changed meanwhile (409 Conflict); retrying from fresh caches", what)
                return Outcome.CONFLICT
            if error.status == HTTPStatus.NOT_FOUND:
                log.info("%s: deleted meanwhile", what)
                return Outcome.GONE
            log.warning("%s: the API refused the write: %s %s", what, error.status, error.reason)
            return Outcome.FAILED
        except (urllib3.exceptions.HTTPError, OSError) as error:
            log.warning("%s: the API is unreachable: %s", what, error)
            return Outcome.UNREACHABLE
        if not isinstance(answer, Mapping):
            log.warning("%s: unexpected answer from the API: %r", what, type(answer))
            return Outcome.FAILED
        self._written[(resource.plural, name)] = (
            str(_metadata(cached).get("resourceVersion")),
            answer,
        )
        self.writes += 1
        log.info("%s written (generation %s)", what, _metadata(answer).get("generation"))
        return Outcome.WRITTEN

    def record_event(self, involved: Object, event_type: str, reason: str, message: str) -> bool:
        """An Event about `involved`, through the controller's one recorder (repeats become
        its series); False when the write is left pending (the recorder retries it)."""
        return self.events.record(involved, event_type, reason, message)
