"""The container image scripts/build-image builds: what `skopeo inspect` shows (entrypoint, user,
labels), and what its root file system runs, entered with chroot (podman cannot start
containers on these machines; see README.md, "The container image"). The Kubernetes lab runs
the cluster side from it too (tests/lab/test_k8s_cluster.py).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from fixtures.image import VERSION

from gatewayd.lab.image import ImageRoot

pytestmark = pytest.mark.system


def run(*argv: str, timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_skopeo_shows_the_entrypoint_the_user_and_the_labels(image: Path) -> None:
    assert image == REPO / f"dist/gatewayd-{VERSION}.oci.tar"
    inspected = json.loads(run("skopeo", "inspect", f"oci-archive:{image}"))
    labels = inspected["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == "gatewayd"
    assert labels["org.opencontainers.image.ref.name"] == f"ghcr.io/gatewayd/gatewayd:{VERSION}"
    for key in ("created", "revision", "description", "base.name"):
        assert labels[f"org.opencontainers.image.{key}"], key
    config = json.loads(run("skopeo", "inspect", "--config", f"oci-archive:{image}"))["config"]
    assert config["Entrypoint"] == ["/opt/gatewayd/bin/gatewayd"]
    assert config["Cmd"] == ["controller"]
    assert config["User"] == "65532:65532"  # the controller's; steer's DaemonSet runs it as root


def chroot(root: Path, *argv: str, user: str = "0:0") -> str:
    return run("chroot", f"--userspec={user}", str(root), *argv)


def test_the_root_file_system_runs_both_commands_and_has_steers_tools(
    image_root: ImageRoot,
) -> None:
    rootfs = image_root.root
    # The controller's user can run it (its imports, the kubernetes client) ...
    assert chroot(rootfs, "gatewayd", "--version", user="65532:65532") == f"gatewayd {VERSION}\n"
    chroot(rootfs, "/opt/gatewayd/bin/python3.11", "-c",
           "import gatewayd.controller.daemon, kubernetes.client", user="65532:65532")
    assert "steer" in chroot(rootfs, "gatewayd", "steer", "--help")
    # ... and steer's tools are there: wg, ip, nft, wireguard-go, conntrack, and libnftables
    # from Python.
    for tool in ("wg", "ip", "nft", "wireguard-go", "conntrack"):
        chroot(rootfs, "sh", "-c", f"command -v {tool}")
    chroot(rootfs, "/opt/gatewayd/bin/python3.11", "-c",
           "import nftables; nftables.Nftables()")
    # systemd-python is the .deb's (journald); the image has none.
    site = rootfs / "opt/gatewayd/lib/python3.11/site-packages"
    assert not (site / "systemd").exists() and (site / "kubernetes").is_dir()
    assert not (site / "kubernetes/aio").exists()
    # The pods' root file system is read-only: byte code is there already.
    assert any((site / "gatewayd/__pycache__").glob("*.cpython-311.pyc"))
