"""`gatewayctl validate`, `explain` and `check-config` as processes on hostile files: each
ends in a clear error within bounded time and memory, never a traceback, a signal or a hang.

The bound: every run gets RLIMIT_AS 512 MiB and RLIMIT_CPU 30 s (a valid run needs about
40 MB and a third of a second), and a wall-clock timeout of 120 s for a loaded machine.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
from test_hostile_input import write

pytestmark = pytest.mark.unit

MEMORY_BYTES = 512 * 2**20
CPU_SECONDS = 30
WALL_SECONDS = 120


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))


def gatewayctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayctl", *args],
        capture_output=True, text=True, timeout=WALL_SECONDS, preexec_fn=_limit, check=False,
    )


def alias_bomb() -> str:
    """503 bytes that expand to 9**9 strings wherever a loader follows the aliases."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join(['*' + previous] * 9)}]")
    return (
        "apiVersion: egress.gatewayd.io/v1alpha1\nkind: EgressGatewayPolicy\n"
        "metadata: {name: bomb}\n" + "\n".join(lines) + "\nspec: {destinationCIDRs: *i}\n"
    )


def merge_chain() -> str:
    """Each mapping merges the previous one several times over: PyYAML copies them all."""
    lines = ["m0: &m0 {k: 0}"]
    for level in range(1, 19):
        merges = ", ".join([f"*m{level - 1}"] * 4)
        lines.append(f"m{level}: &m{level} {{<<: [{merges}], k{level}: {level}}}")
    return "kind: Pod\n" + "\n".join(lines) + "\n"


SNAPSHOTS: dict[str, str | bytes] = {
    "deep.yaml": "[" * 25_000 + "]" * 25_000 + "\n" + " " * 10_000,  # 60 KB
    "alias-bomb.yaml": alias_bomb(),
    "merge-chain.yaml": merge_chain(),
    "self-alias.yaml": "kind: &k [*k]\n",
    "not-utf8.yaml": b"apiVersion: v1\nkind: Pod\nmetadata: {name: \xff\xfe}\n",
    "timestamp.yaml": "apiVersion: v1\nkind: !!timestamp now\n",
    "int-tag.yaml": "apiVersion: v1\nkind: Pod\nspec: {x: !!int zero}\n",
    "huge-int.yaml": "apiVersion: v1\nkind: Pod\nspec: {x: " + "7" * 5_000 + "}\n",
    "deep.json": "[" * 100_000 + "]" * 100_000,
}

CONFIGS: dict[str, str | bytes] = {
    "deep.yaml": "name: gw1\nx: " + "[" * 25_000 + "]" * 25_000 + "\n",
    "alias-bomb.yaml": "name: gw1\n" + alias_bomb().replace("\nspec:", "\nuplink:"),
    "merge-chain.yaml": "name: gw1\n" + merge_chain().replace("kind: Pod\n", ""),
    "not-utf8.yaml": b"name: gw\xff\nuplink: eth0\n",
    "kubernetes-5.yaml": "name: gw1\nkubernetes: 5\nuplink: eth0\ntunnel: {}\n",
    "uplink-newline.yaml": 'name: gw1\nsnapshot: /s\nuplink: "eth0\\n"\ntunnel: {}\n',
    "poll-nan.yaml": "name: gw1\nsnapshot: /s\nuplink: eth0\ntunnel: {}\n"
                     "reconcile: {pollSeconds: .nan}\n",
    "steer-timestamp.yaml": "node: !!timestamp 2024-01-01\nsnapshot: /s\ntunnel: {}\n",
}


def assert_clear_error(result: subprocess.CompletedProcess[str], path: Path,
                       codes: tuple[int, ...]) -> None:
    assert result.returncode >= 0, f"killed by signal {-result.returncode}: {result.stderr[-500:]}"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in codes, (result.returncode, result.stderr[-500:])
    assert str(path) in result.stderr, result.stderr[-500:]
    assert len(result.stderr) < 2_000  # no structure expanded into the message


# Each process costs a second on a loaded machine: explain (the same reader as validate)
# gets the bombs only.
EXPLAINED = {"deep.yaml", "alias-bomb.yaml", "merge-chain.yaml", "deep.json"}


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_validate_and_explain_end_in_a_clear_error(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, SNAPSHOTS[name])
    assert_clear_error(gatewayctl("validate", "-f", str(path)), path, (2,))
    if name in EXPLAINED:
        explained = gatewayctl("explain", "-f", str(path), "--src", "10.0.0.1",
                               "--dst", "1.1.1.1")
        assert_clear_error(explained, path, (2,))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_check_config_ends_in_a_clear_error(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, CONFIGS[name])
    assert_clear_error(gatewayctl("check-config", str(path)), path, (1,))
