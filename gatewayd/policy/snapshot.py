"""Snapshots from Kubernetes objects, as `kubectl get -o yaml|json` prints them.

Input: multi-document YAML, JSON, or `List` / `*List` objects holding `items`. Policies are
validated (`validation.parse_policy`); an invalid one becomes a `PolicyProblem` and is left out,
the way the controller keeps going when one policy is bad. Anything else that is unusable (bad
syntax, a Pod without a name, a bad IP in a Node) raises `SnapshotError`: the engine cannot
decide anything safely from a snapshot it could not read. Other kinds, and fields we do not
read, are ignored, since a cluster dump holds plenty of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gatewayd.policy.fields import (
    child,
    index,
    invalid,
    parse_address_with_prefix,
    read_address,
    read_bool,
    read_cidr,
    read_list,
    read_mapping,
    read_string,
    read_string_map,
    required,
    type_name,
    unsupported,
)
from gatewayd.policy.model import (
    EgressGateway,
    EgressIPPool,
    FieldError,
    GatewayInterface,
    InterfaceAddress,
    IPAddress,
    IPNetwork,
    Namespace,
    Node,
    NodeAddress,
    Pod,
    Policy,
    Snapshot,
)
from gatewayd.policy.safeload import (
    DOCUMENT_LIMITS,
    STDIN,
    STDIN_NAME,
    DocumentError,
    load_json_file,
    load_stdin_documents,
    load_yaml_file,
)
from gatewayd.policy.validation import POLICY_API_VERSIONS, parse_policy

SNAPSHOT_SUFFIXES = (".yaml", ".yml", ".json")
UNNAMED = "<unnamed>"
# Namespaced objects without metadata.namespace land here, as with `kubectl apply`.
DEFAULT_NAMESPACE = "default"
# The API server's own Service: its endpoints are the addresses pods must always reach directly.
API_SERVER_SERVICE = ("default", "kubernetes")


class SnapshotError(DocumentError):
    """Input the snapshot cannot be built from; `str()` is `FILE[:LINE]: message`."""


@dataclass(frozen=True)
class PolicyProblem:
    """One error of one invalid policy, which the snapshot leaves out."""

    file: str
    kind: str
    name: str  # UNNAMED when metadata.name is missing
    error: FieldError

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}/{self.name}: {self.error}"


@dataclass(frozen=True)
class LoadedSnapshot:
    snapshot: Snapshot
    problems: tuple[PolicyProblem, ...] = ()


def snapshot_files(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is a file, or a directory whose *.yaml, *.yml and *.json files are read in
    name order (not recursively)."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            try:
                files += sorted(
                    (p for p in path.iterdir() if p.suffix in SNAPSHOT_SUFFIXES and p.is_file()),
                    key=lambda p: p.name,
                )
            except OSError as e:
                raise SnapshotError(str(path), None, f"cannot read: {e.strerror or e}") from e
        elif path.exists():
            files.append(path)
        else:
            raise SnapshotError(str(path), None, "no such file or directory")
    return files


def load_snapshot(paths: Sequence[str | Path], stdin: IO[bytes] | None = None) -> LoadedSnapshot:
    """The snapshot of files and directories, in the order given. With `stdin` (the CLI's),
    the path `-` stands for it, read once with the same limits and checks as a file."""
    documents: list[_Located] = []
    stdin_read = False
    for given in paths:
        if stdin is not None and str(given) == STDIN:
            if stdin_read:
                raise SnapshotError(STDIN_NAME, None, "standard input (-) given twice; it can "
                                                      "be read only once")
            documents += _read_stdin(stdin)
            stdin_read = True
            continue
        for path in snapshot_files([given]):
            documents += _read_file(path)
    return _build(documents)


def parse_objects(docs: Iterable[tuple[str, Mapping[str, object]]]) -> LoadedSnapshot:
    """Build a snapshot from objects already in memory; each is labelled with a file name
    (or any origin) for error messages. `List` objects are expanded as in files."""
    return _build([_Located(label, None, obj) for label, obj in docs])


# --- reading files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Located:
    """A decoded document or List item and where it came from."""

    file: str
    line: int | None
    obj: object


def _read_file(path: Path) -> list[_Located]:
    """The documents of one file, read within `DOCUMENT_LIMITS` (see `safeload`)."""
    file = str(path)
    try:
        if path.suffix == ".json":
            return [_Located(file, None, load_json_file(path, DOCUMENT_LIMITS))]
        return [
            _Located(file, line, obj)
            for line, obj in load_yaml_file(path, DOCUMENT_LIMITS)
            if obj is not None  # an empty document, e.g. a trailing `---`
        ]
    except DocumentError as e:
        raise SnapshotError(e.file, e.line, e.message) from e


def _read_stdin(stdin: IO[bytes]) -> list[_Located]:
    try:
        documents = load_stdin_documents(stdin, DOCUMENT_LIMITS)
    except DocumentError as e:
        raise SnapshotError(e.file, e.line, e.message) from e
    return [_Located(STDIN_NAME, line, obj) for line, obj in documents if obj is not None]


def _expand(document: _Located) -> Iterator[_Located]:
    """The Kubernetes objects in one document: itself, or the items of a List."""
    obj = document.obj
    if not isinstance(obj, Mapping):
        raise SnapshotError(
            document.file,
            document.line,
            f"expected a Kubernetes object (a mapping with apiVersion and kind), "
            f"found {type_name(obj)}",
        )
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise SnapshotError(document.file, document.line, "kind: Required value: not an object")
    if not (kind == "List" or (kind.endswith("List") and "items" in obj)):
        yield document
        return
    items = obj.get("items") or []
    if not isinstance(items, list):
        raise SnapshotError(
            document.file, document.line, f"{kind}: items: must be a list, found {type_name(items)}"
        )
    # YAML lists know their items' lines (safeload.LineList); JSON has none.
    lines: list[int | None] = list(getattr(items, "item_lines", [])) or [document.line] * len(items)
    for item, line in zip(items, lines, strict=True):
        # Typed lists (PodList, ...) from the API omit kind and apiVersion on their items.
        if kind != "List" and isinstance(item, Mapping) and "kind" not in item:
            item = {**item, "kind": kind.removesuffix("List"), "apiVersion": obj.get("apiVersion")}
        yield from _expand(_Located(document.file, line, item))


# --- building the snapshot ---------------------------------------------------------------------


@dataclass
class _Builder:
    policies: list[Policy] = field(default_factory=list)
    problems: list[PolicyProblem] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    namespaces: list[Namespace] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    gateways: list[EgressGateway] = field(default_factory=list)
    api_server_addresses: set[IPAddress] = field(default_factory=set)
    seen: dict[tuple[str, str, str], _Located] = field(default_factory=dict)

    def claim(self, kind: str, namespace: str, name: str, where: _Located) -> None:
        """Refuse a second object with the same identity: which one wins would be arbitrary."""
        identity = (kind, namespace, name)
        first = self.seen.setdefault(identity, where)
        if first is not where:
            first_at = first.file if first.line is None else f"{first.file}:{first.line}"
            raise SnapshotError(
                where.file,
                where.line,
                f"{kind}/{_qualified(namespace, name)}: defined twice (first in {first_at})",
            )


def _build(documents: Iterable[_Located]) -> LoadedSnapshot:
    builder = _Builder()
    for document in documents:
        for located in _expand(document):
            _add(builder, located)
    _refuse_shadowed_cilium_policies(builder)
    snapshot = Snapshot(
        policies=tuple(sorted(builder.policies, key=lambda p: (p.name, p.kind))),
        pods=tuple(sorted(builder.pods, key=lambda p: (p.namespace, p.name))),
        namespaces=tuple(sorted(builder.namespaces, key=lambda n: n.name)),
        nodes=tuple(sorted(builder.nodes, key=lambda n: n.name)),
        gateways=tuple(sorted(builder.gateways, key=lambda g: g.name)),
        api_server_addresses=tuple(
            sorted(builder.api_server_addresses, key=lambda a: (a.version, a))
        ),
    )
    return LoadedSnapshot(snapshot, tuple(builder.problems))


def _refuse_shadowed_cilium_policies(builder: _Builder) -> None:
    """Plans, status and explain name a policy by its name alone, so two policies must not
    share one. An EgressGatewayPolicy wins over a CiliumEgressGatewayPolicy of the same name
    (the usual case mid-migration), which is reported and left out."""
    ours = {p.name for p in builder.policies if p.kind == "EgressGatewayPolicy"}
    shadowed = [
        p for p in builder.policies if p.kind == "CiliumEgressGatewayPolicy" and p.name in ours
    ]
    for policy in shadowed:
        builder.policies.remove(policy)
        builder.problems.append(PolicyProblem(
            builder.seen[(policy.kind, "", policy.name)].file, policy.kind, policy.name,
            FieldError("metadata.name", f"Duplicate value: {policy.name!r}: an "
                       "EgressGatewayPolicy of the same name is in force; rename one of them"),
        ))


# kind -> (the apiVersion we read, whether it is namespaced)
_KINDS: dict[str, tuple[str, bool]] = {
    "Pod": ("v1", True),
    "Namespace": ("v1", False),
    "Node": ("v1", False),
    "EgressGateway": ("egress.gatewayd.io/v1alpha1", False),
    "EndpointSlice": ("discovery.k8s.io/v1", True),
    "Endpoints": ("v1", True),
}


def _add(builder: _Builder, located: _Located) -> None:
    obj = located.obj
    assert isinstance(obj, Mapping)  # _expand yields only mappings with a string kind
    kind = str(obj["kind"])
    api_version = obj.get("apiVersion")
    if kind in POLICY_API_VERSIONS:
        # The same kind name in another API group is someone else's resource.
        if not isinstance(api_version, str) or _group(api_version) == _group(
            POLICY_API_VERSIONS[kind]
        ):
            _add_policy(builder, located, kind, obj)
        return
    if kind not in _KINDS:
        return
    expected_version, namespaced = _KINDS[kind]
    name, namespace = _identity(obj, namespaced)
    reference = f"{kind}/{_qualified(namespace, name)}"
    if not isinstance(api_version, str):
        raise _error(located, reference, [required("apiVersion")])
    if _group(api_version) != _group(expected_version):
        return
    if api_version != expected_version:
        raise _error(
            located, reference, [unsupported("apiVersion", api_version, [expected_version])]
        )
    if kind in ("EndpointSlice", "Endpoints") and not _is_api_server_endpoints(
        kind, obj, namespace, name
    ):
        return
    if name == UNNAMED:
        raise _error(located, reference, [required("metadata.name")])
    builder.claim(kind, namespace, name, located)

    errors: list[FieldError] = []
    if kind == "Pod":
        builder.pods.append(_read_pod(obj, name, namespace, errors))
    elif kind == "Namespace":
        builder.namespaces.append(Namespace(name, _read_labels(obj, errors)))
    elif kind == "Node":
        builder.nodes.append(_read_node(obj, name, errors))
    elif kind == "EgressGateway":
        builder.gateways.append(_read_gateway(obj, name, errors))
    else:
        builder.api_server_addresses.update(_read_api_server_addresses(obj, kind, errors))
    if errors:
        raise _error(located, reference, errors)


def _is_api_server_endpoints(
    kind: str, obj: Mapping[str, object], namespace: str, name: str
) -> bool:
    """Only the endpoints of the `default/kubernetes` Service matter; other slices are skipped
    unread (a dump has one per Service)."""
    if kind == "Endpoints":
        return (namespace, name) == API_SERVER_SERVICE
    service = _read_labels(obj, []).get("kubernetes.io/service-name")
    return (namespace, service) == API_SERVER_SERVICE


def _add_policy(builder: _Builder, located: _Located, kind: str, obj: Mapping[str, object]) -> None:
    name, _ = _identity(obj, namespaced=False)
    if name != UNNAMED:
        builder.claim(kind, "", name, located)
    policy, errors = parse_policy(obj)
    if policy is not None:
        builder.policies.append(policy)
    builder.problems += [PolicyProblem(located.file, kind, name, error) for error in errors]


def _group(api_version: str) -> str:
    """`discovery.k8s.io/v1` -> `discovery.k8s.io`; the core group `v1` -> ``."""
    return api_version.rpartition("/")[0]


def _qualified(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def _identity(obj: Mapping[str, object], namespaced: bool) -> tuple[str, str]:
    """(name, namespace) for messages and duplicate detection; UNNAMED when missing, and ""
    as the namespace of cluster-scoped kinds."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        metadata = {}
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        name = UNNAMED
    if not namespaced:
        return name, ""
    namespace = metadata.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        namespace = DEFAULT_NAMESPACE
    return name, namespace


def _error(located: _Located, reference: str, errors: list[FieldError]) -> SnapshotError:
    details = "; ".join(str(e) for e in errors)
    return SnapshotError(located.file, located.line, f"{reference}: {details}")


# --- readers of the fields we use (lenient about everything else) ------------------------------


def _section(
    obj: Mapping[str, object], name: str, errors: list[FieldError]
) -> Mapping[str, object]:
    """An optional sub-object (`spec`, `status`); empty when absent or wrong."""
    value = obj.get(name)
    if value is None:
        return {}
    return read_mapping(value, name, errors) or {}


def _read_labels(obj: Mapping[str, object], errors: list[FieldError]) -> dict[str, str]:
    labels = _section(obj, "metadata", errors).get("labels")
    if labels is None:
        return {}
    return read_string_map(labels, "metadata.labels", errors) or {}


def _optional_string(
    section: Mapping[str, object], field_name: str, path: str, errors: list[FieldError]
) -> str | None:
    value = section.get(field_name)
    if value is None or value == "":
        return None
    return read_string(value, child(path, field_name), errors)


def _required_string(
    section: Mapping[str, object], field_name: str, path: str, errors: list[FieldError]
) -> str:
    value = section.get(field_name)
    field_path = child(path, field_name)
    if value is None or value == "":
        errors.append(required(field_path))
        return ""
    return read_string(value, field_path, errors) or ""


def _items(
    section: Mapping[str, object], field_name: str, path: str, errors: list[FieldError]
) -> Iterator[tuple[str, object]]:
    """(path, item) of an optional list field."""
    value = section.get(field_name)
    if value is None:
        return
    list_path = child(path, field_name)
    for i, item in enumerate(read_list(value, list_path, errors) or []):
        yield index(list_path, i), item


def _mapping_items(
    section: Mapping[str, object], field_name: str, path: str, errors: list[FieldError]
) -> Iterator[tuple[str, Mapping[str, object]]]:
    for item_path, item in _items(section, field_name, path, errors):
        mapping = read_mapping(item, item_path, errors)
        if mapping is not None:
            yield item_path, mapping


# Every Pod field `_read_pod` reads. Whoever trims Pods before they reach the engine (the
# controller's cache keeps only what it needs) must keep these, or the engine decides wrongly:
# without `status.phase` a finished pod's IP would carry its policy over to the next pod.
POD_FIELDS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "metadata.labels",
    "metadata.deletionTimestamp",
    "spec.nodeName",
    "spec.hostNetwork",
    "spec.serviceAccountName",
    "spec.serviceAccount",
    "status.phase",
    "status.podIP",
    "status.podIPs",
)


def _read_pod(
    obj: Mapping[str, object], name: str, namespace: str, errors: list[FieldError]
) -> Pod:
    metadata = _section(obj, "metadata", errors)
    # Cilium only selects pods that have a CiliumEndpoint, which needs the UID; it also keys
    # the multi-gateway hash (semantics §3.1, §5.3). A snapshot without it is not usable.
    uid = _required_string(metadata, "uid", "metadata", errors)
    labels = _read_labels(obj, errors)
    spec = _section(obj, "spec", errors)
    node_name = _optional_string(spec, "nodeName", "spec", errors)
    host_network = False
    if spec.get("hostNetwork") is not None:
        host_network = bool(read_bool(spec["hostNetwork"], "spec.hostNetwork", errors))
    service_account = _optional_string(spec, "serviceAccountName", "spec", errors)
    if service_account is None:  # the deprecated alias, still set by old clients
        service_account = _optional_string(spec, "serviceAccount", "spec", errors)

    status = _section(obj, "status", errors)
    ips: list[IPAddress] = []
    for item_path, item in _mapping_items(status, "podIPs", "status", errors):
        address = read_address(item.get("ip"), child(item_path, "ip"), errors)
        if address is not None and address not in ips:
            ips.append(address)
    if not ips and status.get("podIP") not in (None, ""):
        address = read_address(status["podIP"], "status.podIP", errors)
        if address is not None:
            ips.append(address)
    return Pod(
        name=name,
        namespace=namespace,
        uid=uid,
        labels=labels,
        node_name=node_name,
        host_network=host_network,
        service_account=service_account,
        ips=tuple(ips),
        phase=_optional_string(status, "phase", "status", errors),
        deleting=metadata.get("deletionTimestamp") not in (None, ""),
    )


def _read_addresses(
    status: Mapping[str, object], errors: list[FieldError]
) -> tuple[NodeAddress, ...]:
    addresses = []
    for item_path, item in _mapping_items(status, "addresses", "status", errors):
        address_type = _required_string(item, "type", item_path, errors)
        address = _required_string(item, "address", item_path, errors)
        addresses.append(NodeAddress(address_type, address))
    return tuple(addresses)


def _read_node(obj: Mapping[str, object], name: str, errors: list[FieldError]) -> Node:
    labels = _read_labels(obj, errors)
    addresses = _read_addresses(_section(obj, "status", errors), errors)
    spec = _section(obj, "spec", errors)
    pod_cidrs: list[IPNetwork | None] = [
        read_cidr(item, item_path, errors)
        for item_path, item in _items(spec, "podCIDRs", "spec", errors)
    ]
    if not pod_cidrs and spec.get("podCIDR") not in (None, ""):
        pod_cidrs.append(read_cidr(spec["podCIDR"], "spec.podCIDR", errors))
    return Node(name, labels, addresses, tuple(c for c in pod_cidrs if c is not None))


def _read_gateway(obj: Mapping[str, object], name: str, errors: list[FieldError]) -> EgressGateway:
    labels = _read_labels(obj, errors)
    status = _section(obj, "status", errors)
    addresses = _read_addresses(status, errors)
    interfaces = tuple(
        _read_interface(item, item_path, errors)
        for item_path, item in _mapping_items(status, "interfaces", "status", errors)
    )
    pools = []
    for item_path, item in _mapping_items(status, "egressIPPools", "status", errors):
        cidr_path = child(item_path, "cidr")
        cidr = None
        if item.get("cidr") is None:
            errors.append(required(cidr_path))
        else:
            cidr = read_cidr(item["cidr"], cidr_path, errors)
        interface = _required_string(item, "interface", item_path, errors)
        if cidr is not None:
            pools.append(EgressIPPool(cidr, interface))
    ready = False
    for item_path, item in _mapping_items(status, "conditions", "status", errors):
        condition_type = _required_string(item, "type", item_path, errors)
        condition_status = _required_string(item, "status", item_path, errors)
        ready = ready or (condition_type == "Ready" and condition_status == "True")
    return EgressGateway(name, labels, addresses, interfaces, tuple(pools), ready)


def _read_interface(
    obj: Mapping[str, object], path: str, errors: list[FieldError]
) -> GatewayInterface:
    name = _required_string(obj, "name", path, errors)
    altnames = []
    for item_path, item in _items(obj, "altnames", path, errors):
        altname = read_string(item, item_path, errors)
        if altname is not None:
            altnames.append(altname)
    addresses = []
    for item_path, item in _items(obj, "addresses", path, errors):
        text = read_string(item, item_path, errors)
        if text is None:
            continue
        try:
            address, prefixlen = parse_address_with_prefix(text)
        except ValueError as e:
            errors.append(invalid(item_path, text, f"not an address/prefix-length ({e})"))
            continue
        addresses.append(InterfaceAddress(address, prefixlen))
    default_routes = []
    for flag in ("defaultRouteV4", "defaultRouteV6"):
        value = obj.get(flag)
        default_routes.append(
            value is not None and bool(read_bool(value, child(path, flag), errors))
        )
    return GatewayInterface(
        name=name,
        altnames=tuple(altnames),
        addresses=tuple(addresses),
        default_route_v4=default_routes[0],
        default_route_v6=default_routes[1],
    )


def _read_api_server_addresses(
    obj: Mapping[str, object], kind: str, errors: list[FieldError]
) -> list[IPAddress]:
    """`EndpointSlice.endpoints[].addresses[]` or `Endpoints.subsets[].addresses[].ip`."""
    found: list[IPAddress | None] = []
    if kind == "EndpointSlice":
        for endpoint_path, endpoint in _mapping_items(obj, "endpoints", "", errors):
            found += [
                read_address(item, item_path, errors)
                for item_path, item in _items(endpoint, "addresses", endpoint_path, errors)
            ]
    else:
        for subset_path, subset in _mapping_items(obj, "subsets", "", errors):
            found += [
                read_address(item.get("ip"), child(item_path, "ip"), errors)
                for item_path, item in _mapping_items(subset, "addresses", subset_path, errors)
            ]
    return [a for a in found if a is not None]
