"""Reading a daemon's `/metrics` inside a lab host's namespace (lab tests, benches)."""

from __future__ import annotations

import shutil
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from gatewayd.lab.netns import run

METRICS_PORT = 9641  # the agent's and steer's default, on each host's own loopback

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_text(netns: str, port: int = METRICS_PORT) -> str:
    return run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics"],
               netns).stdout


def parse_samples(text: str) -> Samples:
    """Every sample: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample of `name` that has (at least) these labels."""
    found = [v for (n, have), v in samples.items()
             if n == name and set(labels.items()) <= set(have)]
    if len(found) > 1:
        raise ValueError(f"{len(found)} samples of {name} match {labels}")
    return found[0] if found else None


def promtool_check(text: str) -> str:
    """promtool's complaints about an exposition; empty when it passes."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return "promtool is missing (Debian package prometheus)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=60)
    return "" if check.returncode == 0 else (check.stdout + check.stderr).strip()
