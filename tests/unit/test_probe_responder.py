"""The agent's probe responder process (gatewayd/agent/responder.py), on the loopback: it
answers what the agent says is served, passes the demands back with their arrival times,
answers while the agent reads nothing, and lives exactly as long as the agent's end."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from gatewayd.agent.responder import ProbeResponder
from gatewayd.dataplane.priority import URGENT_NICE
from gatewayd.lab.netns import wait_for
from gatewayd.probe import (
    Demand,
    ProbeReply,
    ProbeRequest,
    ResponderState,
    decode_reply,
    encode_request,
)

pytestmark = pytest.mark.unit

LOOPBACK = IPv4Address("127.0.0.1")
TIMEOUT = 10.0


def children() -> set[int]:
    pid = os.getpid()
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


@pytest.fixture
def node() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((str(LOOPBACK), 0))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


@pytest.fixture
def responder() -> Iterator[tuple[ProbeResponder, int, int]]:
    """A started responder, its port and its process."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free:
        free.bind((str(LOOPBACK), 0))
        port = free.getsockname()[1]
    before = children()
    responder = ProbeResponder("gw1", LOOPBACK, port)
    responder.start()
    (pid,) = children() - before
    yield responder, port, pid
    responder.stop()


def ask(node: socket.socket, port: int, request: ProbeRequest) -> ProbeReply:
    node.sendto(encode_request(request), (str(LOOPBACK), port))
    return decode_reply(node.recv(65535))


def drain(node: socket.socket) -> None:
    node.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            node.recv(65535)
    node.settimeout(TIMEOUT)


def demands_of(responder: ProbeResponder) -> list[Demand]:
    return [m for m in responder.messages() if isinstance(m, Demand)]


def demands_until(responder: ProbeResponder, count: int) -> list[Demand]:
    taken: list[Demand] = []

    def enough() -> bool:
        taken.extend(demands_of(responder))
        return len(taken) >= count

    wait_for(enough, TIMEOUT, f"{count} demands from the responder", interval=0.01)
    return taken


def test_it_answers_what_is_served_and_passes_the_demand_on(
    responder: tuple[ProbeResponder, int, int], node: socket.socket,
) -> None:
    agent, port, _ = responder
    assert ask(node, port, ProbeRequest("node1", 1, frozenset({"pay"}))).serving == frozenset()
    agent.set_state(ResponderState(frozenset({"pay", "reports"})))
    sent = time.monotonic()

    def served() -> bool:
        return ask(node, port, ProbeRequest("node1", 2, frozenset({"pay"}),
                                            frozenset({"all"}))).serving == {"pay"}

    wait_for(served, TIMEOUT, "the responder to serve pay", interval=0.01)
    taken = demands_until(agent, 2)
    assert taken[-1].node == "node1"
    assert (taken[-1].here, taken[-1].away) == ({"pay"}, {"all"})
    assert sent <= taken[-1].received_at <= time.monotonic()


def test_a_change_of_what_is_served_answers_each_nodes_latest_probe_again(
    responder: tuple[ProbeResponder, int, int], node: socket.socket,
) -> None:
    agent, port, _ = responder
    assert ask(node, port, ProbeRequest("node1", 7, frozenset({"pay"}))).serving == frozenset()
    agent.set_state(ResponderState(frozenset({"pay"})))
    # No probe sent meanwhile: the node that waits for "pay" hears of it at once.
    assert decode_reply(node.recv(65535)) == ProbeReply("gw1", 7, frozenset({"pay"}))


def test_it_answers_while_the_agent_reads_nothing_and_keeps_each_nodes_latest(
    responder: tuple[ProbeResponder, int, int], node: socket.socket,
) -> None:
    agent, port, _ = responder
    agent.set_state(ResponderState(frozenset({"pay"})))
    wait_for(lambda: ask(node, port, ProbeRequest("node1", 0, frozenset({"pay"}))).serving
             == {"pay"}, TIMEOUT, "the state to arrive", interval=0.01)
    drain(node)  # answers again to the probes before the state came (see below)
    agent.messages()
    # Far more demands than the socket pair holds, none taken meanwhile.
    for sequence in range(1, 3001):
        name = f"node{sequence % 3}"
        assert ask(node, port, ProbeRequest(name, sequence, frozenset({name}))).sequence == (
            sequence)
    taken = demands_of(agent)
    latest = {d.node: d for d in taken}
    assert {n: d.here for n, d in latest.items()} == {
        f"node{i}": {f"node{i}"} for i in range(3)}
    assert len(taken) < 3000  # some waited, coalesced, in the process


def test_a_leaving_gateway_answers_so_and_still_passes_demands_on(
    responder: tuple[ProbeResponder, int, int], node: socket.socket,
) -> None:
    agent, port, _ = responder
    agent.set_state(ResponderState(frozenset({"pay"}), leaving=True))
    node.settimeout(5)
    taken: list[Demand] = []
    for sequence in range(5):
        node.sendto(encode_request(ProbeRequest("node1", sequence, frozenset({"pay"}))),
                    (str(LOOPBACK), port))
        assert decode_reply(node.recv(65535)) == ProbeReply(
            "gw1", sequence, frozenset({"pay"}), leaving=True)
        taken += demands_of(agent)
    assert taken and {d.node for d in taken} == {"node1"}


def test_it_runs_at_a_higher_priority_and_ends_with_the_agent(
    responder: tuple[ProbeResponder, int, int],
) -> None:
    agent, _, pid = responder
    if os.geteuid() == 0:
        assert os.getpriority(os.PRIO_PROCESS, pid) == URGENT_NICE
    agent.stop()
    assert pid not in children()


def test_a_responder_that_died_is_started_again(
    responder: tuple[ProbeResponder, int, int], node: socket.socket,
) -> None:
    agent, port, pid = responder
    agent.set_state(ResponderState(frozenset({"pay"})))
    before = children() - {pid}
    os.kill(pid, 9)
    wait_for(lambda: not agent.messages() and not agent.running, TIMEOUT,
             "the agent to see the responder's end")
    wait_for(lambda: not agent.messages() and agent.running, TIMEOUT,
             "the responder to be started again")
    assert len(children() - before) == 1
    reply = ask(node, port, ProbeRequest("node1", 1, frozenset({"pay"})))
    assert reply.serving == {"pay"}  # the new process was told the state
