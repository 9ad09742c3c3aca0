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
from typing import IO, Any, TypeVar, cast

from gatewayd.metrics import MetricsSettings, parse_address
from gatewayd.policy.fields import dns_subdomain_problem
from gatewayd.policy.model import IPAddress, IPNetwork
from gatewayd.policy.safeload import (
    CONFIG_LIMITS,
    STDIN_NAME,
    DocumentError,
    LineDict,
    describe,
    load_yaml_file,
    parse_yaml,
    read_stream,
)

T = TypeVar("T")
_MISSING: Any = object()
# Linux's rules (dev_valid_name): at most 15 bytes, not "." or "..", no "/", ":" or
# whitespace; control characters and non-ASCII are refused too (tools print them badly).
INTERFACE_NAME = re.compile(r"[\x21-\x7e]{1,15}")
HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# A peer's allowed IPs become routes into the tunnel, and a pool's addresses are claimed on
# the LAN: neither may cover the default route or most of an address family.
SHORTEST_PREFIX = {4: 8, 6: 16}


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


_Mapping = LineDict  # a mapping of the file that remembers the line of each key


def read_config(path: Path) -> Section:
    """The file's top-level mapping, read within `CONFIG_LIMITS` (see `policy.safeload`)."""
    try:
        documents = load_yaml_file(path, CONFIG_LIMITS)
    except DocumentError as exc:
        raise ConfigError([str(exc)]) from exc
    return _top_section(documents, path)


def read_config_stream(stream: IO[bytes]) -> Section:
    """A config piped in (`gatewayctl check-config -`): the same limits and checks as a file,
    errors naming `<stdin>`."""
    try:
        documents = parse_yaml(read_stream(stream, STDIN_NAME, CONFIG_LIMITS), STDIN_NAME,
                               CONFIG_LIMITS)
    except DocumentError as exc:
        raise ConfigError([str(exc)]) from exc
    return _top_section(documents, Path(STDIN_NAME))


def _top_section(documents: list[tuple[int, Any]], path: Path) -> Section:
    if len(documents) > 1:
        raise ConfigError([f"{path}:{documents[1][0]}: one YAML document expected, found "
                           "a second"])
    data = documents[0][1] if documents else None
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
            self.error(key, f"must be {what}, got {describe(value)}")
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

    def number(self, key: str, default: float, low: float, high: float) -> float:
        """A finite number from `low` to `high` (seconds, mostly: 1e-300 would spin the CPU,
        .inf or .nan would never fire)."""
        value = self._get(key, default, (int, float), "a number")
        if value is None:
            return default
        if not low <= value <= high:  # false for NaN too
            self.error(key, f"must be a number from {low:g} to {high:g}, got {describe(value)}")
            return default
        return float(value)

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
            self.error(key, f"must be {what}, got {describe(raw)} ({exc})")
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
                self.error(key, f"item {index} must be {what}, got {describe(item)} ({exc})")
        return tuple(result)

    def section(self, key: str, required: bool = False) -> Section:
        value = self._get(key, _MISSING if required else _Mapping(), dict, "a mapping")
        if not isinstance(value, _Mapping):  # absent, or a problem was recorded
            value = _Mapping(self.data.key_lines.get(key, self.data.line))
        return Section(value, self._key_path(key), self.file, self.problems)

    def sections(self, key: str) -> list[Section]:
        raw = self._get(key, [], list, "a list of mappings")
        result = []
        for index, item in enumerate(raw):
            if isinstance(item, _Mapping):
                result.append(Section(item, f"{self._key_path(key)}[{index}]", self.file,
                                      self.problems))
            else:
                self.error(key, f"item {index} must be a mapping, got {describe(item)}")
        return result

    def check_unique(self, key: str, names: list[str]) -> None:
        seen = set()
        for name in names:
            if name in seen:
                self.error(key, f"{describe(name)} is used twice")
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


def parse_path(text: str) -> Path:
    if not text or "\0" in text:
        raise ValueError("a path is not empty and has no NUL character")
    return Path(text)


def parse_object_name(text: str) -> str:
    """The name of a Kubernetes object (an EgressGateway, a Node): steer derives interface
    names from it, the status and the journal carry it."""
    problem = dns_subdomain_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def parse_interface_name(text: str) -> str:
    if not INTERFACE_NAME.fullmatch(text) or "/" in text or ":" in text or text in (".", ".."):
        raise ValueError("1 to 15 ASCII characters, no '/', ':', whitespace or control "
                         "characters, not '.' or '..'")
    return text


def parse_endpoint(text: str) -> str:
    """`host:port` or `[v6]:port`, as WireGuard takes it."""
    host, sep, port = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, the port a number from 1 to 65535")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError("unbalanced brackets")
        ipaddress.IPv6Address(host[1:-1])
    elif not HOST_NAME.fullmatch(host):
        raise ValueError("expected HOST:PORT, the host an IPv4 address or a DNS name "
                         "(an IPv6 address in brackets)")
    return text


def parse_wireguard_key(text: str) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes, base64-encoded (44 characters)")
    # The canonical spelling, so that one key cannot pass as two (unused low bits).
    return base64.b64encode(raw).decode()


def parse_peer_network(text: str) -> IPNetwork:
    """A CIDR routed to one peer; never the default route or most of an address family."""
    network = parse_network(text)
    if network.prefixlen < SHORTEST_PREFIX[network.version]:
        raise ValueError(f"would route most of IPv{network.version} (the host's default route) "
                         f"into the tunnel: at least /{SHORTEST_PREFIX[network.version]}")
    return network


def parse_pool(text: str) -> IPNetwork:
    network = parse_network(text)
    if network.prefixlen < SHORTEST_PREFIX[network.version]:
        raise ValueError(f"an egress IP pool this large would claim most of IPv"
                         f"{network.version}: at least /{SHORTEST_PREFIX[network.version]}")
    return network


def peer_network_conflicts(peers: list[tuple[str, tuple[IPNetwork, ...]]]) -> list[str]:
    """Overlaps between different peers' allowed IPs: WireGuard would give the shared
    addresses to one of them only, silently."""
    owned: list[tuple[str, IPNetwork]] = []
    conflicts = []
    for name, networks in peers:
        for network in networks:
            for other, taken in owned:
                if other != name and network.version == taken.version and network.overlaps(taken):
                    conflicts.append(f"{network} of {describe(name)} overlaps {taken} of "
                                     f"{describe(other)}")
        owned += [(name, network) for network in networks]
    return conflicts


def read_reconcile(section: Section) -> ReconcileSettings:
    settings = ReconcileSettings(
        poll_seconds=section.number("pollSeconds", ReconcileSettings.poll_seconds, 0.01, 3600),
        repair_seconds=section.number("repairSeconds", ReconcileSettings.repair_seconds, 0.1,
                                      86400),
    )
    section.finish()
    return settings


def parse_metrics_address(text: str) -> str:
    """HOST:PORT of the /metrics listener, or `none` (an empty string too) for none."""
    if text.lower() not in ("", "none"):
        parse_address(text)
    return text


def read_metrics(section: Section) -> MetricsSettings:
    """`metrics: {address: HOST:PORT|none, textfile: PATH}`: the daemon's --metrics-address and
    --metrics-textfile in the file; a flag given on the command line wins."""
    settings = MetricsSettings(
        address=section.parsed("address", parse_metrics_address, "HOST:PORT or none", None),
        textfile=section.parsed("textfile", parse_path, "a path", None),
    )
    section.finish()
    return settings


def read_snapshot_paths(top: Section) -> tuple[Path, ...]:
    """`snapshot:` is one path or a list of paths (files or directories of YAML objects)."""
    if isinstance(top.data.get("snapshot"), list):
        return top.parsed_list("snapshot", parse_path, "a path")
    return (top.parsed("snapshot", parse_path, "a path to a file or directory"),)
