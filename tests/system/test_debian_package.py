"""The .deb as Debian expects it: lintian, what it holds, a rebuild, and an upgrade from the
previous release on a booted Debian 12.

The previous release is the package as main built it before it was made lintian-clean (a
native 0.1.0 whose scripts call systemctl): built once from that commit by its own build.sh and
kept under build/previous-release/.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from nspawn import Container
from test_service import (
    CONFIG,
    PAYMENT_IP,
    UNIT,
    configure,
    data_plane,
    is_running,
    main_pid,
    ruleset,
)

from gatewayd.lab.netns import Sandbox
from gatewayd.lab.observe import LineConnection
from gatewayd.lab.topology import LINE_PORT

pytestmark = pytest.mark.system

PREVIOUS_RELEASE = "52b768cf8db04d0b13fec9be7621bfe0b8673ec4"
POD, PAYMENT_HOST = "10.244.1.10", "198.51.100.10"  # checkout-1; payment-gateway's destination
SITE_PACKAGES = "opt/gatewayd/lib/python3.11/site-packages"


def run(*argv: str, cwd: Path = REPO, timeout: float = 120, input: str | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          input=input)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb")
    run("dpkg-deb", "--raw-extract", str(deb), str(root))
    return root


# --- the package as a file ----------------------------------------------------------------


def test_lintian_reports_no_error_and_no_warning_without_a_reason(deb: Path) -> None:
    proc = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)],
                          capture_output=True, text=True, timeout=600)
    complaints = [line for line in proc.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert proc.returncode == 0 and complaints == [], proc.stdout[-4000:] + proc.stderr[-2000:]
    # Each override says why, on the comment line above it.
    lines = (REPO / "packaging/deb/lintian-overrides").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("gatewayd:"):
            assert number > 0 and lines[number - 1].startswith("# "), f"no reason for {line!r}"


def test_the_package_holds_what_is_used_and_says_what_it_is(unpacked: Path) -> None:
    files = {str(p.relative_to(unpacked)) for p in unpacked.rglob("*") if not p.is_dir()}
    # Pruned: the kubernetes client's asyncio API and its aiohttp stack, tests, byte code and
    # the libraries' console scripts.
    assert not any(f.startswith(f"{SITE_PACKAGES}/kubernetes/aio/") for f in files)
    assert not any(f.startswith(f"{SITE_PACKAGES}/aiohttp") for f in files)
    assert not [f for f in files if re.search(r"/(tests?|__pycache__)/", f)]
    assert sorted(p.name for p in (unpacked / "opt/gatewayd/bin").iterdir()) == [
        "gatewayctl", "gatewayd", "python", "python3", "python3.11"]
    # Shared objects without symbol tables.
    shared = [unpacked / f for f in files if f.endswith(".so")]
    assert shared
    for path in shared:
        assert ".symtab" not in run("readelf", "--section-headers", "--wide", str(path)), path
    # md5sums covers every file shipped, and matches.
    md5sums = (unpacked / "DEBIAN/md5sums").read_text().splitlines()
    listed = {line.split("  ", 1)[1] for line in md5sums}
    assert listed == {f for f in files if not f.startswith("DEBIAN/")
                           and not (unpacked / f).is_symlink()}
    run("md5sum", "--check", "--quiet", str(unpacked / "DEBIAN/md5sums"), cwd=unpacked)
    # Manual pages from the parsers; the copyright file and the Debian changelog.
    for program in ("gatewayd", "gatewayctl"):
        page = run("man", "-l", "-P", "cat", str(unpacked / f"usr/share/man/man8/{program}.8.gz"))
        assert f"{program} - " in page and "--version" in page
    assert "gatewayctl status [-h]" in " ".join(run(
        "man", "-l", "-P", "cat", str(unpacked / "usr/share/man/man8/gatewayctl.8.gz")).split())
    # Bash completion from the same parsers, where bash-completion looks for it.
    for program in ("gatewayd", "gatewayctl"):
        script = unpacked / f"usr/share/bash-completion/completions/{program}"
        assert f"complete -F _{program} {program}" in script.read_text()
        run("bash", "-n", str(script))
    copyright_text = (unpacked / "usr/share/doc/gatewayd/copyright").read_text()
    assert copyright_text.startswith("Format: https://www.debian.org/doc/packaging-manuals/")
    assert (unpacked / "usr/share/doc/gatewayd/changelog.Debian.gz").is_file()
    control = (unpacked / "DEBIAN/control").read_text()
    assert "localhost" not in re.search(r"^Maintainer: (.*)$", control, re.M).group(1)  # type: ignore[union-attr]


def test_a_rebuild_holds_the_same_files(deb: Path, tmp_path: Path) -> None:
    again = Path(run(str(REPO / "packaging/deb/build.sh"), str(tmp_path), timeout=900
                     ).strip().splitlines()[-1])
    assert again != deb

    def md5sums(path: Path) -> str:
        return run("dpkg-deb", "--info", str(path), "md5sums")

    assert md5sums(again) == md5sums(deb)


# --- upgrade and purge on a booted host ---------------------------------------------------


@pytest.fixture(scope="module")
def previous_deb() -> Path:
    """The previous release's .deb, built once from its commit with its own build.sh."""
    cache = REPO / "build/previous-release" / PREVIOUS_RELEASE
    built = sorted(cache.glob("gatewayd_*.deb"))
    if built:
        return built[-1]
    cache.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", PREVIOUS_RELEASE], cwd=REPO, check=True,
                             capture_output=True).stdout
    # A short path: that build.sh cannot cope with #! lines too long for the kernel.
    with tempfile.TemporaryDirectory(prefix="gwd-prev-") as source:
        subprocess.run(["tar", "-x", "-C", source], input=archive, check=True)
        built = Path(run(f"{source}/packaging/deb/build.sh", cwd=Path(source), timeout=900
                         ).strip().splitlines()[-1])
        return Path(shutil.move(built, cache / built.name))


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(f"gwp{os.getpid() % 100000}") as box:
        yield box


@pytest.fixture
def host(
    sandbox: Sandbox, rootfs: Path, deb: Path, previous_deb: Path, tmp_path: Path
) -> Container:
    """A booted container with this .deb at /mnt/dist and the previous one at /mnt/previous."""
    return Container(sandbox, sandbox.prefix, rootfs, tmp_path / "console.log",
                     binds=[(deb.parent, "/mnt/dist"), (previous_deb.parent, "/mnt/previous")])


class CloudNode:
    """A cloud node with the pod checkout-1 (10.244.1.10) and a WireGuard tunnel to the booted
    gateway, and the payment host (198.51.100.10, a line echo) on the gateway's segment: all
    in the sandbox's namespaces (the container's veth moves into the segment's)."""

    def __init__(self, sandbox: Sandbox, host: Container) -> None:
        self.segment, self.netns = sandbox.netns("seg"), sandbox.netns("node")
        self.tunnel = f"{sandbox.prefix}wg"  # wireguard-go's socket names are machine-wide
        self.private_key = run("wg", "genkey").strip()
        self.public_key = run("wg", "pubkey", input=self.private_key).strip()
        run("ip", "link", "set", host.host_veth, "netns", self.segment)
        sandbox.veth(self.segment, "tonode", self.netns, "uplink")
        for command in (f"ip addr add 198.51.100.1/24 dev {host.host_veth}",
                        f"ip addr add {PAYMENT_HOST}/24 dev {host.host_veth}",
                        f"ip link set {host.host_veth} up",
                        "ip addr add 192.0.2.1/24 dev tonode",
                        "sysctl -qw net.ipv4.ip_forward=1"):
            run("ip", "netns", "exec", self.segment, *command.split())
        for command in ("ip addr add 192.0.2.21/24 dev uplink",
                        "ip route add default via 192.0.2.1"):
            run("ip", "netns", "exec", self.netns, *command.split())
        sandbox.spawn(self.segment, [sys.executable, "-m", "gatewayd.lab.echo",
                                     "--http-port", "8080", "--line-port", str(LINE_PORT)])

    def connect(self, host: Container) -> None:
        """The tunnel to the gateway (its key and port read from it); pod traffic to the
        payment host goes through it."""
        public_key = host.run("wg", "show", "egress0", "public-key").stdout.strip()
        port = host.run("wg", "show", "egress0", "listen-port").stdout.strip()
        host.run("ip", "route", "replace", "default", "via", "198.51.100.1")
        inside = ["ip", "netns", "exec", self.netns]
        run(*inside, "wireguard-go", self.tunnel)
        with tempfile.NamedTemporaryFile("w") as key:
            key.write(self.private_key)
            key.flush()
            run(*inside, "wg", "set", self.tunnel, "private-key", key.name, "peer", public_key,
                "endpoint", f"198.51.100.2:{port}", "allowed-ips", f"{PAYMENT_HOST}/32")
        for command in (f"ip addr add {POD}/32 dev {self.tunnel}",
                        f"ip link set {self.tunnel} up",
                        f"ip route add {PAYMENT_HOST}/32 dev {self.tunnel} src {POD}"):
            run(*inside, *command.split())

    def close(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "del", self.tunnel],
                       capture_output=True)


def test_upgrade_from_the_previous_release_keeps_the_gateway_then_purge_removes_all(
    sandbox: Sandbox, host: Container, deb: Path, previous_deb: Path,
) -> None:
    node = CloudNode(sandbox, host)
    sandbox.on_close(f"tunnel {node.tunnel}", node.close)
    host.run("dpkg", "-i", f"/mnt/previous/{previous_deb.name}", timeout=300)
    configure(host, node.public_key)
    host.systemctl("enable", "--now", UNIT)
    assert is_running(host)
    node.connect(host)
    before, table, pid = data_plane(host), ruleset(host), main_pid(host)
    # A connection from the pod, SNATed to the policy's egress IP, held across the upgrade.
    with LineConnection(node.netns, PAYMENT_HOST, LINE_PORT) as connection:
        assert connection.exchange("before") == (PAYMENT_IP, "before")

        host.run("dpkg", "-i", f"/mnt/dist/{deb.name}", timeout=300)
        assert host.sh("dpkg-query -W -f '${Version}' gatewayd") == deb.name.split("_")[1]
        # Restarted on the new code; SNAT, the egress IPs and the tunnel (same wireguard-go)
        # stayed, and so did the connection.
        assert is_running(host) and main_pid(host) != pid
        assert connection.exchange("after the upgrade") == (PAYMENT_IP, "after the upgrade")
    # The new agent rewrites the table's rules once at start, in place, which keeps
    # established SNAT flows (gatewayd/dataplane/nftables.py). A new release may add rules
    # (a guard, a counter); every SNAT of the old one is still there.
    assert data_plane(host) == before and snat_rules(table)
    assert snat_rules(ruleset(host)) == snat_rules(table)
    assert host.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    assert host.run("gatewayd", "--version").stdout.strip() == "gatewayd 0.1.0"
    # Every shipped file as the package says, and byte code made for the installed sources.
    host.run("dpkg", "--verify", "gatewayd")
    assert host.sh("find /opt/gatewayd -name '*.pyc' | wc -l").strip() != "0"
    assert host.sh(f"stat -c '%a %U %G' {CONFIG}").strip() == "640 root gatewayd"

    host.run("dpkg", "--purge", "gatewayd", timeout=300)
    leftovers = host.sh(
        "ls -d /var/lib/gatewayd /etc/gatewayd /opt/gatewayd /lib/systemd/system/gatewayd.service"
        " /etc/systemd/system/multi-user.target.wants/gatewayd.service"
        " /var/lib/systemd/deb-systemd-helper-enabled/gatewayd.service*"
        " /var/lib/systemd/deb-systemd-helper-enabled/*/gatewayd.service 2>/dev/null; true")
    assert leftovers == ""
    assert not data_plane_left(host)


def snat_rules(listing: str) -> set[str]:
    return {line.strip() for line in listing.splitlines() if " snat " in line}


def data_plane_left(host: Container) -> bool:
    table = host.run("nft", "list", "table", "inet", "gatewayd", check=False).returncode == 0
    tunnel = host.run("ip", "link", "show", "egress0", check=False).returncode == 0
    return table or tunnel
