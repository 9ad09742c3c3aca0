"""Reading `nft monitor`: which transactions of other processes touched the agent's table."""

from __future__ import annotations

import pytest

from gatewayd.dataplane.nftables import foreign_changes

pytestmark = pytest.mark.unit

OWN = 4242


def changes(text: str) -> list[int]:
    return list(foreign_changes(text.splitlines(), "inet", "gatewayd", OWN))


def test_a_flushed_ruleset_is_seen() -> None:
    assert changes("""\
delete rule inet gatewayd forward handle 2
delete chain inet gatewayd forward
delete table inet gatewayd
delete table inet filter
# new generation 5 by process 19468 (nft)
add table inet filter
# new generation 6 by process 19470 (nft)
""") == [19468]


def test_own_transactions_and_other_tables_are_not() -> None:
    assert changes(f"""\
delete table inet gatewayd
add table inet gatewayd
add element inet gatewayd rule0_src {{ 10.0.0.1 }}
# new generation 7 by process {OWN} (gatewayd)
delete table inet gatewayd-steer
add rule ip nat postrouting masquerade
# new generation 8 by process 77 (nft)
""") == []


@pytest.mark.parametrize("event", [
    "delete rule inet gatewayd postrouting handle 9",
    "add rule inet gatewayd forward accept",
    "delete element inet gatewayd rule0_dst { 192.0.2.0/24 }",
])
def test_any_edit_of_the_table_by_another_process_is_seen(event: str) -> None:
    assert changes(f"{event}\n# new generation 9 by process 31 (nft)\n") == [31]
