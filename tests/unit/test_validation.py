"""Policy validation: every rule of cilium-egress-semantics.md §2, §2.1, §3.3, §3.4, §4.1, §5.4
and of the CRD, each asserted with its exact field path; CIDR parsing checked against Python's
ipaddress with hypothesis."""

from __future__ import annotations

import copy
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.policy.fields import parse_address, parse_prefix, read_cidr
from gatewayd.policy.model import (
    FieldError,
    GatewaySpec,
    LabelSelector,
    Operator,
    Policy,
    Requirement,
)
from gatewayd.policy.validation import parse_policy

pytestmark = pytest.mark.unit

EGP = ("egress.gatewayd.io/v1alpha1", "EgressGatewayPolicy")
CEGP = ("cilium.io/v2", "CiliumEgressGatewayPolicy")


def policy_doc(kind: tuple[str, str] = EGP, /, **spec: Any) -> dict[str, Any]:
    """A valid policy; keyword arguments replace spec fields (None removes one)."""
    base: dict[str, Any] = {
        "selectors": [{"podSelector": {"matchLabels": {"app": "pay"}}}],
        "destinationCIDRs": ["192.0.2.0/24"],
        "egressGateway": {"nodeSelector": {"matchLabels": {"role": "gateway"}}},
    }
    for name, value in spec.items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    return {
        "apiVersion": kind[0],
        "kind": kind[1],
        "metadata": {"name": "pay"},
        "spec": base,
    }


def valid(doc: dict[str, Any]) -> Policy:
    policy, errors = parse_policy(doc)
    assert errors == []
    assert policy is not None
    return policy


def errors_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    policy, errors = parse_policy(doc)
    assert policy is None
    assert errors
    return [(e.path, e.message) for e in errors]


def paths_of(doc: dict[str, Any]) -> list[str]:
    return [path for path, _ in errors_of(doc)]


def quote(text: str) -> str:
    """How messages quote a value (like Go's %q)."""
    return json.dumps(text, ensure_ascii=False)


ROLE_GATEWAY = LabelSelector((Requirement("role", Operator.IN, frozenset({"gateway"})),))
APP_PAY = LabelSelector((Requirement("app", Operator.IN, frozenset({"pay"})),))

# --- valid policies ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [EGP, CEGP])
def test_minimal_policy_of_both_kinds(kind: tuple[str, str]) -> None:
    assert valid(policy_doc(kind)) == Policy(
        name="pay",
        kind=kind[1],
        endpoint_selectors=(APP_PAY,),
        node_selectors=(),
        destinations=(ipaddress.ip_network("192.0.2.0/24"),),
        exclusions=(),
        gateways=(GatewaySpec(ROLE_GATEWAY),),
        generation=0,
    )


def test_generation_comes_from_metadata() -> None:
    doc = policy_doc()
    doc["metadata"]["generation"] = 7
    assert valid(doc).generation == 7


def test_every_standard_metadata_field_and_status_are_accepted() -> None:
    doc = policy_doc()
    doc["metadata"] = {
        "name": "pay",
        "generateName": "pay-",
        "namespace": "",
        "uid": "0b3c",
        "resourceVersion": "12",
        "generation": 2,
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "deletionTimestamp": None,
        "labels": {"team": "pay"},
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
        "ownerReferences": [],
        "finalizers": ["x"],
        "managedFields": [{"manager": "kubectl"}],
    }
    doc["status"] = {"anything": ["goes", 1]}
    assert valid(doc).generation == 2


def test_full_policy() -> None:
    policy = valid(
        policy_doc(
            selectors=[
                {
                    "podSelector": {"matchLabels": {"app": "pay"}},
                    "namespaceSelector": {"matchLabels": {"team": "pay"}},
                    "nodeSelector": {"matchLabels": {"zone": "a"}},
                },
                {"namespaceSelector": {}},
                {
                    "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
                    "nodeSelector": {},
                },
            ],
            destinationCIDRs=["10.1.2.3/8", "2001:db8::1/32", "0.0.0.0/0"],
            excludedCIDRs=["10.9.0.0/16", "2001:db8:1::/48"],
            egressGateways=[
                {"nodeSelector": {"matchLabels": {"gw": "a"}}, "egressIP": "192.0.2.10"},
                {"nodeSelector": {"matchLabels": {"gw": "b"}}, "interface": "eth1"},
                {"nodeSelector": {}, "egressIP": "2001:db8::10"},
            ],
        )
    )
    assert policy.endpoint_selectors == (
        LabelSelector(
            (
                Requirement("io.cilium.k8s.namespace.labels.team", Operator.IN, frozenset({"pay"})),
                Requirement("app", Operator.IN, frozenset({"pay"})),
            )
        ),
        LabelSelector((Requirement("io.kubernetes.pod.namespace", Operator.EXISTS),)),
        LabelSelector((Requirement("tier", Operator.EXISTS),)),
    )
    # Every entry's nodeSelector is collected policy-wide (§3.4 quirk).
    assert policy.node_selectors == (
        LabelSelector((Requirement("zone", Operator.IN, frozenset({"a"})),)),
        LabelSelector(()),
    )
    assert policy.destinations == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("0.0.0.0/0"),
    )
    assert policy.exclusions == (
        ipaddress.ip_network("10.9.0.0/16"),
        ipaddress.ip_network("2001:db8:1::/48"),
    )
    # egressGateways non-empty: the list is used, egressGateway is not (§5.3).
    assert policy.gateways == (
        GatewaySpec(
            LabelSelector((Requirement("gw", Operator.IN, frozenset({"a"})),)),
            egress_ip=ipaddress.ip_address("192.0.2.10"),
        ),
        GatewaySpec(
            LabelSelector((Requirement("gw", Operator.IN, frozenset({"b"})),)), interface="eth1"
        ),
        GatewaySpec(LabelSelector(()), egress_ip=ipaddress.ip_address("2001:db8::10")),
    )


def test_empty_selectors_list_is_valid_and_selects_nothing() -> None:
    policy = valid(policy_doc(selectors=[]))
    assert policy.endpoint_selectors == ()
    assert policy.node_selectors == ()


def test_empty_egress_gateways_falls_back_to_egress_gateway() -> None:
    assert valid(policy_doc(egressGateways=[])).gateways == (GatewaySpec(ROLE_GATEWAY),)


def test_egress_gateway_may_be_omitted_when_egress_gateways_is_set() -> None:
    policy = valid(policy_doc(egressGateway=None, egressGateways=[{"nodeSelector": {}}]))
    assert policy.gateways == (GatewaySpec(LabelSelector(())),)


@pytest.mark.parametrize("empty", ["", None])
def test_empty_interface_and_egress_ip_mean_unset(empty: str | None) -> None:
    gateway: dict[str, Any] = {"nodeSelector": {}, "interface": empty, "egressIP": empty}
    assert valid(policy_doc(egressGateway=gateway)).gateways == (GatewaySpec(LabelSelector(())),)


def test_empty_interface_with_egress_ip_is_not_both() -> None:
    gateway = {"nodeSelector": {}, "interface": "", "egressIP": "192.0.2.1"}
    assert valid(policy_doc(egressGateway=gateway)).gateways[0].egress_ip == (
        ipaddress.ip_address("192.0.2.1")
    )


def test_sixty_four_gateways_are_allowed() -> None:
    gateways = [{"nodeSelector": {"matchLabels": {"n": str(i)}}} for i in range(64)]
    assert len(valid(policy_doc(egressGateways=gateways)).gateways) == 64


def test_parse_policy_does_not_modify_its_input() -> None:
    doc = policy_doc(excludedCIDRs=["10.0.0.0/8"])
    before = copy.deepcopy(doc)
    valid(doc)
    assert doc == before


# --- top level, kind, apiVersion ---------------------------------------------------------------


def test_unknown_top_level_field() -> None:
    doc = policy_doc()
    doc["spc"] = doc["spec"]
    assert errors_of(doc) == [("spc", 'Forbidden: unknown field; did you mean "spec"?')]


def test_kind_required() -> None:
    doc = policy_doc()
    del doc["kind"]
    assert errors_of(doc) == [("kind", "Required value")]


@pytest.mark.parametrize("kind", ["EgressPolicy", "CiliumNetworkPolicy", 5])
def test_kind_unsupported(kind: object) -> None:
    doc = policy_doc()
    doc["kind"] = kind
    [(path, message)] = errors_of(doc)
    assert path == "kind"
    assert message.endswith('supported values: "EgressGatewayPolicy", "CiliumEgressGatewayPolicy"')


@pytest.mark.parametrize(
    ("kind", "api_version", "expected"),
    [
        (EGP[1], "cilium.io/v2", EGP[0]),
        (EGP[1], "egress.gatewayd.io/v1", EGP[0]),
        (CEGP[1], "egress.gatewayd.io/v1alpha1", CEGP[0]),
        (CEGP[1], "cilium.io/v2alpha1", CEGP[0]),
    ],
)
def test_api_version_must_match_the_kind(kind: str, api_version: str, expected: str) -> None:
    doc = policy_doc((api_version, kind))
    assert errors_of(doc) == [
        ("apiVersion", f'Unsupported value: "{api_version}": supported values: "{expected}"')
    ]


def test_api_version_required() -> None:
    doc = policy_doc()
    del doc["apiVersion"]
    assert errors_of(doc) == [("apiVersion", "Required value")]


# --- metadata ----------------------------------------------------------------------------------


def test_metadata_required() -> None:
    doc = policy_doc()
    del doc["metadata"]
    assert errors_of(doc) == [("metadata", "Required value")]


def test_metadata_not_a_mapping() -> None:
    doc = policy_doc()
    doc["metadata"] = "pay"
    assert errors_of(doc) == [("metadata", 'Invalid value: "string": must be of type object')]


@pytest.mark.parametrize("metadata", [{}, {"name": ""}, {"name": None}, {"generateName": "pay-"}])
def test_name_required(metadata: dict[str, object]) -> None:
    doc = policy_doc()
    doc["metadata"] = metadata
    assert errors_of(doc) == [("metadata.name", "Required value")]


@pytest.mark.parametrize("name", ["Pay", "pay_1", "-pay", "pay-", "pay..x", "a" * 254, "pay me"])
def test_name_must_be_a_dns_subdomain(name: str) -> None:
    doc = policy_doc()
    doc["metadata"]["name"] = name
    [(path, message)] = errors_of(doc)
    assert path == "metadata.name"
    assert message.startswith(f'Invalid value: "{name}": ')


@pytest.mark.parametrize("name", ["pay", "p", "pay-1", "pay.v2", "0pay", "a" * 253])
def test_valid_names(name: str) -> None:
    doc = policy_doc()
    doc["metadata"]["name"] = name
    assert valid(doc).name == name


def test_name_wrong_type() -> None:
    doc = policy_doc()
    doc["metadata"]["name"] = 12
    assert errors_of(doc) == [("metadata.name", 'Invalid value: "integer": must be of type string')]


def test_namespace_is_forbidden_on_a_cluster_scoped_policy() -> None:
    doc = policy_doc()
    doc["metadata"]["namespace"] = "default"
    assert errors_of(doc) == [
        ("metadata.namespace", "Forbidden: not allowed: the policy is cluster-scoped")
    ]


def test_unknown_metadata_field() -> None:
    doc = policy_doc()
    doc["metadata"]["label"] = {"a": "b"}
    assert errors_of(doc) == [
        ("metadata.label", 'Forbidden: unknown field; did you mean "labels"?')
    ]


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ("3", 'Invalid value: "string": must be of type integer'),
        (True, 'Invalid value: "boolean": must be of type integer'),
        (1.5, 'Invalid value: "number": must be of type integer'),
        (-1, "Invalid value: -1: must be non-negative"),
    ],
)
def test_generation_must_be_a_non_negative_integer(generation: object, message: str) -> None:
    doc = policy_doc()
    doc["metadata"]["generation"] = generation
    assert errors_of(doc) == [("metadata.generation", message)]


@pytest.mark.parametrize("field", ["labels", "annotations"])
def test_labels_and_annotations_must_be_string_maps(field: str) -> None:
    doc = policy_doc()
    doc["metadata"][field] = {"a": 1}
    assert errors_of(doc) == [
        (f"metadata.{field}[a]", 'Invalid value: "integer": must be of type string')
    ]


# --- spec --------------------------------------------------------------------------------------


def test_spec_required() -> None:
    doc = policy_doc()
    del doc["spec"]
    assert errors_of(doc) == [("spec", "Required value")]


def test_spec_not_a_mapping() -> None:
    doc = policy_doc()
    doc["spec"] = ["selectors"]
    assert errors_of(doc) == [("spec", 'Invalid value: "array": must be of type object')]


@pytest.mark.parametrize(
    ("field", "suggestion"),
    [
        ("excludeCIDRs", "excludedCIDRs"),
        ("destinationCIDR", "destinationCIDRs"),
        ("egressGatways", "egressGateways"),
        ("selector", "selectors"),
    ],
)
def test_misspelled_spec_field_is_rejected_not_dropped(field: str, suggestion: str) -> None:
    doc = policy_doc()
    doc["spec"][field] = ["10.0.0.0/8"]
    assert (f"spec.{field}", f'Forbidden: unknown field; did you mean "{suggestion}"?') in (
        errors_of(doc)
    )


def test_spec_failover_is_not_a_field_yet() -> None:
    doc = policy_doc()
    doc["spec"]["failover"] = {}
    assert paths_of(doc) == ["spec.failover"]


# --- spec.selectors ----------------------------------------------------------------------------


def test_selectors_required() -> None:
    assert errors_of(policy_doc(selectors=None)) == [("spec.selectors", "Required value")]


def test_selectors_not_a_list() -> None:
    assert errors_of(policy_doc(selectors={"podSelector": {}})) == [
        ("spec.selectors", 'Invalid value: "object": must be of type array')
    ]


def test_selector_entry_not_a_mapping() -> None:
    assert errors_of(policy_doc(selectors=[{"podSelector": {}}, "app=pay"])) == [
        ("spec.selectors[1]", 'Invalid value: "string": must be of type object')
    ]


NEEDS_POD_OR_NAMESPACE = (
    "Required value: podSelector or namespaceSelector (nodeSelector cannot be used alone)"
)


@pytest.mark.parametrize(
    "entry",
    [
        {},
        {"nodeSelector": {"matchLabels": {"zone": "a"}}},
        {"nodeSelector": {}},
        {"podSelector": None},
        {"podSelector": None, "namespaceSelector": None, "nodeSelector": {}},
    ],
)
def test_entry_needs_pod_or_namespace_selector(entry: dict[str, object]) -> None:
    assert errors_of(policy_doc(selectors=[{"podSelector": {}}, entry])) == [
        ("spec.selectors[1]", NEEDS_POD_OR_NAMESPACE)
    ]


def test_selector_entry_unknown_field() -> None:
    assert errors_of(policy_doc(selectors=[{"podSelector": {}, "podSelectors": {}}])) == [
        ("spec.selectors[0].podSelectors", 'Forbidden: unknown field; did you mean "podSelector"?')
    ]


@pytest.mark.parametrize("field", ["podSelector", "namespaceSelector", "nodeSelector"])
def test_invalid_selector_in_entry_names_its_path(field: str) -> None:
    entry: dict[str, object] = {"podSelector": {}}
    entry[field] = {
        "matchExpressions": [
            {"key": "a", "operator": "Exists"},
            {"key": "b", "operator": "In", "values": []},
        ]
    }
    assert errors_of(policy_doc(selectors=[entry])) == [
        (
            f"spec.selectors[0].{field}.matchExpressions[1].values",
            'Required value: must be specified when operator is "In" or "NotIn"',
        )
    ]


def test_invalid_selectors_are_rejected_not_made_to_match_nothing() -> None:
    # Cilium would accept each of these and silently match nothing (§3.3).
    doc = policy_doc(
        selectors=[
            {
                "podSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            },
            {
                "podSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Bogus", "values": ["x"]}]
                }
            },
            {"namespaceSelector": {"matchLabels": {"bad key": "x"}}},
            {"podSelector": {"matchLabels": {"app": "-bad-"}}},
        ]
    )
    assert paths_of(doc) == [
        "spec.selectors[0].podSelector.matchExpressions[0].values",
        "spec.selectors[1].podSelector.matchExpressions[0].operator",
        "spec.selectors[2].namespaceSelector.matchLabels[bad key]",
        "spec.selectors[3].podSelector.matchLabels[app]",
    ]


# --- destinationCIDRs and excludedCIDRs (§4.1) -------------------------------------------------


def test_destination_cidrs_required() -> None:
    assert errors_of(policy_doc(destinationCIDRs=None)) == [
        ("spec.destinationCIDRs", "Required value")
    ]


def test_empty_destination_cidrs_are_rejected() -> None:
    assert errors_of(policy_doc(destinationCIDRs=[])) == [
        (
            "spec.destinationCIDRs",
            "Required value: at least one CIDR; an empty list matches nothing",
        )
    ]


@pytest.mark.parametrize("field", ["destinationCIDRs", "excludedCIDRs"])
def test_cidr_list_not_a_list(field: str) -> None:
    assert errors_of(policy_doc(**{field: "10.0.0.0/8"})) == [
        (f"spec.{field}", 'Invalid value: "string": must be of type array')
    ]


@pytest.mark.parametrize("field", ["destinationCIDRs", "excludedCIDRs"])
def test_cidr_item_wrong_type(field: str) -> None:
    assert errors_of(policy_doc(**{field: ["10.0.0.0/8", 10]})) == [
        (f"spec.{field}[1]", 'Invalid value: "integer": must be of type string')
    ]


INVALID_CIDRS = [
    "10.0.0.256/24",
    "01.2.3.0/24",  # leading zero: the ≤1.19 CRD regex let it through, ParsePrefix did not
    "10.01.0.0/16",
    "fe80::1%eth0/64",  # zone
    "sss2001:db8::/64",
    "10.0.0.1",  # no prefix length
    "/24",
    "10.0.0.0/",
    "10.0.0.0/33",
    "2001:db8::/129",
    "10.0.0.0/024",  # leading zero in the length
    "10.0.0.0/+8",
    "10.0.0.0/-1",
    "10.0.0.0/255.0.0.0",  # netmask form: Python accepts it, Go does not
    " 10.0.0.0/8",
    "10.0.0.0/8 ",
    "10.0.0.0 /8",
    "10.0.0.0/8\n",
    "1.2.3/24",
    "1.2.3.4.5/24",
    "::ffff:01.2.3.4/128",
    "2001:db8:::/48",
    "2001:db8::g/64",
    "10.0.0.0/8/8",
    "10.0.0.0/٨",  # a non-ASCII digit
    "",
]


@pytest.mark.parametrize("field", ["destinationCIDRs", "excludedCIDRs"])
@pytest.mark.parametrize("cidr", INVALID_CIDRS)
def test_invalid_cidrs(field: str, cidr: str) -> None:
    [(path, message)] = errors_of(policy_doc(**{field: ["192.0.2.0/24", cidr]}))
    assert path == f"spec.{field}[1]"
    assert message.startswith(f"Invalid value: {quote(cidr)}: not a valid CIDR (")
    assert message.endswith(
        'expected an IPv4 or IPv6 prefix such as "192.0.2.0/24" or "2001:db8::/32"'
    )


def test_invalid_cidr_message_gives_the_reason() -> None:
    assert errors_of(policy_doc(destinationCIDRs=["10.0.0.0/33"])) == [
        (
            "spec.destinationCIDRs[0]",
            'Invalid value: "10.0.0.0/33": not a valid CIDR (prefix length 33 out of range 0-32'
            ' for IPv4); expected an IPv4 or IPv6 prefix such as "192.0.2.0/24" or'
            ' "2001:db8::/32"',
        )
    ]


@pytest.mark.parametrize(
    ("cidr", "network"),
    [
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits allowed, masked (§4.2)
        ("1.1.1.77/24", "1.1.1.0/24"),
        ("192.0.2.7/32", "192.0.2.7/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("255.255.255.255/0", "0.0.0.0/0"),
        ("::/0", "::/0"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001/128", "2001:db8::1/128"),
        ("::ffff:192.0.2.0/120", "::ffff:c000:200/120"),  # stays IPv6, as in Go
        ("fd00::/8", "fd00::/8"),
    ],
)
def test_valid_cidrs_are_stored_masked(cidr: str, network: str) -> None:
    policy = valid(policy_doc(destinationCIDRs=[cidr], excludedCIDRs=[cidr]))
    assert policy.destinations == (ipaddress.ip_network(network),)
    assert policy.exclusions == (ipaddress.ip_network(network),)


def test_excluded_cidrs_absent_or_empty() -> None:
    assert valid(policy_doc(excludedCIDRs=None)).exclusions == ()
    assert valid(policy_doc(excludedCIDRs=[])).exclusions == ()


def test_every_bad_cidr_is_reported() -> None:
    doc = policy_doc(destinationCIDRs=["bad", "10.0.0.0/8", "also/bad"], excludedCIDRs=["x/1"])
    assert paths_of(doc) == [
        "spec.destinationCIDRs[0]",
        "spec.destinationCIDRs[2]",
        "spec.excludedCIDRs[0]",
    ]


_ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_ipv6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@given(_ipv4, st.integers(0, 32))
def test_ipv4_prefixes_parse_to_the_masked_network(
    address: ipaddress.IPv4Address, bits: int
) -> None:
    assert parse_prefix(f"{address}/{bits}") == ipaddress.ip_network((address, bits), strict=False)


@given(_ipv6, st.integers(0, 128), st.booleans())
def test_ipv6_prefixes_parse_to_the_masked_network(
    address: ipaddress.IPv6Address, bits: int, exploded: bool
) -> None:
    text = address.exploded if exploded else str(address)
    expected = ipaddress.ip_network((address, bits), strict=False)
    assert parse_prefix(f"{text}/{bits}") == expected
    assert parse_prefix(f"{text.upper()}/{bits}") == expected


@given(_ipv4 | _ipv6)
def test_addresses_parse_like_ipaddress(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert parse_address(str(address)) == address
    assert parse_address(address.exploded) == address


@given(st.text(max_size=50) | st.from_regex(r"[0-9a-fA-F:./% ]{0,45}", fullmatch=True))
def test_any_string_gives_a_network_or_one_field_error(text: str) -> None:
    errors: list[FieldError] = []
    network = read_cidr(text, "spec.destinationCIDRs[3]", errors)
    if network is None:
        assert len(errors) == 1
        assert errors[0].path == "spec.destinationCIDRs[3]"
        assert errors[0].message.startswith("Invalid value: ")
    else:
        assert errors == []
        # Whatever is accepted is exactly what ipaddress reads, masked.
        assert network == ipaddress.ip_network(text, strict=False)


@given(st.none() | st.integers() | st.floats() | st.booleans() | st.lists(st.text(max_size=3)))
def test_non_string_cidr_is_a_type_error(value: object) -> None:
    errors: list[FieldError] = []
    assert read_cidr(value, "spec.excludedCIDRs[0]", errors) is None
    [error] = errors
    assert error.path == "spec.excludedCIDRs[0]"
    assert error.message.startswith("Invalid value: ")
    assert error.message.endswith("must be of type string")


# --- egressGateway / egressGateways (§2, §5.4) -------------------------------------------------


def test_egress_gateway_required_without_egress_gateways() -> None:
    assert errors_of(policy_doc(egressGateway=None)) == [
        ("spec.egressGateway", "Required value: required when spec.egressGateways is empty")
    ]
    assert errors_of(policy_doc(egressGateway=None, egressGateways=[])) == [
        ("spec.egressGateway", "Required value: required when spec.egressGateways is empty")
    ]


def test_egress_gateway_not_a_mapping() -> None:
    assert errors_of(policy_doc(egressGateway=["node-1"])) == [
        ("spec.egressGateway", 'Invalid value: "array": must be of type object')
    ]


def test_egress_gateways_not_a_list() -> None:
    assert errors_of(policy_doc(egressGateways={"nodeSelector": {}})) == [
        ("spec.egressGateways", 'Invalid value: "object": must be of type array')
    ]


def test_egress_gateways_at_most_64() -> None:
    gateways: list[dict[str, Any]] = [{"nodeSelector": {}} for _ in range(65)]
    assert errors_of(policy_doc(egressGateways=gateways)) == [
        ("spec.egressGateways", "Too many: 65: must have at most 64 items")
    ]


def test_gateway_entry_node_selector_required() -> None:
    gateways = [{"nodeSelector": {}}, {"egressIP": "192.0.2.1"}]
    assert errors_of(policy_doc(egressGateways=gateways)) == [
        ("spec.egressGateways[1].nodeSelector", "Required value")
    ]
    assert errors_of(policy_doc(egressGateway={"interface": "eth0"})) == [
        ("spec.egressGateway.nodeSelector", "Required value")
    ]


def test_gateway_entry_not_a_mapping() -> None:
    assert errors_of(policy_doc(egressGateways=[{"nodeSelector": {}}, "gw-1"])) == [
        ("spec.egressGateways[1]", 'Invalid value: "string": must be of type object')
    ]


def test_gateway_unknown_field() -> None:
    assert errors_of(policy_doc(egressGateway={"nodeSelector": {}, "egressIp": "192.0.2.1"})) == [
        ("spec.egressGateway.egressIp", 'Forbidden: unknown field; did you mean "egressIP"?')
    ]


def test_gateway_node_selector_invalid() -> None:
    gateways = [
        {"nodeSelector": {}},
        {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "gw 1"}}},
    ]
    [(path, message)] = errors_of(policy_doc(egressGateways=gateways))
    assert path == "spec.egressGateways[1].nodeSelector.matchLabels[kubernetes.io/hostname]"
    assert message.startswith('Invalid value: "gw 1": a valid label must be')


BOTH = (
    'Forbidden: may not be set together with "interface": set "interface" to take the egress IP'
    ' from that interface, or "egressIP" to name it'
)


def test_interface_and_egress_ip_are_exclusive() -> None:
    gateway = {"nodeSelector": {}, "interface": "eth0", "egressIP": "192.0.2.1"}
    assert errors_of(policy_doc(egressGateway=gateway)) == [("spec.egressGateway.egressIP", BOTH)]
    assert errors_of(policy_doc(egressGateways=[{"nodeSelector": {}}, gateway])) == [
        ("spec.egressGateways[1].egressIP", BOTH)
    ]


def test_egress_gateway_is_validated_even_when_egress_gateways_is_used() -> None:
    # Cilium ignores egressGateway here and so accepts both fields (§5.4); we do not.
    gateway = {"nodeSelector": {}, "interface": "eth0", "egressIP": "192.0.2.1"}
    doc = policy_doc(egressGateway=gateway, egressGateways=[{"nodeSelector": {}}])
    assert errors_of(doc) == [("spec.egressGateway.egressIP", BOTH)]
    doc = policy_doc(egressGateway={"interface": "eth0"}, egressGateways=[{"nodeSelector": {}}])
    assert errors_of(doc) == [("spec.egressGateway.nodeSelector", "Required value")]


@pytest.mark.parametrize(
    "name", ["eth0", "ens192", "a", "x" * 15, "bond0.100", "veth@if3", "eth-0_1", "é" * 7]
)
def test_valid_interface_names(name: str) -> None:
    gateway = {"nodeSelector": {}, "interface": name}
    assert valid(policy_doc(egressGateway=gateway)).gateways[0].interface == name


@pytest.mark.parametrize(
    "name",
    [
        "x" * 16,
        "é" * 8,  # 16 bytes
        ".",
        "..",
        "eth/0",
        "eth:0",
        "eth 0",
        "eth\t0",
        "eth0\n",
        "eth\x000",
        "à",  # its UTF-8 form holds byte 0xa0, which the kernel's isspace() refuses
    ],
)
def test_invalid_interface_names(name: str) -> None:
    gateway = {"nodeSelector": {}, "interface": name}
    [(path, message)] = errors_of(policy_doc(egressGateway=gateway))
    assert path == "spec.egressGateway.interface"
    assert message == (
        f'Invalid value: {quote(name)}: not a Linux interface name: 1-15 bytes, not "." or'
        ' "..", without "/", ":" or whitespace (e.g. "eth0", "ens192")'
    )


def test_interface_wrong_type() -> None:
    assert errors_of(policy_doc(egressGateway={"nodeSelector": {}, "interface": 0})) == [
        ("spec.egressGateway.interface", 'Invalid value: "integer": must be of type string')
    ]


@pytest.mark.parametrize("address", ["192.0.2.10", "10.0.0.1", "2001:db8::10", "fd00::1"])
def test_valid_egress_ips(address: str) -> None:
    gateway = {"nodeSelector": {}, "egressIP": address}
    assert valid(policy_doc(egressGateway=gateway)).gateways[0].egress_ip == (
        ipaddress.ip_address(address)
    )


@pytest.mark.parametrize(
    ("address", "detail"),
    [
        ("192.0.2.300", "not a valid IP address ("),
        ("01.2.3.4", "not a valid IP address ("),
        ("192.0.2.0/24", "not a valid IP address ("),
        ("fe80::1%eth0", "not a valid IP address (zones (%) are not allowed)"),
        (" 192.0.2.1", 'not a valid IP address (unexpected character " ")'),
        ("gateway-1", "not a valid IP address ("),
        ("::ffff:192.0.2.1", "IPv4-mapped IPv6 address; write 192.0.2.1"),
        ("0.0.0.0", "must be a unicast address"),
        ("::", "must be a unicast address"),
        ("127.0.0.1", "must be a unicast address"),
        ("224.0.0.1", "must be a unicast address"),
        ("ff02::1", "must be a unicast address"),
    ],
)
def test_invalid_egress_ips(address: str, detail: str) -> None:
    gateway = {"nodeSelector": {}, "egressIP": address}
    [(path, message)] = errors_of(policy_doc(egressGateway=gateway))
    assert path == "spec.egressGateway.egressIP"
    assert message.startswith(f"Invalid value: {quote(address)}: {detail}")


@pytest.mark.parametrize(
    "address",
    [
        "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",  # a valid IPv6 address, 45 characters
        "2001:0db8:0000:0000:0000:0000:0000:00001",
    ],
)
def test_egress_ip_at_most_39_characters(address: str) -> None:
    gateway = {"nodeSelector": {}, "egressIP": address}
    assert errors_of(policy_doc(egressGateway=gateway)) == [
        ("spec.egressGateway.egressIP", f'Too long: "{address}": may not be more than 39 bytes')
    ]


def test_egress_ip_of_39_characters_is_accepted() -> None:
    address = "2001:0db8:0000:0000:0000:0000:0000:0001"
    assert len(address) == 39
    gateway = {"nodeSelector": {}, "egressIP": address}
    assert valid(policy_doc(egressGateway=gateway)).gateways[0].egress_ip == (
        ipaddress.ip_address("2001:db8::1")
    )


def test_egress_ip_wrong_type() -> None:
    assert errors_of(policy_doc(egressGateway={"nodeSelector": {}, "egressIP": 3232235777})) == [
        ("spec.egressGateway.egressIP", 'Invalid value: "integer": must be of type string')
    ]


# --- everything at once, and robustness --------------------------------------------------------


def test_all_errors_of_a_policy_are_reported_together() -> None:
    doc = policy_doc(
        selectors=[{"nodeSelector": {}}],
        destinationCIDRs=["10.0.0.0/33"],
        excludedCIDRs="10.0.0.0/8",
        egressGateways=[{"nodeSelector": {}}, {"interface": "eth0", "egressIP": "x"}],
    )
    doc["metadata"]["namespace"] = "default"
    doc["extra"] = True
    assert paths_of(doc) == [
        "extra",
        "metadata.namespace",
        "spec.selectors[0]",
        "spec.destinationCIDRs[0]",
        "spec.excludedCIDRs",
        "spec.egressGateways[1].nodeSelector",
        "spec.egressGateways[1].egressIP",
        "spec.egressGateways[1].egressIP",
    ]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=15,
)
_spec_fields = st.sampled_from(
    ["selectors", "destinationCIDRs", "excludedCIDRs", "egressGateway", "egressGateways", "x"]
)


@given(st.dictionaries(_spec_fields, _json), st.dictionaries(st.text(max_size=12), _json))
def test_any_spec_or_metadata_gives_a_policy_or_errors_never_an_exception(
    spec: dict[str, object], metadata: dict[str, object]
) -> None:
    for doc in (policy_doc(**spec), {**policy_doc(), "metadata": metadata}, {"spec": spec}):
        policy, errors = parse_policy(doc)
        assert (policy is None) == bool(errors)
