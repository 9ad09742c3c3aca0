"""What the controller keeps of each object its informers cache (their `transform`).

A Pod as the API serves it is about 5 KB of JSON, half of it `metadata.managedFields`, and the
controller reads a few hundred bytes of it; 10,000 whole pods held as Python objects cost
hundreds of MiB. Pods keep what the engine reads (`policy/snapshot.py`) and what decides
whether a pod counts at all (`status.phase`, `metadata.deletionTimestamp`); every other type
keeps everything but `managedFields` and the last-applied annotation, which nothing reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Object = dict[str, Any]
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
POD_METADATA = ("name", "namespace", "uid", "labels", "resourceVersion", "deletionTimestamp")
POD_SPEC = ("nodeName", "hostNetwork", "serviceAccountName", "serviceAccount")
POD_STATUS = ("phase", "podIP", "podIPs")


def _picked(part: object, keys: Iterable[str]) -> Object:
    if not isinstance(part, Mapping):
        return {}
    return {key: part[key] for key in keys if key in part}


def pod_fields(obj: Object) -> Object:
    """The fields of a Pod the controller reads; anything malformed is kept for the parser to
    report."""
    if not all(isinstance(obj.get(part, {}), Mapping) for part in ("metadata", "spec", "status")):
        return obj
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": _picked(obj.get("metadata"), POD_METADATA),
        "spec": _picked(obj.get("spec"), POD_SPEC),
        "status": _picked(obj.get("status"), POD_STATUS),
    }


def without_managed_fields(obj: Object) -> Object:
    """`obj` without `metadata.managedFields` and the last-applied annotation."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return obj
    metadata.pop("managedFields", None)
    annotations = metadata.get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(LAST_APPLIED, None)
    return obj
