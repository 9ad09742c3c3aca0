"""Ansible callback for tests/system/test_ansible.py: every task result as one JSON line in the
file named by GATEWAYD_TIMELINE, with the host, the task, its outcome, and the wall-clock
times it started and ended (the containers share the host's clock), so a test can prove in
which order the hosts were changed. Task names only: no result data, so nothing secret."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: timeline
    type: aggregate
    short_description: each task result with its start and end time, as JSON lines
    description: Writes to the file named by the environment variable GATEWAYD_TIMELINE.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "timeline"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._path = os.environ["GATEWAYD_TIMELINE"]
        self._started: dict[tuple[str, str], float] = {}

    def v2_runner_on_start(self, host: Any, task: Any) -> None:
        self._started[(host.get_name(), task._uuid)] = time.time()

    def _record(self, result: Any, outcome: str) -> None:
        host, task = result._host.get_name(), result._task
        entry = {
            "host": host,
            "task": task.get_name(),
            "outcome": outcome,
            "changed": bool(result._result.get("changed")),
            "start": self._started.pop((host, task._uuid), None),
            "end": time.time(),
        }
        with open(self._path, "a") as out:
            out.write(json.dumps(entry) + "\n")

    def v2_runner_on_ok(self, result: Any) -> None:
        self._record(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._record(result, "failed")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._record(result, "skipped")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._record(result, "unreachable")
