"""The values the daemons' sysctl changes replaced: recorded once, put back at teardown.

A directory laid out like /proc/sys stands in for it (the driver takes its root as a
parameter, as steer does with the node's /host/proc/sys); tests/lab has the kernel's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatewayd.dataplane.sysctl import SysctlError, ensure_sysctls, restore_sysctls

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path: Path) -> Path:
    proc = tmp_path / "sys"
    for path, value in {"net/ipv4/ip_forward": "0", "net/ipv6/conf/all/forwarding": "0",
                        "net/ipv4/conf/egress0/rp_filter": "1"}.items():
        (proc / path).parent.mkdir(parents=True, exist_ok=True)
        (proc / path).write_text(value + "\n")
    return proc


def read(root: Path, path: str) -> str:
    return (root / path).read_text().strip()


def test_the_first_value_is_recorded_and_put_back(root: Path, tmp_path: Path) -> None:
    originals = tmp_path / "sysctl-originals.json"
    wanted = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.egress0.rp_filter": "2"}
    assert ensure_sysctls(wanted, root, originals) == tuple(sorted(wanted))
    assert json.loads(originals.read_text()) == {
        "net.ipv4.ip_forward": "0", "net.ipv4.conf.egress0.rp_filter": "1"}
    # Changed again (drift repaired, another value): the value before the daemon stays.
    (root / "net/ipv4/ip_forward").write_text("0\n")
    ensure_sysctls({"net.ipv4.ip_forward": "1"}, root, originals)
    ensure_sysctls({"net.ipv4.conf.egress0.rp_filter": "0"}, root, originals)
    assert json.loads(originals.read_text())["net.ipv4.ip_forward"] == "0"
    assert json.loads(originals.read_text())["net.ipv4.conf.egress0.rp_filter"] == "1"

    assert restore_sysctls(originals, root) == (
        "net.ipv4.conf.egress0.rp_filter", "net.ipv4.ip_forward")
    assert (read(root, "net/ipv4/ip_forward"), read(root, "net/ipv4/conf/egress0/rp_filter")) \
        == ("0", "1")
    assert not originals.exists()
    assert restore_sysctls(originals, root) == ()


def test_an_unchanged_value_is_not_recorded(root: Path, tmp_path: Path) -> None:
    originals = tmp_path / "sysctl-originals.json"
    assert ensure_sysctls({"net.ipv6.conf.all.forwarding": "0"}, root, originals) == ()
    assert not originals.exists()


def test_restore_skips_the_parameters_of_an_interface_that_is_gone(
    root: Path, tmp_path: Path,
) -> None:
    originals = tmp_path / "sysctl-originals.json"
    ensure_sysctls({"net.ipv4.ip_forward": "1", "net.ipv4.conf.egress0.rp_filter": "2"},
                   root, originals)
    for path in sorted((root / "net/ipv4/conf/egress0").iterdir()):
        path.unlink()
    (root / "net/ipv4/conf/egress0").rmdir()  # the tunnel was removed first
    assert restore_sysctls(originals, root) == ("net.ipv4.ip_forward",)
    assert read(root, "net/ipv4/ip_forward") == "0"


def test_nothing_is_changed_that_cannot_be_recorded(root: Path, tmp_path: Path) -> None:
    originals = tmp_path / "missing-directory" / "sysctl-originals.json"
    with pytest.raises(SysctlError, match=r"cannot record the original value of net\.ipv4\."):
        ensure_sysctls({"net.ipv4.ip_forward": "1"}, root, originals)
    assert read(root, "net/ipv4/ip_forward") == "0"


def test_a_damaged_record_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    originals = tmp_path / "sysctl-originals.json"
    originals.write_text("[1, 2]")
    with pytest.raises(SysctlError, match="not an object of parameter names to values"):
        restore_sysctls(originals, root)
