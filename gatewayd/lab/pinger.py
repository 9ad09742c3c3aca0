"""A probing client for failover measurements, run inside a pod's namespace.

    python -m gatewayd.lab.pinger --target 198.51.100.10:8080 --interval 0.02 --timeout 0.3 \
        --out FILE

Every `interval` it starts one small HTTP request (a new TCP connection each time, so every
request takes the path a new connection takes) in a thread of its own, with `timeout`. Each
outcome is one JSON line in FILE: start and end (wall clock), ok, and the source address the
echo server saw. It stops on SIGTERM. `outage()` reads such a file.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from types import FrameType
from typing import TextIO


@dataclass(frozen=True)
class Attempt:
    start: float
    end: float
    ok: bool
    source: str | None
    error: str | None = None  # why it failed: a timeout, a reset, ...


def request(host: str, port: int, timeout: float) -> tuple[str | None, str | None]:
    """(the source address the echo server reports, None) or (None, what went wrong and the
    local port, to find the connection in a capture)."""
    deadline = time.monotonic() + timeout
    v6 = ip_address(host).version == 6
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("::" if v6 else "0.0.0.0", 0))
        local_port = sock.getsockname()[1]
        try:
            source, error = _exchange(sock, host, port, timeout, deadline)
        except OSError as exc:
            source, error = None, type(exc).__name__
    return source, (f"{error} (port {local_port})" if error else None)


def _exchange(
    sock: socket.socket, host: str, port: int, timeout: float, deadline: float
) -> tuple[str | None, str | None]:
    sock.settimeout(timeout)
    sock.connect((host, port))
    sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0]:
        return None, "bad answer"
    source = body.decode(errors="replace").strip()
    return (source, None) if source else (None, "empty answer")


def join_host_port(address: str, port: int) -> str:
    """HOST:PORT, with an IPv6 address in brackets (as in a URL)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def split_host_port(target: str) -> tuple[str, int]:
    """The address and port of HOST:PORT or [IPv6]:PORT."""
    host, _, port = target.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def stopped_by_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets: the lab's client programs stop cleanly."""
    stopping = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    return stopping


def run(host: str, port: int, interval: float, timeout: float, out: TextIO) -> None:
    stopping = stopped_by_signals()
    lock = threading.Lock()

    def one() -> None:
        start = time.time()
        source, error = request(host, port, timeout)
        line = json.dumps({"start": start, "end": time.time(), "ok": source is not None,
                           "source": source, "error": error})
        with lock:
            out.write(line + "\n")
            out.flush()

    next_start = time.monotonic()
    workers: list[threading.Thread] = []
    while not stopping.is_set():
        worker = threading.Thread(target=one, daemon=True)
        worker.start()
        workers.append(worker)
        workers = [w for w in workers if w.is_alive()]
        next_start += interval
        stopping.wait(max(0.0, next_start - time.monotonic()))
    for worker in workers:
        worker.join(timeout + 1)


def read_attempts(path: Path) -> list[Attempt]:
    attempts = []
    for line in path.read_text().splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        attempts.append(Attempt(data["start"], data["end"], data["ok"], data["source"],
                                data.get("error")))
    return sorted(attempts, key=lambda a: a.start)


@dataclass(frozen=True)
class Outage:
    last_before: Attempt  # the last answered request that ended before the cut
    first_after: Attempt  # the first answered request that started after the cut
    failed: int  # requests between the two that got no answer

    @property
    def seconds(self) -> float:
        """From the last reply before the cut to the first reply after it."""
        return self.first_after.end - self.last_before.end


def outage(attempts: list[Attempt], cut_at: float) -> Outage | None:
    """The gap in answers around `cut_at` (wall clock); None if answers never resumed."""
    before = [a for a in attempts if a.ok and a.end <= cut_at]
    after = [a for a in attempts if a.ok and a.start > cut_at]
    if not before or not after:
        return None
    last, first = before[-1], min(after, key=lambda a: a.end)
    failed = sum(1 for a in attempts if not a.ok and last.end <= a.start <= first.start)
    return Outage(last, first, failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of an echo server")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=0.3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    host, port = split_host_port(args.target)
    with args.out.open("a") as out:
        run(host, port, args.interval, args.timeout, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
