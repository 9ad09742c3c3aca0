"""The pure parts of connection-keeping failover: conntrackd's config, and which conntrack
mark a node gives an established connection of a failed-over rule."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, ip_address, ip_network
from pathlib import Path

from gatewayd.dataplane.conntrackd import SyncSettings, render_conntrackd_config
from gatewayd.policy.model import SteerAction, SteerRule
from gatewayd.probe import connection_follows
from gatewayd.steer.conntrack import MarkMove, moved_mark, parse_flows

MASK = 0xFF00


def settings() -> SyncSettings:
    return SyncSettings("eth0", IPv4Address("198.51.100.2"),
                        (ip_network("10.244.2.0/24"), ip_network("10.244.1.0/24"),
                         ip_network("fd00:10:244:1::/64")), Path("/var/lib/gatewayd/conntrackd"))


def test_the_config_shares_only_pod_flows_over_the_uplink_into_the_kernel() -> None:
    text = render_conntrackd_config(settings())
    assert "Mode FTFW {\n        DisableExternalCache On" in text
    assert "IPv4_interface 198.51.100.2\n        Interface eth0" in text
    accepted = text.split("Address Accept {")[1].split("}")[0].split()
    assert accepted == ["IPv4_address", "10.244.1.0/24", "IPv4_address", "10.244.2.0/24",
                        "IPv6_address", "fd00:10:244:1::/64"]
    # its own lock file and control socket: the distribution's conntrackd may run too
    assert "LockFile /var/lib/gatewayd/conntrackd/conntrackd.lock" in text
    assert "Path /var/lib/gatewayd/conntrackd/conntrackd.ctl" in text


def test_the_config_is_the_same_for_the_same_settings() -> None:
    assert render_conntrackd_config(settings()) == render_conntrackd_config(settings())


MOVE = MarkMove(0x100, 0x200, frozenset({ip_address("10.244.1.10")}),
                (ip_network("198.51.100.10/32"), ip_network("203.0.113.0/24")))


def test_a_connection_of_the_failed_over_rule_gets_the_standbys_mark() -> None:
    assert moved_mark(ip_address("10.244.1.10"), ip_address("198.51.100.10"), 0x100, MASK,
                      [MOVE]) == 0x200
    assert moved_mark(ip_address("10.244.1.10"), ip_address("203.0.113.7"), 0x100, MASK,
                      [MOVE]) == 0x200


def test_bits_outside_the_mask_are_kept() -> None:
    assert moved_mark(ip_address("10.244.1.10"), ip_address("198.51.100.10"), 0x30100, MASK,
                      [MOVE]) == 0x30200


def test_other_connections_keep_their_mark() -> None:
    other_gateway = moved_mark(ip_address("10.244.1.10"), ip_address("198.51.100.10"), 0x300,
                               MASK, [MOVE])
    other_source = moved_mark(ip_address("10.244.1.11"), ip_address("198.51.100.10"), 0x100,
                              MASK, [MOVE])
    other_destination = moved_mark(ip_address("10.244.1.10"), ip_address("198.51.100.11"),
                                   0x100, MASK, [MOVE])
    assert (other_gateway, other_source, other_destination) == (None, None, None)


def rule(policy: str, gateway: str) -> SteerRule:
    return SteerRule(policy, SteerAction.TUNNEL, frozenset({ip_address("10.244.1.10")}),
                     (ip_network("198.51.100.10/32"),), gateway=gateway)


GATEWAYS = frozenset({"gw1", "gw2"})


def test_connections_leave_a_gateway_that_is_down_for_the_policys_gateway() -> None:
    moves = connection_follows([rule("pay", "gw2")], {"gw1": False, "gw2": True},
                               {"gw2": frozenset({"pay"})}, GATEWAYS)
    assert moves == {("gw1", "pay", "gw2")}


def test_connections_leave_a_gateway_that_no_longer_serves_the_policy() -> None:
    """A node moved back to the active gateway: the standby it had moved to never held the
    egress IP, and the connections it had moved there go back."""
    moves = connection_follows([rule("pay", "gw1")], {"gw1": True, "gw2": True},
                               {"gw1": frozenset({"pay"}), "gw2": frozenset()}, GATEWAYS)
    assert moves == {("gw2", "pay", "gw1")}


def test_connections_stay_where_they_are_still_served_or_have_nowhere_to_go() -> None:
    still_served = connection_follows([rule("pay", "gw2")], {"gw1": True, "gw2": True},
                                      {"gw1": frozenset({"pay"})}, GATEWAYS)
    target_down = connection_follows([rule("pay", "gw2")], {"gw1": False, "gw2": False},
                                     {}, GATEWAYS)
    unknown = connection_follows([rule("pay", "gw2")], {"gw2": True}, {}, GATEWAYS)
    assert (still_served, target_down, unknown) == (frozenset(), frozenset(), frozenset())


LISTING = """\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.244.1.10 dst=198.51.100.10 sport=37040 \
dport=9000 src=198.51.100.10 dst=10.244.1.10 sport=9000 dport=37040 [ASSURED] mark=32 use=1
ipv4     2 tcp      6 119 TIME_WAIT src=10.244.1.10 dst=198.51.100.10 sport=41000 dport=8080 \
src=198.51.100.10 dst=10.244.1.10 sport=8080 dport=41000 [ASSURED] mark=288 use=1
ipv4     2 tcp      6 119 SYN_SENT src=10.244.1.11 dst=198.51.100.10 sport=41001 dport=8080 \
[UNREPLIED] src=198.51.100.10 dst=10.244.1.11 sport=8080 dport=41001 mark=32 use=1
ipv4     2 udp      17 29 src=10.244.1.10 dst=198.51.100.53 sport=5353 dport=53 [UNREPLIED] \
src=198.51.100.53 dst=10.244.1.10 sport=53 dport=5353 mark=32 use=1
ipv4     2 icmp     1 29 src=10.244.1.10 dst=198.51.100.10 type=8 code=0 id=7 \
src=198.51.100.10 dst=10.244.1.10 type=0 code=0 id=7 mark=32 use=1
ipv6     10 tcp      6 99 CLOSE src=fd00::10 dst=2001:db8::10 sport=5 dport=80 \
src=2001:db8::10 dst=fd00::10 sport=80 dport=5 mark=32 use=1
"""


def test_a_listing_gives_each_flows_original_direction_state_and_answer() -> None:
    flows = parse_flows(LISTING)
    assert [(f.protocol, f.number, str(f.source), str(f.destination), f.ports, f.icmp, f.state,
             f.answered, f.mark) for f in flows] == [
        ("tcp", 6, "10.244.1.10", "198.51.100.10", (37040, 9000), None, "ESTABLISHED", True, 32),
        ("tcp", 6, "10.244.1.10", "198.51.100.10", (41000, 8080), None, "TIME_WAIT", True, 288),
        ("tcp", 6, "10.244.1.11", "198.51.100.10", (41001, 8080), None, "SYN_SENT", False, 32),
        ("udp", 17, "10.244.1.10", "198.51.100.53", (5353, 53), None, "", False, 32),
        ("icmp", 1, "10.244.1.10", "198.51.100.10", None, (8, 0, 7), "", True, 32),
        ("tcp", 6, "fd00::10", "2001:db8::10", (5, 80), None, "CLOSE", True, 32),
    ]
    assert [f.ended for f in flows] == [False, True, False, False, False, True]


def test_a_flows_tuple_names_it_for_ctnetlink() -> None:
    tcp, _, _, _, icmp, v6 = parse_flows(LISTING)
    orig = tcp.tuple_orig()
    assert (orig.family, orig.saddr, orig.daddr, orig.proto, orig.sport, orig.dport) == (
        socket.AF_INET, "10.244.1.10", "198.51.100.10", 6, 37040, 9000)
    ping = icmp.tuple_orig()
    assert (ping.proto, ping.icmp_type, ping.icmp_code, ping.icmp_id) == (1, 8, 0, 7)
    assert v6.tuple_orig().family == socket.AF_INET6
