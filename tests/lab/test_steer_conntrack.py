"""steer's conntrack cleanup against a real conntrack table (a network namespace's)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from pyroute2 import Conntrack

from gatewayd.lab.netns import Sandbox, entered, run
from gatewayd.steer import conntrack as steer_conntrack

pytestmark = pytest.mark.lab

MARK, MASK = 0x20, 0xFF0


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"ct{secrets.token_hex(2)}-") as box:
        yield box.netns("node")


def unanswered(netns: str, port: int) -> list[str]:
    flow = ["-p", "tcp", "-s", "10.244.1.10", "-d", "198.51.100.10", "--sport", str(port),
            "--dport", "8080"]
    run(["conntrack", "-I", *flow, "--state", "SYN_SENT", "--timeout", "120",
         "--mark", str(MARK)], netns)
    return flow


def test_an_entry_that_ended_meanwhile_does_not_stop_the_others(
    netns: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Entries end between the dump and the delete (an answer, a timeout, another cleanup):
    the rest are still deleted."""
    first = unanswered(netns, 40001)
    unanswered(netns, 40002)
    delete = Conntrack.delete
    calls = []

    def ended_first(self: Conntrack, entry: object) -> object:
        if not calls:
            run(["conntrack", "-D", *first], netns)  # it ends just before we delete it
        calls.append(entry)
        return delete(self, entry)

    monkeypatch.setattr(Conntrack, "delete", ended_first)
    with entered(netns):
        assert steer_conntrack.forget_unanswered(MARK, MASK) == 1
    assert len(calls) == 2
    listed = run(["conntrack", "-L", "--mark", f"{MARK}/{MASK}"], netns, check=False)
    assert "40002" not in listed.stdout and "40001" not in listed.stdout
