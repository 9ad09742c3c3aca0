"""The last valid version of each policy stays in force while a newer version is invalid.

This is Cilium's behaviour (semantics §8) and ours: a bad edit must never tear down the data
plane a good version built. A policy that was never valid has no effect.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gatewayd.policy.model import Policy, Snapshot
from gatewayd.policy.snapshot import LoadedSnapshot


@dataclass(frozen=True)
class Resolved:
    snapshot: Snapshot
    kept: tuple[str, ...]  # "Kind/name" of invalid policies whose last valid version was kept


class PolicyMemory:
    def __init__(self) -> None:
        self._valid: dict[tuple[str, str], Policy] = {}

    def resolve(self, loaded: LoadedSnapshot) -> Resolved:
        current = {(p.kind, p.name): p for p in loaded.snapshot.policies}
        kept = []
        for problem in loaded.problems:
            key = (problem.kind, problem.name)
            if key not in current and key in self._valid:
                current[key] = self._valid[key]
                kept.append(f"{problem.kind}/{problem.name}")
        self._valid = current
        policies = tuple(sorted(current.values(), key=lambda p: (p.name, p.kind)))
        return Resolved(replace(loaded.snapshot, policies=policies), tuple(sorted(set(kept))))
