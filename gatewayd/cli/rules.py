"""`gatewayctl rules`: what the kernel holds now, per policy.

Read from the live nftables table (not from a snapshot or the saved plan). On a gateway: for
each SNAT rule its sources, destinations, egress IP, whether it SNATs (its egress IP is held)
or drops, and its packet and byte counters; each rule is compared with the plan the daemon
saved, so a kernel that disagrees with the plan is named. On a cloud node: the destinations
never steered, and for each rule its sources, destinations, and the gateway its new
connections go to (or that they are dropped).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gatewayd.cli.host import DEFAULT_CONFIG, _config_or_exit
from gatewayd.policy.model import SnatRule
from gatewayd.steer.config import SteerConfig

# The comment render_gateway_table gives each SNAT rule's counter: the one place the kernel
# keeps the policy's name (policy names may be longer than nft object names allow).
_COMMENT = re.compile(r"^(?P<policy>.+) \((?P<role>active|standby)\) via (?P<egress_ip>\S+)$")
_RULE_COUNTER = re.compile(r"^rule\d+$")

IPRange = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                ipaddress.IPv4Address | ipaddress.IPv6Address]


@dataclass(frozen=True)
class KernelRule:
    counter: str  # the named counter, `rule<N>`
    policy: str
    role: str
    egress_ip: str
    snat: bool  # False: the egress IP is not held here, the rule drops
    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    packets: int
    bytes: int
    matches_plan: bool | None = None  # None: no saved plan to compare with

    def covers(self, source: str, destination: str) -> bool:
        return _in(source, self.sources) and _in(destination, self.destinations)


def kernel_rules(sets: Mapping[str, Any], counters: Mapping[str, tuple[int, int]],
                 body: Iterable[Mapping[str, Any]]) -> list[KernelRule]:
    """The SNAT rules of a gateway table as `NftablesDriver.observe` lists it, in rule order."""
    comments: dict[str, str] = {}
    snat_to: dict[str, str] = {}
    accepted: set[str] = set()
    for obj in body:
        if "counter" in obj and _RULE_COUNTER.match(obj["counter"].get("name", "")):
            comments[obj["counter"]["name"]] = obj["counter"].get("comment", "")
        rule = obj.get("rule")
        if not rule:
            continue
        name = _rule_set_name(rule["expr"])
        if name is None:
            continue
        for statement in rule["expr"]:
            if statement.get("counter") == name:
                accepted.add(name)
            if "snat" in statement:
                snat_to[name] = str(statement["snat"].get("addr"))
    rules = []
    for name in sorted(comments, key=lambda n: int(n.removeprefix("rule"))):
        match = _COMMENT.match(comments[name])
        if match is None:
            continue
        packets, size = counters.get(name, (0, 0))
        rules.append(KernelRule(
            counter=name, policy=match["policy"], role=match["role"],
            egress_ip=snat_to.get(name, match["egress_ip"]),
            snat=name in accepted and name in snat_to,
            sources=tuple(sorted(sets[f"{name}_src"].elements)),
            destinations=tuple(sorted(sets[f"{name}_dst"].elements)),
            packets=packets, bytes=size,
        ))
    return rules


@dataclass(frozen=True)
class KernelSteerRule:
    """A cloud node's rule: new connections of `sources` to `destinations` go through the
    tunnel to `gateway`, or are dropped (`gateway` None)."""

    counter: str
    policy: str
    gateway: str | None
    drop_reason: str | None
    sources: tuple[str, ...]
    destinations: tuple[str, ...]
    packets: int
    bytes: int

    def covers(self, source: str, destination: str) -> bool:
        return _in(source, self.sources) and _in(destination, self.destinations)


@dataclass(frozen=True)
class KernelSteerTable:
    cluster_internal: tuple[str, ...]  # never steered
    rules: tuple[KernelSteerRule, ...]  # in rule order

    def never_steers(self, destination: str) -> bool:
        return _in(destination, self.cluster_internal)

    def decide(self, source: str, destination: str) -> KernelSteerRule | None:
        """The rule a new connection meets first; None: it is not steered."""
        if self.never_steers(destination):
            return None
        return next((r for r in self.rules if r.covers(source, destination)), None)


_STEER_COMMENT = re.compile(r"^(?P<policy>.+?) (-> (?P<gateway>\S+)|drop \((?P<reason>.*)\))$")


def kernel_steer_table(sets: Mapping[str, Any], counters: Mapping[str, tuple[int, int]],
                       body: Iterable[Mapping[str, Any]]) -> KernelSteerTable:
    """The steer rules of a node's table as `NftablesDriver.observe` lists it."""
    rules = []
    for obj in body:
        counter = obj.get("counter", {})
        name = counter.get("name", "")
        match = _STEER_COMMENT.match(counter.get("comment", ""))
        if not _RULE_COUNTER.match(name) or match is None:
            continue
        packets, size = counters.get(name, (0, 0))
        rules.append(KernelSteerRule(
            counter=name, policy=match["policy"], gateway=match["gateway"],
            drop_reason=match["reason"],
            sources=tuple(sorted(sets[f"{name}_src"].elements)),
            destinations=tuple(sorted(sets[f"{name}_dst"].elements)),
            packets=packets, bytes=size,
        ))
    rules.sort(key=lambda r: int(r.counter.removeprefix("rule")))
    internal = sorted(e for name in ("cluster4", "cluster6") if name in sets
                      for e in sets[name].elements)
    return KernelSteerTable(tuple(internal), tuple(rules))


def _rule_set_name(expr: Iterable[Mapping[str, Any]]) -> str | None:
    """`rule<N>` when the rule matches on the set `@rule<N>_src`."""
    for statement in expr:
        right = statement.get("match", {}).get("right")
        if isinstance(right, str) and right.startswith("@rule") and right.endswith("_src"):
            return right[1:].removesuffix("_src")
    return None


def _in(address: str, elements: Iterable[str]) -> bool:
    ip = ipaddress.ip_address(address)
    for element in elements:
        if "-" in element:
            first, last = (ipaddress.ip_address(e) for e in element.split("-"))
            if first.version == ip.version and first <= ip <= last:  # type: ignore[operator]
                return True
        elif ip in ipaddress.ip_network(element, strict=False):
            return True
    return False


def compared_with_plan(rules: list[KernelRule], planned: Mapping[str, SnatRule] | None
                       ) -> list[KernelRule]:
    """Mark each rule whether the saved plan has the same rule under the same counter."""
    if planned is None:
        return rules
    result = []
    for rule in rules:
        want = planned.get(rule.counter)
        same = want is not None and (
            want.policy, want.role.value, str(want.egress_ip), {str(s) for s in want.sources},
        ) == (rule.policy, rule.role, rule.egress_ip, set(rule.sources))
        result.append(replace(rule, matches_plan=same))
    return result


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = commands.add_parser(
        "rules", help="the rules the kernel holds now, per policy: SNAT on a gateway, steering "
        "on a cloud node")
    rules.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    rules.add_argument("-o", "--output", choices=("text", "json"), default="text")
    rules.set_defaults(func=run_rules)


def run_rules(args: argparse.Namespace) -> int:
    from gatewayd.agent.target import target_from_dict
    from gatewayd.dataplane.nft_render import FAMILY, GATEWAY_TABLE, snat_counter_rules
    from gatewayd.dataplane.nftables import NftablesDriver
    from gatewayd.runtime import read_json

    config = _config_or_exit(args.config)
    if config is None:
        return 1
    if isinstance(config, SteerConfig):
        return _run_node_rules(config.node, args.output)
    observed = NftablesDriver(FAMILY, GATEWAY_TABLE).observe()
    if observed is None:
        print(f"gatewayctl rules: no table {FAMILY} {GATEWAY_TABLE} in the kernel",
              file=sys.stderr)
        return 1
    try:
        saved = target_from_dict(read_json(config.state_directory / "plan.json"))
        planned: dict[str, SnatRule] | None = snat_counter_rules(saved.plan)
        generation: int | None = saved.generation
    except (OSError, ValueError):
        planned, generation = None, None
    rules = compared_with_plan(
        kernel_rules(observed.sets, observed.counters, observed.body), planned)
    if args.output == "json":
        print(json.dumps({"gateway": config.name, "table": f"{FAMILY} {GATEWAY_TABLE}",
                          "planGeneration": generation,
                          "rules": [_camel(asdict(r)) for r in rules]}, indent=2))
        return 0
    print(render_text(rules), end="")
    return 0


def _run_node_rules(node: str, output: str) -> int:
    from gatewayd.dataplane.nft_render import FAMILY, STEER_TABLE
    from gatewayd.dataplane.nftables import NftablesDriver

    observed = NftablesDriver(FAMILY, STEER_TABLE).observe()
    if observed is None:
        print(f"gatewayctl rules: no table {FAMILY} {STEER_TABLE} in the kernel", file=sys.stderr)
        return 1
    table = kernel_steer_table(observed.sets, observed.counters, observed.body)
    if output == "json":
        print(json.dumps({"node": node, "table": f"{FAMILY} {STEER_TABLE}",
                          "clusterInternal": list(table.cluster_internal),
                          "rules": [_camel(asdict(r)) for r in table.rules]}, indent=2))
        return 0
    lines = [f"never steered (cluster-internal): {', '.join(table.cluster_internal) or '-'}"]
    for r in table.rules:
        action = f"to gateway {r.gateway}" if r.gateway else f"DROP ({r.drop_reason})"
        lines.append(f"{r.policy}: {action}, {r.packets} packets, {r.bytes} bytes")
        lines.append(f"  sources:      {', '.join(r.sources) or '(none)'}")
        lines.append(f"  destinations: {', '.join(r.destinations) or '(none)'}")
    print("\n".join(lines))
    return 0


def _camel(data: dict[str, Any]) -> dict[str, Any]:
    def camel(key: str) -> str:
        head, *rest = key.split("_")
        return head + "".join(part.upper() if part == "ip" else part.title() for part in rest)

    return {camel(key): value for key, value in data.items()}


def render_text(rules: list[KernelRule]) -> str:
    if not rules:
        return "no SNAT rules in the kernel\n"
    lines = []
    for r in rules:
        action = f"SNAT to {r.egress_ip}" if r.snat else f"DROP (egress IP {r.egress_ip} not held)"
        plan = {None: "", True: "", False: "  KERNEL DIFFERS FROM THE PLAN"}[r.matches_plan]
        lines.append(f"{r.policy} ({r.role}): {action}, {r.packets} packets, {r.bytes} bytes{plan}")
        lines.append(f"  sources:      {', '.join(r.sources) or '(none)'}")
        lines.append(f"  destinations: {', '.join(r.destinations) or '(none)'}")
    return "\n".join(lines) + "\n"
