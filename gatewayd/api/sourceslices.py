"""EgressSourceSlices: the pod addresses of a gateway's SNAT rules, in objects of bounded size.

A rule of an EgressGateway spec does not list its sources: it names the EgressSourceSlices that
hold them, each with a digest of its addresses (`sourceSlices: [{name, digest}]`). A slice holds
at most `MAX_ADDRESSES`, so no object grows with the cluster: etcd refuses objects over 1.5 MiB,
and one gateway's sources at 100,000 pods were 7.9 MiB. The gateway reads its slices (labelled
with its name) and applies a spec once every slice it names has the named digest; until then it
keeps the plan it has, and its observedGeneration keeps saying so.

Addresses are spread over a rule's slices by a hash of their text, so one pod's change rewrites
one slice per rule, not every slice after it (as cutting a sorted list would). The number of
slices is a power of two: it doubles when a slice would exceed the bound and halves when they
are less than an eighth full; otherwise it stays what the spec had, so a slice's contents move
only when the count changes.

Why slices written by the controller, not sources each gateway derives from a watch of the
pods: a gateway would then cache every pod of the cluster (about 100 MiB at 100,000 pods) and
run the policy engine itself, and the make-before-break guarantee (a node moves traffic only to
a gateway whose observedGeneration covers the rules) would no longer be one generation number.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, TypeGuard

from gatewayd.policy.model import IPAddress

MAX_ADDRESSES = 1000
GATEWAY_LABEL = "egress.gatewayd.io/gateway"
# In an EgressGateway's `status.features`: its agent reads rules that name slices. One that
# does not (an agent from before slices, during an upgrade) gets its sources in the spec.
SLICES_FEATURE = "sourceSlices"
_MAX_NAME = 253

Rule = Mapping[str, Any]
SliceLookup = Callable[[str], Mapping[str, Any] | None]


@dataclass(frozen=True)
class SourceSlice:
    """One EgressSourceSlice: some of the sources of one rule of `gateway`."""

    name: str
    gateway: str
    policy: str
    addresses: tuple[str, ...]  # in the rule's order

    @property
    def digest(self) -> str:
        return addresses_digest(self.addresses)

    def spec(self) -> dict[str, Any]:
        return {"gateway": self.gateway, "policy": self.policy, "addresses": list(self.addresses)}


def addresses_digest(addresses: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(addresses).encode()).hexdigest()[:16]


def _bucket(address: str, count: int) -> int:
    return zlib.crc32(address.encode()) % count


def _fits(addresses: Sequence[str], count: int) -> bool:
    sizes = [0] * count
    for address in addresses:
        sizes[_bucket(address, count)] += 1
    return max(sizes, default=0) <= MAX_ADDRESSES


def slice_count(addresses: Sequence[str], previous: int) -> int:
    """How many slices hold `addresses`, given that the rule had `previous` (0: a new rule)."""
    count = previous if previous > 0 and previous & (previous - 1) == 0 else 1
    if previous <= 0:
        while len(addresses) > count * MAX_ADDRESSES // 2:
            count *= 2
    while count > 1 and len(addresses) < count * MAX_ADDRESSES // 8:
        count //= 2
    while not _fits(addresses, count):
        count *= 2
    return count


def _family(rule: Rule) -> str:
    return "ipv6" if ":" in str(rule.get("egressIP", "")) else "ipv4"


def rule_slice_prefix(gateway: str, rule: Rule, ordinal: int = 0) -> str:
    """The name its slices share, but for the index: `GATEWAY.POLICY.FAMILY-TAG`. Names may
    hold dots (a gateway named after its FQDN), so `gw.pay` + `x` and `gw` + `pay.x` would
    read alike: the tag, a hash of the parts and of `ordinal` (which of the gateway's rules of
    that policy and family), tells them apart. The policy's name is left out when the whole
    would be longer than an object name may be."""
    family = _family(rule)
    policy = str(rule["policy"])
    parts = "\0".join((gateway, policy, family, str(ordinal)))
    tag = hashlib.sha256(parts.encode()).hexdigest()
    prefix = f"{gateway}.{policy}.{family}-{tag[:8]}"
    if len(prefix) + 6 > _MAX_NAME:
        prefix = f"{gateway}.{family}-{tag[:24]}"
    return prefix


def shard_rule(
    gateway: str, rule: Rule, previous: int, ordinal: int = 0
) -> tuple[dict[str, Any], list[SourceSlice]]:
    """A rule with inline `sources` as the spec holds it (naming its slices), and the slices.
    `previous`: how many slices the spec's rule of that name had; `ordinal`: which of the
    gateway's rules of that policy and family this is (0 for the first)."""
    sources: Sequence[str] = rule["sources"]
    count = slice_count(sources, previous)
    buckets: list[list[str]] = [[] for _ in range(count)]
    for address in sources:
        buckets[_bucket(address, count)].append(address)
    prefix = rule_slice_prefix(gateway, rule, ordinal)
    slices = [
        SourceSlice(f"{prefix}.{index}", gateway, str(rule["policy"]), tuple(bucket))
        for index, bucket in enumerate(buckets)
    ]
    compact = {key: value for key, value in rule.items() if key != "sources"}
    compact["sourceSlices"] = [{"name": s.name, "digest": s.digest} for s in slices]
    return compact, slices


def names_slices(rule: object) -> TypeGuard[Mapping[str, Any]]:
    """Whether a spec rule names slices (the other form lists its sources inline)."""
    return isinstance(rule, Mapping) and "sourceSlices" in rule


def referenced(rule: Rule) -> list[tuple[str, str]]:
    """(name, digest) of each slice a spec rule names; [] for a malformed or inline rule."""
    listed = rule.get("sourceSlices")
    found = []
    for item in listed if isinstance(listed, list) else ():
        if isinstance(item, Mapping):
            name, digest = item.get("name"), item.get("digest")
            if isinstance(name, str) and isinstance(digest, str):
                found.append((name, digest))
    return found


def slice_addresses(obj: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The addresses an EgressSourceSlice object holds; None when it is malformed."""
    spec = obj.get("spec")
    addresses = spec.get("addresses") if isinstance(spec, Mapping) else None
    if not isinstance(addresses, list) or not set(map(type, addresses)) <= {str}:
        return None
    return tuple(addresses)


def addresses_of(name: str, slice_named: SliceLookup) -> tuple[str, ...] | None:
    """The addresses of the slice `name`; None when there is none or it is malformed."""
    obj = slice_named(name)
    return slice_addresses(obj) if obj is not None else None


def _checked(rule: Rule, index: int) -> list[tuple[str, str]]:
    """(name, digest) of each slice the rule names; ValueError names a malformed entry."""
    listed = rule["sourceSlices"]
    where = f"rules[{index}].sourceSlices"
    if not isinstance(listed, list):
        raise ValueError(f"{where}: must be a list")
    for position, item in enumerate(listed):
        if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                and isinstance(item.get("digest"), str)):
            raise ValueError(f"{where}[{position}]: must have a name and a digest (strings)")
    return [(item["name"], item["digest"]) for item in listed]


def _as_named(name: str, digest: str, slice_named: SliceLookup) -> tuple[str, ...] | None:
    """The slice's addresses if it is there with the digest the spec names."""
    addresses = addresses_of(name, slice_named)
    return addresses if addresses is not None and addresses_digest(addresses) == digest else None


def waiting_slices(rules: Sequence[object], slice_named: SliceLookup) -> list[str]:
    """The slices the spec's rules name that are missing or not yet at the named digest;
    ValueError names a malformed `sourceSlices`."""
    return [
        name
        for index, rule in enumerate(rules) if names_slices(rule)
        for name, digest in _checked(rule, index)
        if _as_named(name, digest, slice_named) is None
    ]


def with_sources(
    rules: Sequence[object], slice_named: SliceLookup
) -> tuple[list[object], list[str]]:
    """The spec's rules with `sources` put back from their slices (`slice_named`: the
    EgressSourceSlice object of that name, None when there is none), and the names of the
    slices missing or not yet at the digest the spec names (`waiting_slices`). A rule that
    lists its sources inline (the form before slices) is taken as it is. ValueError names a
    malformed `sourceSlices` (the rest of a rule is left for the plan reader to check)."""
    assembled: list[object] = []
    waiting = []
    for index, rule in enumerate(rules):
        if not names_slices(rule):
            assembled.append(rule)
            continue
        sources: list[str] = []
        for name, digest in _checked(rule, index):
            addresses = _as_named(name, digest, slice_named)
            if addresses is None:
                waiting.append(name)
            else:
                sources.extend(addresses)
        plain = {key: value for key, value in rule.items() if key != "sourceSlices"}
        plain["sources"] = sources
        assembled.append(plain)
    return assembled, waiting


class ParsedSlices:
    """The addresses of each slice parsed once per content (name and digest), for the agent:
    one pod's change parses one slice, and the slices that did not change give the same
    address objects as before, so the plan's set operations over them stay fast."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], frozenset[IPAddress]] = {}
        self._used: dict[tuple[str, str], frozenset[IPAddress]] = {}

    def next_spec(self) -> None:
        """Forget the slices the last spec read did not name."""
        self._kept, self._used = self._used, {}

    def sources(self, rule: Rule, slice_named: SliceLookup) -> frozenset[IPAddress]:
        """The sources of a rule that names its slices, all of them there and as named
        (`waiting_slices` said so); ValueError names a slice with something but an address."""
        parts = []
        for name, digest in referenced(rule):
            key = (name, digest)
            part = self._used.get(key) or self._kept.get(key)
            if part is None:
                addresses = addresses_of(name, slice_named)
                if addresses is None:
                    raise ValueError(f"EgressSourceSlice {name}: spec.addresses is missing")
                try:
                    part = frozenset(map(ip_address, addresses))
                except ValueError as error:
                    raise ValueError(f"EgressSourceSlice {name}: {error}") from None
            self._used[key] = part
            parts.append(part)
        return frozenset().union(*parts)
