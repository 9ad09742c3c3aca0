"""`gatewayctl explain`: output formats, exit codes and messages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gatewayd.cli import explain, gatewayctl

pytestmark = pytest.mark.unit

SNAPSHOT = """\
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: web-out}
spec:
  selectors: [{podSelector: {matchLabels: {app: web}}}]
  destinationCIDRs: [198.51.100.0/24]
  excludedCIDRs: [198.51.100.128/25]
  egressGateway:
    nodeSelector: {matchLabels: {role: gateway}}
---
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: blocked}
spec:
  selectors: [{podSelector: {matchLabels: {app: web}}}]
  destinationCIDRs: [203.0.113.0/24]
  egressGateway:
    nodeSelector: {matchLabels: {role: none}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, uid: "1111", labels: {app: web}}
spec: {nodeName: node-1}
status: {podIPs: [{ip: 10.244.1.5}]}
---
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGateway
metadata: {name: gw-1, labels: {role: gateway}}
status:
  addresses: [{type: InternalIP, address: 192.0.2.1}]
  interfaces: [{name: eth0, addresses: [192.0.2.1/24], defaultRouteV4: true}]
  conditions: [{type: Ready, status: "True"}]
"""

INVALID_POLICY = """\
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: broken}
spec:
  selectors: [{podSelector: {matchLabels: {app: web}}}]
  destinationCIDRs: [not-a-cidr]
  egressGateway:
    nodeSelector: {matchLabels: {role: gateway}}
"""


@pytest.fixture
def snapshot_file(tmp_path: Path) -> str:
    path = tmp_path / "snapshot.yaml"
    path.write_text(SNAPSHOT)
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = gatewayctl.main(["explain", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_snat(capsys: pytest.CaptureFixture[str], snapshot_file: str) -> None:
    code, out, err = run(
        capsys, "-f", snapshot_file, "--src", "10.244.1.5", "--dst", "198.51.100.9", "-o", "json"
    )
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert list(answer)[:5] == ["verdict", "gateway", "egressIP", "policy", "reason"]
    assert answer == {
        "verdict": "snat",
        "gateway": "gw-1",
        "egressIP": "192.0.2.1",
        "policy": "web-out",
        "reason": None,
        "standby": None,
        "cidr": "198.51.100.0/24",
        "pod": "default/web-1",
        "details": answer["details"],
    }
    assert "source 10.244.1.5 is pod default/web-1 on node node-1" in answer["details"]


@pytest.mark.parametrize(
    ("dst", "verdict", "reason", "gateway"),
    [
        ("198.51.100.200", "excluded", "excluded by policy web-out", None),
        ("203.0.113.1", "drop", "no-egress-gateway", None),
        ("192.0.2.200", "no-policy", "no destination or excluded CIDR of blocked, web-out "
         "contains 192.0.2.200", None),
    ],
)  # fmt: skip
def test_json_other_verdicts(
    capsys: pytest.CaptureFixture[str],
    snapshot_file: str,
    dst: str,
    verdict: str,
    reason: str,
    gateway: str | None,
) -> None:
    code, out, _ = run(
        capsys, "-f", snapshot_file, "--src", "10.244.1.5", "--dst", dst, "-o", "json"
    )
    answer = json.loads(out)
    assert code == 0
    assert (answer["verdict"], answer["reason"], answer["gateway"]) == (verdict, reason, gateway)


def test_text_is_the_default(capsys: pytest.CaptureFixture[str], snapshot_file: str) -> None:
    code, out, err = run(
        capsys, "-f", snapshot_file, "--src", "10.244.1.5", "--dst", "198.51.100.9"
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "SNAT: 10.244.1.5 -> 198.51.100.9 leaves through gateway gw-1 as 192.0.2.1"
    assert lines[1] == "  policy: web-out, CIDR 198.51.100.0/24"
    assert "  - longest prefix wins: 198.51.100.0/24 (destination of policy web-out)" in lines


def test_text_drop(capsys: pytest.CaptureFixture[str], snapshot_file: str) -> None:
    _, out, _ = run(capsys, "-f", snapshot_file, "--src", "10.244.1.5", "--dst", "203.0.113.1")
    assert out.splitlines()[0] == "DROP (no-egress-gateway): 10.244.1.5 -> 203.0.113.1 is dropped"


def test_source_that_is_no_pod_is_an_answer_not_an_error(
    capsys: pytest.CaptureFixture[str], snapshot_file: str
) -> None:
    code, out, err = run(capsys, "-f", snapshot_file, "--src", "10.9.9.9", "--dst", "198.51.100.9")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == (
        "NO POLICY: 10.9.9.9 -> 198.51.100.9 is not redirected "
        "(source 10.9.9.9 is not the IP of a pod egress policies apply to)"
    )


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ("10.244.1.300", "198.51.100.9",
         "--src: '10.244.1.300' is not an IP address; expected e.g. 10.0.1.5 or fd00::5"),
        ("10.244.1.5", "example.com",
         "--dst: 'example.com' is not an IP address; expected e.g. 10.0.1.5 or fd00::5"),
        ("10.244.1.5", "2001:db8::1",
         "--src 10.244.1.5 is IPv4 but --dst 2001:db8::1 is IPv6; "
         "give two addresses of the same family"),
    ],
)  # fmt: skip
def test_bad_addresses_exit_2(
    capsys: pytest.CaptureFixture[str], snapshot_file: str, src: str, dst: str, message: str
) -> None:
    code, out, err = run(capsys, "-f", snapshot_file, "--src", src, "--dst", dst)
    assert (code, out) == (2, "")
    assert err == f"gatewayctl explain: error: {message}\n"


def test_unreadable_snapshot_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\n  metadata: [\n")
    code, out, err = run(capsys, "-f", str(bad), "--src", "10.0.0.1", "--dst", "10.0.0.2")
    assert (code, out) == (2, "")
    assert err.startswith(f"gatewayctl explain: error: {bad}:")
    missing = tmp_path / "missing.yaml"
    code, _, err = run(capsys, "-f", str(missing), "--src", "10.0.0.1", "--dst", "10.0.0.2")
    assert code == 2
    assert err == f"gatewayctl explain: error: {missing}: no such file or directory\n"


def test_invalid_policies_are_warned_about_and_left_out(
    capsys: pytest.CaptureFixture[str], snapshot_file: str, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(INVALID_POLICY)
    code, out, err = run(
        capsys, "-f", snapshot_file, "-f", str(broken), "--src", "10.244.1.5",
        "--dst", "198.51.100.9", "-o", "json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["policy"] == "web-out"
    warnings = err.splitlines()
    assert warnings
    for line in warnings:
        assert line.startswith(
            f"gatewayctl explain: warning: policy left out: {broken}: EgressGatewayPolicy/broken: "
            "spec.destinationCIDRs[0]: "
        )


def test_register_adds_the_explain_subcommand(snapshot_file: str) -> None:
    parser = argparse.ArgumentParser(prog="gatewayctl")
    explain.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["explain", "-f", snapshot_file, "--src", "10.244.1.5", "--dst", "198.51.100.9"]
    )
    assert args.func is explain.run
    assert (args.filename, args.src, args.dst, args.output) == (
        [snapshot_file],
        "10.244.1.5",
        "198.51.100.9",
        "text",
    )


FINISHED_POD_SHARING_AN_IP = """\
---
apiVersion: v1
kind: Pod
metadata: {name: backup-1, namespace: default, uid: "2222", labels: {app: backup}}
spec: {nodeName: node-1}
status: {phase: Succeeded, podIPs: [{ip: 10.244.1.5}]}
---
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: backup-out}
spec:
  selectors: [{podSelector: {matchLabels: {app: backup}}}]
  destinationCIDRs: [192.0.2.128/25]
  egressGateway:
    nodeSelector: {matchLabels: {role: gateway}}
"""


def test_a_finished_pod_sharing_an_ip_with_a_running_one_is_not_the_answer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The CNI gave the finished backup-1's IP to web-1: explain answers for web-1 only."""
    path = tmp_path / "snapshot.yaml"
    path.write_text(SNAPSHOT + FINISHED_POD_SHARING_AN_IP)
    code, out, _ = run(capsys, "-f", str(path), "--src", "10.244.1.5", "--dst", "192.0.2.200",
                       "-o", "json")
    answer = json.loads(out)
    assert code == 0
    assert (answer["verdict"], answer["pod"]) == ("no-policy", "default/web-1")
    code, out, _ = run(capsys, "-f", str(path), "--src", "10.244.1.5", "--dst", "198.51.100.1",
                       "-o", "json")
    answer = json.loads(out)
    assert (answer["verdict"], answer["policy"], answer["pod"]) == (
        "snat", "web-out", "default/web-1"
    )
