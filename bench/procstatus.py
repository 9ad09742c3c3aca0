"""This process's memory as the kernel counts it (stdlib only: `agent_memory.py` measures the
bare interpreter before it imports anything else)."""

from __future__ import annotations

from pathlib import Path


def status_kib(key: str) -> int:
    """A KiB line of /proc/self/status: `VmRSS` now, `VmHWM` the peak. Not getrusage's
    ru_maxrss: Linux carries that over an exec, so a spawned child would report the forking
    parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")
