"""The probe responder fences the gateway by itself (gatewayd/agent/responder.py): when no
probe came for the hold time, it removes the owned egress IPs on the pools' interfaces, even
while the agent reads nothing (its keeper thread kept off the CPU), and tells the agent."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gatewayd.agent.responder import ProbeResponder
from gatewayd.dataplane.addresses import AddressDriver
from gatewayd.lab.netns import Sandbox, entered, run, wait_for
from gatewayd.probe import Fenced, ProbeRequest, decode_reply, encode_request

pytestmark = pytest.mark.lab

ip = ipaddress.ip_address
GATEWAY, NODE = ip("192.0.2.1"), ip("192.0.2.2")
EGRESS_V4, EGRESS_V6 = ip("192.0.2.10"), ip("2001:db8::10")
OTHER_POOL = ip("198.51.100.10")  # owned, on an interface of no pool here
PORT = 4790
HOLD_SECONDS = 0.2
TIMEOUT = 10.0


@dataclass(frozen=True)
class Segment:
    gateway: str  # interfaces "upl" (the pool's) and "other"
    node: str  # interface "pl"


@pytest.fixture
def segment() -> Iterator[Segment]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"fence{secrets.token_hex(2)}-") as box:
        gateway, node = box.netns("gw"), box.netns("node")
        box.veth(gateway, "upl", node, "pl")
        box.veth(gateway, "other", node, "pl2")
        run(["ip", "addr", "add", f"{GATEWAY}/24", "dev", "upl"], gateway)
        run(["ip", "addr", "add", f"{NODE}/24", "dev", "pl"], node)
        yield Segment(gateway, node)


def addresses_on(netns: str, interface: str) -> str:
    return run(["ip", "addr", "show", "dev", interface], netns).stdout


def test_a_gateway_no_probe_reaches_gives_its_egress_ips_up_while_the_agent_reads_nothing(
    segment: Segment,
) -> None:
    with entered(segment.gateway):
        driver = AddressDriver(probe_seconds=0)
        driver.ensure("upl", {EGRESS_V4, EGRESS_V6})
        driver.ensure("other", {OTHER_POOL})
        responder = ProbeResponder("gw1", GATEWAY, PORT, hold_seconds=HOLD_SECONDS,
                                   fence_interfaces={"upl"})
        responder.start()  # its process lives in the gateway's namespace
    try:
        with entered(segment.node):
            node = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with node:
            node.settimeout(TIMEOUT)
            node.bind((str(NODE), 0))
            # One probe arms the fence; an answer says the process runs.
            node.sendto(encode_request(ProbeRequest("node1", 1, frozenset({"pay"}))),
                        (str(GATEWAY), PORT))
            assert decode_reply(node.recv(65535)).sequence == 1

        # Nothing reads the responder's messages meanwhile: the agent is as good as stopped.
        wait_for(lambda: str(EGRESS_V4) not in addresses_on(segment.gateway, "upl"),
                 TIMEOUT, "the responder to fence the gateway", interval=0.01)
        left = addresses_on(segment.gateway, "upl")
        assert str(EGRESS_V6) not in left
        assert f"{GATEWAY}/24" in left  # not gatewayd's: never removed
        assert str(OTHER_POOL) in addresses_on(segment.gateway, "other")  # no pool there

        fenced = [m for m in responder.messages() if isinstance(m, Fenced)]
        assert [set(f.removed) for f in fenced] == [{EGRESS_V4, EGRESS_V6}]
    finally:
        responder.stop()
