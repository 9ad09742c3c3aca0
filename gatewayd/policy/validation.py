"""Validation of EgressGatewayPolicy / CiliumEgressGatewayPolicy objects into `Policy`.

We enforce, in one place, the union of what Cilium's CRD schema and its agent (`ParseCEGP`)
check (cilium-egress-semantics.md §2, §2.1, §3.3, §3.4, §4.1, §5.4), plus the checks Cilium
skips and then silently ignores or drops traffic for. Every error names its field path with
the YAML names, in the wording Kubernetes uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv6Address
from typing import NamedTuple

from gatewayd.policy.fields import (
    child,
    dns_subdomain_problem,
    forbidden,
    index,
    invalid,
    read_address,
    read_cidr,
    read_list,
    read_mapping,
    read_string,
    read_string_map,
    reject_unknown_fields,
    required,
    too_long,
    too_many,
    unsupported,
    wrong_type,
)
from gatewayd.policy.model import (
    FieldError,
    GatewaySpec,
    IPAddress,
    IPNetwork,
    LabelSelector,
    Policy,
)
from gatewayd.policy.selectors import entry_selector, parse_label_selector

# kind -> the only apiVersion it is served under.
POLICY_API_VERSIONS = {
    "EgressGatewayPolicy": "egress.gatewayd.io/v1alpha1",
    "CiliumEgressGatewayPolicy": "cilium.io/v2",
}
MAX_GATEWAYS = 64  # Cilium v1.20 CRD: egressGateways maxItems
EGRESS_IP_MAX_LENGTH = 39  # Cilium v1.20 CRD: egressIP maxLength
INTERFACE_NAME_MAX_BYTES = 15  # IFNAMSIZ - 1

_TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")
_OBJECT_META_FIELDS = (
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
)
_SPEC_FIELDS = ("selectors", "destinationCIDRs", "excludedCIDRs", "egressGateway", "egressGateways")
_SELECTOR_ENTRY_FIELDS = ("podSelector", "namespaceSelector", "nodeSelector")
_GATEWAY_FIELDS = ("nodeSelector", "interface", "egressIP")
# Bytes the kernel refuses in an interface name (dev_valid_name: '/', ':', isspace()).
_INTERFACE_NAME_FORBIDDEN_BYTES = frozenset(b"/: \t\n\v\f\r\xa0\x00")


def parse_policy(obj: Mapping[str, object]) -> tuple[Policy | None, list[FieldError]]:
    """Validate one policy object as `kubectl get -o yaml` prints it.

    Returns the Policy only when there is no error; otherwise every error found, each with
    its field path. Never raises on bad input.
    """
    errors: list[FieldError] = []
    reject_unknown_fields(obj, _TOP_LEVEL_FIELDS, "", errors)
    kind = _parse_kind(obj, errors)
    name, generation = _parse_metadata(obj.get("metadata"), errors)
    spec = obj.get("spec")
    if spec is None:
        errors.append(required("spec"))
        return None, errors
    parsed = _parse_spec(spec, errors)
    if errors or kind is None or name is None or parsed is None:
        return None, errors
    policy = Policy(
        name=name,
        kind=kind,
        endpoint_selectors=parsed.endpoint_selectors,
        node_selectors=parsed.node_selectors,
        destinations=parsed.destinations,
        exclusions=parsed.exclusions,
        gateways=parsed.gateways,
        generation=generation,
    )
    return policy, errors


def _parse_kind(obj: Mapping[str, object], errors: list[FieldError]) -> str | None:
    kind = obj.get("kind")
    if kind is None:
        errors.append(required("kind"))
        return None
    if not isinstance(kind, str) or kind not in POLICY_API_VERSIONS:
        errors.append(unsupported("kind", kind, list(POLICY_API_VERSIONS)))
        return None
    api_version = obj.get("apiVersion")
    expected = POLICY_API_VERSIONS[kind]
    if api_version is None:
        errors.append(required("apiVersion"))
    elif api_version != expected:
        errors.append(unsupported("apiVersion", api_version, [expected]))
    return kind


def _parse_metadata(obj: object, errors: list[FieldError]) -> tuple[str | None, int]:
    if obj is None:
        errors.append(required("metadata"))
        return None, 0
    metadata = read_mapping(obj, "metadata", errors)
    if metadata is None:
        return None, 0
    reject_unknown_fields(metadata, _OBJECT_META_FIELDS, "metadata", errors)

    name = _parse_name(metadata.get("name"), errors)

    namespace = metadata.get("namespace")
    if namespace is not None and namespace != "":
        errors.append(forbidden("metadata.namespace", "not allowed: the policy is cluster-scoped"))

    generation = metadata.get("generation", 0)
    if generation is None:
        generation = 0
    if isinstance(generation, bool) or not isinstance(generation, int):
        errors.append(wrong_type("metadata.generation", generation, "integer"))
        generation = 0
    elif generation < 0:
        errors.append(invalid("metadata.generation", generation, "must be non-negative"))
        generation = 0

    for string_map in ("labels", "annotations"):
        if metadata.get(string_map) is not None:
            read_string_map(metadata[string_map], child("metadata", string_map), errors)
    return name, generation


def _parse_name(obj: object, errors: list[FieldError]) -> str | None:
    if obj is None or obj == "":
        errors.append(required("metadata.name"))
        return None
    name = read_string(obj, "metadata.name", errors)
    if name is None:
        return None
    if (problem := dns_subdomain_problem(name)) is not None:
        errors.append(invalid("metadata.name", name, problem))
        return None
    return name


class _Spec(NamedTuple):
    endpoint_selectors: tuple[LabelSelector, ...]
    node_selectors: tuple[LabelSelector, ...]
    destinations: tuple[IPNetwork, ...]
    exclusions: tuple[IPNetwork, ...]
    gateways: tuple[GatewaySpec, ...]


def _parse_spec(obj: object, errors: list[FieldError]) -> _Spec | None:
    spec = read_mapping(obj, "spec", errors)
    if spec is None:
        return None
    reject_unknown_fields(spec, _SPEC_FIELDS, "spec", errors)
    endpoint_selectors, node_selectors = _parse_selectors(spec.get("selectors"), errors)
    raw_destinations = spec.get("destinationCIDRs")
    if raw_destinations is None:
        errors.append(required("spec.destinationCIDRs"))
    elif raw_destinations == []:
        # Cilium accepts an empty list, which can never match a destination: almost surely a
        # mistake, so we reject it rather than accept a policy that does nothing.
        errors.append(
            required("spec.destinationCIDRs", "at least one CIDR; an empty list matches nothing")
        )
    destinations = _parse_cidrs(raw_destinations, "spec.destinationCIDRs", errors)
    exclusions = _parse_cidrs(spec.get("excludedCIDRs"), "spec.excludedCIDRs", errors)
    gateways = _parse_gateways(spec, errors)
    if destinations is None or gateways is None:
        return None
    return _Spec(endpoint_selectors, node_selectors, destinations, exclusions or (), gateways)


def _parse_selectors(
    obj: object, errors: list[FieldError]
) -> tuple[tuple[LabelSelector, ...], tuple[LabelSelector, ...]]:
    """`spec.selectors`: one endpoint selector per entry, and every entry's nodeSelector
    collected policy-wide (Cilium quirk, semantics §3.4). `[]` is valid and selects nothing."""
    path = "spec.selectors"
    if obj is None:
        errors.append(required(path))
        return (), ()
    endpoint_selectors: list[LabelSelector] = []
    node_selectors: list[LabelSelector] = []
    for i, item in enumerate(read_list(obj, path, errors) or []):
        entry_path = index(path, i)
        first_error = len(errors)
        entry = read_mapping(item, entry_path, errors)
        if entry is None:
            continue
        reject_unknown_fields(entry, _SELECTOR_ENTRY_FIELDS, entry_path, errors)
        pod = _parse_optional_selector(entry, "podSelector", entry_path, errors)
        namespace = _parse_optional_selector(entry, "namespaceSelector", entry_path, errors)
        node = _parse_optional_selector(entry, "nodeSelector", entry_path, errors)
        if entry.get("podSelector") is None and entry.get("namespaceSelector") is None:
            errors.append(
                required(
                    entry_path,
                    "podSelector or namespaceSelector (nodeSelector cannot be used alone)",
                )
            )
        if len(errors) > first_error:
            continue
        endpoint_selectors.append(entry_selector(pod, namespace))
        if node is not None:
            node_selectors.append(node)
    return tuple(endpoint_selectors), tuple(node_selectors)


def _parse_optional_selector(
    entry: Mapping[str, object], field: str, entry_path: str, errors: list[FieldError]
) -> LabelSelector | None:
    obj = entry.get(field)
    if obj is None:
        return None
    selector, selector_errors = parse_label_selector(obj, child(entry_path, field))
    errors += selector_errors
    return selector


def _parse_cidrs(obj: object, path: str, errors: list[FieldError]) -> tuple[IPNetwork, ...] | None:
    """The CIDRs that parse, as masked networks (errors for the others); None if absent or
    not a list."""
    if obj is None:
        return None
    items = read_list(obj, path, errors)
    if items is None:
        return None
    networks = [read_cidr(item, index(path, i), errors) for i, item in enumerate(items)]
    return tuple(n for n in networks if n is not None)


def _parse_gateways(
    spec: Mapping[str, object], errors: list[FieldError]
) -> tuple[GatewaySpec, ...] | None:
    """`egressGateways` when non-empty, else `(egressGateway,)` (semantics §5.3)."""
    listed: list[GatewaySpec | None] = []
    raw_list = spec.get("egressGateways")
    if raw_list is not None:
        list_path = "spec.egressGateways"
        items = read_list(raw_list, list_path, errors) or []
        if len(items) > MAX_GATEWAYS:
            errors.append(too_many(list_path, len(items), MAX_GATEWAYS))
        listed = [_parse_gateway(item, index(list_path, i), errors) for i, item in enumerate(items)]

    single: GatewaySpec | None = None
    raw_single = spec.get("egressGateway")
    if raw_single is not None:
        # Cilium does not look at egressGateway at all when egressGateways is non-empty
        # (semantics §5.4), so it accepts e.g. both interface and egressIP there. We validate
        # it anyway: it is still part of the object, and flipping to it later must not fail.
        single = _parse_gateway(raw_single, "spec.egressGateway", errors)
    elif not listed:
        # Cilium's CRD requires egressGateway even next to egressGateways; we require it only
        # where it is used.
        errors.append(required("spec.egressGateway", "required when spec.egressGateways is empty"))

    gateways = listed or [single]
    if any(g is None for g in gateways):
        return None
    return tuple(g for g in gateways if g is not None)


def _parse_gateway(obj: object, path: str, errors: list[FieldError]) -> GatewaySpec | None:
    first_error = len(errors)
    gateway = read_mapping(obj, path, errors)
    if gateway is None:
        return None
    reject_unknown_fields(gateway, _GATEWAY_FIELDS, path, errors)

    node_selector = None
    if gateway.get("nodeSelector") is None:
        errors.append(required(child(path, "nodeSelector")))
    else:
        node_selector = _parse_optional_selector(gateway, "nodeSelector", path, errors)

    # An empty string means "not set", as in Cilium (and `kubectl get -o yaml` may print it).
    interface = None
    raw_interface = gateway.get("interface")
    if raw_interface is not None and raw_interface != "":
        interface = _parse_interface_name(raw_interface, child(path, "interface"), errors)

    egress_ip = None
    raw_egress_ip = gateway.get("egressIP")
    if raw_egress_ip is not None and raw_egress_ip != "":
        egress_ip = _parse_egress_ip(raw_egress_ip, child(path, "egressIP"), errors)
        if raw_interface is not None and raw_interface != "":
            errors.append(
                forbidden(
                    child(path, "egressIP"),
                    'may not be set together with "interface": set "interface" to take the'
                    ' egress IP from that interface, or "egressIP" to name it',
                )
            )

    if len(errors) > first_error or node_selector is None:
        return None
    return GatewaySpec(node_selector=node_selector, interface=interface, egress_ip=egress_ip)


def _parse_interface_name(obj: object, path: str, errors: list[FieldError]) -> str | None:
    name = read_string(obj, path, errors)
    if name is None:
        return None
    raw = name.encode()
    if (
        len(raw) > INTERFACE_NAME_MAX_BYTES
        or name in (".", "..")
        or any(b in _INTERFACE_NAME_FORBIDDEN_BYTES for b in raw)
    ):
        errors.append(
            invalid(
                path,
                name,
                f'not a Linux interface name: 1-{INTERFACE_NAME_MAX_BYTES} bytes, not "." or'
                ' "..", without "/", ":" or whitespace (e.g. "eth0", "ens192")',
            )
        )
        return None
    return name


def _parse_egress_ip(obj: object, path: str, errors: list[FieldError]) -> IPAddress | None:
    text = read_string(obj, path, errors)
    if text is None:
        return None
    if len(text) > EGRESS_IP_MAX_LENGTH:
        errors.append(too_long(path, text, EGRESS_IP_MAX_LENGTH))
        return None
    address = read_address(text, path, errors)
    if address is None:
        return None
    # Like the CRD's CEL isIP(): an IPv4-mapped IPv6 address is an IPv4 address in disguise.
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        errors.append(invalid(path, text, f"IPv4-mapped IPv6 address; write {address.ipv4_mapped}"))
        return None
    # These can never be a packet's source on the wire; Cilium would take 0.0.0.0 as its
    # "no egress IP" sentinel and drop the traffic.
    if address.is_unspecified or address.is_loopback or address.is_multicast:
        errors.append(
            invalid(path, text, "must be a unicast address, not unspecified/loopback/multicast")
        )
        return None
    return address
