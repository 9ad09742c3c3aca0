"""The fast failover path's pure logic: the probe messages, gateway health with hysteresis, the
node's failover decisions and the gateway's egress IP decisions (gatewayd/probe.py)."""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address, ip_network

import pytest

from gatewayd.policy.model import IPAddress, Role, SnatRule, SteerAction, SteerRule
from gatewayd.probe import (
    Demand,
    Failover,
    Fenced,
    Handover,
    ProbeFormatError,
    ProbeHistory,
    ProbeReply,
    ProbeRequest,
    ResponderState,
    Steering,
    answer_probe,
    answers_probe,
    decide_failovers,
    decide_handovers,
    decode_from_responder,
    decode_reply,
    decode_request,
    decode_responder_state,
    effective_rules,
    egress_ips_to_hold,
    encode_demand,
    encode_fenced,
    encode_reply,
    encode_request,
    encode_responder_state,
    keep_when_contested,
    policy_gateways,
    probe_requests,
)

pytestmark = pytest.mark.unit

GRACE = 2.0


def rule(policy: str = "pay", gateway: str | None = "gw1", standby: str | None = "gw2",
         action: SteerAction = SteerAction.TUNNEL, source: str = "10.244.1.10") -> SteerRule:
    return SteerRule(policy=policy, action=action, sources=frozenset({ip_address(source)}),
                     destinations=(ip_network("198.51.100.10/32"),), gateway=gateway,
                     standby=standby)


def snat(policy: str, role: Role, egress_ip: str = "198.51.100.70") -> SnatRule:
    return SnatRule(policy=policy, role=role, sources=frozenset({ip_address("10.244.1.10")}),
                    destinations=(ip_network("198.51.100.10/32"),),
                    egress_ip=ip_address(egress_ip))


# --- messages ----------------------------------------------------------------------------------


def test_messages_round_trip() -> None:
    request = ProbeRequest("node1", 7, frozenset({"pay", "all"}), frozenset({"other"}))
    assert decode_request(encode_request(request)) == request
    reply = ProbeReply("gw1", 7, frozenset({"pay"}))
    assert decode_reply(encode_reply(reply)) == reply


@pytest.mark.parametrize("data", [
    b"not json", b"[]", b'{"v": 2, "node": "n", "seq": 1}', b'{"v": 1, "seq": 1}',
    b'{"v": 1, "node": "n", "seq": true}', b'{"v": 1, "node": "n", "seq": 1, "here": "pay"}',
    b'{"v": 1, "node": "n", "seq": 1, "here": [1]}', b"\xff\xfe",
])
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(ProbeFormatError):
        decode_request(data)


def test_a_reply_is_not_a_request() -> None:
    with pytest.raises(ProbeFormatError):
        decode_request(encode_reply(ProbeReply("gw1", 1)))


def test_the_agents_messages_to_and_from_its_responder_round_trip() -> None:
    demand = Demand("node1", 1234.5678, frozenset({"pay"}), frozenset({"all", "other"}))
    assert decode_from_responder(encode_demand(demand)) == demand
    fenced = Fenced(99.5, (ip_address("192.0.2.10"), ip_address("2001:db8::10")))
    assert decode_from_responder(encode_fenced(fenced)) == fenced
    for state in (ResponderState(), ResponderState(frozenset({"pay", "all"}), leaving=True)):
        assert decode_responder_state(encode_responder_state(state)) == state


@pytest.mark.parametrize("data", [
    b'{"v": 1, "at": 1.0, "fenced": "192.0.2.10"}', b'{"v": 1, "at": 1.0, "fenced": [10]}',
    b'{"v": 1, "at": 1.0, "fenced": ["192.0.2.300"]}', b'{"v": 1, "fenced": []}',
])
def test_malformed_fences_are_refused(data: bytes) -> None:
    with pytest.raises(ProbeFormatError):
        decode_from_responder(data)


def test_a_gateway_may_serve_more_policies_than_a_datagram_names() -> None:
    many = ResponderState(frozenset(f"policy-{i:05}-of-a-big-cluster" for i in range(3000)))
    assert len(encode_responder_state(many)) > 65000
    assert decode_responder_state(encode_responder_state(many)) == many
    with pytest.raises(ProbeFormatError):
        encode_responder_state(ResponderState(frozenset(
            f"policy-{i:06}-of-a-far-too-big-cluster" for i in range(10000))))


@pytest.mark.parametrize("data", [
    b'{"v": 1, "served": [], "leaving": 1}', b'{"v": 1, "served": "pay", "leaving": false}',
    b'{"v": 1, "served": []}',
])
def test_a_malformed_responder_state_is_refused(data: bytes) -> None:
    with pytest.raises(ProbeFormatError):
        decode_responder_state(data)


def test_the_responder_serves_what_the_node_asks_of_what_the_agent_serves() -> None:
    request = ProbeRequest("node1", 9, frozenset({"pay"}), frozenset({"all"}))
    state = ResponderState(frozenset({"pay", "all", "reports"}))
    demand, reply = answer_probe(encode_request(request), "gw1", state, now=50.0)
    assert demand == Demand("node1", 50.0, frozenset({"pay"}), frozenset({"all"}))
    assert decode_reply(reply) == ProbeReply("gw1", 9, frozenset({"pay", "all"}))


def test_a_leaving_gateway_still_answers_what_it_serves_and_says_it_leaves() -> None:
    request = ProbeRequest("node1", 9, frozenset({"pay"}))
    demand, reply = answer_probe(encode_request(request), "gw1",
                                 ResponderState(frozenset({"pay"}), leaving=True), now=50.0)
    assert (demand.node, demand.here) == ("node1", frozenset({"pay"}))
    assert decode_reply(reply) == ProbeReply("gw1", 9, frozenset({"pay"}), leaving=True)


def test_a_reply_says_leaving_only_when_it_is_so() -> None:
    """A node of an earlier version reads a reply without the key as before."""
    assert b"leaving" not in encode_reply(ProbeReply("gw1", 1, frozenset({"pay"})))
    assert decode_reply(encode_reply(ProbeReply("gw1", 1, leaving=True))).leaving
    with pytest.raises(ProbeFormatError):
        decode_reply(b'{"v": 1, "gateway": "gw1", "seq": 1, "leaving": "yes"}')


def test_a_datagram_that_is_no_probe_gets_no_answer() -> None:
    with pytest.raises(ProbeFormatError):
        answer_probe(encode_reply(ProbeReply("gw2", 1)), "gw1", ResponderState(), now=1.0)


# --- health -----------------------------------------------------------------------------------


def history() -> ProbeHistory:
    return ProbeHistory(misses=3, recoveries=2, first_misses=5)


def test_down_after_misses_in_a_row_and_up_after_answers_in_a_row() -> None:
    h = history()
    assert h.record(ProbeReply("gw1", 1)) and h.up is True
    assert not h.record(None) and not h.record(None) and h.up is True
    assert h.record(None) and h.up is False
    assert not h.record(ProbeReply("gw1", 5)) and h.up is False  # one answer is not enough
    assert h.record(ProbeReply("gw1", 6)) and h.up is True


def test_an_answer_between_misses_starts_the_count_again() -> None:
    h = history()
    h.record(ProbeReply("gw1", 1))
    for outcome in (None, None, ProbeReply("gw1", 4), None, None):
        h.record(outcome)
    assert h.up is True


def test_a_gateway_never_answered_is_unknown_until_first_misses() -> None:
    h = history()
    for _ in range(4):
        h.record(None)
    assert h.up is None
    assert h.record(None) and h.up is False


def test_a_leaving_gateway_is_up_but_not_available() -> None:
    h = history()
    h.record(ProbeReply("gw1", 1, frozenset({"pay"})))
    assert (h.up, h.available) == (True, True)
    h.record(ProbeReply("gw1", 2, frozenset({"pay"}), leaving=True))
    assert (h.up, h.available, h.serving) == (True, False, {"pay"})
    for _ in range(3):
        h.record(None)
    assert (h.up, h.available) == (False, False)
    h.record(ProbeReply("gw1", 6))  # its agent started again
    h.record(ProbeReply("gw1", 7))
    assert (h.up, h.available, h.leaving) == (True, True, False)


def test_hearing_an_answer_says_whether_what_it_serves_or_leaving_changed() -> None:
    h = history()
    assert h.hear(ProbeReply("gw1", 1, frozenset({"pay"})))
    assert not h.hear(ProbeReply("gw1", 2, frozenset({"pay"})))
    assert h.hear(ProbeReply("gw1", 3, frozenset({"pay"}), leaving=True))
    assert (h.serving, h.leaving) == ({"pay"}, True)


def test_the_last_reply_says_what_is_served() -> None:
    h = history()
    h.record(ProbeReply("gw1", 1, frozenset({"pay"})))
    h.record(None)
    assert h.serving == {"pay"}


# --- the node's decision ------------------------------------------------------------------------


def decide(rules: list[SteerRule], up: dict[str, bool | None],
           previous: dict[tuple[str, str], Failover] | None = None, now: float = 100.0,
           serving: dict[str, frozenset[str]] | None = None) -> dict[tuple[str, str], Failover]:
    return decide_failovers(rules, up, serving or {}, previous or {}, now, GRACE)


def test_fails_over_when_the_gateway_is_down_and_the_standby_up() -> None:
    decided = decide([rule()], {"gw1": False, "gw2": True})
    assert decided == {("pay", "gw1"): Failover("pay", "gw1", "gw2", 100.0)}


@pytest.mark.parametrize("up", [
    {"gw1": True, "gw2": True},
    {"gw1": None, "gw2": True},  # not known yet: no failover
    {"gw1": False, "gw2": False},
    {"gw1": False, "gw2": None},
    {"gw1": False},
])
def test_no_failover_otherwise(up: dict[str, bool | None]) -> None:
    assert decide([rule()], up) == {}


def test_no_failover_without_a_standby_or_for_drops() -> None:
    rules = [rule(standby=None), rule("drop", gateway=None, standby=None,
                                      action=SteerAction.DROP)]
    assert decide(rules, {"gw1": False, "gw2": True}) == {}


def test_no_flip_back_while_the_standby_works() -> None:
    previous = decide([rule()], {"gw1": False, "gw2": True})
    later = decide([rule()], {"gw1": True, "gw2": True}, previous, now=200.0,
                   serving={"gw2": frozenset({"pay"})})
    assert later == previous


def test_stays_on_the_standby_while_it_claims_within_the_grace() -> None:
    previous = decide([rule()], {"gw1": False, "gw2": True}, now=100.0)
    assert decide([rule()], {"gw1": True, "gw2": True}, previous, now=100.0 + GRACE / 2) \
        == previous


def test_back_to_the_gateway_when_the_standby_cannot_serve_after_the_grace() -> None:
    previous = decide([rule()], {"gw1": False, "gw2": True}, now=100.0)
    assert decide([rule()], {"gw1": True, "gw2": True}, previous, now=100.0 + GRACE) == {}


def test_back_to_the_gateway_at_once_when_it_serves_and_the_standby_does_not() -> None:
    """One node's path to the active stalled for a moment: the other nodes stayed, the active
    kept the egress IP, and the standby cannot claim it. No need to wait for the grace."""
    previous = decide([rule()], {"gw1": False, "gw2": True}, now=100.0)
    back = {"gw1": True, "gw2": True}
    assert decide([rule()], back, previous, now=100.2, serving={"gw1": frozenset({"pay"})}) \
        == {}
    both = {"gw1": frozenset({"pay"}), "gw2": frozenset({"pay"})}
    assert decide([rule()], back, previous, now=100.2, serving=both) == previous


def test_back_to_the_gateway_when_the_standby_goes_down_and_the_gateway_is_up() -> None:
    previous = decide([rule()], {"gw1": False, "gw2": True})
    serving = {"gw2": frozenset({"pay"})}
    assert decide([rule()], {"gw1": True, "gw2": False}, previous, serving=serving) == {}
    # both down: nothing better to do than to stay
    assert decide([rule()], {"gw1": False, "gw2": False}, previous, serving=serving) == previous


def test_a_plan_with_another_standby_ends_the_failover() -> None:
    previous = decide([rule()], {"gw1": False, "gw2": True, "gw3": True})
    assert decide([rule(standby="gw3")], {"gw1": True, "gw2": True, "gw3": True},
                  previous, serving={"gw2": frozenset({"pay"})}) == {}
    moved = decide([rule(standby="gw3")], {"gw1": False, "gw2": True, "gw3": True}, previous)
    assert moved == {("pay", "gw1"): Failover("pay", "gw1", "gw3", 100.0)}


def test_a_plan_that_moved_the_policy_ends_the_failover() -> None:
    previous = decide([rule()], {"gw1": False, "gw2": True})
    assert decide([rule(gateway="gw2", standby=None)], {"gw1": False, "gw2": True},
                  previous) == {}


def test_failovers_are_per_policy_and_gateway() -> None:
    rules = [rule("pay"), rule("all", gateway="gw3", standby="gw2", source="10.244.1.11")]
    decided = decide(rules, {"gw1": False, "gw2": True, "gw3": True})
    assert set(decided) == {("pay", "gw1")}


def test_effective_rules_send_failed_over_rules_to_the_standby() -> None:
    rules = (rule("pay"), rule("all", gateway="gw3", standby="gw2"),
             rule("drop", gateway=None, standby=None, action=SteerAction.DROP))
    failovers = {("pay", "gw1"): Failover("pay", "gw1", "gw2", 1.0)}
    steered = effective_rules(rules, Steering(failovers))
    assert [(r.policy, r.gateway, r.standby) for r in steered] == [
        ("pay", "gw2", None), ("all", "gw3", "gw2"), ("drop", None, None)]
    assert steered[0].sources == rules[0].sources


def test_effective_rules_send_handed_over_rules_to_the_gateway_left() -> None:
    rules = (rule("pay"), rule("all", gateway="gw3", standby="gw2"))
    failovers = {("pay", "gw1"): Failover("pay", "gw1", "gw2", 1.0)}
    handovers = {"pay": Handover("pay", "gw2", "gw1", 1.0), "all": Handover("all", "gw3", "gw1",
                                                                           1.0)}
    steered = effective_rules(rules, Steering(failovers, handovers))
    assert [(r.policy, r.gateway) for r in steered] == [("pay", "gw1"), ("all", "gw1")]
    # a handover to another gateway than the rule's now is not this rule's
    stale = {"pay": Handover("pay", "gw3", "gw1", 1.0)}
    assert effective_rules(rules, Steering(failovers, stale))[0].gateway == "gw2"


def test_policy_gateways_names_the_policies_that_go_to_one_gateway() -> None:
    rules = [rule("pay"), rule("pay", source="10.244.1.11"),
             rule("split"), rule("split", gateway="gw2", source="10.244.1.11"),
             rule("drop", gateway=None, standby=None, action=SteerAction.DROP)]
    assert policy_gateways(rules) == {"pay": "gw1"}


def handovers(moved_to: dict[str, str], sent_to: dict[str, str], up: dict[str, bool | None],
              serving: dict[str, set[str]], previous: dict[str, Handover] | None = None,
              now: float = 100.0) -> dict[str, Handover]:
    return decide_handovers(moved_to, sent_to, up,
                            {g: frozenset(p) for g, p in serving.items()}, previous or {},
                            now, GRACE)


UP = {"gw1": True, "gw2": True}


def test_a_move_keeps_new_connections_on_the_gateway_left_until_the_new_one_serves() -> None:
    decided = handovers({"pay": "gw2"}, {"pay": "gw1"}, UP, {"gw1": {"pay"}})
    assert decided == {"pay": Handover("pay", "gw2", "gw1", 100.0)}
    # the old one gave the egress IP up: it still answers, the new one claims
    assert handovers({"pay": "gw2"}, {"pay": "gw1"}, UP, {}, decided, now=100.5) == decided
    assert handovers({"pay": "gw2"}, {"pay": "gw1"}, UP, {"gw2": {"pay"}}, decided,
                     now=100.5) == {}


@pytest.mark.parametrize(("up", "serving", "now"), [
    ({"gw1": False, "gw2": True}, {"gw1": {"pay"}}, 100.5),  # the old one went down
    ({"gw1": None, "gw2": True}, {"gw1": {"pay"}}, 100.5),
    (UP, {"gw1": {"pay"}}, 100.0 + GRACE),  # the new one did not serve within the grace
])
def test_a_handover_ends(up: dict[str, bool | None], serving: dict[str, set[str]],
                         now: float) -> None:
    previous = {"pay": Handover("pay", "gw2", "gw1", 100.0)}
    assert handovers({"pay": "gw2"}, {"pay": "gw1"}, up, serving, previous, now) == {}


@pytest.mark.parametrize(("moved_to", "sent_to", "up", "serving"), [
    ({"pay": "gw1"}, {"pay": "gw1"}, UP, {"gw1": {"pay"}}),  # no move
    ({"pay": "gw2"}, {}, UP, {"gw1": {"pay"}}),  # a new policy
    ({"pay": "gw2"}, {"pay": "gw1"}, UP, {"gw1": {"other"}}),  # the old one did not serve it
    ({"pay": "gw2"}, {"pay": "gw1"}, {"gw1": False, "gw2": True}, {"gw1": {"pay"}}),  # down
    ({"pay": "gw2"}, {"pay": "gw1"}, UP, {"gw1": {"pay"}, "gw2": {"pay"}}),  # served there
])
def test_no_handover(moved_to: dict[str, str], sent_to: dict[str, str],
                     up: dict[str, bool | None], serving: dict[str, set[str]]) -> None:
    assert handovers(moved_to, sent_to, up, serving) == {}


def test_a_second_move_during_a_handover_starts_from_where_connections_go() -> None:
    previous = {"pay": Handover("pay", "gw2", "gw1", 100.0)}
    up = {"gw1": True, "gw2": True, "gw3": True}
    decided = handovers({"pay": "gw3"}, {"pay": "gw1"}, up, {"gw1": {"pay"}}, previous,
                        now=101.0)
    assert decided == {"pay": Handover("pay", "gw3", "gw1", 101.0)}


def test_probe_requests_tell_each_gateway_where_the_policies_go() -> None:
    rules = [rule("pay"), rule("all", gateway="gw2", standby="gw1"),
             rule("x", gateway="gw3", standby=None),
             rule("drop", gateway=None, standby=None, action=SteerAction.DROP)]
    failovers = {("pay", "gw1"): Failover("pay", "gw1", "gw2", 1.0)}
    requests = probe_requests("node1", ["gw1", "gw2", "gw3"], rules, failovers, 9)
    assert requests["gw1"] == ProbeRequest("node1", 9, frozenset(),
                                           frozenset({"pay", "all", "x"}))
    assert requests["gw2"] == ProbeRequest("node1", 9, frozenset({"pay", "all"}),
                                           frozenset({"x"}))
    assert requests["gw3"] == ProbeRequest("node1", 9, frozenset({"x"}),
                                           frozenset({"pay", "all"}))


def test_a_policy_split_over_gateways_is_here_for_each_of_them() -> None:
    rules = [rule("multi", gateway="gw1", standby=None),
             rule("multi", gateway="gw2", standby=None, source="10.244.1.11")]
    requests = probe_requests("node1", ["gw1", "gw2"], rules, {}, 1)
    assert requests["gw1"].here == requests["gw2"].here == {"multi"}
    assert requests["gw1"].away == requests["gw2"].away == frozenset()


# --- the gateway's egress IPs -------------------------------------------------------------------


POOL = ip_network("198.51.100.64/27")


def provisioned(address: IPAddress) -> bool:
    return address.version == 4 and address in POOL


def demand(node: str, at: float, here: Iterable[str] = (), away: Iterable[str] = ()) -> Demand:
    return Demand(node, at, frozenset(here), frozenset(away))


def hold(rules: list[SnatRule], demands: list[Demand], now: float = 10.0) -> set[str]:
    return {str(a) for a in egress_ips_to_hold(rules, provisioned, demands, now, 0.3)}


def test_the_active_gateway_holds_its_egress_ip_while_nodes_reach_it() -> None:
    assert hold([snat("pay", Role.ACTIVE)], [demand("n1", 9.9)]) == {"198.51.100.70"}


def test_no_recent_probe_means_nothing_is_held() -> None:
    assert hold([snat("pay", Role.ACTIVE)], [demand("n1", 9.6, here={"pay"})]) == set()
    assert hold([snat("pay", Role.ACTIVE)], []) == set()


def test_the_standby_holds_only_when_a_node_sends_the_policy_to_it() -> None:
    rules = [snat("pay", Role.STANDBY)]
    assert hold(rules, [demand("n1", 9.9, away={"pay"})]) == set()
    assert hold(rules, [demand("n1", 9.9)]) == set()
    assert hold(rules, [demand("n1", 9.9, away={"pay"}), demand("n2", 9.8, here={"pay"})]) \
        == {"198.51.100.70"}


def test_the_active_gateway_gives_up_when_nodes_send_the_policy_elsewhere() -> None:
    assert hold([snat("pay", Role.ACTIVE)], [demand("n1", 9.9, away={"pay"})]) == set()
    # ... unless some node still sends it here
    assert hold([snat("pay", Role.ACTIVE)], [demand("n1", 9.9, away={"pay"}),
                                             demand("n2", 9.9, here={"pay"})]) \
        == {"198.51.100.70"}


def test_addresses_outside_the_pools_are_never_held() -> None:
    rules = [snat("pay", Role.ACTIVE, "192.0.2.5")]
    assert hold(rules, [demand("n1", 9.9, here={"pay"})]) == set()


def test_a_contested_address_is_kept_only_when_active_and_in_use() -> None:
    rules = [snat("pay", Role.ACTIVE), snat("all", Role.STANDBY, "198.51.100.71")]
    assert keep_when_contested({"pay"}, rules, {"pay"})
    assert not keep_when_contested({"pay"}, rules, set())
    assert not keep_when_contested({"all"}, rules, {"all"})


@pytest.mark.parametrize(("reply_to", "gateway", "counts"), [
    (10, "gw1", True),  # the probe's own answer
    (8, "gw1", True),  # a late answer to one of the probes just before
    (7, "gw1", False),  # older than the window: that gateway went quiet since
    (11, "gw1", False),  # a probe not sent yet: not an answer
    (10, "gw2", False),  # another gateway's
])
def test_a_late_answer_counts_within_the_window(reply_to: int, gateway: str,
                                                counts: bool) -> None:
    reply = ProbeReply(gateway, reply_to)
    assert answers_probe(reply, "gw1", sequence=10, window=3) is counts
