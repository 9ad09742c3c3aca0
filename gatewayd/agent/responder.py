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
- It exits when the agent's end closes (the agent stopped, or died); the agent starts it again
  if it dies.

Run as `python -m gatewayd.agent.responder GATEWAY PROBE_FD AGENT_FD`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address
from typing import Any

from gatewayd.dataplane.priority import raise_priority
from gatewayd.dataplane.probe import RECEIVE_BYTES, udp_socket
from gatewayd.probe import (
    LOCAL_LIMITS,
    Demand,
    ProbeFormatError,
    ResponderState,
    answer_probe,
    decode_demand,
    decode_responder_state,
    encode_demand,
    encode_responder_state,
)

log = logging.getLogger("gatewayd.agent")

RESTART_AFTER_SECONDS = 1.0  # a responder that dies at once is not started in a tight loop
PAIR_MESSAGE_BYTES = LOCAL_LIMITS.max_bytes
# A node's latest probe is answered again on a change for this long after it came.
ANSWER_AGAIN_SECONDS = 2.0


class ProbeResponder:
    """The agent's side: starts the process, tells it what is served, takes the demands.
    Used from one thread (the egress IP keeper's) after `start`."""

    def __init__(self, gateway: str, address: IPv4Address, port: int) -> None:
        self.gateway = gateway
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
                 *map(str, fds)], pass_fds=fds, stdin=subprocess.DEVNULL)
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
        """Readable when demands came (or the process died): then call `demands`."""
        assert self._pair is not None
        return self._pair.fileno()

    def set_state(self, state: ResponderState) -> None:
        if state != self._state:
            self._state, self._state_sent = state, False
        self._send_state()

    def demands(self) -> list[Demand]:
        """The demands that came since the last call (it does not wait). A process that died
        is started again, at most once per `RESTART_AFTER_SECONDS`."""
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
                received.append(decode_demand(message))
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


def serve(gateway: str, probes: socket.socket, agent: socket.socket) -> None:
    """Answer probes until the agent's end of the pair closes."""
    probes.setblocking(False)
    agent.setblocking(False)
    state = ResponderState()  # nothing is served until the agent says so
    pending: dict[str, Demand] = {}  # the latest demand per node, not yet taken by the agent
    asked: dict[str, tuple[bytes, Any, float]] = {}  # node -> its latest probe, from, when
    while True:
        readable, _, _ = select.select([probes, agent], [agent] if pending else [], [])
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
    gateway, probe_fd, agent_fd = argv
    probes = socket.socket(fileno=int(probe_fd))
    agent = socket.socket(fileno=int(agent_fd))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the agent is gone
        serve(gateway, probes, agent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
