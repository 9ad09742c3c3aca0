"""The version-skew rule: which agents and steer daemons a controller works with.

A controller works with daemons of its own major version and of its own minor version or the
one before it (controller 1.4 with agents and steer 1.3 and 1.4, any patch level): upgrade the
controller first, then the gateways and nodes, one minor version at a time. A daemon newer than
the controller, or two minor versions behind, may write or expect fields the other does not
know. The controller checks every EgressGateway's and EgressNode's `status.version` and records
a Warning Event `VersionSkew` (and logs it) when one is outside the rule; it keeps planning for
it all the same, since cutting a gateway off would drop traffic a skew may never touch.
"""

from __future__ import annotations

import re

SUPPORTED_MINORS_BEHIND = 1
_RELEASE = re.compile(r"(\d+)\.(\d+)(?:\.\d+)?")


def skew_problem(controller: str, daemon: str) -> str | None:
    """Why a daemon at version `daemon` is outside the rule for a controller at `controller`;
    None when it is inside. A version without a leading MAJOR.MINOR is outside."""
    ours, theirs = _RELEASE.match(controller), _RELEASE.match(daemon)
    if ours is None or theirs is None:
        return f"version {daemon!r} cannot be compared with the controller's {controller}"
    major, minor = int(ours[1]), int(ours[2])
    their_major, their_minor = int(theirs[1]), int(theirs[2])
    if their_major != major or their_minor > minor:
        return (f"version {daemon} is not supported by controller {controller}: upgrade the "
                "controller first (it works with its own minor version and the one before)")
    if their_minor < minor - SUPPORTED_MINORS_BEHIND:
        return (f"version {daemon} is more than {SUPPORTED_MINORS_BEHIND} minor version behind "
                f"controller {controller}: upgrade it to {major}.{minor - 1} or {major}.{minor}")
    return None
