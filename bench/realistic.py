"""Objects as a real API server serves them: `metadata.managedFields` added to generated ones.

The benches build their objects in memory; an API server would hand them out with the field
manager's bookkeeping, about half of a Pod's JSON. This adds it in the same shape (one `Update`
entry for the main resource, one for the status subresource, each with the FieldsV1 set of the
part it owns), so that sizes and parse costs are those of a real cluster.
"""

from __future__ import annotations

from typing import Any

from fakecluster.fakeapi import fields_v1  # as the fake API server writes it

Obj = dict[str, Any]
MANAGED_METADATA = ("labels", "annotations", "ownerReferences", "finalizers")
SERVER_PARTS = ("apiVersion", "kind", "metadata", "status")
WRITTEN_AT = "2026-11-01T10:00:00Z"


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
