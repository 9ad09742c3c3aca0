"""Long-lived connections for failover measurements, run inside a pod's namespace.

    python -m gatewayd.lab.holder --target 198.51.100.10:9000 --connections 20 \
        --interval 0.05 [--download 198.51.100.10:8080 --download-rate 1048576] --out FILE

Opens `connections` TCP connections to a line echo server (`gatewayd.lab.echo`) and keeps
them busy: each sends one line every `interval` and waits for its echo. With `--download`, one
more connection is an HTTP download from that echo host's `/download`, which sends
`download-rate` bytes a second until it is closed; each chunk read counts as its echo. A
connection breaks on an error (a reset, the server closing it) or when nothing came back for
`give_up` seconds. FILE (JSON, rewritten atomically every half second and at the end) holds
each connection's record (the download's last); it stops on SIGTERM. `read_held()` reads it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gatewayd.lab.pinger import split_host_port, stopped_by_signals

WRITE_EVERY = 0.5


@dataclass
class Held:
    index: int
    kind: str = "echo"  # or "download"
    local_port: int = 0
    source: str | None = None  # the address the echo server saw
    echoes: int = 0
    last_echo: float = 0.0  # wall clock
    longest_gap: float = 0.0  # between two echoes (or the first one and the open)
    gap_from: float = 0.0  # when the longest gap began
    error: str | None = None  # why it broke; None while it works
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (from, seconds) >= 0.2 s


def hold(record: Held, host: str, port: int, interval: float, give_up: float,
         stopping: threading.Event, lock: threading.Lock) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=give_up)
    except OSError as exc:
        with lock:
            record.error = f"connect: {type(exc).__name__}"
        return
    with sock:
        sock.settimeout(give_up)
        reader = sock.makefile("rb")
        with lock:
            record.local_port = sock.getsockname()[1]
            record.last_echo = time.time()
        sequence = 0
        while not stopping.is_set():
            sequence += 1
            try:
                sock.sendall(f"{record.index} {sequence}\n".encode())
                line = reader.readline()
            except OSError as exc:
                with lock:
                    record.error = f"{type(exc).__name__} after {record.echoes} echoes"
                return
            now = time.time()
            if not line:
                with lock:
                    record.error = f"closed by the server after {record.echoes} echoes"
                return
            with lock:
                record.source = line.split(b" ", 1)[0].decode(errors="replace")
                heard(record, now)
            stopping.wait(interval)


def heard(record: Held, now: float) -> None:
    """An echo (or a chunk of the download) came back at `now`."""
    gap = now - record.last_echo
    if gap > record.longest_gap:
        record.longest_gap, record.gap_from = gap, record.last_echo
    if gap >= 0.2:
        record.gaps.append((record.last_echo, gap))
    record.echoes += 1
    record.last_echo = now


def download(record: Held, host: str, port: int, rate: int, give_up: float,
             stopping: threading.Event, lock: threading.Lock) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=give_up)
    try:
        connection.request("GET", f"/download?rate={rate}")
        assert connection.sock is not None  # the response takes it over: its port now
        local_port = connection.sock.getsockname()[1]
        response = connection.getresponse()
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        with lock:
            record.local_port = local_port
            record.source = response.readline().decode(errors="replace").strip()
            record.last_echo = time.time()
        while not stopping.is_set():
            if not response.read1(65536):
                with lock:
                    record.error = f"closed by the server after {record.echoes} chunks"
                return
            with lock:
                heard(record, time.time())
    except (OSError, http.client.HTTPException) as exc:
        with lock:
            record.error = f"{type(exc).__name__} after {record.echoes} chunks"
    finally:
        connection.close()


def write(records: list[Held], out: Path, lock: threading.Lock) -> None:
    with lock:
        text = json.dumps([asdict(r) for r in records])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


def read_held(path: Path) -> list[Held]:
    """The records in a holder's FILE (empty before its first write)."""
    try:
        items = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [Held(**{**item, "gaps": [tuple(g) for g in item["gaps"]]}) for item in items]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gatewayd.lab.holder", description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT of a line echo server")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--download", metavar="HOST:PORT", help="an echo host's HTTP server")
    parser.add_argument("--download-rate", type=int, default=1 << 20, help="bytes a second")
    parser.add_argument("--give-up", type=float, default=30.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    host, port = split_host_port(args.target)
    stopping = stopped_by_signals()
    lock = threading.Lock()
    records = [Held(i) for i in range(args.connections)]
    threads = [threading.Thread(target=hold, daemon=True, args=(
        r, host, port, args.interval, args.give_up, stopping, lock)) for r in records]
    if args.download:
        records.append(Held(args.connections, kind="download"))
        threads.append(threading.Thread(target=download, daemon=True, args=(
            records[-1], *split_host_port(args.download), args.download_rate, args.give_up,
            stopping, lock)))
    for thread in threads:
        thread.start()
    while not stopping.wait(WRITE_EVERY):
        write(records, args.out, lock)
    write(records, args.out, lock)  # connections still waiting for an echo are not waited for


if __name__ == "__main__":
    main()
