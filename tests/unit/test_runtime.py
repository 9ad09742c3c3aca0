"""The daemon loop: input checks on change (inotify), on the poll timer, and on SIGHUP."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gatewayd.lab.netns import wait_for
from gatewayd.runtime import DaemonLoop, fingerprint, write_json_atomic

pytestmark = pytest.mark.unit


def run_in_thread(loop: DaemonLoop, checks: list[bool]) -> threading.Thread:
    thread = threading.Thread(
        target=loop.run, args=(checks.append, lambda: None), daemon=True
    )
    thread.start()
    return thread


def stop(loop: DaemonLoop, thread: threading.Thread) -> None:
    loop.stopping = True
    loop._on_inputs_changed()  # wakes the wait
    thread.join(5)
    assert not thread.is_alive()


def test_a_file_change_wakes_the_loop_long_before_the_poll(tmp_path: Path) -> None:
    loop = DaemonLoop(poll_seconds=3600, repair_seconds=3600)
    loop.watch([tmp_path])
    checks: list[bool] = []
    thread = run_in_thread(loop, checks)
    try:
        wait_for(lambda: len(checks) == 1, 5, "the first input check")
        write_json_atomic(tmp_path / "policy.json", {"a": 1})  # rename: MOVED_TO
        wait_for(lambda: len(checks) >= 2, 5, "an input check after the file changed")
        assert checks[-1] is False  # not forced: the follower compares fingerprints itself
    finally:
        stop(loop, thread)


def test_a_watched_file_is_watched_through_its_directory(tmp_path: Path) -> None:
    config = tmp_path / "gatewayd.yaml"
    config.write_text("a: 1\n")
    loop = DaemonLoop(poll_seconds=3600, repair_seconds=3600)
    loop.watch([config])
    checks: list[bool] = []
    thread = run_in_thread(loop, checks)
    try:
        wait_for(lambda: len(checks) == 1, 5, "the first input check")
        config.write_text("a: 2\n")
        wait_for(lambda: len(checks) >= 2, 5, "an input check after the config changed")
    finally:
        stop(loop, thread)


def test_reload_request_forces_a_check(tmp_path: Path) -> None:
    loop = DaemonLoop(poll_seconds=3600, repair_seconds=3600)
    checks: list[bool] = []
    thread = run_in_thread(loop, checks)
    try:
        wait_for(lambda: len(checks) == 1, 5, "the first input check")
        loop._on_reload(1, None)
        wait_for(lambda: checks[-1] is True, 5, "a forced check after SIGHUP")
    finally:
        stop(loop, thread)


def test_fingerprint_sees_new_changed_and_removed_files(tmp_path: Path) -> None:
    before = fingerprint([tmp_path])
    (tmp_path / "a.yaml").write_text("x")
    with_file = fingerprint([tmp_path])
    assert with_file != before
    (tmp_path / "a.yaml").write_text("longer")
    assert fingerprint([tmp_path]) != with_file
    (tmp_path / "a.yaml").unlink()
    assert fingerprint([tmp_path]) == before
