"""Looking into the lab's hosts from outside, the way an operator would check them.

Used by the lab tests and the lab benchmark: nftables tables and counters, addresses,
WireGuard peers, and a long-lived TCP connection held from inside a pod.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import nftables

from gatewayd.agent.footprint import GatewayFootprint
from gatewayd.lab.netns import entered, run

GATEWAY_TABLE = GatewayFootprint.table


class NftReader:
    """The libnftables binding bound to one namespace: one read costs no process start."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        with entered(netns):
            self._nft = nftables.Nftables()
        self._nft.set_json_output(True)

    def table(self, family: str, name: str) -> list[dict[str, Any]] | None:
        """The table's objects (`nft -j list table`), or None when it does not exist."""
        with entered(self.netns):
            rc, output, _ = self._nft.cmd(f"list table {family} {name}")
        if rc != 0:
            return None
        objects: list[dict[str, Any]] = json.loads(output)["nftables"]
        return objects


def nft_table(netns: str, family: str, name: str) -> list[dict[str, Any]] | None:
    """`nft -j list table FAMILY NAME` in `netns`; None when the table does not exist."""
    proc = run(["nft", "-j", "list", "table", family, name], netns, check=False)
    if proc.returncode != 0:
        return None
    objects: list[dict[str, Any]] = json.loads(proc.stdout)["nftables"]
    return objects


def drop_counters(objects: list[dict[str, Any]]) -> dict[str, int]:
    """Packets counted by each counter of a rule that drops: named counters by name,
    anonymous ones as `rule HANDLE`."""
    named = {o["counter"]["name"]: o["counter"]["packets"] for o in objects if "counter" in o}
    counted: dict[str, int] = {}
    for obj in objects:
        rule = obj.get("rule", {})
        expressions = rule.get("expr", [])
        if not any("drop" in e for e in expressions):
            continue
        for expression in expressions:
            counter = expression.get("counter")
            if isinstance(counter, str):
                counted[counter] = named.get(counter, 0)
            elif isinstance(counter, dict):
                counted[f"rule {rule.get('handle')}"] = counter.get("packets", 0)
    return counted


def set_addresses(objects: list[dict[str, Any]]) -> Iterator[str]:
    """Every address or network element of every set and map in the table, as text."""
    for obj in objects:
        body = obj.get("set") or obj.get("map")
        for element in (body or {}).get("elem", []):
            yield from _element_texts(element)


def _element_texts(element: Any) -> Iterator[str]:
    if isinstance(element, str):
        yield element
    elif isinstance(element, dict):
        if "prefix" in element:
            yield f"{element['prefix']['addr']}/{element['prefix']['len']}"
        elif "range" in element:
            first, last = element["range"]
            yield f"{first}-{last}"
        elif "elem" in element:
            yield from _element_texts(element["elem"]["val"])
        elif "concat" in element:
            for part in element["concat"]:
                yield from _element_texts(part)
    elif isinstance(element, list):  # a map entry: [key, value]
        yield from _element_texts(element[0])


def covers(texts: Iterator[str], address: str) -> bool:
    """Whether one of the element texts (address, prefix or range) contains `address`."""
    wanted = ip_address(address)
    for text in texts:
        try:
            if "-" in text:
                first, last = (ip_address(t) for t in text.split("-"))
                if first.version == wanted.version and int(first) <= int(wanted) <= int(last):
                    return True
            elif wanted in ip_network(text, strict=False):
                return True
        except ValueError:
            continue  # a port, an interface name, a mark: not an address
    return False


def has_address(netns: str, device: str, address: str) -> bool:
    proc = run(["ip", "-j", "addr", "show", "dev", device], netns)
    return any(
        info["local"] == address
        for link in json.loads(proc.stdout)
        for info in link.get("addr_info", [])
    )


def wireguard_peers(netns: str, interface: str) -> set[str]:
    return set(run(["wg", "show", interface, "peers"], netns).stdout.split())


class LineConnection:
    """A TCP connection opened from inside `netns` to a line-echo server, used from here."""

    def __init__(self, netns: str, host: str, port: int, timeout: float = 10) -> None:
        # A socket belongs to the namespace it was created in, wherever it is used later.
        with entered(netns):
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self._lines = self.sock.makefile("rb")

    def exchange(self, line: str) -> tuple[str, str]:
        """Send one line; return (source address the server saw, the line echoed back)."""
        self.sock.sendall(line.encode() + b"\n")
        reply = self._lines.readline().decode().rstrip("\n")
        if not reply:
            raise ConnectionError("the server closed the connection")
        source, _, echoed = reply.partition(" ")
        return source, echoed

    def close(self) -> None:
        self._lines.close()
        self.sock.close()

    def __enter__(self) -> LineConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
