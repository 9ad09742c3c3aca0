"""The fast failover's urgent tasks: a thread raised, and the processes it starts meanwhile."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from gatewayd.dataplane.priority import URGENT_NICE, urgent_children

pytestmark = pytest.mark.unit


def nice_of(task: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, task)


def test_a_child_started_meanwhile_runs_urgent_and_the_thread_goes_back() -> None:
    if os.geteuid() != 0:
        pytest.skip("raising a priority needs CAP_SYS_NICE")
    thread = threading.get_native_id()
    before = nice_of(thread)
    with urgent_children("a test child"):
        assert nice_of(thread) == URGENT_NICE
        child = subprocess.Popen(["sleep", "30"])
    try:
        assert nice_of(child.pid) == URGENT_NICE
        assert nice_of(thread) == before
    finally:
        child.kill()
        child.wait()


def test_without_the_capability_a_task_keeps_its_priority_and_says_so() -> None:
    """A process without CAP_SYS_NICE (here: one that gave root up) cannot raise itself: it
    says so and goes on at its priority."""
    script = (
        "import os, sys\n"
        "from gatewayd.dataplane.priority import raise_priority\n"
        "os.setpriority(os.PRIO_PROCESS, 0, 5)\n"
        "if os.geteuid() == 0:\n"
        "    os.setuid(65534)\n"
        "raised = raise_priority(os.getpid(), 'the test task')\n"
        "sys.exit(0 if not raised and os.getpriority(os.PRIO_PROCESS, 0) == 5 else 1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "the test task runs at the daemon's CPU priority" in result.stderr


def test_a_process_raised_whole_runs_its_threads_and_their_children_urgent() -> None:
    """The agent's threads share one interpreter lock: all of them are raised, those already
    running and those started later."""
    if os.geteuid() != 0:
        pytest.skip("raising a priority needs CAP_SYS_NICE")
    script = (
        "import os, subprocess, sys, threading\n"
        "from gatewayd.dataplane.priority import URGENT_NICE, raise_process_priority\n"
        "stop = threading.Event()\n"
        "early = threading.Thread(target=stop.wait)\n"
        "early.start()\n"
        "assert raise_process_priority('the test process')\n"
        "later = threading.Thread(target=stop.wait)\n"
        "later.start()\n"
        "child = subprocess.run(['cat', '/proc/self/stat'], capture_output=True, text=True)\n"
        "tasks = [int(t) for t in os.listdir('/proc/self/task')]\n"
        "nices = {os.getpriority(os.PRIO_PROCESS, t) for t in tasks}\n"
        "stop.set()\n"
        "child_nice = int(child.stdout.rsplit(')', 1)[1].split()[16])\n"
        "sys.exit(0 if len(tasks) == 3 and nices == {URGENT_NICE} and child_nice == URGENT_NICE"
        " else 1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
