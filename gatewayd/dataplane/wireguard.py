"""WireGuard interfaces through the `wg` tool: the kernel module where the kernel has it,
`wireguard-go` otherwise.

Peers are changed one by one with `wg set` (never `setconf`/replace_peers: replacing the peer
set drops every session, and traffic stops until the peers handshake again, ~15 s). A
`wireguard-go` interface is served by a daemonized process in its own session, so the tunnel
outlives the daemon that created it; deleting the link ends that process.

Private keys never appear in logs, errors or return values: `wg show dump` prints the
private key, and that column is dropped as soon as it is read.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from pyroute2 import IPRoute

from gatewayd.dataplane.durable import fsync_directory
from gatewayd.dataplane.netlink import OWNER_PROTOCOL, find_link
from gatewayd.dataplane.priority import urgent_children
from gatewayd.policy.model import IPNetwork

# WireGuard rejects a session 180 s after its handshake; a live peer re-handshakes before that.
PEER_UP_SECONDS = 180

_IFF_UP = 0x1
_MAIN_TABLE = 254


class WireGuardError(Exception):
    pass


@dataclass(frozen=True)
class Peer:
    public_key: str
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: str | None = None  # "host:port", "[v6]:port"
    persistent_keepalive: int | None = None  # seconds; None = off


@dataclass(frozen=True)
class WireGuardConfig:
    interface: str
    private_key_path: Path
    listen_port: int | None  # None: keep whatever port the interface has
    peers: tuple[Peer, ...]
    addresses: tuple[str, ...] = ()  # "10.255.0.1/24"
    mtu: int = 1420
    routes: tuple[IPNetwork, ...] = ()  # routed through the interface (main table)


@dataclass(frozen=True)
class PeerState:
    public_key: str
    endpoint: str | None
    allowed_ips: tuple[IPNetwork, ...]
    latest_handshake: int | None  # unix time; None = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None


@dataclass(frozen=True)
class WireGuardState:
    interface: str
    public_key: str | None  # None when no private key is set
    listen_port: int
    peers: tuple[PeerState, ...]
    mtu: int
    up: bool
    addresses: tuple[str, ...]  # without link-local ones
    routes: tuple[IPNetwork, ...]  # the routes we added through it


@dataclass(frozen=True)
class WireGuardChanges:
    created: bool = False
    private_key_set: bool = False
    listen_port_set: bool = False
    peers_added: tuple[str, ...] = ()  # public keys
    peers_updated: tuple[str, ...] = ()
    peers_removed: tuple[str, ...] = ()
    mtu_set: bool = False
    brought_up: bool = False
    addresses_added: tuple[str, ...] = ()
    addresses_removed: tuple[str, ...] = ()
    routes_added: tuple[str, ...] = ()
    routes_removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))


def generate_private_key(path: Path) -> str:
    """Create the private key file if it is missing (`wg genkey`, mode 0600, written
    atomically and durably); return the public key. An existing key must be private to
    this daemon's user (see `check_private_key_file`)."""
    if path.exists():
        check_private_key_file(path)
    else:
        key = _run(["wg", "genkey"]).strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(key + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
            fsync_directory(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise
    return public_key(path)


def check_private_key_file(path: Path) -> None:
    """Refuse a private key that others can read, or that belongs to another user than the
    one this daemon runs as (whoever owns it can replace it)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise WireGuardError(f"cannot read private key {path}: {exc.strerror or exc}") from exc
    if st.st_uid != os.geteuid():
        raise WireGuardError(
            f"private key {path} belongs to uid {st.st_uid}, not to this daemon's uid "
            f"{os.geteuid()}: run `chown {os.geteuid()} {path}` (or remove it for a new key)")
    if st.st_mode & 0o077:
        raise WireGuardError(
            f"private key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"run `chmod 600 {path}`, and replace the key if others may have read it")


def public_key(private_key_path: Path) -> str:
    try:
        private = private_key_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise WireGuardError(f"cannot read private key {private_key_path}: {exc}") from exc
    try:
        return _run(["wg", "pubkey"], stdin=private + "\n").strip()
    except WireGuardError as exc:
        raise WireGuardError(f"{private_key_path} does not hold a WireGuard private key") from exc


class WireGuardDriver:
    def __init__(self) -> None:
        self._kernel: bool | None = None  # does the kernel have WireGuard? Probed once.
        # Endpoint we last set per (interface, peer): a different endpoint in `wg show` then
        # means the peer roamed (NAT), which WireGuard handles; we do not force it back.
        self._endpoints: dict[tuple[str, str], str] = {}

    def ensure(self, config: WireGuardConfig) -> WireGuardChanges:
        """Create the interface if missing, then bring key, port, peers (one by one), MTU,
        link state, addresses and routes to `config`. Returns what changed."""
        keys = [p.public_key for p in config.peers]
        if len(set(keys)) != len(keys):
            raise ValueError(f"WireGuard {config.interface}: a peer is listed twice")
        created = False
        with IPRoute() as ipr:
            if find_link(ipr, config.interface) is None:
                self._create(config.interface)
                created = True
        state = self.observe(config.interface)
        if state is None:
            raise WireGuardError(f"WireGuard interface {config.interface} vanished after creation")

        args: list[str] = []
        key_set = state.public_key != public_key(config.private_key_path)
        if key_set:
            args += ["private-key", str(config.private_key_path)]
        port_set = config.listen_port is not None and state.listen_port != config.listen_port
        if port_set:
            args += ["listen-port", str(config.listen_port)]
        peer_args, added, updated, removed = self._peer_changes(config, state)
        if args or peer_args:
            _run(["wg", "set", config.interface, *args, *peer_args])

        with IPRoute() as ipr:
            link_changes = _ensure_link(ipr, config)
        return replace(
            link_changes, created=created, private_key_set=key_set, listen_port_set=port_set,
            peers_added=added, peers_updated=updated, peers_removed=removed,
        )

    def observe(self, interface: str) -> WireGuardState | None:
        with IPRoute() as ipr:
            link = find_link(ipr, interface)
            if link is None:
                return None
            addresses = _addresses(ipr, link["index"])
            routes = _routes(ipr, link["index"])
        lines = _run(["wg", "show", interface, "dump"]).splitlines()
        if not lines:
            raise WireGuardError(f"wg show {interface} dump printed nothing")
        # Columns: private key (dropped here, never kept), public key, port, fwmark.
        _, own_public, port, _fwmark = lines[0].split("\t")
        return WireGuardState(
            interface=interface,
            public_key=None if own_public == "(none)" else own_public,
            listen_port=int(port),
            peers=tuple(_peer_state(line) for line in lines[1:]),
            mtu=link.get("IFLA_MTU"),
            up=bool(link["flags"] & _IFF_UP),
            addresses=tuple(sorted(addresses)),
            routes=tuple(sorted(routes, key=str)),
        )

    def delete(self, interface: str) -> bool:
        """Remove the interface (a wireguard-go process exits with it). False if absent."""
        with IPRoute() as ipr:
            link = find_link(ipr, interface)
            if link is None:
                return False
            ipr.link("del", index=link["index"])
        self._endpoints = {k: v for k, v in self._endpoints.items() if k[0] != interface}
        return True

    # --- internals ----------------------------------------------------------------------------

    def _peer_changes(
        self, config: WireGuardConfig, state: WireGuardState
    ) -> tuple[list[str], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        have = {p.public_key: p for p in state.peers}
        args: list[str] = []
        added: list[str] = []
        updated: list[str] = []
        for peer in sorted(config.peers, key=lambda p: p.public_key):
            current = have.get(peer.public_key)
            settings: list[str] = []
            if current is None or set(current.allowed_ips) != set(peer.allowed_ips):
                settings += ["allowed-ips", ",".join(str(n) for n in peer.allowed_ips)]
            if current is None or (current.persistent_keepalive or 0) != (
                peer.persistent_keepalive or 0
            ):
                settings += ["persistent-keepalive", str(peer.persistent_keepalive or "off")]
            remembered = (config.interface, peer.public_key)
            if peer.endpoint is not None and (current is None or (
                current.endpoint != peer.endpoint
                and self._endpoints.get(remembered) != peer.endpoint
            )):
                settings += ["endpoint", peer.endpoint]
                self._endpoints[remembered] = peer.endpoint
            if settings:
                args += ["peer", peer.public_key, *settings]
                (added if current is None else updated).append(peer.public_key)
        removed = sorted(set(have) - {p.public_key for p in config.peers})
        for key in removed:
            args += ["peer", key, "remove"]
            self._endpoints.pop((config.interface, key), None)
        return args, tuple(added), tuple(updated), tuple(removed)

    def _create(self, interface: str) -> None:
        if self._kernel_supported():
            _run(["ip", "link", "add", interface, "type", "wireguard"])
            return
        env = {k: v for k, v in os.environ.items()
               if k not in ("WG_PROCESS_FOREGROUND", "LOG_LEVEL")}
        # It daemonizes itself; without LOG_LEVEL the daemon does not inherit our pipes.
        # A session of its own keeps it alive when the caller's process group is signalled.
        # It carries the fast failover's probes: a tunnel process kept off the CPU is a gap
        # in them (the kernel's WireGuard runs in softirq, ahead of every process).
        with urgent_children(f"wireguard-go {interface}"):
            proc = subprocess.run(
                ["wireguard-go", interface], env=env, capture_output=True, text=True,
                start_new_session=True, timeout=30,
            )
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise WireGuardError(
                f"wireguard-go {interface} failed (exit {proc.returncode}): "
                f"{detail[-1] if detail else 'no output'}"
            )

    def _kernel_supported(self) -> bool:
        if self._kernel is None:
            probe = f"gwdprobe{os.getpid() % 1000000}"
            result = subprocess.run(
                ["ip", "link", "add", probe, "type", "wireguard"], capture_output=True
            )
            self._kernel = result.returncode == 0
            if self._kernel:
                subprocess.run(["ip", "link", "del", probe], capture_output=True)
        return self._kernel


def _peer_state(line: str) -> PeerState:
    key, _preshared, endpoint, allowed, handshake, rx, tx, keepalive = line.split("\t")
    return PeerState(
        public_key=key,
        endpoint=None if endpoint == "(none)" else endpoint,
        allowed_ips=tuple(
            ipaddress.ip_network(n) for n in allowed.split(",") if n and n != "(none)"
        ),
        latest_handshake=int(handshake) or None,
        rx_bytes=int(rx),
        tx_bytes=int(tx),
        persistent_keepalive=None if keepalive == "off" else int(keepalive),
    )


def _ensure_link(ipr: IPRoute, config: WireGuardConfig) -> WireGuardChanges:
    """MTU, link state, addresses, routes; the returned changes hold only those."""
    link = find_link(ipr, config.interface)
    if link is None:
        raise WireGuardError(f"WireGuard interface {config.interface} vanished")
    index = link["index"]
    mtu_set = link.get("IFLA_MTU") != config.mtu
    if mtu_set:
        ipr.link("set", index=index, mtu=config.mtu)
    brought_up = not link["flags"] & _IFF_UP
    if brought_up:
        ipr.link("set", index=index, state="up")

    wanted = {str(ipaddress.ip_interface(a)) for a in config.addresses}
    present = _addresses(ipr, index)
    for address in sorted(wanted - present):
        interface = ipaddress.ip_interface(address)
        ipr.addr("add", index=index, address=str(interface.ip),
                 prefixlen=interface.network.prefixlen)
    for address in sorted(present - wanted):
        interface = ipaddress.ip_interface(address)
        ipr.addr("del", index=index, address=str(interface.ip),
                 prefixlen=interface.network.prefixlen)

    wanted_routes = set(config.routes)
    routes = _routes(ipr, index)
    for network in sorted(wanted_routes - routes, key=str):
        ipr.route("replace", dst=str(network), oif=index, proto=OWNER_PROTOCOL,
                  family=_family(network.version))
    for network in sorted(routes - wanted_routes, key=str):
        ipr.route("del", dst=str(network), oif=index, proto=OWNER_PROTOCOL,
                  family=_family(network.version))
    return WireGuardChanges(
        mtu_set=mtu_set,
        brought_up=bool(brought_up),
        addresses_added=tuple(sorted(wanted - present)),
        addresses_removed=tuple(sorted(present - wanted)),
        routes_added=_names(wanted_routes - routes),
        routes_removed=_names(routes - wanted_routes),
    )


def _addresses(ipr: IPRoute, index: int) -> set[str]:
    """Addresses on the link as "address/prefixlen", without the IPv6 link-local one the
    kernel assigns itself (IPv4 link-local addresses are configured, so they count)."""
    found = set()
    for msg in ipr.get_addr(index=index):
        address = ipaddress.ip_address(msg.get("IFA_ADDRESS") or msg.get("IFA_LOCAL"))
        if not (address.version == 6 and address.is_link_local):
            found.add(f"{address}/{msg['prefixlen']}")
    return found


def _routes(ipr: IPRoute, index: int) -> set[IPNetwork]:
    found: set[IPNetwork] = set()
    for family in (4, 6):
        for msg in ipr.route("dump", family=_family(family)):
            table = msg.get("RTA_TABLE") or msg["table"]
            if msg["proto"] == OWNER_PROTOCOL and msg.get("RTA_OIF") == index \
                    and table == _MAIN_TABLE:
                dst = msg.get("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
                found.add(ipaddress.ip_network(f"{dst}/{msg['dst_len']}"))
    return found


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _names(networks: set[IPNetwork]) -> tuple[str, ...]:
    return tuple(sorted(str(n) for n in networks))


def _run(argv: Sequence[str], stdin: str | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=stdin, timeout=30)
    if proc.returncode != 0:
        # argv of `wg set` holds only key paths and public keys, never a private key.
        raise WireGuardError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout
