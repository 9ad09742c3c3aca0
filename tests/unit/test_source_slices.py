"""EgressSourceSlices: a gateway rule's sources cut into bounded objects and read back."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.agent.kubernetes import target_from_object
from gatewayd.api.sourceslices import (
    MAX_ADDRESSES,
    ParsedSlices,
    addresses_digest,
    rule_slice_prefix,
    shard_rule,
    slice_count,
    with_sources,
)
from gatewayd.controller.slicing import Slicer, slice_object


def addresses(count: int, start: int = 0) -> list[str]:
    return [str(IPv4Address("10.0.0.0") + start + i) for i in range(count)]


def rule(sources: list[str], policy: str = "pay", egress_ip: str = "192.0.2.1") -> dict[str, Any]:
    return {"policy": policy, "role": "active", "egressIP": egress_ip, "sources": sources,
            "destinations": ["198.51.100.0/24"]}


def objects(slices: list[Any]) -> dict[str, dict[str, Any]]:
    return {s.name: slice_object(s) for s in slices}


def read_back(compact: dict[str, Any], slices: list[Any]) -> tuple[list[str], list[str]]:
    found = objects(slices)
    rules, waiting = with_sources([compact], found.get)
    assembled = rules[0]
    assert isinstance(assembled, dict)
    return assembled["sources"], waiting


def test_a_small_rule_is_one_slice_named_after_gateway_policy_and_family() -> None:
    compact, slices = shard_rule("gw-1", rule(["10.244.1.10", "10.244.1.11"]), previous=0)
    (name,) = [s.name for s in slices]
    assert re.fullmatch(r"gw-1\.pay\.ipv4-[0-9a-f]{8}\.0", name)
    assert "sources" not in compact
    assert compact["sourceSlices"] == [
        {"name": name, "digest": addresses_digest(["10.244.1.10", "10.244.1.11"])}
    ]
    assert slices[0].spec() == {"gateway": "gw-1", "policy": "pay",
                                "addresses": ["10.244.1.10", "10.244.1.11"]}
    assert read_back(compact, slices) == (["10.244.1.10", "10.244.1.11"], [])


def test_an_empty_rule_names_one_empty_slice() -> None:
    compact, slices = shard_rule("gw-1", rule([]), previous=0)
    assert len(slices) == 1 and slices[0].addresses == ()
    assert read_back(compact, slices) == ([], [])


def test_ipv6_rules_and_second_rules_of_a_policy_have_their_own_names() -> None:
    v4, v6 = rule(["10.0.0.1"]), rule(["fd00::1"], egress_ip="2001:db8::1")
    assert rule_slice_prefix("gw-1", v6).startswith("gw-1.pay.ipv6-")
    names = {rule_slice_prefix("gw-1", v4), rule_slice_prefix("gw-1", v6),
             rule_slice_prefix("gw-1", v6, ordinal=1), rule_slice_prefix("gw-2", v6)}
    assert len(names) == 4


def test_names_with_dots_do_not_run_into_each_other() -> None:
    """A gateway named after its FQDN: `gw.pay` with policy `x` is not `gw` with `pay.x`."""
    assert rule_slice_prefix("gw.pay", rule([], policy="x")) != rule_slice_prefix(
        "gw", rule([], policy="pay.x"))


def test_a_name_too_long_for_kubernetes_hashes_the_policy() -> None:
    policy = "p" * 250
    prefix = rule_slice_prefix("g" * 63, rule([], policy=policy))
    assert len(prefix) + len(".4095") <= 253
    assert policy not in prefix
    assert prefix != rule_slice_prefix("g" * 63, rule([], policy="q" * 250))


def test_100000_sources_fit_in_slices_of_at_most_1000() -> None:
    sources = addresses(100_000)
    compact, slices = shard_rule("gw-1", rule(sources), previous=0)
    assert len(slices) == 256  # the first power of two that is at most half full
    assert max(len(s.addresses) for s in slices) <= MAX_ADDRESSES
    assembled, waiting = read_back(compact, slices)
    assert waiting == [] and sorted(assembled) == sorted(sources)


def test_one_address_more_rewrites_one_slice() -> None:
    before = addresses(5_000)
    compact, slices = shard_rule("gw-1", rule(before), previous=0)
    after_compact, after = shard_rule("gw-1", rule([*before, "10.9.9.9"]),
                                      previous=len(slices))
    changed = [a.name for a, b in zip(slices, after, strict=True) if a != b]
    assert len(changed) == 1
    assert [e for e in after_compact["sourceSlices"] if e not in compact["sourceSlices"]] == [
        {"name": changed[0], "digest": next(s.digest for s in after if s.name == changed[0])}
    ]


def test_the_count_stays_until_a_slice_overflows_or_they_are_nearly_empty() -> None:
    assert slice_count(addresses(400), previous=0) == 1
    assert slice_count(addresses(900), previous=0) == 2  # new: at most half full
    assert slice_count(addresses(900), previous=1) == 1  # kept: it fits
    assert slice_count(addresses(1001), previous=1) == 2  # one slice would overflow
    assert slice_count(addresses(600), previous=4) == 4  # a sixth full: kept
    assert slice_count(addresses(400), previous=4) == 2  # a tenth full: halved
    assert slice_count(addresses(10), previous=64) == 1
    assert slice_count(addresses(10), previous=3) == 1  # not a power of two: start again


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4_000)), min_size=1, max_size=40))
def test_random_changes_rewrite_one_slice_each_unless_the_count_changes(
    changes: list[tuple[bool, int]],
) -> None:
    sources = set(addresses(1_500))
    _, slices = shard_rule("gw-1", rule(sorted(sources)), previous=0)
    for add, number in changes:
        address = str(IPv4Address("10.0.0.0") + number)
        if add:
            sources.add(address)
        else:
            sources.discard(address)
        new_compact, new = shard_rule("gw-1", rule(sorted(sources)), previous=len(slices))
        assert max(len(s.addresses) for s in new) <= MAX_ADDRESSES
        assembled, waiting = read_back(new_compact, new)
        assert waiting == [] and set(assembled) == sources
        if len(new) == len(slices):
            assert sum(a != b for a, b in zip(slices, new, strict=True)) <= 1
        slices = new


def test_a_missing_or_stale_slice_is_waited_for() -> None:
    compact, slices = shard_rule("gw-1", rule(addresses(3_000)), previous=0)
    found = objects(slices)
    missing = slices[1].name
    del found[missing]
    stale = slices[2].name
    found[stale]["spec"]["addresses"] = found[stale]["spec"]["addresses"][1:]
    _, waiting = with_sources([compact], found.get)
    assert waiting == [missing, stale]


def test_a_rule_with_inline_sources_is_read_as_it_is() -> None:
    inline = rule(["10.244.1.10"])
    assert with_sources([inline], lambda name: None) == ([inline], [])


@pytest.mark.parametrize(
    ("listed", "error"),
    [
        ("gw-1.pay.ipv4-0a0a0a0a.0", r"rules\[0\]\.sourceSlices: must be a list"),
        ([{"name": "gw-1.pay.ipv4-0a0a0a0a.0"}],
         r"rules\[0\]\.sourceSlices\[0\]: must have a name"),
        ([{"name": 1, "digest": "x"}], r"rules\[0\]\.sourceSlices\[0\]"),
    ],
)
def test_a_malformed_slice_list_names_the_field(listed: object, error: str) -> None:
    bad = {**rule([]), "sourceSlices": listed}
    del bad["sources"]
    with pytest.raises(ValueError, match=error):
        with_sources([bad], lambda name: None)


def test_a_malformed_slice_object_is_waited_for() -> None:
    compact, slices = shard_rule("gw-1", rule(["10.244.1.10"]), previous=0)
    bad = {"metadata": {"name": slices[0].name}, "spec": {"addresses": [1]}}
    assert with_sources([compact], {slices[0].name: bad}.get)[1] == [slices[0].name]


# --- the controller's side: cuts kept while the rules stay --------------------------------------


def test_the_slicer_cuts_a_kept_rule_once() -> None:
    slicer = Slicer()
    planned = rule(addresses(2_000))
    first, made = slicer.spec_rules("gw-1", [planned], [], {})
    slicer.next_round()
    again, made_again = slicer.spec_rules("gw-1", [planned], first, objects(made))
    assert again[0] is first[0] and made_again == made


def test_the_slicer_keeps_the_count_the_spec_has() -> None:
    slicer = Slicer()
    sources = addresses(900)
    _, made = slicer.spec_rules("gw-1", [rule(sources)], [], {})
    assert len(made) == 2  # new: half full at most
    # The spec had one slice for it (an older controller, or fewer pods then): one it stays.
    one, _ = shard_rule("gw-1", rule(sources), previous=1)
    _, kept = Slicer().spec_rules("gw-1", [rule(sources)], [one], {})
    assert len(kept) == 1


def test_a_rule_kept_from_the_spec_keeps_its_slices_as_the_cluster_has_them() -> None:
    old, made = shard_rule("gw-1", rule(addresses(10)), previous=0)
    rules, slices = Slicer().spec_rules("gw-1", [old], [old], objects(made))
    assert rules == [old] and slices == made


def test_two_rules_of_one_policy_and_family_get_two_names() -> None:
    first, second = rule(addresses(3)), rule(addresses(3, start=100), egress_ip="192.0.2.2")
    rules, slices = Slicer().spec_rules("gw-1", [first, second], [], {})
    assert [s.name for s in slices] == [f"{rule_slice_prefix('gw-1', first)}.0",
                                        f"{rule_slice_prefix('gw-1', second, ordinal=1)}.0"]
    assert len(rules) == 2 and slices[0].name != slices[1].name


def test_ipv6_addresses_are_sliced_too() -> None:
    sources = [str(IPv6Address("fd00::") + i) for i in range(2_500)]
    compact, slices = shard_rule("gw-1", rule(sources, egress_ip="2001:db8::1"), previous=0)
    assert all(s.name.startswith("gw-1.pay.ipv6-") for s in slices)
    assert sorted(read_back(compact, slices)[0]) == sorted(sources)


# --- the agent's side: slices parsed once per content --------------------------------------------


def test_an_unchanged_slice_is_parsed_once_and_gives_the_same_addresses() -> None:
    compact, slices = shard_rule("gw-1", rule(addresses(3_000)), previous=0)
    found = objects(slices)
    parsed = ParsedSlices()
    first = parsed.sources(compact, found.get)
    assert sorted(map(str, first)) == sorted(addresses(3_000))
    parsed.next_spec()
    # One slice changes: the others' address objects are the very same ones.
    changed, after = shard_rule("gw-1", rule([*addresses(3_000), "10.9.9.9"]),
                                previous=len(slices))
    found = objects(after)
    second = parsed.sources(changed, found.get)
    assert second - first == {IPv4Address("10.9.9.9")}
    unchanged = [s for s, a in zip(slices, after, strict=True) if s == a]
    kept = {id(a) for a in first}
    assert all(id(a) in kept for s in unchanged for a in second if str(a) in s.addresses)


def test_a_slice_holding_something_but_an_address_is_named() -> None:
    compact, slices = shard_rule("gw-1", rule(["10.244.1.10"]), previous=0)
    bad = {"metadata": {"name": slices[0].name}, "spec": {"addresses": ["10.244.1.999"]}}
    named = rf"EgressSourceSlice {re.escape(slices[0].name)}: .*10\.244\.1\.999"
    with pytest.raises(ValueError, match=named):
        ParsedSlices().sources(compact, {slices[0].name: bad}.get)


def test_the_agent_reads_the_same_plan_with_or_without_the_parse_cache() -> None:
    compact, slices = shard_rule("gw-1", rule(addresses(2_500)), previous=0)
    gateway = {"metadata": {"name": "gw-1", "generation": 2}, "spec": {"rules": [compact]}}
    found = objects(slices)
    parsed = ParsedSlices()
    cached = target_from_object(gateway, found.get, parsed)
    assert target_from_object(gateway, found.get, parsed) == cached
    assert target_from_object(gateway, found.get) == cached
    assert target_from_object({**gateway, "spec": {"rules": [rule(addresses(2_500))]}}) == cached
