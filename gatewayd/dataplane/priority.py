"""The CPU priority of the fast failover's timing-critical tasks: the gateway's probe responder
and its agent, the node's probe thread and its failover's table changes, and a userspace
WireGuard (wireguard-go) that carries the probes. A late answer, or a miss counted late, moves
traffic for nothing or late; a claim or a table change that waits for the CPU is outage.

The gateway's agent is raised whole, not its egress IP keeper thread alone: the agent's threads
share one interpreter lock, and a raised thread that waits for it behind a thread the host keeps
off the CPU is as late as that thread. In the lab a standby's claim came 0.15 s late that way
(1 in 20 failovers), and a cut-off gateway's fence up to 0.9 s late; with the agent raised
whole, 20 failovers had no late claim.

Raising a priority needs CAP_SYS_NICE; without it the task keeps the daemon's priority, and the
journal says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

log = logging.getLogger("gatewayd")

URGENT_NICE = -10


def raise_priority(task: int, what: str) -> bool:
    """Run process or thread `task` (its Linux id) at `URGENT_NICE`."""
    try:
        os.setpriority(os.PRIO_PROCESS, task, URGENT_NICE)
    except OSError as exc:
        _not_raised(what, exc)
        return False
    return True


def raise_process_priority(what: str) -> bool:
    """Run every thread of this process at `URGENT_NICE`, and with them every thread and process
    they start from now on (a task inherits the nice value of the thread that starts it)."""
    for task in sorted(map(int, os.listdir("/proc/self/task"))):
        try:
            os.setpriority(os.PRIO_PROCESS, task, URGENT_NICE)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as exc:
            _not_raised(what, exc)
            return False
    return True


def _not_raised(what: str, error: OSError) -> None:
    log.warning("%s runs at the daemon's CPU priority: raising it needs CAP_SYS_NICE (%s)",
                what, error)


@contextlib.contextmanager
def urgent_children(what: str) -> Iterator[None]:
    """Processes this thread starts meanwhile run at `URGENT_NICE`: a child inherits the nice
    value of the thread that forks it (also one that daemonizes, as wireguard-go does)."""
    thread = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, thread)
    raised = raise_priority(thread, what)
    try:
        yield
    finally:
        if raised:
            os.setpriority(os.PRIO_PROCESS, thread, before)  # lowering needs no capability
