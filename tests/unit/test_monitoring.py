"""packaging/monitoring: the alert rules pass promtool's checks and unit tests, the
PrometheusRule carries the same groups, and every metric an alert names is one the daemons
export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_metrics import exposition, gateway_state

from gatewayd.agent.metrics import nat_samples
from gatewayd.controller.metrics import controller_samples
from gatewayd.dataplane.natstats import NatFlow
from gatewayd.metrics import REGISTRY, generate_latest, plan_samples
from gatewayd.probe import Failover
from gatewayd.steer.metrics import gateway_samples

pytestmark = pytest.mark.unit

MONITORING = Path(__file__).resolve().parents[2] / "packaging" / "monitoring"
RULES = MONITORING / "gatewayd-rules.yml"


def promtool(*args: str, cwd: Path = MONITORING) -> None:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing (Debian package prometheus; scripts/setup)"
    result = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_promtool_check() -> None:
    promtool("check", "rules", RULES.name)


def test_rules_pass_their_unit_tests() -> None:
    promtool("test", "rules", "gatewayd-rules.test.yml")


def test_prometheus_rule_carries_the_same_groups(tmp_path: Path) -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    (tmp_path / "spec.yml").write_text(yaml.safe_dump(rule["spec"]))
    promtool("check", "rules", "spec.yml", cwd=tmp_path)


def exported_names() -> set[str]:
    failover = Failover("p", "gw-a", "gw-b", "2026-12-03T00:00:00Z")
    state = exposition([
        *gateway_state(),
        *nat_samples([NatFlow("198.51.100.70", "203.0.113.5", 443, "tcp")], ["198.51.100.70"]),
        *plan_samples("agent", desired=2, applied=1, ready=False, policies=1),
        *gateway_samples({"gw-a": False}, [failover]),
        *controller_samples(True, {"p": {"gateways": [], "conditions": []}}),
    ])
    text = state + generate_latest(REGISTRY).decode()
    return set(re.findall(r"^# TYPE (\w+) ", text, re.MULTILINE)) | set(
        re.findall(r"^(\w+)[{ ]", text, re.MULTILINE))


def test_every_metric_an_alert_names_is_exported() -> None:
    names = exported_names()
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    used = {name for rule in rules for name in re.findall(r"\bgatewayd_\w+", rule["expr"])}
    assert used and used - names == set()


def test_dashboard_queries_parse_and_name_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    # promtool parses each query as a recording rule's expression.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
    used = {name for expr in exprs for name in re.findall(r"\bgatewayd_\w+", expr)}
    exported = exported_names()
    assert {n.removesuffix("_bucket") for n in used} - exported == set()
