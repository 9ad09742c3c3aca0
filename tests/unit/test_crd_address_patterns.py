"""The CRD's address checks (RE2 patterns and CEL rules, since a Kubernetes 1.30 API server
offers no isIP/isCIDR to new CRDs) accept exactly the addresses `gatewayctl validate` accepts.
Hypothesis generates real addresses in their usual spellings, the same with one character
inserted or replaced, and near misses: hex groups, octets with leading zeros, stray or doubled
colons, embedded IPv4, zones, prefix lengths out of range."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import re2
from fakecluster.crdcheck import CustomResourceValidator, load_documents
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gatewayd.policy.fields import parse_prefix
from gatewayd.policy.validation import parse_policy

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD_DOCUMENT = load_documents(REPO / "packaging/kubernetes/crds/egressgatewaypolicies.yaml")[0]
CRD = CustomResourceValidator(CRD_DOCUMENT)
SPEC_SCHEMA = CRD_DOCUMENT["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
CIDR_PATTERN = re2.compile(SPEC_SCHEMA["properties"]["destinationCIDRs"]["items"]["pattern"])

POLICY: dict[str, Any] = {
    "apiVersion": "egress.gatewayd.io/v1alpha1",
    "kind": "EgressGatewayPolicy",
    "metadata": {"name": "pay"},
    "spec": {
        "selectors": [{"podSelector": {}}],
        "destinationCIDRs": ["192.0.2.0/24"],
        "egressGateway": {"nodeSelector": {}},
    },
}
# Compile every CEL rule now: cel-python raises the recursion limit on first use, which
# Hypothesis warns about when it happens inside a test.
assert CRD.errors(POLICY) == []

hex_group = st.text("0123456789abcdefABCDEF", min_size=0, max_size=5)
octet = st.sampled_from(
    ["0", "00", "01", "1", "10", "99", "127", "192", "223", "224", "239", "240", "255", "256"]
)
dotted = st.lists(octet, min_size=3, max_size=5).map(".".join)
group = st.one_of(hex_group, st.sampled_from(["", "0", "ffff", "FFFF", "ff02", "1"]), dotted)
colon_separated = st.lists(group, min_size=1, max_size=10).map(":".join)
real_address = st.ip_addresses().flatmap(
    lambda a: st.sampled_from([str(a), a.exploded, str(a).upper()])
)


def edited(text: str, position: int, insert: str, replace: bool) -> str:
    position %= len(text) + 1
    return text[:position] + insert + text[position + replace :]


near_real_address = st.builds(
    edited,
    real_address,
    st.integers(0, 45),
    st.sampled_from(["", ":", "0", ".", "f"]),
    st.booleans(),
)
address_like = st.one_of(
    real_address,
    near_real_address,
    dotted,
    colon_separated,
    st.tuples(
        st.sampled_from(["", ":", "::"]), colon_separated, st.sampled_from(["", ":", "::"])
    ).map("".join),
    st.text("0123456789abcdef:.%/ ", max_size=16),
)
prefix_length = st.sampled_from(["0", "00", "01", "8", "24", "32", "33", "64", "128", "129", ""])


def parser_accepts_cidr(text: str) -> bool:
    try:
        parse_prefix(text)
    except ValueError:
        return False
    return True


@settings(max_examples=1500, deadline=None)
@given(address_like, prefix_length)
@example("::ffff:192.0.2.0", "120")
@example("1:2:3:4:5:6:7::", "64")
@example("fe80::1%eth0", "64")
@example("01.2.3.4", "8")
def test_cidr_pattern_accepts_what_the_parser_accepts(address: str, length: str) -> None:
    text = f"{address}/{length}"
    assert bool(CIDR_PATTERN.search(text)) == parser_accepts_cidr(text), text


def egress_ip_policy(text: str) -> dict[str, Any]:
    policy = copy.deepcopy(POLICY)
    policy["spec"]["egressGateway"]["egressIP"] = text
    return policy


@settings(max_examples=300, deadline=None)
@given(address_like)
@example("::ffff:1")  # ffff is the 7th group here: not IPv4-mapped
@example("0:0:0:0:0:ffff:1::")  # ... and the 6th here: IPv4-mapped
@example("::0.0.0.1")  # ::1, the loopback address
@example("0000:0000:0000:0000:0000:abcd:203.0.113.10")  # well-formed, longer than 39
def test_egress_ip_rules_accept_what_the_parser_accepts(text: str) -> None:
    policy = egress_ip_policy(text)
    parser_valid = parse_policy(policy)[0] is not None
    crd_errors = CRD.errors(policy)
    assert parser_valid == (not crd_errors), (text, crd_errors)
