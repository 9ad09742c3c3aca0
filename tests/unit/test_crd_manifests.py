"""The Kubernetes manifests in packaging/kubernetes: valid objects for every Kubernetes version
from 1.30 on (kubernetes-validate, strict, offline schemas), CRDs the API server will take
(structural schemas, CEL that a 1.30 API server compiles), least-privilege RBAC, and workloads
with the promised replicas, probes and security settings."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fakecluster.crdcheck import (
    CustomResourceValidator,
    cel_functions,
    cel_rules,
    load_documents,
    structural_problems,
)
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from gatewayd.api.sourceslices import shard_rule
from gatewayd.cli.gatewayd import build_parser
from gatewayd.kube.resources import (
    EGRESS_GATEWAY_POLICIES,
    EGRESS_GATEWAYS,
    EGRESS_NODES,
    EGRESS_SOURCE_SLICES,
    Resource,
)
from gatewayd.policy.model import (
    DropReason,
    GatewayPlan,
    NodePlan,
    Role,
    SnatRule,
    SteerAction,
    SteerRule,
)
from gatewayd.policy.planio import gateway_plan_to_dict, node_plan_to_dict
from gatewayd.policy.validation import parse_policy

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "packaging/kubernetes"
NAMESPACE = "gatewayd-system"
# The manifests name the image `gatewayd`; the kustomization gives it its registry and tag.
IMAGE = "gatewayd"
FLOOR = Version("1.30")
VERSIONS = [v for v in dict.fromkeys(all_versions()) if Version(v) >= FLOOR]
TEMPLATE = KUBE / "templates/gateway-credentials.yaml"

# CEL a 1.30 API server compiles in a new CRD: the standard functions and macros, and the
# libraries Kubernetes added up to 1.29 (1.30 accepts its own additions, such as isIP and
# isCIDR, only in CRDs stored before, for rollback safety).
CEL_FUNCTIONS_1_30 = frozenset(
    {"has", "all", "exists", "exists_one", "map", "filter", "size", "matches", "type"}
    | {"string", "int", "uint", "double", "bytes", "bool", "duration", "timestamp"}
    | {"startsWith", "endsWith", "contains", "split", "join", "lowerAscii", "upperAscii"}
    | {"charAt", "indexOf", "lastIndexOf", "replace", "substring", "trim"}
    | {"isSorted", "sum", "min", "max", "find", "findAll"}
)


def manifest_files() -> list[Path]:
    """The files kustomization.yaml should list: every YAML file but itself and templates."""
    return sorted(
        p
        for p in KUBE.rglob("*.yaml")
        if p.name != "kustomization.yaml"
        and not {"templates", "cleanup"} & set(p.relative_to(KUBE).parts)
    )


@cache
def installed() -> list[dict[str, Any]]:
    """Every object `kubectl apply -k` installs (shared: tests copy before changing one)."""
    return [doc for path in manifest_files() for doc in load_documents(path)]


@cache
def rendered_template(gateway: str) -> list[dict[str, Any]]:
    """The per-gateway credentials, as `gatewayctl token create` renders them."""
    text = TEMPLATE.read_text().replace("GATEWAY_NAME", gateway)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def crd(name: str) -> dict[str, Any]:
    return find(installed(), "CustomResourceDefinition", name)


def validator(name: str) -> CustomResourceValidator:
    return CustomResourceValidator(crd(name))


def schema_of(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = crd(name)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


# --- every manifest is a valid Kubernetes object --------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    problems = []
    for doc in installed() + rendered_template("gw-east-1"):
        if doc["apiVersion"].startswith("egress.gatewayd.io/"):
            continue  # custom resources: checked against our CRDs below
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
    assert problems == []


@cache
def cleanup() -> list[dict[str, Any]]:
    """What `kubectl apply -k packaging/kubernetes/cleanup` installs."""
    (kustomization,) = load_documents(KUBE / "cleanup" / "kustomization.yaml")
    return [doc for name in kustomization["resources"]
            for doc in load_documents(KUBE / "cleanup" / name)]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_cleanup_is_valid_for_kubernetes(version: str) -> None:
    for doc in cleanup():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_cleanup_runs_steers_teardown_with_steers_state_and_node() -> None:
    """The cleanup reads what steer wrote where steer wrote it, as the node steer ran on."""
    steer = find(installed(), "DaemonSet", "gatewayd-steer")["spec"]["template"]["spec"]
    pod = find(cleanup(), "DaemonSet", "gatewayd-steer-cleanup")["spec"]["template"]["spec"]
    (teardown,) = pod["initContainers"]
    (daemon,) = steer["containers"]
    args = build_parser().parse_args(teardown["args"])
    assert (args.role, args.teardown) == ("steer", True)
    assert args.config == build_parser().parse_args(daemon["args"]).config
    state = {m["mountPath"] for m in daemon["volumeMounts"] if m["name"] == "state"}
    assert state == {m["mountPath"] for m in teardown["volumeMounts"]}
    assert [v for v in pod["volumes"] if v["name"] == "state"] == \
        [v for v in steer["volumes"] if v["name"] == "state"]
    node = next(e for e in daemon["env"] if e["name"] == "GATEWAYD_NODE_NAME")
    assert node in teardown["env"]
    assert teardown["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert pod["hostNetwork"] is True and pod["automountServiceAccountToken"] is False


def test_a_broken_manifest_is_caught() -> None:
    deployment = copy.deepcopy(find(installed(), "Deployment", "gatewayd-controller"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_the_template_egress_gateway_is_a_valid_custom_resource() -> None:
    stub = find(rendered_template("gw-east-1"), "EgressGateway", "gw-east-1")
    assert validator("egressgateways.egress.gatewayd.io").errors(stub) == []


def test_kustomization_lists_every_manifest_once() -> None:
    (kustomization,) = load_documents(KUBE / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(KUBE / r for r in listed) == manifest_files()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_whole_install() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], check=True, capture_output=True, text=True
    ).stdout
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in yaml.safe_load_all(built))
    assert kinds == sorted(f"{d['kind']}/{d['metadata']['name']}" for d in installed())


def test_namespaced_objects_live_in_gatewayd_system() -> None:
    """No exception, not even for the API server's EndpointSlice in `default` (a ClusterRole
    limited by name): an overlay's `namespace:` moves every namespaced object."""
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                      "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    for doc in installed():
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_scoped:
            assert namespace is None, doc["metadata"]["name"]
        else:
            assert namespace == NAMESPACE, doc["metadata"]["name"]


# --- the CRDs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "resource", [EGRESS_GATEWAY_POLICIES, EGRESS_GATEWAYS, EGRESS_NODES, EGRESS_SOURCE_SLICES]
)
def test_crds_match_the_names_the_code_uses(resource: Resource) -> None:
    definition = crd(f"{resource.plural}.{resource.group}")
    spec = definition["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["plural"]) == (
        resource.group,
        resource.kind,
        resource.plural,
    )
    assert spec["scope"] == ("Namespaced" if resource.namespaced else "Cluster")
    (version,) = spec["versions"]
    assert version["name"] == resource.version
    assert version["served"] is version["storage"] is True
    # A slice is the controller's alone: no status for anyone else to write.
    expected = {} if resource is EGRESS_SOURCE_SLICES else {"status": {}}
    assert version.get("subresources", {}) == expected


def test_policy_short_name_and_printer_columns() -> None:
    spec = crd("egressgatewaypolicies.egress.gatewayd.io")["spec"]
    assert spec["names"]["shortNames"] == ["egp"]
    columns = [c["name"].upper() for c in spec["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["GATEWAY", "EGRESS-IP", "PODS", "READY", "AGE"]
    status = spec["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    for column in spec["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".status."):
            field = column["jsonPath"].removeprefix(".status.").split("[")[0]
            assert field in status["properties"], column


@pytest.mark.parametrize(
    "name",
    [
        "egressgatewaypolicies.egress.gatewayd.io",
        "egressgateways.egress.gatewayd.io",
        "egressnodes.egress.gatewayd.io",
    ],
)
def test_crd_schemas_are_structural(name: str) -> None:
    assert structural_problems(schema_of(name)) == []


def test_structural_check_finds_problems() -> None:
    broken = copy.deepcopy(schema_of("egressgatewaypolicies.egress.gatewayd.io"))
    spec = broken["properties"]["spec"]
    del spec["properties"]["selectors"]["type"]
    spec["properties"]["excludedCIDRs"]["allOf"] = [{"type": "string"}]
    spec["x-kubernetes-validations"][0]["fieldPath"] = ".nowhere"
    assert len(structural_problems(broken)) == 3


@pytest.mark.parametrize(
    "name",
    [
        "egressgatewaypolicies.egress.gatewayd.io",
        "egressgateways.egress.gatewayd.io",
        "egressnodes.egress.gatewayd.io",
    ],
)
def test_cel_rules_compile_on_kubernetes_1_30(name: str) -> None:
    for path, rule in cel_rules(schema_of(name)):
        assert cel_functions(rule["rule"]) <= CEL_FUNCTIONS_1_30, path
        assert "oldSelf" not in rule["rule"], path


def test_cel_function_scan_sees_library_calls() -> None:
    assert cel_functions("isIP(self) && cidr(self.c).prefixLength() > 8") == {
        "isIP",
        "cidr",
        "prefixLength",
    }


def label_selector_schemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for name, child in schema.get("properties", {}).items():
        if name.endswith("Selector"):
            yield child
        yield from label_selector_schemas(child)
    if isinstance(schema.get("items"), dict):
        yield from label_selector_schemas(schema["items"])


def without_descriptions(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: without_descriptions(v) for k, v in schema.items() if k != "description"}
    return schema


def test_every_label_selector_is_checked_the_same_way() -> None:
    spec = schema_of("egressgatewaypolicies.egress.gatewayd.io")["properties"]["spec"]
    selectors = [without_descriptions(s) for s in label_selector_schemas(spec)]
    assert len(selectors) == 5  # pod, namespace and node selector; two gateway nodeSelectors
    assert all(s == selectors[0] for s in selectors)
    gateways = spec["properties"]
    assert without_descriptions(gateways["egressGateway"]) == without_descriptions(
        gateways["egressGateways"]["items"]
    )


def test_plans_fit_the_gateway_and_node_crds() -> None:
    """The controller writes planio's dicts as the spec (without the name and generation,
    which metadata carries); the CRDs must take them as they are."""
    gateway_plan = GatewayPlan(
        gateway="gw-east-1",
        generation=3,
        rules=(
            SnatRule(
                policy="pay",
                role=Role.ACTIVE,
                sources=frozenset({ip_address("10.244.1.10"), ip_address("10.244.2.7")}),
                destinations=(ip_network("198.51.100.0/24"),),
                egress_ip=ip_address("203.0.113.10"),
            ),
        ),
    )
    node_plan = NodePlan(
        node="node-1",
        generation=2,
        cluster_internal=(ip_network("10.244.0.0/16"),),
        rules=(
            SteerRule(
                policy="pay",
                action=SteerAction.TUNNEL,
                sources=frozenset({ip_address("10.244.1.10")}),
                destinations=(ip_network("198.51.100.0/24"),),
                gateway="gw-east-1",
                standby="gw-east-2",
            ),
            SteerRule(
                policy="blocked",
                action=SteerAction.DROP,
                sources=frozenset({ip_address("10.244.1.11")}),
                destinations=(ip_network("192.0.2.0/24"),),
                reason=DropReason.NO_EGRESS_GATEWAY,
            ),
        ),
    )
    gateway_spec = gateway_plan_to_dict(gateway_plan)
    sharded, slices = shard_rule("gw-east-1", gateway_spec["rules"][0], previous=0)
    documents = [
        ({**gateway_spec, "rules": [sharded]}, "EgressGateway", "gw-east-1"),
        ({**gateway_spec, "rules": gateway_spec["rules"]}, "EgressGateway", "gw-east-1"),
        (node_plan_to_dict(node_plan), "EgressNode", "node-1"),
        *((s.spec(), "EgressSourceSlice", s.name) for s in slices),
    ]
    for plan, kind, name in documents:
        spec = {k: v for k, v in plan.items() if k not in ("node", "generation")}
        if kind != "EgressSourceSlice":
            spec.pop("gateway", None)
        obj = {
            "apiVersion": "egress.gatewayd.io/v1alpha1",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
        assert validator(f"{kind.lower()}s.egress.gatewayd.io").errors(obj) == []


def example_objects(kind: str) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((REPO / "examples").glob("*.yaml"))
        for doc in load_documents(path)
        if doc.get("kind") == kind
    ]


def test_example_policies_pass_the_crd_and_the_parser() -> None:
    policies = example_objects("EgressGatewayPolicy")
    assert policies
    check = validator("egressgatewaypolicies.egress.gatewayd.io")
    for policy in policies:
        assert check.errors(policy) == [], policy["metadata"]["name"]
        assert parse_policy(policy)[1] == [], policy["metadata"]["name"]


def test_example_gateway_status_fits_the_crd() -> None:
    """What the snapshot reader takes from an EgressGateway's status is what the agent can
    write there."""
    gateways = example_objects("EgressGateway")
    assert gateways
    check = validator("egressgateways.egress.gatewayd.io")
    for gateway in gateways:
        assert check.errors(gateway, status_update=True) == [], gateway["metadata"]["name"]


@pytest.mark.parametrize("kind", ["EgressGateway", "EgressNode"])
def test_the_daemon_version_is_a_status_field(kind: str) -> None:
    """The agent and steer write status.version; the controller checks it (versions.py)."""
    plural = {"EgressGateway": "egressgateways", "EgressNode": "egressnodes"}[kind]
    obj = {"apiVersion": "egress.gatewayd.io/v1alpha1", "kind": kind,
           "metadata": {"name": "x"}, "spec": {}, "status": {"version": "0.1.0"}}
    check = validator(f"{plural}.egress.gatewayd.io")
    assert check.errors(obj, status_update=True) == []
    assert check.errors({**obj, "status": {"version": "v" * 65}}, status_update=True) != []
    columns = crd(f"{plural}.egress.gatewayd.io")["spec"]["versions"][0]["additionalPrinterColumns"]
    assert {"name": "Version", "type": "string", "jsonPath": ".status.version",
            "priority": 1} in columns


def test_condition_types_are_unique() -> None:
    gateway = copy.deepcopy(example_objects("EgressGateway")[0])
    ready = {"type": "Ready", "status": "True"}
    gateway["status"]["conditions"] = [ready, {**ready, "status": "False"}]
    errors = validator("egressgateways.egress.gatewayd.io").errors(gateway, status_update=True)
    assert errors == ["status.conditions: Duplicate value: keys ['type']"]


# --- RBAC -----------------------------------------------------------------------------------------


def bound_rules(
    docs: list[dict[str, Any]], service_account: str, namespace: str | None
) -> list[dict[str, Any]]:
    """The rules that apply to a service account of gatewayd-system for a request in
    `namespace` (None: a cluster-scoped resource)."""
    rules: list[dict[str, Any]] = []
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}
    for binding in docs:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        if subject not in binding["subjects"]:
            continue
        if binding["kind"] == "RoleBinding" and binding["metadata"]["namespace"] != namespace:
            continue
        role_ref = binding["roleRef"]
        role_namespace = None if role_ref["kind"] == "ClusterRole" else namespace
        role = find(
            [d for d in docs if d["metadata"].get("namespace") == role_namespace],
            role_ref["kind"],
            role_ref["name"],
        )
        rules += role["rules"]
    return rules


def allowed(
    docs: list[dict[str, Any]],
    service_account: str,
    verb: str,
    resource: tuple[str, str],
    name: str | None = None,
    namespace: str | None = None,
) -> bool:
    """Whether RBAC lets the service account do `verb` on `resource` (API group, resource)."""
    group, plural = resource
    for rule in bound_rules(docs, service_account, namespace):
        if (
            group in rule["apiGroups"]
            and plural in rule["resources"]
            and verb in rule["verbs"]
            and (not rule.get("resourceNames") or name in rule["resourceNames"])
        ):
            return True
    return False


EGW = ("egress.gatewayd.io", "egressgateways")
EGW_STATUS = ("egress.gatewayd.io", "egressgateways/status")
EGN = ("egress.gatewayd.io", "egressnodes")
EGN_STATUS = ("egress.gatewayd.io", "egressnodes/status")
EGSS = ("egress.gatewayd.io", "egresssourceslices")
EGP = ("egress.gatewayd.io", "egressgatewaypolicies")
EGP_STATUS = ("egress.gatewayd.io", "egressgatewaypolicies/status")
CEGP = ("cilium.io", "ciliumegressgatewaypolicies")
LEASES = ("coordination.k8s.io", "leases")
ENDPOINT_SLICES = ("discovery.k8s.io", "endpointslices")
PODS = ("", "pods")
NODES = ("", "nodes")
SECRETS = ("", "secrets")
EVENTS = ("events.k8s.io", "events")
CORE_EVENTS = ("", "events")


def test_no_rule_uses_wildcards() -> None:
    for doc in installed() + rendered_template("gw-east-1"):
        for rule in doc.get("rules", ()):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, ()), (doc["metadata"]["name"], rule)


# (verb, resource, name, namespace, allowed?) for the gateway gw-a
GATEWAY_ACCESS = [
    ("get", EGW, "gw-a", None, True),
    ("watch", EGW, "gw-a", None, True),
    ("patch", EGW, "gw-a", None, False),  # its labels are the administrator's
    ("update", EGW_STATUS, "gw-a", None, True),
    ("get", EGW, "gw-b", None, False),
    ("patch", EGW, "gw-b", None, False),
    ("update", EGW_STATUS, "gw-b", None, False),
    ("list", EGW, None, None, False),
    ("create", EGW, None, None, False),
    ("delete", EGW, "gw-a", None, False),
    ("patch", LEASES, "egressgateway-gw-a", NAMESPACE, True),
    ("patch", LEASES, "egressgateway-gw-b", NAMESPACE, False),
    ("patch", LEASES, "gatewayd-controller", NAMESPACE, False),
    ("create", LEASES, None, NAMESPACE, False),
    ("get", EGP, "pay", None, False),
    ("get", EGN, "node-1", None, False),
    ("list", PODS, None, NAMESPACE, False),
    ("get", SECRETS, "gateway-gw-a-token", NAMESPACE, False),
    ("watch", EGSS, None, None, True),  # its rules' sources (RBAC cannot narrow to its label)
    ("create", EGSS, None, None, False),
    ("patch", EGSS, "gw-a.pay.ipv4.0", None, False),
    ("delete", EGSS, "gw-a.pay.ipv4.0", None, False),
]


@pytest.mark.parametrize(("verb", "resource", "name", "namespace", "expected"), GATEWAY_ACCESS)
def test_a_gateway_reaches_only_its_own_objects(
    verb: str, resource: tuple[str, str], name: str | None, namespace: str | None, expected: bool
) -> None:
    docs = installed() + rendered_template("gw-a") + rendered_template("gw-b")
    assert allowed(docs, "gateway-gw-a", verb, resource, name, namespace) is expected


CONTROLLER_ACCESS = [
    ("watch", EGP, None, None, True),
    ("patch", EGP_STATUS, "pay", None, True),
    ("update", EGP, "pay", None, False),  # the user's spec is never rewritten
    ("patch", EGW, "gw-a", None, True),
    ("patch", EGW_STATUS, "gw-a", None, True),  # status.clockSkewSeconds, with a merge patch
    ("update", EGW_STATUS, "gw-a", None, False),
    ("patch", EGN, "node-1", None, True),
    ("patch", EGN_STATUS, "node-1", None, True),  # its PeerAccepted condition
    ("update", EGN_STATUS, "node-1", None, False),
    ("delete", EGW, "gw-a", None, False),
    ("watch", EGSS, None, None, True),
    ("create", EGSS, None, None, True),
    ("patch", EGSS, "gw-a.pay.ipv4.0", None, True),
    ("delete", EGSS, "gw-a.pay.ipv4.0", None, True),
    ("list", CEGP, None, None, True),
    ("patch", CEGP, "pay", None, False),
    ("watch", PODS, None, None, True),
    ("watch", NODES, None, None, True),
    ("get", SECRETS, "any", NAMESPACE, False),
    ("watch", LEASES, None, NAMESPACE, True),
    ("create", LEASES, None, NAMESPACE, True),
    ("patch", LEASES, "gatewayd-controller", NAMESPACE, True),
    ("patch", LEASES, "egressgateway-gw-a", NAMESPACE, False),
    ("watch", ENDPOINT_SLICES, "kubernetes", "default", True),
    ("watch", ENDPOINT_SLICES, None, "default", False),
    ("get", ENDPOINT_SLICES, "shop", "shop", False),
    ("create", EVENTS, None, "default", True),
    ("patch", EVENTS, "pay.1", "default", True),  # a repeat updates the Event's series
    ("create", CORE_EVENTS, None, "default", False),  # events.k8s.io/v1 only
]


@pytest.mark.parametrize(("verb", "resource", "name", "namespace", "expected"), CONTROLLER_ACCESS)
def test_controller_access(
    verb: str, resource: tuple[str, str], name: str | None, namespace: str | None, expected: bool
) -> None:
    assert allowed(installed(), "gatewayd-controller", verb, resource, name, namespace) is expected


STEER_ACCESS = [
    ("create", EGN, None, None, True),
    ("watch", EGN, None, None, True),
    ("patch", EGN_STATUS, "node-1", None, True),
    ("patch", EGN, "node-1", None, False),  # the plan is the controller's
    ("delete", EGN, "node-1", None, False),
    ("get", EGW, "gw-a", None, False),
    ("get", EGP, "pay", None, False),
    ("list", EGSS, None, None, False),
    ("list", PODS, None, None, False),
    ("get", NODES, "node-1", None, True),
    ("list", NODES, None, None, False),
    ("create", EVENTS, None, "default", True),
    ("patch", EVENTS, "node-1.1", "default", True),
    ("create", CORE_EVENTS, None, "default", False),
    ("get", LEASES, "egressgateway-gw-a", NAMESPACE, False),
]


@pytest.mark.parametrize(("verb", "resource", "name", "namespace", "expected"), STEER_ACCESS)
def test_steer_access(
    verb: str, resource: tuple[str, str], name: str | None, namespace: str | None, expected: bool
) -> None:
    assert allowed(installed(), "gatewayd-steer", verb, resource, name, namespace) is expected


# --- workloads ------------------------------------------------------------------------------------


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(installed(), kind, name)["spec"]["template"]["spec"]
    return spec


def test_controller_deployment() -> None:
    deployment = find(installed(), "Deployment", "gatewayd-controller")
    assert deployment["spec"]["replicas"] == 2
    pod = pod_spec("Deployment", "gatewayd-controller")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod.get("hostNetwork") is not True
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert_probes_and_resources(container)
    find(installed(), "ServiceAccount", pod["serviceAccountName"])
    budget = find(installed(), "PodDisruptionBudget", "gatewayd-controller")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


def test_steer_daemonset() -> None:
    pod = pod_spec("DaemonSet", "gatewayd-steer")
    assert pod["hostNetwork"] is True
    assert {"operator": "Exists"} in pod["tolerations"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_NICE"]}
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security.get("privileged") is not True
    assert_probes_and_resources(container)
    find(installed(), "ServiceAccount", pod["serviceAccountName"])
    # The fast failover path: last to be evicted or preempted on its node.
    assert pod["priorityClassName"] == "system-node-critical"


def assert_probes_and_resources(container: dict[str, Any]) -> None:
    assert container["image"] == IMAGE
    ports = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def built_image_name() -> str:
    """The name scripts/build-image gives the image, with the version of the package."""
    script = (REPO / "scripts/build-image").read_text()
    (name,) = re.findall(r"^IMAGE=\$\{GATEWAYD_IMAGE:-([^}]+)\}$", script, re.M)
    return f"{name}:{metadata.version('gatewayd')}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_image_scripts_build_image_builds() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], check=True, capture_output=True, text=True
    ).stdout
    images = {c["image"] for d in yaml.safe_load_all(built)
              if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {built_image_name()}


def test_readme_names_the_image_and_the_floor() -> None:
    readme = (KUBE / "README.md").read_text()
    assert built_image_name() in readme and "scripts/build-image" in readme
    assert "1.30" in readme
