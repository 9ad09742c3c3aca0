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
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from http import HTTPStatus
from typing import Any

import urllib3
from kubernetes.client import ApiClient, CustomObjectsApi, V1DeleteOptions, V1Preconditions
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
        # (plural, name) -> the resourceVersion deleted, until the cache no longer has it
        self._deleted: dict[tuple[str, str], str] = {}
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

    def write_object(
        self, resource: Resource, cached: Object | None, wanted: Mapping[str, Any]
    ) -> Outcome:
        """Make an object that is wholly the controller's (`wanted`: apiVersion, kind,
        metadata.name and labels, spec) exist as wanted: create it when the cache has none
        (`cached` None), else write its spec."""
        name = str(_metadata(wanted).get("name"))
        if cached is None:
            created = self._written.get((resource.plural, name))
            if created is not None and created[0] == "" and created[1].get("spec") == wanted.get(
                    "spec"):
                return Outcome.UNCHANGED  # created, and the cache has not seen it yet
            return self._create(resource, wanted)
        return self.write_spec(resource, cached, wanted["spec"])

    def delete(self, resource: Resource, cached: Object) -> Outcome:
        """Delete an object of the controller's, as cached (only the version cached: one
        changed meanwhile is left for the next reconcile)."""
        metadata = _metadata(cached)
        name = str(metadata.get("name"))
        key = (resource.plural, name)
        version = str(metadata.get("resourceVersion"))
        if self._deleted.get(key) == version:
            return Outcome.UNCHANGED  # deleted, and the cache has not seen it yet
        body = V1DeleteOptions(preconditions=V1Preconditions(resource_version=version))
        outcome, _ = self._call(
            f"{resource.kind} {name}",
            lambda: self._objects.delete_cluster_custom_object(
                resource.group, resource.version, resource.plural, name, body=body,
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )
        if outcome in (Outcome.WRITTEN, Outcome.GONE):
            log.info("%s %s deleted", resource.kind, name)
            self._deleted[key] = version
            self._written.pop(key, None)
        return outcome

    def forget_deleted(self, resource: Resource, cached: Iterable[str]) -> None:
        """Forget the deletions the cache has seen (`cached`: the names it holds)."""
        present = set(cached)
        self._deleted = {
            key: version for key, version in self._deleted.items()
            if key[0] != resource.plural or key[1] in present
        }

    def _create(self, resource: Resource, wanted: Mapping[str, Any]) -> Outcome:
        name = str(_metadata(wanted).get("name"))
        outcome, answer = self._call(
            f"{resource.kind} {name}",
            lambda: self._objects.create_cluster_custom_object(
                resource.group, resource.version, resource.plural, dict(wanted),
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )
        if outcome is Outcome.WRITTEN:
            log.info("%s %s created", resource.kind, name)
            self._written[(resource.plural, name)] = ("", answer)
            self._deleted.pop((resource.plural, name), None)
        return outcome

    def _call(self, what: str, request: Callable[[], Any]) -> tuple[Outcome, Object]:
        """Send one request; its outcome, and the API's answer ({} unless WRITTEN)."""
        try:
            answer = request()
        except ApiException as error:
            if error.status == HTTPStatus.CONFLICT:
                log.info("%s: changed meanwhile (409 Conflict); retrying from fresh caches", what)
                return Outcome.CONFLICT, {}
            if error.status == HTTPStatus.NOT_FOUND:
                log.info("%s: deleted meanwhile", what)
                return Outcome.GONE, {}
            log.warning("%s: the API refused the write: %s %s", what, error.status, error.reason)
            return Outcome.FAILED, {}
        except (urllib3.exceptions.HTTPError, OSError) as error:
            log.warning("%s: the API is unreachable: %s", what, error)
            return Outcome.UNREACHABLE, {}
        if not isinstance(answer, Mapping):
            log.warning("%s: unexpected answer from the API: %r", what, type(answer))
            return Outcome.FAILED, {}
        self.writes += 1
        return Outcome.WRITTEN, answer

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
        patch = (
            self._objects.patch_cluster_custom_object_status
            if part == "status"
            else self._objects.patch_cluster_custom_object
        )
        outcome, answer = self._call(what, lambda: patch(*args, **options))
        if outcome is Outcome.WRITTEN:
            self._written[(resource.plural, name)] = (
                str(_metadata(cached).get("resourceVersion")),
                answer,
            )
            log.info("%s written (generation %s)", what, _metadata(answer).get("generation"))
        return outcome

    def record_event(self, involved: Object, event_type: str, reason: str, message: str) -> bool:
        """An Event about `involved`, through the controller's one recorder (repeats become
        its series); False when the write is left pending (the recorder retries it)."""
        return self.events.record(involved, event_type, reason, message)
