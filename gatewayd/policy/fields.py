"""Strict readers for untyped YAML/JSON fields, reporting Kubernetes-style field errors.

Every reader takes the value, its field path (`spec.destinationCIDRs[0]`) and the list that
collects errors; it returns the typed value, or None after appending a `FieldError`. Nothing
here raises on bad input, so one pass over an object reports every problem in it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Collection, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_network

from gatewayd.policy.model import FieldError, IPAddress, IPNetwork

# --- paths -------------------------------------------------------------------------------------


def child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def key(path: str, map_key: str) -> str:
    """A map entry, written like Kubernetes does (`matchLabels[app]`): keys may contain dots."""
    return f"{path}[{map_key}]"


# --- messages (the wording Kubernetes uses, so users recognise them) ---------------------------


def quote(value: object) -> str:
    """Go's %q-like quoting for strings; other scalars as JSON would print them. A mapping
    or list is named by its type, never expanded into a message (it may be huge)."""
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        return type_name(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(path, f"Required value: {detail}" if detail else "Required value")


def invalid(path: str, value: object, detail: str) -> FieldError:
    return FieldError(path, f"Invalid value: {quote(value)}: {detail}")


def unsupported(path: str, value: object, supported: Sequence[str]) -> FieldError:
    choices = ", ".join(quote(s) for s in supported)
    return FieldError(path, f"Unsupported value: {quote(value)}: supported values: {choices}")


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError(path, f"Forbidden: {detail}")


def too_many(path: str, count: int, limit: int) -> FieldError:
    return FieldError(path, f"Too many: {count}: must have at most {limit} items")


def too_long(path: str, value: str, limit: int) -> FieldError:
    return FieldError(path, f"Too long: {quote(value)}: may not be more than {limit} bytes")


def wrong_type(path: str, value: object, expected: str) -> FieldError:
    return invalid(path, type_name(value), f"must be of type {expected}")


# --- structural readers ------------------------------------------------------------------------


def read_mapping(value: object, path: str, errors: list[FieldError]) -> Mapping[str, object] | None:
    if not isinstance(value, Mapping):
        errors.append(wrong_type(path, value, "object"))
        return None
    return value


def read_list(value: object, path: str, errors: list[FieldError]) -> list[object] | None:
    if not isinstance(value, list):
        errors.append(wrong_type(path, value, "array"))
        return None
    return value


def read_string(value: object, path: str, errors: list[FieldError]) -> str | None:
    if not isinstance(value, str):
        errors.append(wrong_type(path, value, "string"))
        return None
    return value


def read_bool(value: object, path: str, errors: list[FieldError]) -> bool | None:
    if not isinstance(value, bool):
        errors.append(wrong_type(path, value, "boolean"))
        return None
    return value


def read_string_map(value: object, path: str, errors: list[FieldError]) -> dict[str, str] | None:
    """A `map[string]string` such as `metadata.labels`; None if any entry is not a string."""
    mapping = read_mapping(value, path, errors)
    if mapping is None:
        return None
    result: dict[str, str] = {}
    ok = True
    for k, v in mapping.items():
        if not isinstance(k, str):
            errors.append(invalid(path, k, "keys must be strings"))
            ok = False
        elif (text := read_string(v, key(path, k), errors)) is None:
            ok = False
        else:
            result[k] = text
    return result if ok else None


def reject_unknown_fields(
    obj: Mapping[str, object], allowed: Collection[str], path: str, errors: list[FieldError]
) -> None:
    """Strict decoding, like `kubectl --validate=strict`: a misspelled field is an error, not
    silently dropped (a dropped `excludedCIDRs` would widen what a policy redirects)."""
    for name in obj:
        if isinstance(name, str) and name in allowed:
            continue
        field_path = child(path, str(name))
        guess = difflib.get_close_matches(str(name), list(allowed), n=1)
        hint = (
            f"did you mean {quote(guess[0])}?"
            if guess
            else "supported fields: " + ", ".join(quote(a) for a in sorted(allowed))
        )
        errors.append(forbidden(field_path, f"unknown field; {hint}"))


# --- names -------------------------------------------------------------------------------------

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
DNS_SUBDOMAIN_MAX = 253


def dns_subdomain_problem(name: str) -> str | None:
    """Why `name` is not a lowercase RFC 1123 subdomain (object names, label key prefixes)."""
    if len(name) > DNS_SUBDOMAIN_MAX:
        return f"must be no more than {DNS_SUBDOMAIN_MAX} characters"
    if not _DNS_SUBDOMAIN.fullmatch(name):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters,"
            " '-' or '.', and must start and end with an alphanumeric character"
            " (e.g. 'example.com')"
        )
    return None


# --- addresses (Go net/netip rules: what Cilium's agent accepts) -------------------------------

_ADDRESS_CHARACTERS = frozenset("0123456789abcdefABCDEF:.")


def parse_address(text: str) -> IPAddress:
    """Parse an IPv4 or IPv6 address like Go's `netip.ParseAddr`, without zones.

    Raises ValueError with the reason. Python's `ipaddress` already rejects leading zeros in
    IPv4 octets; the character check removes what it accepts beyond Go (zones, whitespace).
    """
    if not text:
        raise ValueError("empty address")
    bad = next((c for c in text if c not in _ADDRESS_CHARACTERS), None)
    if bad == "%":
        raise ValueError("zones (%) are not allowed")
    if bad is not None:
        raise ValueError(f"unexpected character {quote(bad)}")
    if ":" in text:
        return IPv6Address(text)
    return IPv4Address(text)


def parse_address_with_prefix(text: str) -> tuple[IPAddress, int]:
    """Split and check `address/length` like Go's `netip.ParsePrefix`, keeping host bits
    (an interface address such as `192.0.2.5/24`). Raises ValueError with the reason."""
    address_text, slash, bits_text = text.rpartition("/")
    if not slash:
        raise ValueError("missing '/' and prefix length")
    address = parse_address(address_text)
    if not (bits_text.isascii() and bits_text.isdigit()) or (
        len(bits_text) > 1 and bits_text[0] == "0"
    ):
        raise ValueError(f"bad prefix length {quote(bits_text)}")
    bits = int(bits_text)
    if bits > address.max_prefixlen:
        raise ValueError(
            f"prefix length {bits} out of range 0-{address.max_prefixlen} for IPv{address.version}"
        )
    return address, bits


def parse_prefix(text: str) -> IPNetwork:
    """Parse a CIDR like Go's `netip.ParsePrefix`, returning the masked network.

    Host bits are allowed (Cilium keeps them, and the kernel's LPM trie ignores them, so the
    masked network is what matches). Raises ValueError with the reason.
    """
    return ip_network(parse_address_with_prefix(text), strict=False)


_CIDR_EXAMPLES = 'an IPv4 or IPv6 prefix such as "192.0.2.0/24" or "2001:db8::/32"'


def read_cidr(value: object, path: str, errors: list[FieldError]) -> IPNetwork | None:
    text = read_string(value, path, errors)
    if text is None:
        return None
    try:
        return parse_prefix(text)
    except ValueError as e:
        errors.append(invalid(path, text, f"not a valid CIDR ({e}); expected {_CIDR_EXAMPLES}"))
        return None


def read_address(value: object, path: str, errors: list[FieldError]) -> IPAddress | None:
    text = read_string(value, path, errors)
    if text is None:
        return None
    try:
        return parse_address(text)
    except ValueError as e:
        detail = f"not a valid IP address ({e}); expected e.g. 192.0.2.1 or 2001:db8::1"
        errors.append(invalid(path, text, detail))
        return None
