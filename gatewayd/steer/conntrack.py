"""Connections that never got an answer through a gateway that failed start over.

A connection keeps the gateway its first packet was marked for (its conntrack mark), so that a
failover moves new connections only. A connection whose handshake is still under way when its
gateway fails has no answer yet, and its SYN retransmissions (or a client that reuses the
port while the entry lives) would keep going to the dead gateway for minutes. Deleting those
entries lets the next packet start a new connection entry, marked for the standby.
"""

from __future__ import annotations

import errno

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

IPS_SEEN_REPLY = 0x2  # <linux/netfilter/nf_conntrack_common.h>


def forget_unanswered(mark: int, mask: int) -> int:
    """Delete every conntrack entry (of this network namespace) whose mark, under `mask`, is
    `mark` and that never saw a reply; returns how many. An entry that ended (or was deleted)
    since the dump is skipped: the others still go."""
    conntrack = Conntrack()
    forgotten = 0
    try:
        doomed = [
            entry for entry in conntrack.dump_entries(mark=mark, mark_mask=mask)
            if not entry.status & IPS_SEEN_REPLY
        ]
        for entry in doomed:
            try:
                conntrack.delete(entry)
            except NetlinkError as error:
                if error.code != errno.ENOENT:
                    raise
                continue
            forgotten += 1
    finally:
        conntrack.close()
    return forgotten
