"""`-` for standard input: `gatewayctl validate -f -`, `explain -f -` and `check-config -` read
a pipe through the same bounded reader and checks as a file, and errors name `<stdin>`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_config import AGENT, STEER
from test_explain_cli import INVALID_POLICY, SNAPSHOT

from gatewayd.cli import gatewayctl
from gatewayd.policy.safeload import DOCUMENT_LIMITS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: bytes,
        *argv: str) -> tuple[int, str, str]:
    """`gatewayctl ARGV` in this process with `stdin` as its standard input."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = gatewayctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_reads_a_pipe(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run(monkeypatch, capsys, SNAPSHOT.encode(), "validate", "-f", "-") == (
        0, "<stdin>: 2 policies valid\n", "")


def test_validate_names_stdin_and_the_field_of_an_invalid_policy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(monkeypatch, capsys, INVALID_POLICY.encode(), "validate", "-f", "-")
    assert code == 1
    assert out.startswith("<stdin>: EgressGatewayPolicy/broken: spec.destinationCIDRs[0]")
    assert err == "gatewayctl validate: <stdin>: 1 policy invalid, 0 policies valid\n"


def test_stdin_and_files_mix_in_order(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    policies, rest = SNAPSHOT.split("---\napiVersion: v1\nkind: Pod", 1)
    pods = tmp_path / "pods.yaml"
    pods.write_text("apiVersion: v1\nkind: Pod" + rest)
    code, out, err = run(monkeypatch, capsys, policies.encode(), "explain", "-f", "-", "-f",
                         str(pods), "--src", "10.244.1.5", "--dst", "198.51.100.9", "-o", "json")
    assert (code, err) == (0, "")
    assert json.loads(out)["verdict"] == "snat"


def test_json_on_stdin_is_read_as_json(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # kubectl get -o json prints a List; a duplicate key is refused as in a *.json file.
    policy = {"apiVersion": "egress.gatewayd.io/v1alpha1", "kind": "EgressGatewayPolicy",
              "metadata": {"name": "p"},
              "spec": {"selectors": [{"podSelector": {}}], "destinationCIDRs": ["192.0.2.0/24"],
                       "egressGateway": {"nodeSelector": {}}}}
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": [policy]}, indent=2)
    assert run(monkeypatch, capsys, listed.encode(), "validate", "-f", "-") == (
        0, "<stdin>: 1 policy valid\n", "")
    code, _, err = run(monkeypatch, capsys, b'{"kind": "List", "kind": "List"}',
                       "validate", "-f", "-")
    assert (code, err) == (2, "gatewayctl validate: <stdin>: JSON: duplicate key 'kind'\n")


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"kind: Pod\n  bad: [\n", "<stdin>:2: YAML syntax error"),
        (b"a: &x 1\nb: *x\n", "<stdin>:1: anchors (&x) are not accepted"),
        (b"kind: List\n\xff\n", "<stdin>:2: not UTF-8 text"),
        (b"a: 1\na: 2\n", "<stdin>:2: duplicate key 'a' (first on line 1)"),
    ],
)
def test_unusable_stdin_exits_2_naming_stdin_and_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: bytes,
    message: str,
) -> None:
    code, out, err = run(monkeypatch, capsys, stdin, "validate", "-f", "-")
    assert (code, out) == (2, "")
    assert err.startswith(f"gatewayctl validate: {message}")


def test_stdin_is_bounded_like_a_file(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    too_large = b"#" * (DOCUMENT_LIMITS.max_bytes + 1)
    code, _, err = run(monkeypatch, capsys, too_large, "explain", "-f", "-", "--src",
                       "10.0.0.1", "--dst", "10.0.0.2")
    assert code == 2
    assert err == (f"gatewayctl explain: error: <stdin>: larger than "
                   f"{DOCUMENT_LIMITS.max_bytes} bytes: refused\n")


def test_stdin_given_twice_is_refused(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(monkeypatch, capsys, SNAPSHOT.encode(), "validate", "-f", "-", "-f", "-")
    assert code == 2
    assert err == ("gatewayctl validate: <stdin>: standard input (-) given twice; it can be "
                   "read only once\n")


@pytest.mark.parametrize(("config", "role"), [(AGENT, "gateway"), (STEER, "steer")])
def test_check_config_reads_a_pipe(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], config: str,
                                   role: str) -> None:
    assert run(monkeypatch, capsys, config.encode(), "check-config", "-") == (
        0, f"<stdin>: valid {role} configuration\n", "")


def test_check_config_errors_name_stdin_line_and_field(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = AGENT.replace("listenPort: 51820", "listenPort: 0").replace(
        "uplink: eth0", "uplink: eth0\ncolour: blue")
    code, out, err = run(monkeypatch, capsys, broken.encode(), "check-config", "-")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "<stdin>:14: tunnel.listenPort: must be between 1 and 65535, got 0",
        "<stdin>:7: colour: unknown setting",
    ]


def test_a_real_pipe_into_the_installed_command() -> None:
    config = textwrap.dedent("""\
        node: node1
        snapshot: /a
        tunnel: {gateways: [{name: gw1, publicKey: 1}]}
        """)
    result = subprocess.run(
        [sys.executable, "-m", "gatewayd.cli.gatewayctl", "check-config", "-"],
        input=config, capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("<stdin>:3: tunnel.gateways[0].publicKey: must be a "
                                    "WireGuard public key, got 1")
