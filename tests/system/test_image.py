"""The container image scripts/build-image builds: what `skopeo inspect` shows (entrypoint, user,
labels), and what its root file system runs, entered with chroot (podman cannot start
containers on these machines; see README.md, "The container image").

The image is cached under .cache/image/ by a hash of its inputs: after the first build, a
rerun with an unchanged tree takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

pytestmark = pytest.mark.system

VERSION = metadata.version("gatewayd")


def run(*argv: str, timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def image(deb: Path) -> Path:
    if os.geteuid() != 0:
        pytest.fail("scripts/build-image runs debootstrap and buildah: run the tests as root")
    # The session's .deb (conftest.py) is built from this tree already: no second build.
    proc = subprocess.run([str(REPO / "scripts/build-image")], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "GATEWAYD_DEB": str(deb)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = proc.stdout.strip().splitlines()[-1]
    path = Path(built)
    assert path == REPO / f"dist/gatewayd-{VERSION}.oci.tar"
    return path


@pytest.fixture(scope="module")
def rootfs(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's layers unpacked in order, as a runtime would."""
    root = tmp_path_factory.mktemp("image") / "rootfs"
    root.mkdir()
    with tarfile.open(image) as archive:
        def blob(digest: str) -> Any:
            member = archive.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert member is not None
            return member

        index = json.load(blob_file(archive, "index.json"))
        manifest = json.load(blob(index["manifests"][0]["digest"]))
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=blob(layer["digest"]), mode="r:*") as files:
                files.extractall(root)  # our own image: its paths and links are trusted
    return root


def blob_file(archive: tarfile.TarFile, name: str) -> Any:
    member = archive.extractfile(name)
    assert member is not None
    return member


def test_skopeo_shows_the_entrypoint_the_user_and_the_labels(image: Path) -> None:
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


def test_the_root_file_system_runs_both_commands_and_has_steers_tools(rootfs: Path) -> None:
    # The controller's user can run it (its imports, the kubernetes client) ...
    assert chroot(rootfs, "gatewayd", "--version", user="65532:65532") == f"gatewayd {VERSION}\n"
    chroot(rootfs, "/opt/gatewayd/bin/python3.11", "-c",
           "import gatewayd.controller.daemon, kubernetes.client", user="65532:65532")
    assert "steer" in chroot(rootfs, "gatewayd", "steer", "--help")
    # ... and steer's tools are there: wg, ip, nft, wireguard-go, libnftables from Python.
    for tool in ("wg", "ip", "nft", "wireguard-go"):
        chroot(rootfs, "sh", "-c", f"command -v {tool}")
    chroot(rootfs, "/opt/gatewayd/bin/python3.11", "-c",
           "import nftables; nftables.Nftables()")
    # systemd-python is the .deb's (journald); the image has none.
    site = rootfs / "opt/gatewayd/lib/python3.11/site-packages"
    assert not (site / "systemd").exists() and (site / "kubernetes").is_dir()
    assert not (site / "kubernetes/aio").exists()
    # The pods' root file system is read-only: byte code is there already.
    assert any((site / "gatewayd/__pycache__").glob("*.cpython-311.pyc"))
