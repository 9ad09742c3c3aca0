"""The EgressGatewayPolicy CRD rejects what `gatewayctl validate` rejects, and accepts what it
accepts: one table of cases (tests/fixtures/policy_cases.yaml) through `parse_policy` and
through the CRD as the API server checks a create (testkit/fakecluster/crdcheck.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from fakecluster.crdcheck import CustomResourceValidator, load_documents

from gatewayd.policy.validation import parse_policy

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "packaging/kubernetes/crds/egressgatewaypolicies.yaml"
CASES_FILE = REPO / "tests/fixtures/policy_cases.yaml"
TABLE = load_documents(CASES_FILE)[0]
CRD = CustomResourceValidator(load_documents(CRD_FILE)[0])


def expand(value: Any) -> Any:
    """Resolve the table's `{$repeat: N, $item: X}` shorthand, anywhere in a value."""
    if isinstance(value, dict) and "$repeat" in value:
        item = expand(value["$item"])
        if isinstance(item, str):
            return value.get("$prefix", "") + item * value["$repeat"] + value.get("$suffix", "")
        return [copy.deepcopy(item) for _ in range(value["$repeat"])]
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v) for v in value]
    return value


def build(case: dict[str, Any]) -> dict[str, Any]:
    """The object a case describes: the base policy with the case's changes."""
    obj: dict[str, Any] = copy.deepcopy(TABLE["base"])
    obj.update(expand(case.get("merge", {})))
    if "metadata" in case:
        obj["metadata"] = expand(case["metadata"])
    if isinstance(obj.get("spec"), dict):
        for name in case.get("drop", ()):
            del obj["spec"][name]
        obj["spec"].update(expand(case.get("spec", {})))
    return obj


def verdict(valid: bool) -> str:
    return "valid" if valid else "invalid"


def parser_verdict(obj: dict[str, Any]) -> tuple[str, list[str]]:
    policy, errors = parse_policy(obj)
    assert (policy is None) == bool(errors)
    return verdict(policy is not None), [str(e) for e in errors]


def crd_verdict(obj: dict[str, Any]) -> tuple[str, list[str]]:
    errors = CRD.errors(obj)
    return verdict(not errors), errors


@pytest.mark.parametrize("case", TABLE["cases"], ids=lambda case: case["name"])
def test_parser_and_crd_agree(case: dict[str, Any]) -> None:
    obj = build(case)
    expected = verdict(case["valid"])
    parser, parser_errors = parser_verdict(obj)
    crd, crd_errors = crd_verdict(obj)
    assert (parser, crd) == (expected, expected), (parser_errors, crd_errors)


@pytest.mark.parametrize("case", TABLE["differences"], ids=lambda case: case["name"])
def test_known_differences_are_as_documented(case: dict[str, Any]) -> None:
    obj = build(case)
    parser, parser_errors = parser_verdict(obj)
    crd, crd_errors = crd_verdict(obj)
    assert parser != crd, "both agree now: move this case into `cases`"
    assert (parser, crd) == (case["parser"], case["crd"]), (parser_errors, crd_errors)


def test_every_rule_has_valid_and_invalid_cases() -> None:
    rules = TABLE["rules"]
    covered = {(c["rule"], c["valid"]) for c in TABLE["cases"]}
    assert {c["rule"] for c in TABLE["cases"]} <= set(rules)
    missing = [(r, v) for r in rules for v in (True, False) if (r, v) not in covered]
    assert missing == []
    assert len(TABLE["cases"]) >= 30


def test_an_invalid_case_fails_on_its_own_field() -> None:
    """Guards against a table whose invalid cases all fail for one unrelated reason: the CRD
    errors name the field each case breaks."""
    expected_paths = {
        "interface and egressIP together": "spec.egressGateway.egressIP",
        "In without values": "spec.selectors[0].podSelector.matchExpressions[0].values",
        "nodeSelector alone": "spec.selectors[0]",
        "no gateway at all": "spec.egressGateway",
        "prefix length out of range": "spec.destinationCIDRs[0]",
        "label key with a space": "spec.selectors[0].podSelector.matchLabels",
        'label value null (YAML "app:" with nothing after it)': (
            "spec.selectors[0].podSelector.matchLabels"
        ),
        "IPv4-mapped IPv6 egressIP": "spec.egressGateway.egressIP",
        "interface with a colon (an old alias label)": "spec.egressGateway.interface",
        "65 egressGateways": "spec.egressGateways",
        "misspelled egressIP": "spec.egressGateway.egressIp",
    }
    cases = {c["name"]: c for c in TABLE["cases"]}
    for name, path in expected_paths.items():
        errors = CRD.errors(build(cases[name]))
        assert errors, name
        assert all(e.startswith(path) for e in errors), (name, errors)
