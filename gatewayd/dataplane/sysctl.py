"""Kernel parameters under /proc/sys (forwarding, rp_filter, ...).

`net.*` values belong to the network namespace of the thread that opens the file, so the
driver acts on the caller's namespace like the others. Keys use sysctl's dotted form
(`net.ipv4.conf.egress0.rp_filter`); in `net.ipv{4,6}.{conf,neigh}.<interface>.<parameter>`
the interface name may hold dots (`net.ipv4.conf.eth0.100.rp_filter`). The slash form
(`net/ipv4/conf/eth0.100/rp_filter`) is accepted too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

PROC_SYS = Path("/proc/sys")
_PER_INTERFACE = ("net.ipv4.conf.", "net.ipv6.conf.", "net.ipv4.neigh.", "net.ipv6.neigh.")


class SysctlError(Exception):
    pass


def ensure_sysctls(
    values: Mapping[str, str], root: Path = PROC_SYS, originals: Path | None = None
) -> tuple[str, ...]:
    """Write every value that differs; return the keys that changed (sorted). With
    `originals` (a JSON file), the value a key had before it was first changed is recorded
    there, before the write, so that `restore_sysctls` can put it back at teardown."""
    changed: list[str] = []
    for key in sorted(values):
        wanted = _normalize(values[key])
        current = _read(root, key)
        if current == wanted:
            continue
        if originals is not None:
            _remember(originals, key, current)
        path = _path(root, key)
        try:
            path.write_text(wanted + "\n")
        except OSError as exc:
            raise SysctlError(f"cannot set {key} ({path}) to {wanted!r}: {exc}") from exc
        changed.append(key)
    return tuple(changed)


def restore_sysctls(originals: Path, root: Path = PROC_SYS) -> tuple[str, ...]:
    """Put back every value recorded in `originals`, then remove the file; return the keys
    restored. A key whose interface is gone (the tunnel, removed first) is skipped."""
    try:
        recorded = _read_originals(originals)
    except FileNotFoundError:
        return ()
    restored = []
    for key, value in sorted(recorded.items()):
        path = _path(root, key)
        if not path.exists():
            continue
        if _read(root, key) != value:
            try:
                path.write_text(value + "\n")
            except OSError as exc:
                raise SysctlError(f"cannot restore {key} ({path}) to {value!r}: {exc}") from exc
        restored.append(key)
    originals.unlink()
    return tuple(restored)


def _remember(originals: Path, key: str, value: str) -> None:
    """Record `value` as the original of `key` unless one is recorded already."""
    try:
        recorded = _read_originals(originals)
    except FileNotFoundError:
        recorded = {}
    if key in recorded:
        return
    recorded[key] = value
    temporary = originals.with_name(f".{originals.name}.tmp")
    try:
        with temporary.open("w") as out:
            json.dump(recorded, out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(originals)
    except OSError as exc:
        # Not changed unrecorded: teardown could not put the value back.
        raise SysctlError(f"cannot record the original value of {key} in {originals}: "
                          f"{exc}") from exc


def _read_originals(originals: Path) -> dict[str, str]:
    try:
        data = json.loads(originals.read_text())
    except ValueError as exc:
        raise SysctlError(f"{originals}: not the JSON object of original values: {exc}") from exc
    if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise SysctlError(f"{originals}: not an object of parameter names to values")
    return data


def observe_sysctls(keys: Iterable[str], root: Path = PROC_SYS) -> dict[str, str]:
    return {key: _read(root, key) for key in keys}


def _path(root: Path, key: str) -> Path:
    if "/" in key:
        return root / key.strip("/")
    for prefix in _PER_INTERFACE:
        if key.startswith(prefix):
            # The parameter is the last word; everything between is the interface name.
            interface, _, parameter = key.removeprefix(prefix).rpartition(".")
            if interface:
                return root / prefix.replace(".", "/") / interface / parameter
    return root / key.replace(".", "/")


def _read(root: Path, key: str) -> str:
    path = _path(root, key)
    try:
        return _normalize(path.read_text())
    except FileNotFoundError as exc:
        raise SysctlError(
            f"unknown kernel parameter {key}: {path} does not exist (is the interface "
            "there, and does this kernel have the feature?)"
        ) from exc
    except OSError as exc:
        raise SysctlError(f"cannot read {key} ({path}): {exc}") from exc


def _normalize(value: str) -> str:
    """Multi-value parameters print tab-separated; compare them word by word."""
    return " ".join(value.split())
