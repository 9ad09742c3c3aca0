"""The probe responder: a small process of the agent's that answers the cloud nodes' probes.

A late answer is a miss, and a few misses in a row fail the gateway over. The agent's own
process can be kept off the CPU for longer than that while its host is busy: in the lab, 0.3 to
0.5 s while another gateway on the same two cores boots, with every thread of the agent idle
and the probes queued at its socket. So the answers come from a process that does nothing
else, at a higher CPU priority (nice `URGENT_NICE`, which needs CAP_SYS_NICE; without it,
the agent's own priority).

- The agent binds the probe socket and passes it to the process with one end of a socket pair.
- The agent says what it serves (`ResponderState`) over the pair whenever that changes.
- The process sends back each node's latest demand with the time its probe arrived, so the
  agent decides on when the probes came, not on when it got to read them. While the agent
  does not read, demands wait in the process, the latest per node: it never waits for the
  agent.
- When what is served changes, it answers each node's latest probe again at once: a node that
  waits for a gateway to serve a policy (a handover) learns it then, not at its next probe.
- It fences the gateway (`Fence`): when no probe came for the hold time, it removes the
  provisioned egress IPs itself and tells the agent (`Fenced`). The agent's keeper does the
  same, but its thread shares the agent's interpreter with the others and was seen kept off
  the CPU for 0.6 s; a late fence keeps the address from the standby the nodes moved to.
- It exits when the agent's end closes (the agent stopped, or died); the agent starts it again
  if it dies.

Run as `python -m gatewayd.agent.responder GATEWAY PROBE_FD AGENT_FD HOLD_SECONDS
[INTERFACE ...]` (the egress IP pools' interfaces; none: no fence).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import subprocess
import sys
import time
from collections.abc import Collection
from ipaddress import IPv4Address
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from gatewayd.dataplane.addresses import AddressDriver
from gatewayd.dataplane.priority import raise_priority
from gatewayd.dataplane.probe import RECEIVE_BYTES, udp_socket
from gatewayd.probe import (
    LOCAL_LIMITS,
    Demand,
    Fenced,
    ProbeFormatError,
    ResponderState,
    answer_probe,
    decode_from_responder,
    decode_responder_state,
    encode_demand,
    encode_fenced,
    encode_responder_state,
)

log = logging.getLogger("gatewayd.agent")

RESTART_AFTER_SECONDS = 1.0  # a responder that dies at once is not started in a tight loop
PAIR_MESSAGE_BYTES = LOCAL_LIMITS.max_bytes
# A node's latest probe is answered again on a change for this long after it came.
ANSWER_AGAIN_SECONDS = 2.0
# A step timed for a moment (a fence, a claim tried again) runs this much after it: at the
# very moment a probe still counts as recent, and a retry is not due yet.
ON_TIME = 0.001


class ProbeResponder:
    """The agent's side: starts the process, tells it what is served, takes the demands.
    Used from one thread (the egress IP keeper's) after `start`. With `fence_interfaces`, the
    process fences the gateway when no probe came for `hold_seconds`."""

    def __init__(self, gateway: str, address: IPv4Address, port: int,
                 hold_seconds: float = 0.0, fence_interfaces: Collection[str] = ()) -> None:
        self.gateway = gateway
        self.hold_seconds = hold_seconds
        self.fence_interfaces = tuple(sorted(set(fence_interfaces)))
        self._probes = udp_socket(address, port)
        self._state = ResponderState()
        self._state_sent = False
        self._pair: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._died_at = 0.0
        self._unsendable: ResponderState | None = None  # logged once

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            fds = (self._probes.fileno(), theirs.fileno())
            self._process = subprocess.Popen(
                [sys.executable, "-m", "gatewayd.agent.responder", self.gateway,
                 *map(str, fds), repr(self.hold_seconds), *self.fence_interfaces],
                pass_fds=fds, stdin=subprocess.DEVNULL)
        ours.setblocking(False)
        self._pair = ours
        self._state_sent = False
        self._send_state()
        raise_priority(self._process.pid, "the probe responder")

    def stop(self) -> None:
        if self._pair is not None:
            self._pair.close()  # the process exits on the closed pair
            self._pair = None
        if self._process is not None:
            try:
                self._process.wait(2)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._probes.close()

    @property
    def running(self) -> bool:
        return self._pair is not None

    def fileno(self) -> int:
        """Readable when messages came (or the process died): then call `messages`."""
        assert self._pair is not None
        return self._pair.fileno()

    def set_state(self, state: ResponderState) -> None:
        if state != self._state:
            self._state, self._state_sent = state, False
        self._send_state()

    def messages(self) -> list[Demand | Fenced]:
        """The demands and fences that came since the last call (it does not wait). A process
        that died is started again, at most once per `RESTART_AFTER_SECONDS`."""
        if self._pair is None:
            self._restart()
            return []
        received = []
        while True:
            try:
                message = self._pair.recv(PAIR_MESSAGE_BYTES)
            except BlockingIOError:
                break
            except ConnectionResetError:  # it died with our state unread
                message = b""
            if not message:
                self._ended()
                break
            try:
                received.append(decode_from_responder(message))
            except ProbeFormatError as exc:
                log.error("probe responder: %s", exc)
        self._send_state()
        return received

    def _send_state(self) -> None:
        if self._state_sent or self._pair is None:
            return
        try:
            self._pair.send(encode_responder_state(self._state))
            self._state_sent = True
        except ProbeFormatError as exc:  # the answers go on with the last state sent
            self._state_sent = True
            if self._unsendable != self._state:
                self._unsendable = self._state
                log.error("the probe responder cannot be told what is served: %s", exc)
        except BlockingIOError:  # the process is behind: sent at the next call
            pass
        except OSError:  # it died: `demands` sees the end
            pass

    def _ended(self) -> None:
        assert self._pair is not None and self._process is not None
        self._pair.close()
        self._pair = None
        code = self._process.wait()
        self._died_at = time.monotonic()
        log.error("the probe responder exited (%s); starting it again", code)

    def _restart(self) -> None:
        if time.monotonic() - self._died_at >= RESTART_AFTER_SECONDS:
            self.start()


class Fence:
    """Removes the owned addresses on `interfaces` once no probe came for `hold_seconds`,
    once per silence: the rule of `gatewayd.probe.egress_ips_to_hold` with no recent probe.
    Armed by the first probe, as the agent keeps what it holds until the first probes say."""

    def __init__(self, hold_seconds: float, interfaces: Collection[str]) -> None:
        self.hold_seconds = hold_seconds
        self.interfaces = frozenset(interfaces)
        self._newest: float | None = None  # the latest probe since the last fence
        self._addresses = AddressDriver()

    def heard(self, at: float) -> None:
        self._newest = at

    def seconds_left(self, now: float) -> float | None:
        """How long until the fence is due; None when it is not armed."""
        if not self.interfaces or self._newest is None:
            return None
        return max(self._newest + self.hold_seconds + ON_TIME - now, 0.0)

    def run_if_due(self, now: float) -> Fenced | None:
        """Fence when it is time; what was removed, if anything was."""
        if self.seconds_left(now) != 0.0:  # not armed, or not yet
            return None
        self._newest = None
        try:
            removed = self._addresses.remove_all(self.interfaces).removed
        except (OSError, NetlinkError) as exc:  # the agent's keeper fences too
            log.error("probe responder: fencing failed: %s", exc)
            return None
        return Fenced(now, removed) if removed else None


def serve(gateway: str, probes: socket.socket, agent: socket.socket, fence: Fence) -> None:
    """Answer probes until the agent's end of the pair closes."""
    probes.setblocking(False)
    agent.setblocking(False)
    state = ResponderState()  # nothing is served until the agent says so
    pending: dict[str, Demand] = {}  # the latest demand per node, not yet taken by the agent
    fences: list[Fenced] = []  # not yet taken by the agent
    asked: dict[str, tuple[bytes, Any, float]] = {}  # node -> its latest probe, from, when
    while True:
        readable, _, _ = select.select([probes, agent], [agent] if pending or fences else [],
                                       [], fence.seconds_left(time.monotonic()))
        if agent in readable:
            before = state
            while True:
                try:
                    message = agent.recv(PAIR_MESSAGE_BYTES)
                except BlockingIOError:
                    break
                if not message:
                    return
                state = decode_responder_state(message)
            if state != before:
                answer_again(probes, gateway, state, asked, time.monotonic())
        if probes in readable:
            while True:
                try:
                    data, peer = probes.recvfrom(RECEIVE_BYTES)
                except BlockingIOError:
                    break
                except OSError:  # an ICMP error reported on the socket
                    continue
                try:
                    demand, reply = answer_probe(data, gateway, state, time.monotonic())
                except ProbeFormatError:
                    continue
                with contextlib.suppress(OSError):  # no route back now: a miss there
                    probes.sendto(reply, peer)
                pending[demand.node] = demand
                asked[demand.node] = (data, peer, demand.received_at)
                fence.heard(demand.received_at)
        if fenced := fence.run_if_due(time.monotonic()):
            fences.append(fenced)
        while fences:
            try:
                agent.send(encode_fenced(fences[0]))
            except BlockingIOError:
                break
            fences.pop(0)
        for node in list(pending):
            try:
                agent.send(encode_demand(pending[node]))
            except BlockingIOError:
                break
            del pending[node]


def answer_again(probes: socket.socket, gateway: str, state: ResponderState,
                 asked: dict[str, tuple[bytes, Any, float]], now: float) -> None:
    for node, (data, peer, at) in list(asked.items()):
        if now - at > ANSWER_AGAIN_SECONDS:
            del asked[node]
            continue
        _, reply = answer_probe(data, gateway, state, at)
        with contextlib.suppress(OSError):
            probes.sendto(reply, peer)


def main(argv: list[str]) -> int:
    gateway, probe_fd, agent_fd, hold_seconds, *interfaces = argv
    probes = socket.socket(fileno=int(probe_fd))
    agent = socket.socket(fileno=int(agent_fd))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the agent is gone
        serve(gateway, probes, agent, Fence(float(hold_seconds), interfaces))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
