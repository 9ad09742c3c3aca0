"""The cluster side's container image, run from its root file system in the lab's namespaces.

`podman run` cannot start containers on these machines, so the Kubernetes lab runs the image
the way a runtime would, without one: the archive's layers unpacked in order into a directory,
the command under the image's entrypoint, environment and user, chrooted there. What a pod
gets from its runtime comes from the lab's host instead: /proc, /sys, /dev and /run (wireguard-
go's sockets, which the lab's checks read) and the files the daemon is given (its config and
state, a kubeconfig), bind-mounted into the root in a mount namespace of the process's own.
"""

from __future__ import annotations

import json
import shlex
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

HOST_MOUNTS = ("/proc", "/sys", "/dev", "/run")


@dataclass(frozen=True)
class ImageRoot:
    """An unpacked image: its root file system, and what a runtime reads from its config."""

    root: Path
    entrypoint: tuple[str, ...]
    env: tuple[str, ...]  # NAME=value
    user: str  # uid:gid

    def argv(self, args: Sequence[str], binds: Sequence[Path], user: str | None = None
             ) -> list[str]:
        """A command line that runs the entrypoint with `args` inside the root, as `user`
        (default: the image's), with the host's kernel interfaces and `binds` (directories,
        at the same paths) mounted in. It must run in a mount namespace of its own, which
        `ip netns exec` gives: the mounts then vanish with the process."""
        mounts = [*HOST_MOUNTS, *map(str, binds)]
        script = "set -e\n" + "".join(
            f"mkdir -p {shlex.quote(str(self.root) + path)}\n"
            f"mount --rbind {shlex.quote(path)} {shlex.quote(str(self.root) + path)}\n"
            for path in mounts
        ) + 'exec "$@"\n'
        # Unbuffered: the lab's tests read the daemons' logs while they run.
        return ["sh", "-c", script, "image", "chroot", f"--userspec={user or self.user}",
                str(self.root), "env", "-i", *self.env, "PYTHONUNBUFFERED=1",
                *self.entrypoint, *args]


def unpack_image(archive: Path, directory: Path) -> ImageRoot:
    """Unpack the OCI archive's layers in order into `directory` (new or empty), as a
    runtime does, and read the image's entrypoint, environment and user."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> IO[bytes]:
            return _member(tar, "blobs/sha256/" + digest.removeprefix("sha256:"))

        index = json.load(_member(tar, "index.json"))
        manifest: dict[str, Any] = json.load(blob(index["manifests"][0]["digest"]))
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=blob(layer["digest"]), mode="r:*") as files:
                files.extractall(directory)  # our own image: its paths and links are trusted
        config = json.load(blob(manifest["config"]["digest"]))["config"]
    return ImageRoot(directory, tuple(config.get("Entrypoint") or ()),
                     tuple(config.get("Env") or ()), config.get("User") or "0:0")


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    member = tar.extractfile(name)
    if member is None:
        raise ValueError(f"{name} in the image archive is not a file")
    return member
