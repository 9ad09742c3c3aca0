"""`gatewayctl validate`: exit codes 0/1/2 and the exact lines it prints."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest

from gatewayd.cli import gatewayctl, validate

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path("tests/fixtures/validation")  # relative, as a user would type it


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = gatewayctl.main(["validate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


POLICY = """\
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata:
  name: {name}
spec:
  selectors: [{{podSelector: {{}}}}]
  destinationCIDRs: [192.0.2.0/24]
  egressGateway:
    nodeSelector: {{}}
"""


def test_valid_file_exits_0_with_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "-f", str(FIXTURES / "valid.yaml")) == (
        0,
        "tests/fixtures/validation/valid.yaml: 3 policies valid\n",
        "",
    )


def test_invalid_file_exits_1_with_one_line_per_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "-f", str(FIXTURES / "invalid.yaml"))
    assert code == 1
    assert out == (REPO / FIXTURES / "invalid.expected").read_text()
    assert (
        "tests/fixtures/validation/invalid.yaml: EgressGatewayPolicy/pay:"
        " spec.egressGateways[1].nodeSelector: Required value"
    ) in out.splitlines()
    assert err == (
        "gatewayctl validate: tests/fixtures/validation/invalid.yaml: 2 policies invalid,"
        " 1 policy valid\n"
    )


def test_long_option_repeated_files_and_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dir").mkdir()
    write(tmp_path / "dir" / "a.yaml", POLICY.format(name="a"))
    write(tmp_path / "dir" / "b.yml", POLICY.format(name="b"))
    single = write(tmp_path / "c.yaml", POLICY.format(name="c"))
    code, out, err = run(capsys, "--filename", str(tmp_path / "dir"), "-f", single)
    assert (code, err) == (0, "")
    assert out == f"{tmp_path / 'dir'}, {single}: 3 policies valid\n"


def test_one_policy_is_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "p.yaml", POLICY.format(name="a"))
    assert run(capsys, "-f", path) == (0, f"{path}: 1 policy valid\n", "")


def test_no_policies_found_is_not_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    assert run(capsys, "-f", path) == (0, f"{path}: no policies found\n", "")


def test_problems_across_files_name_their_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path / "good.yaml", POLICY.format(name="good"))
    bad = write(tmp_path / "bad.yaml", POLICY.format(name="Bad"))
    code, out, err = run(capsys, "-f", good, "-f", bad)
    assert code == 1
    [line] = out.splitlines()
    assert line.startswith(f'{bad}: EgressGatewayPolicy/Bad: metadata.name: Invalid value: "Bad": ')
    assert err.endswith("1 policy invalid, 1 policy valid\n")


def test_yaml_syntax_error_exits_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "x.yaml", POLICY.format(name="a") + "  bad: [\n")
    code, out, err = run(capsys, "-f", path)
    assert (code, out) == (2, "")
    assert err.startswith(f"gatewayctl validate: {path}:11: YAML syntax error: ")


def test_unusable_object_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path / "x.yaml",
        POLICY.format(name="a") + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web}\n",
    )
    assert run(capsys, "-f", path) == (
        2,
        "",
        f"gatewayctl validate: {path}:11: Pod/default/web: metadata.uid: Required value\n",
    )


def test_duplicate_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write(tmp_path / "1.yaml", POLICY.format(name="a"))
    second = write(tmp_path / "2.yaml", POLICY.format(name="a"))
    assert run(capsys, "-f", first, "-f", second) == (
        2,
        "",
        f"gatewayctl validate: {second}:1: EgressGatewayPolicy/a: defined twice (first in"
        f" {first}:1)\n",
    )


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "-f", "no/such.yaml") == (
        2,
        "",
        "gatewayctl validate: no/such.yaml: no such file or directory\n",
    )


def test_json_document_that_is_not_an_object_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps(["not", "an", "object"]))
    code, out, err = run(capsys, "-f", str(path))
    assert (code, out) == (2, "")
    assert err == (
        f"gatewayctl validate: {path}: expected a Kubernetes object (a mapping with apiVersion"
        " and kind), found array\n"
    )


def test_filename_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        gatewayctl.main(["validate"])
    assert raised.value.code == 2
    assert "-f/--filename" in capsys.readouterr().err


def test_register_adds_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="gatewayctl")
    subparsers = parser.add_subparsers(dest="command", required=True)
    validate.register(subparsers)
    args = parser.parse_args(["validate", "-f", str(FIXTURES / "invalid.yaml")])
    assert args.func is validate.run
    assert args.func(args) == 1
    assert capsys.readouterr().out == (REPO / FIXTURES / "invalid.expected").read_text()
