"""The engine's Snapshot from the informers' caches, parsing each object once per version.

Objects are parsed with `gatewayd.policy.snapshot.parse_objects`, the same reader `gatewayctl
explain` uses on files, one object at a time, so that an object the engine cannot read (a Pod
with a malformed IP, an EgressGateway whose agent reported a bad address) is logged and left out
instead of stopping every decision, and so that a pod change re-parses one pod, not ten thousand.
Policies are parsed together (an EgressGatewayPolicy shadows a Cilium policy of the same name),
again only when one of them changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from gatewayd.policy.model import Pod, Snapshot
from gatewayd.policy.snapshot import LoadedSnapshot, SnapshotError, parse_objects

log = logging.getLogger(__name__)

Object = Mapping[str, Any]
T = TypeVar("T")
# What the API calls an object here, for messages: "Pod default/web-1".
ORIGIN = "API"


@dataclass(frozen=True)
class Cluster:
    """The informers' caches at one moment: objects as the API serves them (never mutated)."""

    policies: Sequence[Object] = ()  # EgressGatewayPolicies, and Cilium ones when enabled
    pods: Sequence[Object] = ()
    namespaces: Sequence[Object] = ()
    nodes: Sequence[Object] = ()
    gateways: Sequence[Object] = ()
    egress_nodes: Sequence[Object] = ()
    leases: Mapping[str, Object] = field(default_factory=dict)  # by name, in our namespace
    endpoint_slices: Sequence[Object] = ()  # the `kubernetes` Service's, in `default`
    source_slices: Mapping[str, Object] = field(default_factory=dict)  # EgressSourceSlices


def object_key(obj: Object) -> tuple[str, str, str]:
    metadata = obj.get("metadata") or {}
    return (str(obj.get("kind")), str(metadata.get("namespace", "")), str(metadata.get("name")))


def resource_version(obj: Object) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))


def _generation_or_version(obj: Object) -> str:
    metadata = obj.get("metadata") or {}
    if isinstance(metadata.get("generation"), int):
        return f"{metadata.get('uid', '')}/{metadata['generation']}"
    return resource_version(obj)


# An object of the last build: (the object, its key, its version, its parse).
_Seen = tuple[Object, tuple[str, str, str], str, Any]


@dataclass
class _Changes(Generic[T]):
    """What one `SnapshotCache._each` pass found changed."""

    removed: list[T] = field(default_factory=list)  # parses replaced
    added: list[T] = field(default_factory=list)  # their replacements, and new objects'
    new_keys: set[tuple[str, str, str]] = field(default_factory=set)


class SnapshotCache:
    """Builds Snapshots from Clusters; keeps each object's parse while its version is current."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, str, str], tuple[str, Any]] = {}
        # The pods the last `build` left out or changed, as the build before had them, and
        # those it brought in or changed (pods with an IP only, as in the Snapshot).
        self.pod_changes: tuple[list[Pod], list[Pod]] = ([], [])
        self._pod_keys: set[tuple[str, str, str]] = set()  # of the last build
        self._seen: dict[int, _Seen] = {}  # id of each object of the last build
        self._policies_key: tuple[tuple[tuple[str, str, str], str], ...] | None = None
        self._policies = LoadedSnapshot(Snapshot())

    def build(self, cluster: Cluster) -> Snapshot:
        """Every readable object of `cluster` but the policies (see `policies()`)."""
        parsed: dict[tuple[str, str, str], tuple[str, Any]] = {}
        changes = _Changes[Pod]()
        seen: dict[int, _Seen] = {}
        pods = self._each(cluster.pods, parsed, seen, lambda s: s.pods, changes)
        namespaces = self._each(cluster.namespaces, parsed, seen, lambda s: s.namespaces)
        nodes = self._each(cluster.nodes, parsed, seen, lambda s: s.nodes)
        gateways = self._each(cluster.gateways, parsed, seen, lambda s: s.gateways)
        addresses = self._each(
            cluster.endpoint_slices, parsed, seen, lambda s: s.api_server_addresses
        )
        self._pod_keys |= changes.new_keys
        if len(self._pod_keys) > len(cluster.pods):  # some pods are gone
            gone = self._pod_keys - parsed.keys()
            for key in gone:
                changes.removed.extend(self._parsed[key][1])
            self._pod_keys -= gone
        self.pod_changes = (
            [p for p in changes.removed if p.ips],
            [p for p in changes.added if p.ips],
        )
        self._parsed, self._seen = parsed, seen
        return Snapshot(
            # A pod without an IP yet (just created, not started) changes no plan: leaving
            # it out spares an engine run until the kubelet reports its IP.
            # In the caches' order: the engine orders pods itself (claim order).
            pods=tuple(p for p in _flat(pods) if p.ips),
            namespaces=tuple(sorted(_flat(namespaces), key=lambda n: n.name)),
            nodes=tuple(sorted(_flat(nodes), key=lambda n: n.name)),
            gateways=tuple(sorted(_flat(gateways), key=lambda g: g.name)),
            api_server_addresses=tuple(
                sorted(set(_flat(addresses)), key=lambda a: (a.version, int(a)))
            ),
        )

    def policies(self, objects: Sequence[Object]) -> LoadedSnapshot:
        """The valid policies and the problems of the others; the same object again while
        no policy changed."""
        # A policy's meaning changes only with its generation (a status write changes its
        # resourceVersion, not its generation).
        key = tuple((object_key(p), _generation_or_version(p)) for p in objects)
        if key != self._policies_key:
            try:
                self._policies = parse_objects([(ORIGIN, p) for p in objects])
            except SnapshotError as error:  # not expected from an API server: keep the last
                log.error("policies could not be read, keeping the previous ones: %s", error)
                return self._policies
            self._policies_key = key
        return self._policies

    def _each(
        self,
        objects: Sequence[Object],
        parsed: dict[tuple[str, str, str], tuple[str, Any]],
        seen: dict[int, _Seen],
        pick: Callable[[Snapshot], tuple[T, ...]],
        changes: _Changes[T] | None = None,
    ) -> list[tuple[T, ...]]:
        """Each object's parse; `changes` gets the parses replaced, and new keys. An object
        the caches still hold as they did at the last build (the same Python object: they
        never mutate one) is known without even reading its key."""
        result: tuple[T, ...]
        found = []
        for obj in objects:
            same = self._seen.get(id(obj))
            if same is not None and same[0] is obj:  # the very object of the last build
                _, key, version, result = same
                parsed[key] = (version, result)
                seen[id(obj)] = same
                found.append(result)
                continue
            key, version = object_key(obj), resource_version(obj)
            cached = self._parsed.get(key)
            if cached is not None and cached[0] == version and version:
                result = cached[1]
            else:
                try:
                    result = pick(parse_objects([(ORIGIN, obj)]).snapshot)
                except SnapshotError as error:
                    log.warning("left out of every decision until it changes: %s", error)
                    result = ()
                if cached is not None and cached[1] == result:
                    result = cached[1]  # a new version, the same meaning (a re-list)
                elif changes is not None:
                    if cached is None:
                        changes.new_keys.add(key)
                    else:
                        changes.removed.extend(cached[1])
                    changes.added.extend(result)
            parsed[key] = (version, result)
            seen[id(obj)] = (obj, key, version, result)
            found.append(result)
        return found


def _flat(groups: list[tuple[T, ...]]) -> list[T]:
    return [item for group in groups for item in group]
