"""Keeps one nftables table equal to a `RenderedTable`, through libnftables' JSON API.

When only set elements differ from what we applied last, one transaction adds and deletes
those elements (a pod coming or going reaches the kernel in milliseconds). When rules or
counters change, the table is changed in place (`update_commands`): sets that stay are kept,
new ones are filled in a first transaction, and a second one swaps the rules. Re-creating an
interval set lets new connections miss it for a moment after the commit, and so leave without
their gateway (see `replace_commands`). Only a missing table or a change of chains replaces
the whole table, in one transaction: deleting the table in a separate step would break
established NAT flows too.

Drift: `ensure(verify=True)` re-reads the kernel. The body (chains, rules, counters) is
compared with what the kernel listed right after our last change, not with our own JSON, so
nft's way of printing an expression never looks like drift. A driver that has applied nothing
yet (daemon start) therefore always rewrites the rules once.

The libnftables context is created per call: it binds to the network namespace of the calling
thread when created, and the driver acts on the caller's namespace. Not thread-safe.

A table that carries flags (another process owns it, or made it dormant) is never listed as
JSON: nft 1.0.6 frees the JSON of a table's single flag before writing it, which corrupts the
heap of the process that asked (the agent aborted when the context was freed). Its flags are
read over netlink first (pyroute2); gatewayd never sets any.

`TableWatcher` follows the kernel's nftables events (`nft monitor` as a child process) and
says when another process changed or removed the table, so the daemon repairs it at once
instead of on its repair timer.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import nftables
from pyroute2.nftables.main import NFTables

from gatewayd.dataplane.nft_render import (
    JsonObject,
    RenderedTable,
    SetSpec,
    element_commands,
    element_delta,
    element_from_json,
    replace_commands,
    update_commands,
)

_MISSING = "No such file or directory"  # what nft says about a table that is not there
_GENERATION = "# new generation "  # `nft monitor` ends each transaction's events with it
_FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}  # NFPROTO_*
_TABLE_FLAGS = {1: "dormant", 2: "owner", 4: "persist"}  # NFT_TABLE_F_*

log = logging.getLogger("gatewayd.nftables")


class NftablesError(Exception):
    """libnftables refused a command; the message holds what nft said."""


class FlaggedTableError(NftablesError):
    """The table carries flags gatewayd never sets: another process owns it, or made it
    dormant. It is not listed (see the module's docstring)."""

    def __init__(self, family: str, name: str, flags: tuple[str, ...]) -> None:
        self.flags = flags
        whose = " (another process owns it)" if "owner" in flags else ""
        super().__init__(f"table {family} {name} has flags {', '.join(flags)}{whose}; "
                         "gatewayd never sets flags on its tables")


@dataclass(frozen=True)
class ObservedTable:
    family: str
    name: str
    sets: Mapping[str, SetSpec]  # with their elements, canonical
    counters: Mapping[str, tuple[int, int]]  # named counter -> (packets, bytes)
    # Counters, chains, rules and anything else in the table as nft lists them, without
    # handles and counter values.
    body: tuple[JsonObject, ...]

    def declarations(self) -> dict[str, SetSpec]:
        return {name: spec.declaration() for name, spec in self.sets.items()}


@dataclass(frozen=True)
class ApplyResult:
    action: Literal["none", "elements", "update", "replace"]
    seconds: float
    drift: bool  # the kernel differed from what this driver applied last
    added: int = 0  # set elements added (element updates only)
    removed: int = 0  # set elements removed (element updates only)


class NftablesDriver:
    def __init__(self, family: str, name: str) -> None:
        self.family = family
        self.name = name
        self._applied: RenderedTable | None = None
        self._applied_body: tuple[JsonObject, ...] | None = None  # as listed after our last change
        # The same, kept when a later change fails: the kernel then still has that table.
        self._installed_body: tuple[JsonObject, ...] | None = None

    def ensure(self, desired: RenderedTable, verify: bool = False) -> ApplyResult:
        """Make the kernel's table equal `desired`. `verify` re-reads the kernel first (the
        reconcile timer uses it to catch drift); otherwise the diff is against memory."""
        if (desired.family, desired.name) != (self.family, self.name):
            raise ValueError(
                f"this driver manages table {self.family} {self.name}, "
                f"not {desired.family} {desired.name}"
            )
        start = time.monotonic()
        applied = self._applied
        if applied is None or verify:
            return self._reconcile(desired, start)
        if desired.body != applied.body or desired.declarations() != applied.declarations():
            how = self._change(desired, applied.sets, applied.body)
            return ApplyResult(how, time.monotonic() - start, drift=False)
        removed, added = element_delta(applied.sets, desired.sets)
        if not removed and not added:
            return ApplyResult("none", time.monotonic() - start, drift=False)
        try:
            self._run(element_commands(desired, removed, added), "set element update")
        except NftablesError:
            # Our memory is stale (an element we delete is gone, say): re-read the kernel.
            return self._reconcile(desired, start)
        self._applied = desired
        return ApplyResult(
            "elements", time.monotonic() - start, drift=False,
            added=_count(added), removed=_count(removed),
        )

    def observe(self) -> ObservedTable | None:
        """The table as the kernel has it, set elements and counter values included; None when
        there is no such table."""
        objects = self._list(f"list table {self.family} {self.name}", terse=False)
        return None if objects is None else _parse_table(self.family, self.name, objects)

    def counters(self) -> dict[str, tuple[int, int]]:
        """Named counters of the table: name -> (packets, bytes); empty without the table, or
        when the table is flagged (not ours). nft 1.0.6 fetches every set element for any
        listing: ~0.2 s at 100,000 sources."""
        try:
            objects = self._list(f"list counters table {self.family} {self.name}", terse=True)
        except FlaggedTableError:
            return {}
        return {
            obj["counter"]["name"]: (obj["counter"]["packets"], obj["counter"]["bytes"])
            for obj in objects or []
            if "counter" in obj
        }

    def intact(self) -> bool:
        """Whether the kernel's table is still the one this driver installed last (set
        elements aside): after a failed apply, whether the last good table still filters."""
        try:
            objects = self._list(f"list table {self.family} {self.name}", terse=True)
        except FlaggedTableError:
            return False
        return objects is not None and self._installed_body is not None and (
            _parse_table(self.family, self.name, objects).body == self._installed_body)

    def delete(self) -> bool:
        """Remove the table (teardown). False when it was not there."""
        self._applied = self._applied_body = self._installed_body = None
        try:
            self._run([{"delete": {"table": {"family": self.family, "name": self.name}}}],
                      "deletion")
        except NftablesError as exc:
            if _MISSING in str(exc):
                return False
            raise
        return True

    # --- internals ----------------------------------------------------------------------------

    def _reconcile(self, desired: RenderedTable, start: float) -> ApplyResult:
        try:
            observed = self.observe()
        except FlaggedTableError as exc:
            if "owner" in exc.flags:
                raise  # the kernel refuses anyone else's change of an owned table
            self._replace(desired)  # a table made dormant by hand: a new one has no flags
            return ApplyResult("replace", time.monotonic() - start, drift=True)
        applied = self._applied
        drift = applied is not None and (
            observed is None
            or observed.body != self._applied_body
            or dict(observed.sets) != dict(applied.sets)
        )
        if observed is None:
            self._replace(desired)
            return ApplyResult("replace", time.monotonic() - start, drift=drift)
        if (
            applied is None
            or observed.body != self._applied_body
            or desired.body != applied.body
            or observed.declarations() != desired.declarations()
        ):
            how = self._change(desired, observed.sets, observed.body)
            return ApplyResult(how, time.monotonic() - start, drift=drift)
        removed, added = element_delta(observed.sets, desired.sets)
        if removed or added:
            self._run(element_commands(desired, removed, added), "set element update")
        self._applied = desired
        return ApplyResult(
            "elements" if removed or added else "none", time.monotonic() - start, drift=drift,
            added=_count(added), removed=_count(removed),
        )

    def _change(
        self, desired: RenderedTable, sets: Mapping[str, SetSpec], body: Iterable[JsonObject]
    ) -> Literal["update", "replace"]:
        """Bring the table from `sets` and `body` to `desired`: in place when its chains stay
        (see `update_commands`), else by a replace."""
        update = update_commands(desired, sets, body)
        if update is None:
            self._replace(desired)
            return "replace"
        self._applied = self._applied_body = None
        if update.prepare:
            self._run(list(update.prepare), "preparation")
        try:
            self._run(list(update.swap), "update")
        except NftablesError:
            # The rules in force stay; so does the table `intact()` compares with.
            if update.unprepare:
                self._run(list(update.unprepare), "clean-up of a refused update")
            raise
        self._installed(desired)
        return "update"

    def _replace(self, desired: RenderedTable) -> None:
        self._applied = self._applied_body = None
        self._run(replace_commands(desired)["nftables"], "table replace")
        self._installed(desired)

    def _installed(self, desired: RenderedTable) -> None:
        """Remember `desired` and its body as the kernel lists it, right after applying it."""
        listed = self._list(f"list table {self.family} {self.name}", terse=True)
        if listed is None:
            raise NftablesError(f"table {self.family} {self.name} is missing right after apply")
        self._applied = desired
        self._applied_body = self._installed_body = _parse_table(self.family, self.name,
                                                                 listed).body

    def _run(self, commands: list[JsonObject], what: str) -> None:
        nft = nftables.Nftables()
        rc, _output, error = nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftablesError(
                f"nft refused the {what} of table {self.family} {self.name}: {error.strip()}"
            )

    def _list(self, command: str, terse: bool) -> list[JsonObject] | None:
        flags = self._flags()
        if flags:
            raise FlaggedTableError(self.family, self.name, flags)
        nft = nftables.Nftables()
        nft.set_json_output(True)
        nft.set_terse_output(terse)  # terse: without set elements
        rc, output, error = nft.cmd(command)
        if rc != 0:
            if _MISSING in error:
                return None
            raise NftablesError(f"nft {command}: {error.strip()}")
        objects: list[JsonObject] = json.loads(output)["nftables"]
        return objects

    def _flags(self) -> tuple[str, ...]:
        """The table's flags as the kernel has them; empty also when there is no table."""
        with NFTables(nfgen_family=_FAMILIES[self.family]) as netlink:
            tables = netlink.get_tables()
        bits = next((t.get_attr("NFTA_TABLE_FLAGS") or 0 for t in tables
                     if t.get_attr("NFTA_TABLE_NAME") == self.name), 0)
        unknown = bits & ~sum(_TABLE_FLAGS)
        return (*(name for bit, name in _TABLE_FLAGS.items() if bits & bit),
                *((f"0x{unknown:x}",) if unknown else ()))


def _parse_table(family: str, name: str, objects: list[JsonObject]) -> ObservedTable:
    sets: dict[str, SetSpec] = {}
    counters: dict[str, tuple[int, int]] = {}
    body: list[JsonObject] = []
    for obj in objects:
        ((kind, value),) = obj.items()
        if kind in ("metainfo", "table"):
            continue
        if kind == "set":
            set_type = value["type"]
            sets[value["name"]] = SetSpec(
                type=set_type if isinstance(set_type, str) else " . ".join(set_type),
                flags=tuple(value.get("flags", ())),
                elements=frozenset(element_from_json(e) for e in value.get("elem", ())),
                comment=value.get("comment", ""),
            )
            continue
        if kind == "counter":
            counters[value["name"]] = (value["packets"], value["bytes"])
        body.append({kind: _without(value, "handle", "packets", "bytes")})
    return ObservedTable(family, name, sets, counters, tuple(body))


def _without(value: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k not in keys}


def _count(changes: Mapping[str, frozenset[str]]) -> int:
    return sum(len(e) for e in changes.values())


# --- events -------------------------------------------------------------------------------------


def foreign_changes(
    lines: Iterable[str], family: str, name: str, own_pid: int
) -> Iterable[int]:
    """For `nft monitor` output: yield the pid of every process whose transaction touched
    table `family name`, except `own_pid`. A transaction's events come first, then
    `# new generation N by process PID (COMM)`."""
    touched = False
    for line in lines:
        if line.startswith(_GENERATION):
            words = line.split()
            pid = int(words[6]) if len(words) > 6 and words[6].isdigit() else -1
            if touched and pid != own_pid:
                yield pid
            touched = False
            continue
        words = line.split(maxsplit=4)
        # "<add|delete> <object> <family> <table> ...": `delete table inet gatewayd`
        if len(words) >= 4 and (words[2], words[3]) == (family, name):
            touched = True


class TableWatcher:
    """Calls `changed` (in its own thread) as soon as another process changes or removes the
    table: `nft flush ruleset`, `systemctl restart nftables`, an edited rule. When `nft
    monitor` stops (its netlink buffer overflowed, it was killed), `changed` is called too,
    since events may be lost, and the monitor is started again."""

    RESTART_SECONDS = 1.0

    def __init__(self, family: str, name: str, changed: Callable[[], None]) -> None:
        self.family = family
        self.name = name
        self._changed = changed
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # `_process` is started and stopped under it
        self._process: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, name="nft-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._process = subprocess.Popen(
                        ["nft", "monitor"], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                        bufsize=1,
                    )
                except OSError as exc:
                    log.error("cannot follow nftables events (nft monitor): %s", exc)
                    self._process = None
            process = self._process
            if process is not None:
                assert process.stdout is not None
                with process:
                    for pid in foreign_changes(process.stdout, self.family, self.name,
                                               os.getpid()):
                        log.warning("process %d changed table %s %s", pid, self.family,
                                    self.name)
                        self._changed()
                if self._stopping.is_set():
                    return
                log.warning("nft monitor ended (exit status %s); starting it again",
                            process.returncode)
                self._changed()
            self._stopping.wait(self.RESTART_SECONDS)
