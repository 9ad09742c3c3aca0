"""What sharing connection state costs: conntrackd with the agent's config, on two gateways.

    .venv/bin/python bench/bench_conntrack_sync.py [--rate 500] [--seconds 10]   # root

Builds its own namespaces (`gwdsync-*`: a client, gateway A that SNATs it, gateway B and a
server on one bridge), runs conntrackd in A and B with `render_conntrackd_config` (multicast
on the segment), opens `--rate` short HTTP connections a second from the client for
`--seconds`, and prints the CPU time each conntrackd used, the sync messages A sent and the
entries in both kernel tables. Removes everything afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, ip_network
from pathlib import Path

from gatewayd.dataplane.conntrackd import SyncSettings, config_path, render_conntrackd_config

PREFIX = "gwdsync-"
CLIENT, GATEWAY_A, GATEWAY_B, SERVER, SEGMENT = (
    PREFIX + n for n in ("client", "a", "b", "server", "segment"))
SNAT = """table ip bench {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 10.244.1.0/24 oifname "eth0" snat to 198.18.0.70
    }
}
"""
CLIENT_CODE = """
import socket, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
count = failed = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    time.sleep(max(0.0, start + count / rate - time.monotonic()))
    try:
        with socket.create_connection(("198.18.0.4", 8080), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            while s.recv(4096):
                pass
    except OSError:
        failed += 1
    count += 1
print(count, failed)
"""


def sh(command: str, check: bool = True) -> str:
    return subprocess.run(command, shell=True, check=check, capture_output=True,
                          text=True).stdout


def build() -> None:
    for ns in (CLIENT, GATEWAY_A, GATEWAY_B, SERVER, SEGMENT):
        sh(f"ip netns add {ns} && ip netns exec {ns} ip link set lo up")
    sh(f"ip link add eth0 netns {CLIENT} type veth peer name in0 netns {GATEWAY_A}")
    sh(f"ip -n {CLIENT} addr add 10.244.1.10/24 dev eth0 && ip -n {CLIENT} link set eth0 up"
       f" && ip -n {CLIENT} route add default via 10.244.1.1")
    sh(f"ip -n {GATEWAY_A} addr add 10.244.1.1/24 dev in0 && ip -n {GATEWAY_A} link set in0 up"
       f" && ip netns exec {GATEWAY_A} sysctl -qw net.ipv4.ip_forward=1")
    sh(f"ip -n {SEGMENT} link add br0 type bridge && ip -n {SEGMENT} link set br0 up")
    for index, ns in enumerate((GATEWAY_A, GATEWAY_B, SERVER)):
        sh(f"ip link add eth0 netns {ns} type veth peer name p{index} netns {SEGMENT}")
        sh(f"ip -n {SEGMENT} link set p{index} master br0 up")
        sh(f"ip -n {ns} addr add 198.18.0.{index + 2}/24 dev eth0 && ip -n {ns} link set eth0 up")
    sh(f"ip -n {GATEWAY_A} addr add 198.18.0.70/32 dev eth0")
    subprocess.run(["ip", "netns", "exec", GATEWAY_A, "nft", "-f", "-"], input=SNAT, text=True,
                   check=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    daemons: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="gwdsync-") as tmp:
        try:
            build()
            settings = {}
            for ns, address in ((GATEWAY_A, "198.18.0.2"), (GATEWAY_B, "198.18.0.3")):
                settings[ns] = SyncSettings("eth0", IPv4Address(address),
                                            (ip_network("10.244.0.0/16"),), Path(tmp) / ns)
                settings[ns].directory.mkdir()
                config_path(settings[ns].directory).write_text(
                    render_conntrackd_config(settings[ns]))
                daemons.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, "conntrackd", "-C",
                     str(config_path(settings[ns].directory))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            daemons.append(subprocess.Popen(
                ["ip", "netns", "exec", SERVER, sys.executable, "-m", "gatewayd.lab.echo",
                 "--http-port", "8080", "--line-port", "9000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(2.0)  # both daemons up, the server listening
            before = [cpu_seconds(d.pid) for d in daemons[:2]]
            out = subprocess.run(["ip", "netns", "exec", CLIENT, sys.executable, "-c",
                                  CLIENT_CODE, str(args.rate), str(args.seconds)],
                                 capture_output=True, text=True, check=True).stdout.split()
            time.sleep(1.0)
            used = [cpu_seconds(d.pid) - b for d, b in zip(daemons[:2], before, strict=True)]
            stats = sh(f"ip netns exec {GATEWAY_A} conntrackd -C "
                       f"{config_path(settings[GATEWAY_A].directory)} -s network", check=False)
            sent = next((line.split()[0] for line in stats.splitlines() if "Pckts sent" in line),
                        "?")
            entries = [sh(f"ip netns exec {ns} conntrack -C").strip()
                       for ns in (GATEWAY_A, GATEWAY_B)]
        finally:
            for daemon in daemons:
                daemon.terminate()
                daemon.wait(5)
            for ns in (CLIENT, GATEWAY_A, GATEWAY_B, SERVER, SEGMENT):
                sh(f"ip netns del {ns}", check=False)
    count, failed = int(out[0]), int(out[1])
    rate = count / args.seconds
    print(f"{count} connections in {args.seconds:g} s ({rate:.0f}/s), {failed} failed")
    print(f"sync messages sent by A: {sent} ({int(sent) / count:.1f} per connection)"
          if sent.isdigit() else "sync messages: unknown")
    for name, seconds in (("A (sends)", used[0]), ("B (receives)", used[1])):
        print(f"conntrackd {name}: {seconds:.2f} CPU s = {100 * seconds / args.seconds:.1f} % "
              f"of a core, {1000 * seconds / count:.2f} ms per connection")
    print(f"conntrack entries: A {entries[0]}, B {entries[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
