"""What each generation of a plan held, to know what a gateway or node may be using right now.

An agent applies a spec atomically and then reports `status.observedGeneration`, so its data
plane is at the observed generation or at a newer one it has not reported yet. Knowing what each
of those generations held (the controller saw or wrote them), the controller can say what is
surely programmed (in every one of them) and what may be in use (in any of them). Generations it
does not know make the answer conservative: nothing is surely programmed, anything may be in use.

Objects are keyed by name and uid, since a re-created object starts again at generation 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")
ObjectId = tuple[str, str]  # (name, uid)


class GenerationLog(Generic[T]):
    def __init__(self) -> None:
        self._seen: dict[ObjectId, dict[int, frozenset[T]]] = {}

    def record(self, obj: ObjectId, generation: int, items: frozenset[T]) -> None:
        self._seen.setdefault(obj, {})[generation] = items

    def knows(self, obj: ObjectId, generation: int) -> bool:
        return generation in self._seen.get(obj, {})

    def keep_only(self, objects: Iterable[ObjectId]) -> None:
        """Forget objects that no longer exist."""
        wanted = set(objects)
        for gone in set(self._seen) - wanted:
            del self._seen[gone]

    def _span(self, obj: ObjectId, observed: int) -> list[frozenset[T]] | None:
        """What the generations from `observed` to the newest known one held; None if one of
        them is unknown. Older generations are forgotten: the agent is past them."""
        seen = self._seen.get(obj, {})
        for old in [g for g in seen if g < observed]:
            del seen[old]
        if not seen:
            return None
        newest = max(seen)
        if observed > newest:
            return [seen[newest]]
        span = [seen.get(g) for g in range(observed, newest + 1)]
        return None if any(s is None for s in span) else [s for s in span if s is not None]

    def surely_applied(self, obj: ObjectId, observed: int | None) -> frozenset[T]:
        """Items in every generation the object may be at (nothing if that is unknown)."""
        span = self._span(obj, observed) if observed is not None else None
        if not span:
            return frozenset()
        return frozenset.intersection(*span)

    def maybe_in_use(self, obj: ObjectId, observed: int | None) -> frozenset[T] | None:
        """Items in any generation the object may be at; None when that is unknown (anything
        may be in use). An object that never reported a generation has programmed nothing."""
        if observed is None:
            return frozenset()
        span = self._span(obj, observed)
        if span is None:
            return None
        return frozenset().union(*span)
