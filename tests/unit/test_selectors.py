"""Label selectors: compilation, every operator, every error with its exact field path, and the
namespace/pod merge of one `selectors[]` entry (cilium-egress-semantics.md §2.1, §3.2-§3.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.policy.model import FieldError, LabelSelector, Operator, Requirement
from gatewayd.policy.selectors import (
    entry_selector,
    label_key_problem,
    label_value_problem,
    parse_label_selector,
    prefix_namespace_selector,
)

pytestmark = pytest.mark.unit

P = "spec.selectors[0].podSelector"


def compile_ok(obj: object) -> LabelSelector:
    selector, errors = parse_label_selector(obj, P)
    assert errors == []
    assert selector is not None
    return selector


def errors_of(obj: object) -> list[tuple[str, str]]:
    selector, errors = parse_label_selector(obj, P)
    assert selector is None
    assert errors
    return [(e.path, e.message) for e in errors]


def paths_of(obj: object) -> list[str]:
    return [path for path, _ in errors_of(obj)]


# --- compiling valid selectors -----------------------------------------------------------------


def test_empty_selector_has_no_requirement_and_matches_everything() -> None:
    selector = compile_ok({})
    assert selector == LabelSelector(())
    assert selector.matches({})
    assert selector.matches({"app": "web"})


def test_null_fields_are_absent() -> None:
    assert compile_ok({"matchLabels": None, "matchExpressions": None}) == LabelSelector(())


def test_match_labels_become_in_requirements_sorted_by_key() -> None:
    selector = compile_ok({"matchLabels": {"tier": "db", "app": "pay"}})
    assert selector == LabelSelector(
        (
            Requirement("app", Operator.IN, frozenset({"pay"})),
            Requirement("tier", Operator.IN, frozenset({"db"})),
        )
    )


@pytest.mark.parametrize(
    ("expression", "requirement"),
    [
        (
            {"key": "app", "operator": "In", "values": ["a", "b"]},
            Requirement("app", Operator.IN, frozenset({"a", "b"})),
        ),
        (
            {"key": "app", "operator": "NotIn", "values": ["a"]},
            Requirement("app", Operator.NOT_IN, frozenset({"a"})),
        ),
        ({"key": "app", "operator": "Exists"}, Requirement("app", Operator.EXISTS)),
        (
            {"key": "app", "operator": "DoesNotExist"},
            Requirement("app", Operator.DOES_NOT_EXIST),
        ),
        # An empty or null values list is the same as none for Exists/DoesNotExist.
        ({"key": "app", "operator": "Exists", "values": []}, Requirement("app", Operator.EXISTS)),
        (
            {"key": "app", "operator": "DoesNotExist", "values": None},
            Requirement("app", Operator.DOES_NOT_EXIST),
        ),
    ],
)
def test_each_operator_compiles(expression: dict[str, object], requirement: Requirement) -> None:
    assert compile_ok({"matchExpressions": [expression]}) == LabelSelector((requirement,))


def test_match_labels_come_before_expressions_and_all_are_anded() -> None:
    selector = compile_ok(
        {
            "matchLabels": {"app": "pay"},
            "matchExpressions": [
                {"key": "tier", "operator": "NotIn", "values": ["test"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }
    )
    assert [r.key for r in selector.requirements] == ["app", "tier", "canary"]
    assert selector.matches({"app": "pay"})
    assert selector.matches({"app": "pay", "tier": "prod"})
    assert not selector.matches({"app": "pay", "tier": "test"})
    assert not selector.matches({"app": "pay", "canary": "yes"})
    assert not selector.matches({"tier": "prod"})


@pytest.mark.parametrize(
    ("operator", "labels", "expected"),
    [
        ("In", {"env": "prod"}, True),
        ("In", {"env": "dev"}, False),
        ("In", {}, False),
        ("NotIn", {"env": "prod"}, False),
        ("NotIn", {"env": "dev"}, True),
        ("NotIn", {}, True),  # absent key: NotIn matches (§3.2)
        ("Exists", {"env": ""}, True),
        ("Exists", {}, False),
        ("DoesNotExist", {}, True),
        ("DoesNotExist", {"env": "prod"}, False),
    ],
)
def test_operator_semantics(operator: str, labels: dict[str, str], expected: bool) -> None:
    values = ["prod"] if operator in ("In", "NotIn") else []
    selector = compile_ok(
        {"matchExpressions": [{"key": "env", "operator": operator, "values": values}]}
    )
    assert selector.matches(labels) is expected


def test_empty_label_value_is_valid() -> None:
    selector = compile_ok({"matchLabels": {"flag": ""}})
    assert selector.matches({"flag": ""})
    assert not selector.matches({"flag": "x"})


@pytest.mark.parametrize(
    "key",
    [
        "app",
        "A",
        "9",
        "a_b.c-d",
        "x" * 63,
        "example.com/app",
        "app.kubernetes.io/name",
        "io.cilium.k8s.policy.serviceaccount",
        "io.kubernetes.pod.namespace",
        ("a" * 63 + ".") * 3 + "b" * 61 + "/name",  # a 253-character prefix
    ],
)
def test_valid_label_keys(key: str) -> None:
    assert label_key_problem(key) is None
    assert compile_ok({"matchLabels": {key: "v"}}).requirements[0].key == key


@pytest.mark.parametrize("value", ["", "a", "A9", "a.b_c-d", "x" * 63, "1.2.3", "true"])
def test_valid_label_values(value: str) -> None:
    assert label_value_problem(value) is None


# --- errors, each with its exact path ----------------------------------------------------------


def test_selector_not_a_mapping() -> None:
    assert errors_of("app=web") == [(P, 'Invalid value: "string": must be of type object')]
    assert errors_of(["app"]) == [(P, 'Invalid value: "array": must be of type object')]


def test_unknown_field_suggests_the_right_one() -> None:
    assert errors_of({"matchLabel": {"app": "web"}}) == [
        (f"{P}.matchLabel", 'Forbidden: unknown field; did you mean "matchLabels"?')
    ]


def test_unknown_field_without_a_close_match_lists_supported_fields() -> None:
    assert errors_of({"selector": {}}) == [
        (
            f"{P}.selector",
            'Forbidden: unknown field; supported fields: "matchExpressions", "matchLabels"',
        )
    ]


def test_match_labels_not_a_mapping() -> None:
    assert errors_of({"matchLabels": ["app=web"]}) == [
        (f"{P}.matchLabels", 'Invalid value: "array": must be of type object')
    ]


@pytest.mark.parametrize(
    ("key", "problem_start"),
    [
        ("-app", "name part must consist of alphanumeric characters"),
        ("app-", "name part must consist of alphanumeric characters"),
        ("my app", "name part must consist of alphanumeric characters"),
        ("x" * 64, "name part must be no more than 63 characters"),
        ("", "name part must be non-empty"),
        ("example.com/", "name part must be non-empty"),
        ("/app", "prefix part must be non-empty"),
        ("Example.com/app", "prefix part a lowercase RFC 1123 subdomain"),
        ("example_com/app", "prefix part a lowercase RFC 1123 subdomain"),
        ("a" * 254 + "/app", "prefix part must be no more than 253 characters"),
        ("a/b/c", "a qualified name must be a name with an optional DNS subdomain prefix"),
        ("k8s:app", 'Cilium source prefixes ("k8s:") are not supported'),
        ("any:app", 'Cilium source prefixes ("any:") are not supported'),
    ],
)
def test_invalid_match_labels_key(key: str, problem_start: str) -> None:
    [(path, message)] = errors_of({"matchLabels": {key: "v"}})
    assert path == f"{P}.matchLabels[{key}]"
    assert message.startswith(f'Invalid value: "{key}": {problem_start}')


@pytest.mark.parametrize(
    ("value", "problem_start"),
    [
        ("x" * 64, "must be no more than 63 characters"),
        ("-web", "a valid label must be an empty string or consist of alphanumeric"),
        ("web-", "a valid label must be an empty string"),
        ("a b", "a valid label must be an empty string"),
        ("a/b", "a valid label must be an empty string"),
        ("é", "a valid label must be an empty string"),
    ],
)
def test_invalid_match_labels_value(value: str, problem_start: str) -> None:
    [(path, message)] = errors_of({"matchLabels": {"app": value}})
    assert path == f"{P}.matchLabels[app]"
    assert message.startswith(f'Invalid value: "{value}": {problem_start}')


@pytest.mark.parametrize(
    ("value", "type_name"), [(5, "integer"), (True, "boolean"), (None, "null"), (["a"], "array")]
)
def test_match_labels_value_of_wrong_type(value: object, type_name: str) -> None:
    assert errors_of({"matchLabels": {"app": value}}) == [
        (f"{P}.matchLabels[app]", f'Invalid value: "{type_name}": must be of type string')
    ]


def test_match_labels_key_of_wrong_type() -> None:
    assert errors_of({"matchLabels": {1: "a"}}) == [
        (f"{P}.matchLabels", "Invalid value: 1: label keys must be strings")
    ]


def test_match_expressions_not_a_list() -> None:
    assert errors_of({"matchExpressions": {"key": "app"}}) == [
        (f"{P}.matchExpressions", 'Invalid value: "object": must be of type array')
    ]


def test_expression_not_a_mapping() -> None:
    assert errors_of({"matchExpressions": ["app In (a)"]}) == [
        (f"{P}.matchExpressions[0]", 'Invalid value: "string": must be of type object')
    ]


def test_expression_unknown_field() -> None:
    assert paths_of({"matchExpressions": [{"key": "app", "operator": "In", "value": ["a"]}]}) == [
        f"{P}.matchExpressions[0].value",
        f"{P}.matchExpressions[0].values",
    ]
    assert errors_of({"matchExpressions": [{"key": "a", "operator": "Exists", "op": 1}]}) == [
        (
            f"{P}.matchExpressions[0].op",
            'Forbidden: unknown field; supported fields: "key", "operator", "values"',
        )
    ]


@pytest.mark.parametrize("key", [None, ""])
def test_expression_key_required(key: str | None) -> None:
    expression: dict[str, object] = {"operator": "Exists"}
    if key is not None:
        expression["key"] = key
    assert errors_of({"matchExpressions": [expression]}) == [
        (f"{P}.matchExpressions[0].key", "Required value")
    ]


def test_expression_key_invalid() -> None:
    [(path, message)] = errors_of({"matchExpressions": [{"key": "a b", "operator": "Exists"}]})
    assert path == f"{P}.matchExpressions[0].key"
    assert message.startswith('Invalid value: "a b": name part must consist of')


def test_expression_key_wrong_type() -> None:
    assert errors_of({"matchExpressions": [{"key": 7, "operator": "Exists"}]}) == [
        (f"{P}.matchExpressions[0].key", 'Invalid value: "integer": must be of type string')
    ]


def test_expression_operator_required() -> None:
    assert errors_of({"matchExpressions": [{"key": "app", "values": ["a"]}]}) == [
        (f"{P}.matchExpressions[0].operator", "Required value")
    ]


@pytest.mark.parametrize("operator", ["in", "Equals", "Gt", "NotExists", "=="])
def test_expression_operator_unsupported(operator: str) -> None:
    assert errors_of(
        {"matchExpressions": [{"key": "app", "operator": operator, "values": ["1"]}]}
    ) == [
        (
            f"{P}.matchExpressions[0].operator",
            f'Unsupported value: "{operator}": supported values:'
            ' "In", "NotIn", "Exists", "DoesNotExist"',
        )
    ]


def test_expression_operator_wrong_type() -> None:
    assert errors_of({"matchExpressions": [{"key": "app", "operator": ["In"]}]}) == [
        (f"{P}.matchExpressions[0].operator", 'Invalid value: "array": must be of type string')
    ]


@pytest.mark.parametrize("operator", ["In", "NotIn"])
@pytest.mark.parametrize("values", ["missing", None, []])
def test_in_and_not_in_need_values(operator: str, values: object) -> None:
    expression: dict[str, object] = {"key": "app", "operator": operator}
    if values != "missing":
        expression["values"] = values
    assert errors_of({"matchExpressions": [{"key": "ok", "operator": "Exists"}, expression]}) == [
        (
            f"{P}.matchExpressions[1].values",
            'Required value: must be specified when operator is "In" or "NotIn"',
        )
    ]


@pytest.mark.parametrize("operator", ["Exists", "DoesNotExist"])
def test_exists_and_does_not_exist_forbid_values(operator: str) -> None:
    assert errors_of(
        {"matchExpressions": [{"key": "app", "operator": operator, "values": ["a"]}]}
    ) == [
        (
            f"{P}.matchExpressions[0].values",
            'Forbidden: may not be specified when operator is "Exists" or "DoesNotExist"',
        )
    ]


def test_values_not_a_list() -> None:
    assert errors_of({"matchExpressions": [{"key": "app", "operator": "In", "values": "a"}]}) == [
        (f"{P}.matchExpressions[0].values", 'Invalid value: "string": must be of type array')
    ]


def test_value_item_wrong_type_and_invalid() -> None:
    assert errors_of(
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["ok", 3, "-bad"]}]}
    ) == [
        (f"{P}.matchExpressions[0].values[1]", 'Invalid value: "integer": must be of type string'),
        (
            f"{P}.matchExpressions[0].values[2]",
            'Invalid value: "-bad": a valid label must be an empty string or consist of'
            " alphanumeric characters, '-', '_' or '.', and must start and end with an"
            " alphanumeric character (e.g. 'MyValue', or 'my_value', or '12345')",
        ),
    ]


def test_every_error_is_reported_in_one_pass() -> None:
    assert paths_of(
        {
            "matchLabels": {"bad key": "x", "ok": "-bad"},
            "matchExpressions": [
                {"key": "a", "operator": "Exists"},
                {"key": "b", "operator": "In"},
                {"key": "c", "operator": "Bogus", "values": ["x"]},
            ],
            "extra": 1,
        }
    ) == [
        f"{P}.extra",
        f"{P}.matchLabels[bad key]",
        f"{P}.matchLabels[ok]",
        f"{P}.matchExpressions[1].values",
        f"{P}.matchExpressions[2].operator",
    ]


def test_the_path_given_is_the_prefix_of_every_error() -> None:
    _, errors = parse_label_selector(
        {"matchExpressions": [{"key": "x", "operator": "Exists"}, {"key": "y", "operator": "In"}]},
        "spec.egressGateways[1].nodeSelector",
    )
    assert errors == [
        FieldError(
            "spec.egressGateways[1].nodeSelector.matchExpressions[1].values",
            'Required value: must be specified when operator is "In" or "NotIn"',
        )
    ]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)
_selector_like = st.fixed_dictionaries(
    {},
    optional={
        "matchLabels": st.dictionaries(st.text(max_size=10), _json_values, max_size=3)
        | _json_values,
        "matchExpressions": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "key": st.sampled_from(["app", "", "a b"]) | _json_values,
                    "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "X"])
                    | _json_values,
                    "values": st.lists(st.text(max_size=5), max_size=3) | _json_values,
                },
            )
            | _json_values,
            max_size=3,
        )
        | _json_values,
    },
)


@given(_selector_like | _json_values)
def test_any_input_gives_a_selector_or_errors_never_an_exception(obj: object) -> None:
    selector, errors = parse_label_selector(obj, P)
    assert (selector is None) == bool(errors)
    assert all(e.path.startswith(P) for e in errors)


# --- namespace selectors and the merge of one entry (§3.4) ------------------------------------


def test_prefix_namespace_selector_prefixes_every_key_and_keeps_operators() -> None:
    namespace = compile_ok(
        {
            "matchLabels": {"kubernetes.io/metadata.name": "shop"},
            "matchExpressions": [
                {"key": "team", "operator": "NotIn", "values": ["a"]},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }
    )
    assert prefix_namespace_selector(namespace) == LabelSelector(
        (
            Requirement(
                "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
                Operator.IN,
                frozenset({"shop"}),
            ),
            Requirement("io.cilium.k8s.namespace.labels.team", Operator.NOT_IN, frozenset({"a"})),
            Requirement("io.cilium.k8s.namespace.labels.legacy", Operator.DOES_NOT_EXIST),
        )
    )


def test_empty_namespace_selector_means_every_namespace() -> None:
    assert prefix_namespace_selector(LabelSelector(())) == LabelSelector(
        (Requirement("io.kubernetes.pod.namespace", Operator.EXISTS),)
    )


def test_entry_with_pod_selector_only_is_the_pod_selector() -> None:
    pod = compile_ok({"matchLabels": {"app": "pay"}})
    assert entry_selector(pod, None) is pod


def test_entry_with_namespace_selector_only_selects_every_pod_there() -> None:
    namespace = compile_ok({"matchLabels": {"team": "pay"}})
    selector = entry_selector(None, namespace)
    assert selector == LabelSelector(
        (Requirement("io.cilium.k8s.namespace.labels.team", Operator.IN, frozenset({"pay"})),)
    )
    pod_labels = {
        "app": "anything",
        "io.kubernetes.pod.namespace": "shop",
        "io.cilium.k8s.namespace.labels.team": "pay",
    }
    assert selector.matches(pod_labels)
    assert not selector.matches({**pod_labels, "io.cilium.k8s.namespace.labels.team": "web"})


def test_entry_with_both_ands_namespace_and_pod_requirements() -> None:
    pod = compile_ok({"matchLabels": {"app": "pay"}})
    namespace = compile_ok({"matchLabels": {"team": "pay"}})
    selector = entry_selector(pod, namespace)
    assert selector.requirements == (
        Requirement("io.cilium.k8s.namespace.labels.team", Operator.IN, frozenset({"pay"})),
        Requirement("app", Operator.IN, frozenset({"pay"})),
    )
    labels = {"app": "pay", "io.cilium.k8s.namespace.labels.team": "pay"}
    assert selector.matches(labels)
    assert not selector.matches({**labels, "app": "web"})
    assert not selector.matches({"app": "pay", "io.cilium.k8s.namespace.labels.team": "web"})


def test_empty_namespace_selector_with_pod_selector_needs_a_namespace_label() -> None:
    selector = entry_selector(compile_ok({"matchLabels": {"app": "pay"}}), LabelSelector(()))
    assert selector.requirements == (
        Requirement("io.kubernetes.pod.namespace", Operator.EXISTS),
        Requirement("app", Operator.IN, frozenset({"pay"})),
    )
    assert selector.matches({"app": "pay", "io.kubernetes.pod.namespace": "any"})
    assert not selector.matches({"app": "pay"})


def test_pod_namespace_in_pod_selector_with_namespace_labels_needs_both() -> None:
    # §3.4: `io.kubernetes.pod.namespace: X` in podSelector ANDed with a namespaceSelector
    # selects only namespace X, and only if X also carries the selected labels.
    selector = entry_selector(
        compile_ok({"matchLabels": {"io.kubernetes.pod.namespace": "shop"}}),
        compile_ok({"matchLabels": {"team": "pay"}}),
    )
    in_shop = {"io.kubernetes.pod.namespace": "shop", "io.cilium.k8s.namespace.labels.team": "pay"}
    assert selector.matches(in_shop)
    assert not selector.matches({**in_shop, "io.kubernetes.pod.namespace": "other"})
    assert not selector.matches({"io.kubernetes.pod.namespace": "shop"})


def test_entry_without_pod_or_namespace_selector_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="podSelector or a namespaceSelector"):
        entry_selector(None, None)
