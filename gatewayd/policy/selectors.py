"""Kubernetes LabelSelectors (`matchLabels`, `matchExpressions`), compiled strictly.

Cilium compiles a selector that Kubernetes' `NewRequirement` refuses (a bad key or value, an
unknown operator, `In` without values, `Exists` with values) into one that silently matches
nothing, so the policy goes inert or drops traffic. We reject such selectors with the field path
instead (DESIGN.md, "Where we differ from Cilium").
"""

from __future__ import annotations

import re

from gatewayd.policy.fields import (
    child,
    dns_subdomain_problem,
    forbidden,
    index,
    invalid,
    key,
    read_list,
    read_mapping,
    read_string,
    reject_unknown_fields,
    required,
    unsupported,
)
from gatewayd.policy.model import FieldError, LabelSelector, Operator, Requirement

# Identity labels Cilium derives from the pod's namespace (cilium-egress-semantics.md §3.1).
NAMESPACE_LABEL_PREFIX = "io.cilium.k8s.namespace.labels."
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"

LABEL_NAME_MAX = 63
LABEL_VALUE_MAX = 63
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_SELECTOR_FIELDS = ("matchLabels", "matchExpressions")
_EXPRESSION_FIELDS = ("key", "operator", "values")
_OPERATORS = tuple(op.value for op in Operator)
_OPERATORS_WITH_VALUES = (Operator.IN, Operator.NOT_IN)
# Cilium accepts "source:key" in its own network policies; its egress selectors never need it.
_CILIUM_SOURCE_PREFIXES = ("k8s:", "any:")


def label_key_problem(label_key: str) -> str | None:
    """Why `label_key` is not a Kubernetes qualified name (`[prefix/]name`), or None."""
    if label_key.startswith(_CILIUM_SOURCE_PREFIXES):
        source = label_key.split(":", 1)[0]
        return f'Cilium source prefixes ("{source}:") are not supported; write the key without it'
    parts = label_key.split("/")
    if len(parts) > 2:
        return (
            "a qualified name must be a name with an optional DNS subdomain prefix and '/'"
            " (e.g. 'MyName' or 'example.com/MyName')"
        )
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            return "prefix part must be non-empty"
        if (problem := dns_subdomain_problem(prefix)) is not None:
            return f"prefix part {problem}"
    if not name:
        return "name part must be non-empty"
    if len(name) > LABEL_NAME_MAX:
        return f"name part must be no more than {LABEL_NAME_MAX} characters"
    if not _LABEL_NAME.fullmatch(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start"
            " and end with an alphanumeric character (e.g. 'MyName', 'my.name', or '123-abc')"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a valid label value, or None."""
    if len(value) > LABEL_VALUE_MAX:
        return f"must be no more than {LABEL_VALUE_MAX} characters"
    if not _LABEL_VALUE.fullmatch(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters,"
            " '-', '_' or '.', and must start and end with an alphanumeric character"
            " (e.g. 'MyValue', or 'my_value', or '12345')"
        )
    return None


def parse_label_selector(obj: object, path: str) -> tuple[LabelSelector | None, list[FieldError]]:
    """Compile a LabelSelector; `matchLabels {k: v}` becomes `k In [v]`. All requirements are
    ANDed; no requirement (`{}`) matches everything. Returns a selector only without errors."""
    errors: list[FieldError] = []
    mapping = read_mapping(obj, path, errors)
    if mapping is None:
        return None, errors
    reject_unknown_fields(mapping, _SELECTOR_FIELDS, path, errors)
    requirements: list[Requirement] = []
    match_labels = mapping.get("matchLabels")
    if match_labels is not None:
        requirements += _parse_match_labels(match_labels, child(path, "matchLabels"), errors)
    match_expressions = mapping.get("matchExpressions")
    if match_expressions is not None:
        expressions_path = child(path, "matchExpressions")
        items = read_list(match_expressions, expressions_path, errors) or []
        for i, item in enumerate(items):
            requirement = _parse_expression(item, index(expressions_path, i), errors)
            if requirement is not None:
                requirements.append(requirement)
    if errors:
        return None, errors
    return LabelSelector(tuple(requirements)), errors


def _parse_match_labels(obj: object, path: str, errors: list[FieldError]) -> list[Requirement]:
    mapping = read_mapping(obj, path, errors)
    if mapping is None:
        return []
    requirements = []
    for label_key, value in mapping.items():
        if not isinstance(label_key, str):
            errors.append(invalid(path, label_key, "label keys must be strings"))
            continue
        entry_path = key(path, label_key)
        if (problem := label_key_problem(label_key)) is not None:
            errors.append(invalid(entry_path, label_key, problem))
        text = read_string(value, entry_path, errors)
        if text is None:
            continue
        if (problem := label_value_problem(text)) is not None:
            errors.append(invalid(entry_path, text, problem))
            continue
        requirements.append(Requirement(label_key, Operator.IN, frozenset({text})))
    return sorted(requirements, key=lambda r: r.key)


def _parse_expression(obj: object, path: str, errors: list[FieldError]) -> Requirement | None:
    first_error = len(errors)
    mapping = read_mapping(obj, path, errors)
    if mapping is None:
        return None
    reject_unknown_fields(mapping, _EXPRESSION_FIELDS, path, errors)

    key_path = child(path, "key")
    label_key = _read_required_string(mapping.get("key"), key_path, errors)
    if label_key is not None and (problem := label_key_problem(label_key)) is not None:
        errors.append(invalid(key_path, label_key, problem))

    operator_path = child(path, "operator")
    operator_text = _read_required_string(mapping.get("operator"), operator_path, errors)
    operator = None
    if operator_text is not None:
        if operator_text in _OPERATORS:
            operator = Operator(operator_text)
        else:
            errors.append(unsupported(operator_path, operator_text, _OPERATORS))

    values_path = child(path, "values")
    raw_values = mapping.get("values")
    items = [] if raw_values is None else read_list(raw_values, values_path, errors)
    values: list[str] = []
    for i, item in enumerate(items or []):
        item_path = index(values_path, i)
        text = read_string(item, item_path, errors)
        if text is not None and (problem := label_value_problem(text)) is not None:
            errors.append(invalid(item_path, text, problem))
        elif text is not None:
            values.append(text)

    # `items is None` means `values` had the wrong type, which is already reported.
    if operator in _OPERATORS_WITH_VALUES and items == []:
        errors.append(required(values_path, 'must be specified when operator is "In" or "NotIn"'))
    if operator is not None and operator not in _OPERATORS_WITH_VALUES and items:
        errors.append(
            forbidden(
                values_path, 'may not be specified when operator is "Exists" or "DoesNotExist"'
            )
        )
    if len(errors) > first_error or label_key is None or operator is None:
        return None
    return Requirement(label_key, operator, frozenset(values))


def _read_required_string(value: object, path: str, errors: list[FieldError]) -> str | None:
    if value is None or value == "":
        errors.append(required(path))
        return None
    return read_string(value, path, errors)


def prefix_namespace_selector(selector: LabelSelector) -> LabelSelector:
    """A `namespaceSelector` as a selector over pod identity labels (semantics §3.4): every key
    gets the namespace-label prefix; `{}` (every namespace) becomes `namespace Exists`."""
    if not selector.requirements:
        return LabelSelector((Requirement(POD_NAMESPACE_LABEL, Operator.EXISTS),))
    return LabelSelector(
        tuple(
            Requirement(NAMESPACE_LABEL_PREFIX + r.key, r.operator, r.values)
            for r in selector.requirements
        )
    )


def entry_selector(
    pod_selector: LabelSelector | None, namespace_selector: LabelSelector | None
) -> LabelSelector:
    """One `selectors[]` entry as one selector: namespace and pod requirements ANDed (§3.4).

    A pod selector alone selects matching pods in every namespace (the policy is cluster-wide);
    a namespace selector alone selects every pod in the matching namespaces.
    """
    if namespace_selector is None:
        if pod_selector is None:
            raise ValueError("a selectors[] entry needs a podSelector or a namespaceSelector")
        return pod_selector
    namespace_requirements = prefix_namespace_selector(namespace_selector).requirements
    pod_requirements = pod_selector.requirements if pod_selector is not None else ()
    return LabelSelector(namespace_requirements + pod_requirements)
