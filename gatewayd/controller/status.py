"""An EgressGatewayPolicy's status, as the controller writes it (pure functions).

Conditions:
- Accepted: True when the newest spec is valid. False (reason InvalidSpec) names every field
  that is wrong and says whether the last valid version stays in force.
- Ready: True when every gateway entry has a usable active gateway that has programmed the
  policy (reported an observedGeneration whose spec holds its rules). Otherwise False with the
  reason of the worst entry: NoGatewayMatches, NoEgressIP, GatewayNotProgrammed (or InvalidSpec
  when no valid version was ever seen).
A condition's lastTransitionTime only changes when its status does, so an unchanged policy gets
an unchanged status and is not rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gatewayd.policy.engine import PolicyResult
from gatewayd.policy.gateways import EgressIPs, destination_families
from gatewayd.policy.model import FieldError, Policy

Status = dict[str, Any]

ACCEPTED = "Accepted"
READY = "Ready"
INVALID_SPEC = "InvalidSpec"
NO_GATEWAY_MATCHES = "NoGatewayMatches"
NO_EGRESS_IP = "NoEgressIP"
GATEWAY_NOT_PROGRAMMED = "GatewayNotProgrammed"
# Worst first: the Ready reason is that of the worst entry.
_SEVERITY = (NO_GATEWAY_MATCHES, NO_EGRESS_IP, GATEWAY_NOT_PROGRAMMED)


def _condition(
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Mapping[str, Any]],
    now: str,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = previous.get(kind, {})
    changed_at = before.get("lastTransitionTime") if before.get("status") == status else None
    return {
        "type": kind,
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": changed_at or now,
        "reason": reason,
        "message": message,
    }


def _previous_conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    return {
        c["type"]: c
        for c in (conditions if isinstance(conditions, list) else [])
        if isinstance(c, Mapping) and isinstance(c.get("type"), str)
    }


def _ips(egress: EgressIPs | None) -> list[str]:
    if egress is None:
        return []
    return [str(ip) for ip in (egress.ipv4, egress.ipv6) if ip is not None]


def _readiness(
    policy: Policy, result: PolicyResult, not_programmed: Mapping[str, str]
) -> tuple[str | None, str]:
    """(reason, message): reason None when the policy is Ready."""
    v4_needed, v6_needed = destination_families(policy)
    problems: list[tuple[str, str]] = []
    for entry in result.entries:
        where = f"entry {entry.entry}"
        if entry.gateway is None:
            why = entry.notes[-1] if entry.notes else f"{where}: no usable gateway matches"
            problems.append((NO_GATEWAY_MATCHES, why))
            continue
        missing = [
            family
            for family, needed, ip in (
                ("IPv4", v4_needed, entry.egress.ipv4),
                ("IPv6", v6_needed, entry.egress.ipv6),
            )
            if needed and ip is None
        ]
        if missing:
            notes = "; ".join(entry.egress.notes)
            problems.append(
                (
                    NO_EGRESS_IP,
                    f"{where}: gateway {entry.gateway} has no {' or '.join(missing)} egress IP"
                    + (f" ({notes})" if notes else ""),
                )
            )
        elif entry.gateway in not_programmed:
            problems.append((GATEWAY_NOT_PROGRAMMED, f"{where}: {not_programmed[entry.gateway]}"))
    if not problems:
        actives = ", ".join(sorted({e.gateway for e in result.entries if e.gateway}))
        return None, f"traffic leaves through {actives}"
    worst = min(problems, key=lambda p: _SEVERITY.index(p[0]))[0]
    return worst, "; ".join(message for _, message in problems)


def policy_status(
    obj: Mapping[str, Any],
    in_force: Policy | None,
    result: PolicyResult | None,
    errors: Sequence[FieldError],
    not_programmed: Mapping[str, str],
    now: str,
) -> Status:
    """The status of one policy object.

    `in_force`: the version the engine used (the newest if valid, else the last valid one, else
    None) and `result` what it resolved to; `errors`: what is wrong with the newest version;
    `not_programmed`: gateway -> why it has not programmed this policy yet (gateways missing
    from it have); `now`: the time for conditions that change, RFC 3339.
    """
    metadata = obj.get("metadata") or {}
    generation = int(metadata.get("generation") or 0)
    previous = _previous_conditions(obj)
    status: Status = {"observedGeneration": generation}

    if errors:
        wrong = "; ".join(str(e) for e in errors)
        if in_force is not None:
            verdict = f"the last valid version (generation {in_force.generation}) stays in force"
        else:
            verdict = "no valid version was seen, so the policy has no effect"
        accepted = _condition(
            ACCEPTED, False, INVALID_SPEC, f"{wrong}; {verdict}", generation, previous, now
        )
    else:
        accepted = _condition(
            ACCEPTED, True, ACCEPTED, "the spec is valid", generation, previous, now
        )

    if in_force is None or result is None:
        ready = _condition(
            READY, False, INVALID_SPEC, "the policy has no valid version", generation, previous, now
        )
        status.update(conditions=[accepted, ready], gateways=[], selectedPods=0)
    else:
        reason, message = _readiness(in_force, result, not_programmed)
        ready = _condition(
            READY, reason is None, reason or READY, message, generation, previous, now
        )
        gateways: list[dict[str, Any]] = []
        for entry in result.entries:
            if entry.gateway is not None:
                gateways.append(
                    {
                        "entry": entry.entry,
                        "name": entry.gateway,
                        "role": "active",
                        "egressIPs": _ips(entry.egress),
                    }
                )
            if entry.standby is not None:
                gateways.append(
                    {
                        "entry": entry.entry,
                        "name": entry.standby,
                        "role": "standby",
                        "egressIPs": _ips(entry.standby_egress),
                    }
                )
        actives = [e for e in result.entries if e.gateway is not None]
        status.update(
            conditions=[accepted, ready],
            gateways=gateways,
            activeGateways=",".join(dict.fromkeys(e.gateway for e in actives if e.gateway)),
            egressIPs=",".join(dict.fromkeys(ip for e in actives for ip in _ips(e.egress))),
            selectedPods=result.selected_pods,
        )
    if errors:
        status["lastError"] = {"field": errors[0].path, "message": errors[0].message}
    return status


def active_gateways_of(obj: Mapping[str, Any]) -> dict[int, str]:
    """Entry index -> active gateway, as a policy's status last recorded it."""
    status = obj.get("status")
    gateways = status.get("gateways") if isinstance(status, Mapping) else None
    found: dict[int, str] = {}
    for item in gateways if isinstance(gateways, list) else []:
        if (
            isinstance(item, Mapping)
            and item.get("role") == "active"
            and isinstance(item.get("entry"), int)
            and isinstance(item.get("name"), str)
        ):
            found.setdefault(item["entry"], item["name"])
    return found
