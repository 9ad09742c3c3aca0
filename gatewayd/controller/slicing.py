"""The gateways' rules as their specs hold them: sources moved to EgressSourceSlices (pure).

See `gatewayd/api/sourceslices.py` for the contract. A rule the plan keeps from one reconcile
to the next (the same spec form, see `SpecForms`) is not cut again while its slice count stays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from gatewayd.api.sourceslices import (
    GATEWAY_LABEL,
    SLICES_FEATURE,
    SourceSlice,
    addresses_of,
    referenced,
    rule_slice_prefix,
    shard_rule,
    with_sources,
)
from gatewayd.kube.resources import EGRESS_SOURCE_SLICES

Rule = Mapping[str, Any]
Object = Mapping[str, Any]
_Cut = tuple[Rule, str, dict[str, Any], list[SourceSlice]]  # rule, prefix, spec form, slices


def slice_object(piece: SourceSlice) -> dict[str, Any]:
    """The EgressSourceSlice object the controller writes for `piece`."""
    return {
        "apiVersion": EGRESS_SOURCE_SLICES.api_version,
        "kind": EGRESS_SOURCE_SLICES.kind,
        "metadata": {"name": piece.name, "labels": {GATEWAY_LABEL: piece.gateway}},
        "spec": piece.spec(),
    }


def reads_slices(gateway: Object) -> bool:
    """Whether the gateway's agent reads rules that name slices (its status says so)."""
    status = gateway.get("status")
    features = status.get("features") if isinstance(status, Mapping) else None
    return isinstance(features, list) and SLICES_FEATURE in features


def inline_rules(rules: Sequence[Rule], cached: Mapping[str, Object]) -> list[Rule]:
    """`rules` for an agent that does not read slices: sources in the rules. A rule kept from
    a spec that named slices gets them back from the slices; one whose slices are gone stays
    as it was (the agent keeps its last plan, as it would for any spec it cannot read)."""
    inline: list[Rule] = []
    for rule in rules:
        if "sources" not in rule:
            with contextlib.suppress(ValueError):  # malformed: stays as it was
                (assembled,), waiting = with_sources([rule], cached.get)
                if not waiting and isinstance(assembled, Mapping):
                    rule = assembled
        inline.append(rule)
    return inline


def slice_counts(rules: Sequence[Rule]) -> dict[str, int]:
    """How many slices each rule of a spec names, by the prefix of their names."""
    counts = {}
    for rule in rules:
        names = [name for name, _ in referenced(rule)]
        if names:
            counts[names[0].rpartition(".")[0]] = len(names)
    return counts


class Slicer:
    def __init__(self) -> None:
        self._current: dict[tuple[str, int], _Cut] = {}
        self._previous: dict[tuple[str, int], _Cut] = {}

    def next_round(self) -> None:
        """Forget the cuts the last round did not use."""
        self._previous, self._current = self._current, {}

    def spec_rules(
        self,
        gateway: str,
        rules: Sequence[Rule],
        current: Sequence[Rule],
        cached: Mapping[str, Object],
    ) -> tuple[list[Rule], list[SourceSlice]]:
        """`rules` (the plan's with inline sources, and rules kept from the spec `current`,
        which name their slices already) as the spec holds them, and the slices they name.
        `cached`: the EgressSourceSlices the cluster holds, by name."""
        counts = slice_counts(current)
        seen: dict[str, int] = {}
        out: list[Rule] = []
        slices: list[SourceSlice] = []
        for rule in rules:
            if "sources" not in rule:  # kept from the spec: its slices stay as they are
                out.append(rule)
                slices += _kept_slices(gateway, rule, cached)
                continue
            first = rule_slice_prefix(gateway, rule)
            ordinal = seen.get(first, 0)
            seen[first] = ordinal + 1
            prefix = rule_slice_prefix(gateway, rule, ordinal)
            previous = counts.get(prefix, 0)
            key = (gateway, id(rule))
            cut = self._current.get(key) or self._previous.get(key)
            if cut is None or cut[0] is not rule or cut[1] != prefix or (
                previous and previous != len(cut[3])
            ):
                compact, made = shard_rule(gateway, rule, previous, ordinal)
                cut = (rule, prefix, compact, made)
            self._current[key] = cut
            out.append(cut[2])
            slices += cut[3]
        return out, slices


def _kept_slices(gateway: str, rule: Rule, cached: Mapping[str, Object]) -> list[SourceSlice]:
    kept = []
    for name, _ in referenced(rule):
        addresses = addresses_of(name, cached.get)
        if addresses is not None:
            kept.append(SourceSlice(name, gateway, str(rule["policy"]), addresses))
    return kept
