"""The gateway never forwards without its filter, and forwarding does not cost the uplink its
IPv6 router advertisements.

`nft flush ruleset` on a gateway while a pod sends: no packet with a pod's address reaches
the on-prem side, and the agent puts the table back at once (nftables events, not the repair
timer). A table the kernel refuses: forwarding is switched off and reported, and comes back
on once the table is in place.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gatewayd.lab.netns import Sandbox, run, wait_for
from gatewayd.lab.observe import GATEWAY_TABLE, nft_table
from gatewayd.lab.topology import EXTERNAL, GATEWAYS, NODES, Lab, lab_prefix

pytestmark = pytest.mark.lab

ACTIVE = GATEWAYS[0]
NODE = NODES[0]
CHECKOUT = NODE.pods[0]
PAYMENT_GATEWAY = EXTERNAL.addresses[0]
EGRESS_IP = "198.51.100.70"  # payment-gateway's
PORT = 9999
WAIT = 30  # generous: every wait here is for a condition, never a timing target

# A new socket per datagram: each one is a new connection, so each gets its own NAT decision.
SENDER = """
import socket, sys, time
while True:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    s.close()
    time.sleep(0.002)
"""


def sysctl(name: str) -> str:
    return run(["sysctl", "-n", name], ACTIVE.netns).stdout.strip()


class TableEvents:
    """`nft monitor` in the gateway's namespace: when the table went and came back."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", ACTIVE.netns, "nft", "monitor", "tables"],
            stdout=subprocess.PIPE, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self.events.append((time.monotonic(), line.strip()))

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(5)
        self._thread.join(5)

    def gap(self) -> float | None:
        """Seconds from the table's deletion by the flush to its first re-creation."""
        table = " ".join(GATEWAY_TABLE)
        deleted = next((t for t, e in self.events if e == f"delete table {table}"), None)
        if deleted is None:
            return None
        return next((t - deleted for t, e in self.events
                     if t >= deleted and e == f"add table {table}"), None)


def test_a_flushed_ruleset_forwards_no_pod_packet(lab: Lab, tmp_path: Path) -> None:
    capture = tmp_path / "onprem.txt"

    def seen(source: str) -> int:
        return sum(f" IP {source}." in line for line in capture.read_text().splitlines())

    events = TableEvents()
    try:
        with Sandbox(lab_prefix() + "t") as sandbox:
            # On-prem: every datagram that reaches the payment gateway, with its source.
            sandbox.spawn(EXTERNAL.netns, ["tcpdump", "-n", "-l", "-i", "eth0",
                                           f"udp and dst port {PORT}"], log=capture)
            wait_for(lambda: "listening on" in capture.read_text(), WAIT, "tcpdump")
            sandbox.spawn(CHECKOUT.netns, [sys.executable, "-c", SENDER, PAYMENT_GATEWAY,
                                           str(PORT)])
            wait_for(lambda: seen(EGRESS_IP) > 50, WAIT, "SNATed datagrams on-prem")
            events.events.clear()

            run(["nft", "flush", "ruleset"], ACTIVE.netns)
            wait_for(lambda: nft_table(ACTIVE.netns, *GATEWAY_TABLE) is not None, WAIT,
                     "the agent to put its table back")
            after_repair = seen(EGRESS_IP)
            wait_for(lambda: seen(EGRESS_IP) > after_repair + 100, WAIT,
                     "SNATed datagrams again after the repair")
    finally:
        events.stop()
    gap = events.gap()
    assert gap is not None, events.events
    print(f"table back {gap * 1000:.1f} ms after nft flush ruleset")
    leaked = [line for line in capture.read_text().splitlines() if f" IP {CHECKOUT.address}."
              in line]
    assert leaked == [], f"{len(leaked)} datagrams left un-NATed, e.g. {leaked[:3]}"


def test_ipv6_forwarding_keeps_router_advertisements_on_the_uplink(lab: Lab) -> None:
    assert sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert sysctl("net.ipv6.conf.eth0.accept_ra") == "2"  # a fresh namespace has 1


def test_forwarding_is_off_while_the_table_cannot_be_installed(lab: Lab) -> None:
    """Another process owns a table of the same name (nftables' owner flag): the kernel
    refuses the agent's transaction, so the host must not forward at all."""
    lab.stop_daemon(ACTIVE.name)
    run(["nft", "delete", "table", *GATEWAY_TABLE], ACTIVE.netns)
    assert sysctl("net.ipv4.ip_forward") == "1"  # as the agent left it
    owner = subprocess.Popen(["ip", "netns", "exec", ACTIVE.netns, "nft", "-i"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert owner.stdin is not None
        owner.stdin.write(f"add table {' '.join(GATEWAY_TABLE)} {{ flags owner; }}\n")
        owner.stdin.flush()
        table = f"table {' '.join(GATEWAY_TABLE)}"  # nft 1.0.6 lists it as broken JSON
        wait_for(lambda: table in run(["nft", "list", "tables"], ACTIVE.netns).stdout, WAIT,
                 "the owned table")
        lab.start_daemon(ACTIVE.name)

        def forwarding_off_and_reported() -> bool:
            error = (lab.status(ACTIVE.name) or {}).get("lastError") or ""
            return sysctl("net.ipv4.ip_forward") == "0" and "forwarding: off" in error

        try:
            wait_for(forwarding_off_and_reported, WAIT, "forwarding off, reported")
        except TimeoutError as error:
            raise AssertionError(f"{error}: {lab.describe_daemon(ACTIVE.name)}") from None
        assert sysctl("net.ipv6.conf.all.forwarding") == "0"
    finally:
        owner.kill()  # the kernel removes an owned table with its owner
        owner.wait(5)
    started = time.time()
    try:
        wait_for(lambda: sysctl("net.ipv4.ip_forward") == "1", WAIT, "forwarding back on")
    except TimeoutError as error:
        tables = run(["nft", "list", "tables"], ACTIVE.netns).stdout
        log = lab.log_path(ACTIVE.name).read_text().splitlines()[-25:]
        raise AssertionError(f"{error} (tables now: {tables.strip()!r}): "
                             f"{lab.describe_daemon(ACTIVE.name)}; log:\n" + "\n".join(log)
                             ) from None
    lab.wait_ready([ACTIVE.name], since=started)
    assert nft_table(ACTIVE.netns, *GATEWAY_TABLE) is not None
