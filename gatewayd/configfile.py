"""Reading YAML configuration files with errors that name the file, line and key.

`read_config(path)` gives a `Section` for the top level; typed getters record every problem
(wrong type, missing key, unknown key) with its line, and `Section.finish()` raises one
`ConfigError` listing them all, so an operator fixes a broken file in one pass.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from gatewayd.policy.model import IPAddress, IPNetwork

T = TypeVar("T")
_MISSING: Any = object()
INTERFACE_NAME = re.compile(r"^[^/:\s]{1,15}$")


@dataclass(frozen=True)
class ReconcileSettings:
    poll_seconds: float = 1.0  # how often inputs (config, snapshot) are checked for changes
    repair_seconds: float = 10.0  # how often the kernel state is re-read and drift repaired


# The kernel's reverse-path filter (strict or loose) drops packets arriving on an interface
# that has no IPv4 address, so a tunnel without a configured address gets this link-local one.
DEFAULT_TUNNEL_ADDRESS = "169.254.77.1/32"


def parse_interface_address(text: str) -> str:
    """`ADDRESS/PREFIXLEN` as `ip addr add` takes it (host bits are the point here)."""
    ipaddress.ip_interface(text)
    if "/" not in text:
        raise ValueError("give the prefix length, e.g. 100.64.0.1/24")
    return text


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    key_lines: dict[Any, int]
    line: int


class _LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        mapping = _Mapping(super().construct_mapping(node, deep=True))
        mapping.key_lines = {
            self.construct_object(key, deep=True): key.start_mark.line + 1 for key, _ in node.value
        }
        mapping.line = node.start_mark.line + 1
        return mapping


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _LineLoader.construct_mapping,
)


def read_config(path: Path) -> Section:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    if not isinstance(data, _Mapping):
        raise ConfigError([f"{path}: the top level must be a mapping of settings"])
    return Section(data, "", path, [])


class Section:
    """One mapping of the file; getters validate and remember which keys were read."""

    def __init__(self, data: _Mapping, path: str, file: Path, problems: list[str]) -> None:
        self.data = data
        self.path = path
        self.file = file
        self.problems = problems
        self._read: set[str] = set()

    def _key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        line = self.data.key_lines.get(key, self.data.line)
        self.problems.append(f"{self.file}:{line}: {self._key_path(key)}: {message}")

    def _get(self, key: str, default: Any, kind: type | tuple[type, ...], what: str) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                self.error(key, "required")
                return None
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            self.error(key, f"must be {what}, got {value!r}")
            return None if default is _MISSING else default
        return value

    def string(self, key: str, default: str = _MISSING) -> str:
        return self._get(key, default, str, "a string")  # type: ignore[no-any-return]

    def optional_string(self, key: str) -> str | None:
        return self._get(key, None, str, "a string")  # type: ignore[no-any-return]

    def integer(self, key: str, default: int = _MISSING, low: int = 0, high: int = 2**31) -> int:
        value = self._get(key, default, int, "an integer")
        if isinstance(value, int) and not low <= value <= high:
            self.error(key, f"must be between {low} and {high}, got {value}")
        return value  # type: ignore[no-any-return]

    def number(self, key: str, default: float = _MISSING, low: float = 0.0) -> float:
        value = self._get(key, default, (int, float), "a number")
        if isinstance(value, int | float) and value <= low:
            self.error(key, f"must be greater than {low}, got {value}")
        return float(value) if value is not None else default

    def string_map(self, key: str) -> dict[str, str]:
        value = self._get(key, {}, dict, "a mapping of strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            self.error(key, "every key and value must be a string (quote numbers)")
            return {}
        return dict(value)

    def parsed(self, key: str, parse: Callable[[str], T], what: str, default: Any = _MISSING) -> T:
        """A string converted by `parse`; a ValueError becomes a problem naming `what`."""
        raw = self._get(key, default, str, what)
        if not isinstance(raw, str):
            return cast(T, raw)  # the default, or None after a recorded problem
        try:
            return parse(raw)
        except ValueError as exc:
            self.error(key, f"must be {what}, got {raw!r} ({exc})")
            # Values are only used when no problem was recorded (see raise_if_problems).
            return cast(T, None if default is _MISSING else default)

    def parsed_list(self, key: str, parse: Callable[[str], T], what: str) -> tuple[T, ...]:
        raw = self._get(key, [], list, f"a list of {what}")
        result = []
        for index, item in enumerate(raw):
            try:
                if not isinstance(item, str):
                    raise ValueError("not a string")
                result.append(parse(item))
            except ValueError as exc:
                self.error(key, f"item {index} must be {what}, got {item!r} ({exc})")
        return tuple(result)

    def section(self, key: str, required: bool = False) -> Section:
        value = self._get(key, _MISSING if required else _Mapping(), dict, "a mapping")
        if not isinstance(value, _Mapping):
            value = _Mapping(value or {})
            value.key_lines, value.line = {}, self.data.key_lines.get(key, self.data.line)
        return Section(value, self._key_path(key), self.file, self.problems)

    def sections(self, key: str) -> list[Section]:
        raw = self._get(key, [], list, "a list of mappings")
        result = []
        for index, item in enumerate(raw):
            if isinstance(item, _Mapping):
                result.append(Section(item, f"{self._key_path(key)}[{index}]", self.file,
                                      self.problems))
            else:
                self.error(key, f"item {index} must be a mapping, got {item!r}")
        return result

    def check_unique(self, key: str, names: list[str]) -> None:
        seen = set()
        for name in names:
            if name in seen:
                self.error(key, f"{name!r} is used twice")
            seen.add(name)

    def finish(self) -> None:
        """Report keys nobody read (typos must not be ignored silently)."""
        for key in self.data:
            if key not in self._read:
                self.error(str(key), "unknown setting")

    def raise_if_problems(self) -> None:
        if self.problems:
            raise ConfigError(list(self.problems))


def parse_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def parse_network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=True)


def parse_interface_name(text: str) -> str:
    if not INTERFACE_NAME.match(text) or text in (".", ".."):
        raise ValueError("1 to 15 characters, no '/', ':' or whitespace")
    return text


def parse_endpoint(text: str) -> str:
    """`host:port` or `[v6]:port`, as WireGuard takes it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError("expected HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("unbalanced brackets")
        ipaddress.IPv6Address(host[1:-1])
    return text


def parse_wireguard_key(text: str) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes, base64-encoded (44 characters)")
    return text


def read_reconcile(section: Section) -> ReconcileSettings:
    settings = ReconcileSettings(
        poll_seconds=section.number("pollSeconds", ReconcileSettings.poll_seconds),
        repair_seconds=section.number("repairSeconds", ReconcileSettings.repair_seconds),
    )
    section.finish()
    return settings


def read_snapshot_paths(top: Section) -> tuple[Path, ...]:
    """`snapshot:` is one path or a list of paths (files or directories of YAML objects)."""
    if isinstance(top.data.get("snapshot"), list):
        return tuple(Path(p) for p in top.parsed_list("snapshot", str, "a path"))
    return (top.parsed("snapshot", Path, "a path to a file or directory"),)
