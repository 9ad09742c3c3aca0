"""ConnectionFollower's order of work in a failover: the move of established connections
never waits for the cleanup of unanswered ones. The conntrack calls are replaced here; what
they do to a real table is in tests/lab/test_steer_conntrack.py."""

from __future__ import annotations

import threading
from ipaddress import ip_address, ip_network

import pytest

from gatewayd.lab.netns import wait_for
from gatewayd.policy.model import ConnectionFollow, SteerAction, SteerRule
from gatewayd.steer import connections
from gatewayd.steer.config import GatewayTunnelEnd
from gatewayd.steer.conntrack import MarkMove


def end(name: str, mark: int) -> GatewayTunnelEnd:
    return GatewayTunnelEnd(name, f"egw-{name}", 51820, "key", None, None, mark, mark, "")


def rule(gateway: str) -> SteerRule:
    return SteerRule("team.payments", SteerAction.TUNNEL, frozenset({ip_address("10.0.0.5")}),
                     (ip_network("192.0.2.0/24"),), gateway=gateway)


def test_a_cleanup_waits_for_the_move_under_way(monkeypatch: pytest.MonkeyPatch) -> None:
    moving, release = threading.Event(), threading.Event()
    order: list[str] = []

    def move(moves: list[MarkMove], mask: int) -> int:
        moving.set()
        release.wait(10)
        order.append("moved")
        return len(moves)

    def forget(mark: int, mask: int) -> int:
        order.append(f"forgot {mark:#x}")
        return 0

    monkeypatch.setattr(connections, "move_answered", move)
    monkeypatch.setattr(connections, "forget_unanswered", forget)
    follower = connections.ConnectionFollower(mark_mask=0xFF00)
    ends = (end("gw-a", 0x100), end("gw-b", 0x200))
    follower.steering_changed((rule("gw-a"),), ends)

    # gw-a failed: the daemon asks for the move first, then programs the table (the cleanup).
    follower.follow_policies((rule("gw-b"),),
                             frozenset({ConnectionFollow("gw-a", "team.payments", "gw-b")}), ends)
    follower.steering_changed((rule("gw-b"),), ends)
    wait_for(moving.is_set, 10, "the move to start")
    with pytest.raises(TimeoutError):  # the cleanup does not run beside the move
        wait_for(lambda: bool(order), 1.0, "a cleanup beside the move")
    release.set()
    wait_for(lambda: len(order) == 2, 10, "the cleanup after the move")
    assert order == ["moved", "forgot 0x100"]
