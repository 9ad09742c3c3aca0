"""WireGuardDriver: two namespaces, a wireguard-go interface in each, traffic through them."""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from gatewayd.dataplane.wireguard import (
    Peer,
    WireGuardChanges,
    WireGuardConfig,
    WireGuardDriver,
    WireGuardError,
    WireGuardState,
    generate_private_key,
    public_key,
)
from gatewayd.lab.netns import Sandbox, entered, run, wait_for

pytestmark = pytest.mark.lab

net = ipaddress.ip_network


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    with Sandbox(f"drvwg{secrets.token_hex(2)}-") as box:
        yield box


def pings(netns: str, address: str) -> bool:
    return run(["ping", "-c1", "-W1", address], netns, check=False).returncode == 0


def remove(netns: str, interface: str) -> None:
    """Delete the link so that wireguard-go exits cleanly and removes its control socket
    (killed with the namespace, it would leave the socket file behind)."""
    with entered(netns):
        WireGuardDriver().delete(interface)
    socket_path = Path(f"/var/run/wireguard/{interface}.sock")
    wait_for(lambda: not socket_path.exists(), 5, f"wireguard-go {interface} to exit")


def observed(netns: str, driver: WireGuardDriver, interface: str) -> WireGuardState:
    with entered(netns):
        state = driver.observe(interface)
    assert state is not None
    return state


def test_private_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "private.key"
    public = generate_private_key(path)
    content = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert generate_private_key(path) == public == public_key(path)
    assert path.read_text() == content
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_tunnel_peers_are_changed_incrementally_and_drift_is_repaired(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    a, b = sandbox.netns("a"), sandbox.netns("b")
    sandbox.veth(a, "ula", b, "ulb")
    run(["ip", "addr", "add", "10.97.0.1/24", "dev", "ula"], a)
    run(["ip", "addr", "add", "10.97.0.2/24", "dev", "ulb"], b)
    # The control sockets in /var/run/wireguard are shared by all namespaces: unique names.
    tag = secrets.token_hex(3)
    if_a, if_b = f"wgt{tag}a", f"wgt{tag}b"
    for netns, interface in ((a, if_a), (b, if_b)):
        sandbox.on_close(f"wireguard {interface}", partial(remove, netns, interface))
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    pub_a, pub_b = generate_private_key(key_a), generate_private_key(key_b)
    peer_b = Peer(pub_b, (net("10.96.0.2/32"), net("10.95.0.0/24")), "10.97.0.2:51821")
    config_a = WireGuardConfig(if_a, key_a, 51820, (peer_b,), ("10.96.0.1/24",),
                               routes=(net("10.95.0.0/24"),))
    config_b = WireGuardConfig(if_b, key_b, 51821, (Peer(pub_a, (net("10.96.0.1/32"),)),),
                               ("10.96.0.2/24",))
    driver_a, driver_b = WireGuardDriver(), WireGuardDriver()
    run(["ip", "addr", "add", "10.95.0.1/24", "dev", "lo"], b)  # reached via the route

    with entered(a):
        first = driver_a.ensure(config_a)
        assert driver_a.ensure(config_a) == WireGuardChanges()
    with entered(b):
        driver_b.ensure(config_b)
        assert driver_b.ensure(config_b) == WireGuardChanges()
    assert first.created and first.private_key_set and first.listen_port_set and first.brought_up
    assert (first.peers_added, first.addresses_added, first.routes_added) == (
        (pub_b,), ("10.96.0.1/24",), ("10.95.0.0/24",))
    private_a = key_a.read_text().strip()
    assert private_a not in repr(first) and private_a not in repr(observed(a, driver_a, if_a))

    wait_for(lambda: pings(a, "10.96.0.2"), 10, "a ping through the tunnel")
    assert pings(a, "10.95.0.1")  # the route through the tunnel
    state = observed(a, driver_a, if_a)
    assert (state.public_key, state.listen_port, state.mtu, state.up) == (pub_a, 51820, 1420, True)
    (seen_b,) = state.peers
    assert seen_b.public_key == pub_b and seen_b.endpoint == "10.97.0.2:51821"
    assert seen_b.latest_handshake is not None and seen_b.rx_bytes > 0 and seen_b.tx_bytes > 0

    # Adding a peer leaves the session with b alone: no new handshake is needed.
    pub_c = generate_private_key(tmp_path / "c.key")
    with_c = replace(config_a, peers=(peer_b, Peer(pub_c, (net("10.96.0.3/32"),))))
    with entered(a):
        changes = driver_a.ensure(with_c)
    assert changes == WireGuardChanges(peers_added=(pub_c,))
    assert pings(a, "10.96.0.2")
    after = {p.public_key: p for p in observed(a, driver_a, if_a).peers}
    assert after[pub_b].latest_handshake == seen_b.latest_handshake
    assert set(after) == {pub_b, pub_c}

    # Removing peers and adding one back.
    with entered(a):
        assert driver_a.ensure(replace(config_a, peers=())) == WireGuardChanges(
            peers_removed=tuple(sorted((pub_b, pub_c))))
        assert observed(a, driver_a, if_a).peers == ()
        assert driver_a.ensure(config_a) == WireGuardChanges(peers_added=(pub_b,))
    wait_for(lambda: pings(a, "10.96.0.2"), 10, "a ping after the peer came back")

    # A peer's allowed IPs change in place.
    narrower = replace(peer_b, allowed_ips=(net("10.96.0.2/32"),))
    with entered(a):
        assert driver_a.ensure(replace(config_a, peers=(narrower,))) == WireGuardChanges(
            peers_updated=(pub_b,))
        assert driver_a.ensure(config_a) == WireGuardChanges(peers_updated=(pub_b,))

    # Sabotage by hand, repaired by the next ensure().
    run(["wg", "set", if_a, "peer", pub_b, "remove"], a)
    run(["ip", "link", "set", "dev", if_a, "mtu", "1300"], a)
    run(["ip", "addr", "flush", "dev", if_a], a)
    with entered(a):
        repaired = driver_a.ensure(config_a)
    assert repaired == WireGuardChanges(  # the kernel drops routes with the last address
        peers_added=(pub_b,), mtu_set=True, addresses_added=("10.96.0.1/24",),
        routes_added=("10.95.0.0/24",))
    run(["ip", "link", "set", "dev", if_a, "down"], a)  # takes the route with it
    with entered(a):
        assert driver_a.ensure(config_a) == WireGuardChanges(
            brought_up=True, routes_added=("10.95.0.0/24",))
    wait_for(lambda: pings(a, "10.95.0.1"), 10, "a ping after the repair")

    # The link deleted by hand: ensure() builds it again.
    run(["ip", "link", "del", "dev", if_a], a)
    with entered(a):
        assert driver_a.ensure(config_a).created
    wait_for(lambda: pings(a, "10.96.0.2"), 10, "a ping through the new interface")

    with entered(a):
        assert driver_a.delete(if_a) is True
        assert driver_a.observe(if_a) is None
        assert driver_a.delete(if_a) is False
    socket_path = Path(f"/var/run/wireguard/{if_a}.sock")
    wait_for(lambda: not socket_path.exists(), 5, "wireguard-go to exit with its link")


def test_a_name_taken_by_another_kind_of_link_is_an_error(sandbox: Sandbox,
                                                         tmp_path: Path) -> None:
    a, b = sandbox.netns("a"), sandbox.netns("b")
    sandbox.veth(a, "notwg", b, "peer")
    config = WireGuardConfig("notwg", tmp_path / "k", None, ())
    generate_private_key(config.private_key_path)
    with entered(a), pytest.raises(WireGuardError, match="notwg"):
        WireGuardDriver().ensure(config)
    assert "notwg" in run(["ip", "link"], a).stdout  # left alone


def test_ipv4_link_local_tunnel_addresses_are_kept_on_several_tunnels(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Steer gives every tunnel the same 169.254.x address (rp_filter needs one): a second
    ensure must see it as present, not try to add it again."""
    a = sandbox.netns("a")
    key = tmp_path / "key"
    generate_private_key(key)
    suffix = secrets.token_hex(2)
    names = [f"ll1-{suffix}", f"ll2-{suffix}"]
    driver = WireGuardDriver()
    configs = [WireGuardConfig(n, key, None, (), addresses=("169.254.77.1/32",)) for n in names]
    try:
        with entered(a):
            for config in configs:
                assert driver.ensure(config).addresses_added == ("169.254.77.1/32",)
            for config in configs:
                assert driver.ensure(config) == WireGuardChanges()
    finally:
        for name in names:
            remove(a, name)
