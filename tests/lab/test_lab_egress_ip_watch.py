"""The lab's egress IP watch, on which every "never on two gateways" assertion rests: it must
see two holders at once, and only on uplinks that are up."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from gatewayd.lab.kubelab import EgressIPWatch
from gatewayd.lab.netns import Sandbox, run, wait_for

pytestmark = pytest.mark.lab

EGRESS_IP = "198.51.100.70"


@pytest.fixture
def gateways() -> Iterator[dict[str, str]]:
    """Two namespaces whose uplinks (eth0) face each other."""
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"ipw{secrets.token_hex(2)}-") as box:
        one, two = box.netns("gw1"), box.netns("gw2")
        box.veth(one, "eth0", two, "eth0")
        for netns in (one, two):
            run(["ip", "link", "set", "eth0", "up"], netns)
        yield {"gw1": one, "gw2": two}


def address(netns: str, verb: str) -> None:
    run(["ip", "addr", verb, f"{EGRESS_IP}/32", "dev", "eth0"], netns)


def test_an_address_on_two_live_uplinks_is_caught_and_a_down_uplink_holds_nothing(
        gateways: dict[str, str]) -> None:
    with EgressIPWatch([EGRESS_IP], gateways) as watch:
        address(gateways["gw1"], "add")
        wait_for(lambda: watch.holders()[EGRESS_IP] == {"gw1"}, 5, "gw1 to hold the address")
        assert watch.overlaps == []
        address(gateways["gw2"], "add")
        wait_for(lambda: bool(watch.overlaps), 5, "the overlap to be caught")
        assert watch.overlaps[0][1:] == (EGRESS_IP, ("gw1", "gw2"))

        address(gateways["gw2"], "del")
        run(["ip", "link", "set", "eth0", "down"], gateways["gw1"])
        caught, checks = len(watch.overlaps), watch.checks
        address(gateways["gw2"], "add")  # gw1's uplink is down: the segment cannot hear it
        wait_for(lambda: watch.checks > checks, 5, "a check after gw2 added the address")
        assert watch.holders()[EGRESS_IP] == {"gw2"} and len(watch.overlaps) == caught
