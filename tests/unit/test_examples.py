"""The example snapshots answer `gatewayctl explain` exactly as examples/README.md says.

Every row of every table in the README is run through the real CLI (`-o json`), and the two
transcripts in the README are compared with the real output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gatewayd.cli.gatewayctl import main as gatewayctl_main
from gatewayd.policy.engine import build_plan
from gatewayd.policy.snapshot import load_snapshot

pytestmark = pytest.mark.unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
README = EXAMPLES / "README.md"
COLUMNS = ["--src", "--dst", "verdict", "gateway", "egressIP", "policy", "reason"]


def documented_rows() -> list[tuple[str, dict[str, str | None]]]:
    """(example file, row) for every table row under a `## NAME.yaml` heading."""
    rows = []
    example = None
    for line in README.read_text().splitlines():
        heading = re.fullmatch(r"## (\S+\.yaml)", line)
        if heading:
            example = heading.group(1)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if (
            example is None
            or not line.startswith("|")
            or cells == COLUMNS
            or set(line) <= set("|-")
        ):
            continue
        assert len(cells) == len(COLUMNS), line
        rows.append(
            (example, {k: None if v == "-" else v for k, v in zip(COLUMNS, cells, strict=True)})
        )
    return rows


ROWS = documented_rows()


def test_every_example_is_documented_and_loads_cleanly() -> None:
    files = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert files == ["all-destinations.yaml", "payment-gateway.yaml", "two-gateways.yaml"]
    assert sorted({example for example, _ in ROWS}) == files
    for name in files:
        loaded = load_snapshot([EXAMPLES / name])
        assert loaded.problems == ()
        assert loaded.snapshot.policies


@pytest.mark.parametrize(
    ("example", "row"), ROWS, ids=[f"{e}:{r['--src']}->{r['--dst']}" for e, r in ROWS]
)
def test_documented_verdict(
    example: str, row: dict[str, str | None], capsys: pytest.CaptureFixture[str]
) -> None:
    code = gatewayctl_main(
        ["explain", "-f", str(EXAMPLES / example), "--src", str(row["--src"]),
         "--dst", str(row["--dst"]), "-o", "json"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert {k: answer[k] for k in COLUMNS[2:]} == {k: row[k] for k in COLUMNS[2:]}


def transcripts() -> list[tuple[list[str], str]]:
    """(argv, expected stdout) of every `$ gatewayctl explain ...` block in the README."""
    found = []
    for block in re.findall(
        r"```\n\$ gatewayctl explain (.*?)\n(.*?)```", README.read_text(), re.S
    ):
        argv = block[0].replace("examples/", f"{EXAMPLES}/").split()
        found.append((argv, block[1]))
    return found


@pytest.mark.parametrize(("argv", "expected"), transcripts())
def test_readme_transcripts(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gatewayctl_main(["explain", *argv]) == 0
    assert capsys.readouterr().out == expected


def test_payment_gateway_plans() -> None:
    plan = build_plan(load_snapshot([EXAMPLES / "payment-gateway.yaml"]).snapshot)
    (active,) = plan.gateway_plan("gw-a").rules
    (standby,) = plan.gateway_plan("gw-b").rules
    assert (active.role.value, str(active.egress_ip)) == ("active", "203.0.113.10")
    assert (standby.role.value, str(standby.egress_ip)) == ("standby", "203.0.113.10")
    assert sorted(map(str, active.sources)) == ["10.244.1.10", "10.244.2.10"]
    assert [str(d) for d in active.destinations] == ["198.51.100.80/32"]
    (steer,) = plan.node_plan("node-1").rules
    assert (sorted(map(str, steer.sources)), steer.gateway, steer.standby) == (
        ["10.244.1.10"],
        "gw-a",
        "gw-b",
    )
    assert plan.policy_results["payment-gateway"].selected_pods == 2
