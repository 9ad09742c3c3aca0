"""Bad input is reported once, however often it is read again."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatewayd.follower import SnapshotSource
from gatewayd.policy.engine import EgressPlan
from gatewayd.policy.lastgood import PolicyMemory

pytestmark = pytest.mark.unit

INVALID_POLICY = """\
apiVersion: egress.gatewayd.io/v1alpha1
kind: EgressGatewayPolicy
metadata: {name: broken}
spec:
  selectors: [{podSelector: {}}]
  destinationCIDRs: ["10.0.0.0/33"]
  egressGateway: {nodeSelector: {}}
"""


def test_an_invalid_policy_is_journaled_once_until_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "policy.yaml").write_text(INVALID_POLICY)
    source = SnapshotSource((tmp_path,), PolicyMemory(), lambda plan, generation: plan,
                            lambda a, b: a == b)

    def reported() -> list[str]:
        return [r.getMessage() for r in caplog.records if "event=policy-invalid" in r.getMessage()]

    plan: EgressPlan = source.desired(None)
    assert plan.policy_results == {}
    source.desired(None)  # read again, e.g. `systemctl reload` after inotify already did
    assert len(reported()) == 1 and "10.0.0.0/33" in reported()[0]
    assert len(source.problems) == 1  # still known, for the status

    (tmp_path / "policy.yaml").write_text(INVALID_POLICY.replace("/33", "/40"))
    source.desired(None)
    assert len(reported()) == 2 and "10.0.0.0/40" in reported()[1]
