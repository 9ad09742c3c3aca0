"""steer's probe thread (FastFailover) against a real UDP responder in a network namespace:
what counts as an answer when the gateway's answers come late, and what the node does when
a gateway says it is leaving."""

from __future__ import annotations

import heapq
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from gatewayd.dataplane.probe import ProbeTarget
from gatewayd.lab.netns import Sandbox, entered, run, wait_for
from gatewayd.policy.model import ConnectionFollow, SteerAction, SteerRule
from gatewayd.probe import (
    GATEWAY_TUNNEL_ADDRESS,
    PROBE_PORT,
    ProbeReply,
    ProbeRequest,
    decode_request,
    effective_rules,
    encode_reply,
)
from gatewayd.steer.config import FailoverSettings
from gatewayd.steer.failover import FastFailover

pytestmark = pytest.mark.lab

NODE_ADDRESS = IPv4Address("100.64.0.2")
STANDBY_ADDRESS = IPv4Address("100.127.0.2")  # the lab's gateways share one; here two listen
SETTINGS = FailoverSettings(probe_interval_seconds=0.1, misses=5, recoveries=3)


class LateResponder:
    """Answers every probe `delay` seconds after it arrived, as a gateway on a busy host,
    with `serving` (of what the probe names) and `leaving`; `silent` stops the answers. Keeps
    every request it received."""

    def __init__(self, netns: str, delay: float, gateway: str = "gw1",
                 address: IPv4Address = GATEWAY_TUNNEL_ADDRESS) -> None:
        with entered(netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((str(address), PROBE_PORT))
        self.sock.settimeout(0.01)
        self.delay = delay
        self.gateway = gateway
        self.silent = threading.Event()
        self.serving: frozenset[str] = frozenset()
        self.leaving = False
        self.requests: list[ProbeRequest] = []
        self._due: list[tuple[float, int, bytes, tuple[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LateResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    @property
    def received(self) -> int:
        return len(self.requests)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, sender = self.sock.recvfrom(2048)
                request = decode_request(data)
                self.requests.append(request)
                if self.silent.is_set():
                    continue
                serving = self.serving & (request.here | request.away)
                reply = encode_reply(ProbeReply(self.gateway, request.sequence, serving,
                                                self.leaving))
                heapq.heappush(self._due, (time.monotonic() + self.delay, request.sequence,
                                           reply, sender))
            except TimeoutError:
                pass
            while self._due and self._due[0][0] <= time.monotonic():
                _, _, reply, sender = heapq.heappop(self._due)
                self.sock.sendto(reply, sender)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"probes{secrets.token_hex(2)}-") as box:
        name = box.netns("node")
        run(["ip", "link", "set", "lo", "up"], name)
        for address in (GATEWAY_TUNNEL_ADDRESS, STANDBY_ADDRESS, NODE_ADDRESS):
            run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], name)
        yield name


def test_answers_that_come_late_keep_a_gateway_up(netns: str) -> None:
    """Every answer arrives one and a half probe intervals late: after the next probe went
    out. The gateway answers all the same, so it is up and stays up."""
    with LateResponder(netns, delay=1.5 * SETTINGS.probe_interval_seconds) as responder:
        with entered(netns):  # the probe thread and its sockets live in the namespace
            failover = FastFailover("node1", SETTINGS, on_change=lambda: None)
            failover.set_plan((), [ProbeTarget("gw1", 0, GATEWAY_TUNNEL_ADDRESS, PROBE_PORT)],
                              NODE_ADDRESS)
            failover.start()
        try:
            wait_for(lambda: failover.reachable() == {"gw1": True}, 10,
                     "the gateway that answers late to count as up")
            seen = responder.received
            wait_for(lambda: responder.received >= seen + 20, 10, "20 more probes")
            assert failover.reachable() == {"gw1": True}
        finally:
            failover.stop()


def test_probes_go_on_while_a_change_is_applied(netns: str) -> None:
    """The daemon applies a change under the lock its loop holds for whole passes. Probes
    must go on meanwhile: a gateway without probes for `egressIPHoldSeconds` gives up its
    egress IPs, and the change under way may be the one that just sent traffic to it."""
    applying, done = threading.Event(), threading.Event()

    def slow_change() -> None:
        applying.set()
        done.wait(10)

    with LateResponder(netns, delay=0) as responder:
        with entered(netns):
            failover = FastFailover("node1", SETTINGS, on_change=slow_change)
            failover.set_plan((), [ProbeTarget("gw1", 0, GATEWAY_TUNNEL_ADDRESS, PROBE_PORT)],
                              NODE_ADDRESS)
            failover.start()
        try:
            wait_for(applying.is_set, 10, "the gateway coming up to be applied")
            seen = responder.received
            wait_for(lambda: responder.received >= seen + 10, 5,
                     "10 probes while the change is being applied")
        finally:
            done.set()
            failover.stop()


def probing_both(netns: str, settings: FailoverSettings, rule: SteerRule) -> FastFailover:
    """A node's probes, started, to the active (gw1) and the standby (gw2) of `rule`."""
    failover = FastFailover("node1", settings, on_change=lambda: None)
    with entered(netns):
        failover.set_plan((rule,), [
            ProbeTarget("gw1", 0, GATEWAY_TUNNEL_ADDRESS, PROBE_PORT),
            ProbeTarget("gw2", 0, STANDBY_ADDRESS, PROBE_PORT),
        ], NODE_ADDRESS)
        failover.start()
    return failover


def test_the_gateways_hear_of_a_failover_at_once(netns: str) -> None:
    """When a failover is decided, the standby (which must claim the egress IP) and the
    gateway left behind (which must give it up) are told in the same round of probes, sent
    again, not a probe interval later."""
    settings = FailoverSettings(probe_interval_seconds=1.0, misses=2, recoveries=1)
    rule = SteerRule("team.payments", SteerAction.TUNNEL, frozenset(), (),
                     gateway="gw1", standby="gw2")

    with LateResponder(netns, 0, "gw1") as active, \
            LateResponder(netns, 0, "gw2", STANDBY_ADDRESS) as standby:
        failover = probing_both(netns, settings, rule)
        try:
            wait_for(lambda: failover.reachable() == {"gw1": True, "gw2": True}, 10,
                     "both gateways up")
            active.silent.set()
            wait_for(lambda: any("team.payments" in r.here for r in standby.requests), 20,
                     "the standby to hear that the node sends it the policy")
            told = next(r for r in standby.requests if "team.payments" in r.here)
            # the copy sent again and the gateway left behind: each heard by its own thread
            wait_for(lambda: any("team.payments" in r.away for r in active.requests), 10,
                     "the gateway left behind to hear that the policy went")
            left = [r for r in active.requests if "team.payments" in r.away]
            assert left[0].sequence == told.sequence
            wait_for(lambda: [r.sequence for r in standby.requests].count(told.sequence) >= 2,
                     10, "the round to be sent again")
            assert [r.sequence for r in standby.requests].count(told.sequence) == 2
            # and the node's established connections follow the policy to the standby
            assert failover.take()[0].follows == {
                ConnectionFollow("gw1", "team.payments", "gw2")}
        finally:
            failover.stop()


def test_a_leaving_gateway_keeps_new_connections_until_the_standby_serves(netns: str) -> None:
    """A gateway whose agent stops answers that it is leaving. The node fails its policies
    over (the standby hears that it gets them, the leaving one that they went) but keeps
    their new connections on the leaving one, which still holds the egress IP, until the
    standby serves them: a planned stop makes before it breaks."""
    rule = SteerRule("team.payments", SteerAction.TUNNEL, frozenset(), (),
                     gateway="gw1", standby="gw2")
    with LateResponder(netns, 0, "gw1") as active, \
            LateResponder(netns, 0, "gw2", STANDBY_ADDRESS) as standby:
        active.serving = frozenset({"team.payments"})
        failover = probing_both(netns, SETTINGS, rule)

        def sent_to() -> str | None:
            return effective_rules((rule,), failover.take()[0])[0].gateway

        try:
            wait_for(lambda: failover.serving().get("gw1") == {"team.payments"}, 10,
                     "gw1 to serve the policy")
            active.leaving = True
            wait_for(lambda: any("team.payments" in r.here for r in standby.requests), 10,
                     "the standby to hear that it gets the policy")
            # the same round, heard by the other responder's thread
            wait_for(lambda: any("team.payments" in r.away for r in active.requests), 10,
                     "the leaving gateway to hear that the policy went")
            assert failover.failovers.keys() == {("team.payments", "gw1")}
            assert sent_to() == "gw1"  # still: the standby does not serve it yet
            seen = standby.received
            wait_for(lambda: standby.received >= seen + 5, 10, "5 rounds that change nothing")
            assert sent_to() == "gw1"
            standby.serving = frozenset({"team.payments"})
            wait_for(lambda: sent_to() == "gw2", 10, "new connections to go to the standby")
        finally:
            failover.stop()
