"""Objects as a real API server serves them: `metadata.managedFields` added to generated ones.

The benches build their objects in memory; an API server would hand them out with the field
manager's bookkeeping, about half of a Pod's JSON. This adds it in the same shape (one `Update`
entry for the main resource, one for the status subresource, each with the FieldsV1 set of the
part it owns), so that sizes and parse costs are those of a real cluster.
"""

from __future__ import annotations

import json
from typing import Any

Obj = dict[str, Any]
MANAGED_METADATA = ("labels", "annotations", "ownerReferences", "finalizers")
SERVER_PARTS = ("apiVersion", "kind", "metadata", "status")
# Lists whose items FieldsV1 keys by one of their fields (`k:{"name":"x"}`).
LIST_KEYS = ("name", "type", "ip", "containerPort", "mountPath", "devicePath", "key")
WRITTEN_AT = "2026-11-01T10:00:00Z"


def fields_v1(value: Any) -> Obj:
    """The FieldsV1 set of `value`: `f:<key>` per map key, `k:{...}` per item of a keyed list;
    scalars and other lists are leaves."""
    if isinstance(value, dict):
        return {f"f:{key}": fields_v1(item) for key, item in value.items()}
    if isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
        key = next((k for k in LIST_KEYS if all(k in i for i in value)), None)
        if key is not None:
            return {
                "k:" + json.dumps({key: item[key]}, separators=(",", ":")): {
                    ".": {},
                    **fields_v1(item),
                }
                for item in value
            }
    return {}


def with_managed_fields(obj: Obj, manager: str = "kube-controller-manager") -> Obj:
    """`obj` with the managedFields a server keeps: the main part written by `manager`, the
    status by the kubelet."""
    metadata = {k: v for k, v in obj["metadata"].items() if k in MANAGED_METADATA}
    main = {k: v for k, v in obj.items() if k not in SERVER_PARTS}
    parts = {
        "": (manager, {"metadata": metadata, **main}),
        "status": ("kubelet", {"status": obj.get("status")}),
    }
    entries = []
    for subresource, (writer, content) in parts.items():
        present = {k: v for k, v in content.items() if v}
        if not present:
            continue
        entry: Obj = {
            "manager": writer,
            "operation": "Update",
            "apiVersion": obj["apiVersion"],
            "time": WRITTEN_AT,
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(present),
        }
        if subresource:
            entry["subresource"] = subresource
        entries.append(entry)
    return {**obj, "metadata": {**obj["metadata"], "managedFields": entries}}
