"""`gatewayctl explain --live --src POD_IP --dst IP`: what this host's kernel does to a new
connection now, read from its nftables sets (as `gatewayctl rules` reads them), beside what
the plan the daemon saved says, and whether the two disagree.

On a gateway: the first SNAT rule whose source and destination sets hold the connection
decides (SNAT with its egress IP, or a drop while that address is not held here); no rule:
the forward chain drops it. On a cloud node: a cluster-internal destination is never steered;
else the first steer rule decides (into a gateway's tunnel, or a drop); no rule: not steered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from gatewayd.cli.rules import KernelRule, KernelSteerTable
from gatewayd.dataplane.nft_render import snat_counter_rules
from gatewayd.policy.model import GatewayPlan, IPAddress, NodePlan, SteerAction

PROG = "gatewayctl explain --live"
NO_RULE = "no-rule"  # a gateway drops it: no rule allows this source and destination
NOT_HELD = "egress-ip-not-held"
CLUSTER_INTERNAL = "cluster-internal"


@dataclass(frozen=True)
class Decision:
    """What happens to a new connection. `verdict`: on a gateway `snat` or `drop`; on a node
    `tunnel`, `drop` or `not-steered`."""

    verdict: str
    policy: str | None = None
    role: str | None = None  # a gateway's rule: active or standby
    egress_ip: str | None = None  # a gateway's rule
    gateway: str | None = None  # a node's tunnel rule: the gateway it sends to
    standby: str | None = None  # a node's plan: the gateway a fast failover sends to
    reason: str | None = None  # drop and not-steered
    counter: str | None = None  # the kernel rule's named counter (`rule<N>`)
    packets: int | None = None  # that counter's packets

    def same_rule(self, other: Decision) -> bool:
        """Whether `other` (the plan's) names the same rule and action as this (the kernel's):
        the counter and the packet count are the kernel's alone."""
        mine = replace(self, counter=None, packets=None, standby=None)
        return mine == replace(other, counter=None, packets=None, standby=None)


@dataclass(frozen=True)
class LiveExplanation:
    kernel: Decision
    plan: Decision | None  # None: no saved plan to compare with
    agrees: bool | None  # None: no saved plan
    notes: tuple[str, ...] = ()


# --- gateway ----------------------------------------------------------------------------------


def gateway_kernel_decision(rules: Iterable[KernelRule], src: IPAddress, dst: IPAddress
                            ) -> Decision:
    """The first kernel rule holding the connection, as the forward chain meets them."""
    for rule in rules:
        if rule.covers(str(src), str(dst)):
            return Decision(
                "snat" if rule.snat else "drop", rule.policy, rule.role, rule.egress_ip,
                reason=None if rule.snat else NOT_HELD, counter=rule.counter,
                packets=rule.packets)
    return Decision("drop", reason=NO_RULE)


def gateway_plan_decision(plan: GatewayPlan, src: IPAddress, dst: IPAddress) -> Decision:
    """The same question put to the plan, its rules in the kernel's order."""
    for rule in snat_counter_rules(plan).values():
        if src in rule.sources and any(dst in d for d in rule.destinations):
            return Decision("snat", rule.policy, rule.role.value, str(rule.egress_ip))
    return Decision("drop", reason=NO_RULE)


def explain_gateway(rules: list[KernelRule], plan: GatewayPlan | None, src: IPAddress,
                    dst: IPAddress) -> LiveExplanation:
    kernel = gateway_kernel_decision(rules, src, dst)
    if plan is None:
        return LiveExplanation(kernel, None, None)
    planned = gateway_plan_decision(plan, src, dst)
    if kernel.reason == NOT_HELD and kernel.same_rule(replace(planned, verdict="drop",
                                                              reason=NOT_HELD)):
        # The plan's rule, rendered as a drop until this host holds the egress IP.
        return LiveExplanation(kernel, planned, True, (
            f"egress IP {kernel.egress_ip} is not held by this host: the plan's SNAT rule "
            "drops until it is (a standby's address moves here on failover)",))
    return LiveExplanation(kernel, planned, kernel.same_rule(planned))


# --- cloud node -------------------------------------------------------------------------------


def node_kernel_decision(table: KernelSteerTable, src: IPAddress, dst: IPAddress) -> Decision:
    rule = table.decide(str(src), str(dst))
    if rule is None:
        internal = table.never_steers(str(dst))
        return Decision("not-steered", reason=CLUSTER_INTERNAL if internal else NO_RULE)
    if rule.gateway is None:
        return Decision("drop", rule.policy, reason=rule.drop_reason, counter=rule.counter,
                        packets=rule.packets)
    return Decision("tunnel", rule.policy, gateway=rule.gateway, counter=rule.counter,
                    packets=rule.packets)


def node_plan_decision(plan: NodePlan, src: IPAddress, dst: IPAddress) -> Decision:
    if any(dst in n for n in plan.cluster_internal):
        return Decision("not-steered", reason=CLUSTER_INTERNAL)
    for rule in sorted(plan.rules, key=lambda r: r.policy):
        if src in rule.sources and any(dst in d for d in rule.destinations):
            if rule.action is SteerAction.DROP:
                return Decision("drop", rule.policy,
                                reason=rule.reason.value if rule.reason else "no gateway")
            return Decision("tunnel", rule.policy, gateway=rule.gateway, standby=rule.standby)
    return Decision("not-steered", reason=NO_RULE)


def explain_node(table: KernelSteerTable, plan: NodePlan | None, src: IPAddress,
                 dst: IPAddress) -> LiveExplanation:
    kernel = node_kernel_decision(table, src, dst)
    if plan is None:
        return LiveExplanation(kernel, None, None)
    planned = node_plan_decision(plan, src, dst)
    if (kernel.verdict == "tunnel" and planned.standby is not None
            and kernel.same_rule(replace(planned, gateway=planned.standby))):
        return LiveExplanation(kernel, planned, True, (
            f"fast failover in force: the plan's gateway {planned.gateway} is down, new "
            f"connections go to its standby {planned.standby}",))
    return LiveExplanation(kernel, planned, kernel.same_rule(planned))


# --- output -----------------------------------------------------------------------------------


def describe(decision: Decision, src: IPAddress, dst: IPAddress) -> str:
    d = decision
    policy = f"policy {d.policy}" if d.policy else "no policy"
    if d.verdict == "snat":
        return f"SNAT: {src} -> {dst} leaves as {d.egress_ip} ({policy}, {d.role})"
    if d.verdict == "tunnel":
        return f"TUNNEL: {src} -> {dst} goes to gateway {d.gateway} ({policy})"
    if d.verdict == "not-steered":
        return f"NOT STEERED: {src} -> {dst} leaves this node directly ({d.reason})"
    egress = f", egress IP {d.egress_ip}" if d.egress_ip else ""
    return f"DROP ({d.reason}): {src} -> {dst} is dropped ({policy}{egress})"


def to_text(explanation: LiveExplanation, src: IPAddress, dst: IPAddress,
            generation: int | None) -> str:
    kernel = explanation.kernel
    counter = (f"\n  kernel rule {kernel.counter}: {kernel.packets} packets so far"
               if kernel.counter else "")
    lines = [f"kernel: {describe(kernel, src, dst)}{counter}"]
    if explanation.plan is None:
        lines.append("plan: none saved on this host: nothing to compare with")
    elif explanation.agrees:
        lines.append(f"plan (generation {generation}): agrees")
    else:
        lines.append(f"KERNEL DIFFERS FROM THE PLAN (generation {generation}): the plan says "
                     f"{describe(explanation.plan, src, dst)}")
    lines += [f"  - {note}" for note in explanation.notes]
    return "\n".join(lines)


def to_json(explanation: LiveExplanation, host: dict[str, str], generation: int | None
            ) -> dict[str, object]:
    def decision(d: Decision | None) -> dict[str, object] | None:
        if d is None:
            return None
        return {_camel(k): v for k, v in asdict(d).items() if v is not None}

    return {**host, "kernel": decision(explanation.kernel), "plan": decision(explanation.plan),
            "planGeneration": generation, "agrees": explanation.agrees,
            "notes": list(explanation.notes)}


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.upper() if part == "ip" else part.title() for part in rest)


# --- the command (reads the kernel and the saved plan) ----------------------------------------


def run_live(args: argparse.Namespace, src: IPAddress, dst: IPAddress) -> int:
    from gatewayd.cli.host import _config_or_exit
    from gatewayd.cli.rules import kernel_rules, kernel_steer_table
    from gatewayd.dataplane.nft_render import FAMILY, GATEWAY_TABLE, STEER_TABLE
    from gatewayd.dataplane.nftables import NftablesDriver
    from gatewayd.steer.config import SteerConfig

    config = _config_or_exit(args.config)
    if config is None:
        return 2
    node = isinstance(config, SteerConfig)
    table_name = STEER_TABLE if node else GATEWAY_TABLE
    observed = NftablesDriver(FAMILY, table_name).observe()
    if observed is None:
        print(f"{PROG}: error: no table {FAMILY} {table_name} in the kernel (is the daemon "
              "running, and are you root?)", file=sys.stderr)
        return 2
    saved = _saved_plan(config.state_directory / "plan.json", node)
    generation = saved.generation if saved is not None else None
    if isinstance(config, SteerConfig):
        assert saved is None or isinstance(saved, NodePlan)
        explanation = explain_node(
            kernel_steer_table(observed.sets, observed.counters, observed.body), saved, src,
            dst)
        host = {"node": config.node}
    else:
        assert saved is None or isinstance(saved, GatewayPlan)
        explanation = explain_gateway(
            kernel_rules(observed.sets, observed.counters, observed.body), saved, src, dst)
        host = {"gateway": config.name}
    if args.output == "json":
        print(json.dumps(to_json(explanation, host, generation), indent=2))
    else:
        print(to_text(explanation, src, dst, generation))
    return 0


def _saved_plan(path: Path, node: bool) -> GatewayPlan | NodePlan | None:
    """The plan the daemon applied last (plan.json); None when there is none to read."""
    from gatewayd.agent.target import target_from_dict as gateway_target
    from gatewayd.runtime import read_json
    from gatewayd.steer.target import target_from_dict as node_target

    try:
        data = read_json(path)
        return node_target(data).plan if node else gateway_target(data).plan
    except (OSError, ValueError):
        return None
