"""Kernel parameters under /proc/sys (forwarding, rp_filter, ...).

`net.*` values belong to the network namespace of the thread that opens the file, so the
driver acts on the caller's namespace like the others. Keys use sysctl's dotted form
(`net.ipv4.conf.egress0.rp_filter`); in `net.ipv{4,6}.{conf,neigh}.<interface>.<parameter>`
the interface name may hold dots (`net.ipv4.conf.eth0.100.rp_filter`). The slash form
(`net/ipv4/conf/eth0.100/rp_filter`) is accepted too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

PROC_SYS = Path("/proc/sys")
_PER_INTERFACE = ("net.ipv4.conf.", "net.ipv6.conf.", "net.ipv4.neigh.", "net.ipv6.neigh.")


class SysctlError(Exception):
    pass


def ensure_sysctls(values: Mapping[str, str], root: Path = PROC_SYS) -> tuple[str, ...]:
    """Write every value that differs; return the keys that changed (sorted)."""
    changed: list[str] = []
    for key in sorted(values):
        wanted = _normalize(values[key])
        if _read(root, key) == wanted:
            continue
        path = _path(root, key)
        try:
            path.write_text(wanted + "\n")
        except OSError as exc:
            raise SysctlError(f"cannot set {key} ({path}) to {wanted!r}: {exc}") from exc
        changed.append(key)
    return tuple(changed)


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
