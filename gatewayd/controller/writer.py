"""Writes the controller's decisions, only where they differ from what the cluster holds.

Specs and the policies' statuses are written as JSON merge patches (RFC 7386) of that one part,
with no resourceVersion: the agents and steer write the status of the same objects every time
their state changes, and a whole-object replace would answer 409 to every spec write made
between the controller's read and its write. The controller is the only writer of specs and of
policy statuses, so a patch cannot undo anyone's work; a field the controller no longer wants
is sent as null, which removes it. Conditions the controller keeps on another writer's status
(an EgressNode's `PeerAccepted`) carry the resourceVersion they were computed from, so a list
rewritten meanwhile answers 409 and is tried again from fresh caches.

The informers see a write only when its watch event arrives; until then the answer to the
write stands in for the cached object, so the next reconcile does not write the same thing
again.
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
from gatewayd.kube.mergepatch import MERGE_PATCH, merge_patch_to
from gatewayd.kube.resources import Resource

log = logging.getLogger(__name__)

Object = Mapping[str, Any]
REQUEST_TIMEOUT = (10.0, 30.0)  # connect, read (seconds)


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
        """Make the spec of `obj` (as cached) `spec` unless it holds that already; after
        WRITTEN, `current()` gives the API's answer."""
        return self._patch(resource, obj, "spec", spec)

    def write_status(self, resource: Resource, obj: Object, status: Mapping[str, Any]) -> Outcome:
        return self._patch(resource, obj, "status", status)

    def merge_status(self, resource: Resource, obj: Object, fields: Mapping[str, Any]) -> Outcome:
        """Set `fields` in the status of `obj` (as cached) with a JSON merge patch of just those
        keys, unless it holds them already: the status's other keys, written by the object's
        own daemon, stay as they are, so the patch needs no resourceVersion."""
        status = self.current(resource, obj).get("status")
        status = status if isinstance(status, Mapping) else {}
        if all(status.get(key) == value for key, value in fields.items()):
            return Outcome.UNCHANGED
        return self._send(resource, obj, "status", {"status": dict(fields)})

    def write_condition(
        self, resource: Resource, obj: Object, kind: str, condition: Mapping[str, Any] | None
    ) -> Outcome:
        """Put `condition` (of type `kind`; None: none) among the conditions of another
        writer's status, leaving theirs as they are."""
        current = self.current(resource, obj)
        status = current.get("status")
        listed = status.get("conditions") if isinstance(status, Mapping) else None
        conditions = [
            c for c in listed or () if isinstance(c, Mapping) and c.get("type") != kind
        ]
        if condition is not None:
            conditions.append(condition)
        if conditions == list(listed or ()):
            return Outcome.UNCHANGED
        version = _metadata(current).get("resourceVersion")
        body = {"metadata": {"resourceVersion": version}, "status": {"conditions": conditions}}
        return self._send(resource, obj, "status", body)

    def _patch(
        self, resource: Resource, cached: Object, part: str, content: Mapping[str, Any]
    ) -> Outcome:
        obj = self.current(resource, cached)
        if obj.get(part) == content:
            return Outcome.UNCHANGED
        return self._send(resource, cached, part, {part: merge_patch_to(content, obj.get(part))})

    def _send(
        self, resource: Resource, cached: Object, part: str, body: dict[str, Any]
    ) -> Outcome:
        name = str(_metadata(cached).get("name"))
        what = f"{resource.kind} {name} {part}"
        args = (resource.group, resource.version, resource.plural, name, body)
        options: dict[str, Any] = {
            "_request_timeout": REQUEST_TIMEOUT,
            "_content_type": MERGE_PATCH,
        }
        try:
            if part == "status":
                answer = self._objects.patch_cluster_custom_object_status(*args, **options)
            else:
                answer = self._objects.patch_cluster_custom_object(*args, **options)
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
