"""JSON merge patches (RFC 7386) that make a part of an object exactly what the writer wants."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MERGE_PATCH = "application/merge-patch+json"


def merge_patch_to(wanted: Mapping[str, Any], current: object) -> dict[str, Any]:
    """The merge patch that turns `current` into `wanted`: `wanted` itself, with null for every
    key `current` has and `wanted` lacks, at every level of nested mappings (lists are
    replaced whole by a merge patch)."""
    patch = dict(wanted)
    if not isinstance(current, Mapping):
        return patch
    for key, value in current.items():
        if key not in wanted:
            patch[key] = None
        elif isinstance(wanted[key], Mapping) and isinstance(value, Mapping):
            patch[key] = merge_patch_to(wanted[key], value)
    return patch
