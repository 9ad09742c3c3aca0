"""Sockets of the fast failover path: UDP probes through the tunnels, and an ARP watcher.

Bytes in, bytes out: the message format and what the probes decide are in `gatewayd.probe`.

- `udp_socket` (gateway): the socket the agent's responder process answers probes on
  (`gatewayd.agent.responder`).
- `ProbeSockets` (cloud node): one UDP socket per gateway, bound to the node's tunnel address
  and marked with the gateway's fwmark (SO_MARK, CAP_NET_ADMIN), so policy routing sends each
  probe into that gateway's tunnel.
- `ClaimWatcher` (gateway): reports ARP packets and neighbour advertisements from other hosts
  that claim one of the watched addresses (a gratuitous ARP or an unsolicited neighbour
  advertisement after another gateway took an egress IP, or its answers).

Sockets bind with IP_FREEBIND: the tunnel address may not exist yet (or for a moment not at
all, while an interface is re-created), and a bound socket keeps working once it does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address

from gatewayd.dataplane.announce import (
    ETH_P_ARP,
    claimed_in,
    format_mac,
    neighbour_socket,
    packet_socket,
)
from gatewayd.policy.model import IPAddress

log = logging.getLogger(__name__)

IP_FREEBIND = 15  # <linux/in.h>; not exported by every Python build
RECEIVE_BYTES = 65535


def udp_socket(address: IPv4Address, port: int, mark: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.bind((str(address), port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class ProbeTarget:
    """Where one gateway's probes go, and the fwmark that routes them into its tunnel."""

    gateway: str
    mark: int
    destination: IPv4Address
    port: int


class ProbeSockets:
    """One socket per gateway, all bound to `source` (the node's tunnel address)."""

    def __init__(self, source: IPv4Address) -> None:
        self.source = source
        self._sockets: dict[str, tuple[ProbeTarget, socket.socket]] = {}

    def update(self, targets: Collection[ProbeTarget]) -> None:
        """Open sockets for new targets, close those of targets that went or changed."""
        wanted = {t.gateway: t for t in targets}
        for gateway, (target, sock) in list(self._sockets.items()):
            if wanted.get(gateway) != target:
                sock.close()
                del self._sockets[gateway]
        for gateway, target in wanted.items():
            if gateway not in self._sockets:
                self._sockets[gateway] = (target, udp_socket(self.source, 0, target.mark))

    @property
    def gateways(self) -> tuple[str, ...]:
        return tuple(sorted(self._sockets))

    def send(self, messages: Mapping[str, bytes]) -> None:
        """Send each gateway its message; a send that fails now is simply a missed probe."""
        for gateway, data in messages.items():
            entry = self._sockets.get(gateway)
            if entry is None:
                continue
            target, sock = entry
            with contextlib.suppress(OSError):
                sock.sendto(data, (str(target.destination), target.port))

    def receive(
        self, timeout: float, wake: int | None = None
    ) -> tuple[list[tuple[str, bytes]], bool]:
        """Datagrams that arrive within `timeout` seconds (returns early when there are some),
        and whether the eventfd `wake` was written to meanwhile (it is read back to zero)."""
        by_socket = {sock: gateway for gateway, (_, sock) in self._sockets.items()}
        waiting: list[socket.socket | int] = [*by_socket, *([wake] if wake is not None else [])]
        if not waiting:
            return [], False
        ready = select.select(waiting, [], [], max(timeout, 0.0))[0]
        woken = False
        if wake is not None and wake in ready:
            woken = True
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(wake)
        received = []
        for sock in ready:
            if not isinstance(sock, socket.socket):
                continue
            while True:
                try:
                    data = sock.recv(RECEIVE_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # e.g. ICMP unreachable reported on the socket
                    break
                received.append((by_socket[sock], data))
        return received, woken

    def close(self) -> None:
        self.update(())


class ClaimWatcher:
    """Calls `claimed(address, interface, mac)` for every packet from another MAC that claims
    one of `addresses()` (read at each packet, so it follows the caller): an ARP packet whose
    sender address it is, or a neighbour advertisement for it."""

    def __init__(
        self,
        interfaces: Collection[str],
        addresses: Callable[[], Collection[IPAddress]],
        claimed: Callable[[IPAddress, str, str], None],
    ) -> None:
        self._interfaces = sorted(set(interfaces))
        self._addresses = addresses
        self._claimed = claimed
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(2)

    def _open(self) -> dict[socket.socket, tuple[str, bytes]]:
        """Two sockets per interface (ARP, neighbour discovery), or none when one fails."""
        opened: dict[socket.socket, tuple[str, bytes]] = {}
        for interface in self._interfaces:
            pair: list[socket.socket] = []
            try:
                pair.append(packet_socket(interface, ETH_P_ARP))
                pair.append(neighbour_socket(interface))
            except OSError as exc:
                log.warning("cannot watch ARP and neighbour discovery on %s (%s); retrying",
                            interface, exc)
                for sock in pair:
                    sock.close()
                continue
            mac = bytes(pair[0].getsockname()[4])
            opened.update({sock: (interface, mac) for sock in pair})
        return opened

    def _run(self) -> None:
        sockets: dict[socket.socket, tuple[str, bytes]] = {}
        try:
            while not self._stopping.is_set():
                if len(sockets) < 2 * len(self._interfaces):
                    for sock in sockets:
                        sock.close()
                    sockets = self._open()
                    if len(sockets) < 2 * len(self._interfaces):
                        self._stopping.wait(1.0)
                        continue
                try:
                    ready = select.select(list(sockets), [], [], 0.2)[0]
                except OSError:
                    ready = []
                for sock in ready:
                    interface, mac = sockets[sock]
                    try:
                        frame = sock.recv(2048)
                    except OSError:  # the interface went away: open again
                        sock.close()
                        del sockets[sock]
                        continue
                    self._handle(frame, interface, mac)
        finally:
            for sock in sockets:
                sock.close()

    def _handle(self, frame: bytes, interface: str, own_mac: bytes) -> None:
        # Another host probing for a held address is no claim: the kernel answers it.
        claim = claimed_in(frame, own_mac, probes=False)
        if claim is not None and claim[0] in self._addresses():
            self._claimed(claim[0], interface, format_mac(claim[1]))
