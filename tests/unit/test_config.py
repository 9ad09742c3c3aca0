"""Agent and steer configuration: valid files load, every bad input names its line and key."""

from __future__ import annotations

import ipaddress
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from gatewayd.agent.config import AgentConfig, load_agent_config
from gatewayd.cli import gatewayd as gatewayd_cli
from gatewayd.configfile import ConfigError
from gatewayd.metrics import MetricsOptions, MetricsSettings, resolve_options
from gatewayd.steer.config import FIRST_TABLE, MARK_MASK, SteerConfig, load_steer_config

pytestmark = pytest.mark.unit

KEY = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
KEY2 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="

AGENT = f"""\
name: gw1
labels:
  site: dc1
snapshot: /etc/gatewayd/snapshot
stateDirectory: /var/lib/gatewayd
uplink: eth0
egressIPPools:
  - cidr: 198.51.100.64/27
  - cidr: 2001:db8:1::/120
    interface: eth1
tunnel:
  interface: egress0
  listenPort: 51820
  address: 100.64.0.1/24
  peers:
    - name: node1
      publicKey: "{KEY}"
      endpoint: "192.0.2.21:51821"
      allowedIPs: ["10.244.1.0/24"]
reconcile:
  pollSeconds: 0.5
"""

STEER = f"""\
node: node1
snapshot: [/a, /b]
tunnel:
  gateways:
    - name: gw1
      publicKey: "{KEY}"
      endpoint: "198.51.100.2:51820"
    - name: gateway-with-long-name
      publicKey: "{KEY2}"
      interface: n1-gw2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path, loader=load_agent_config) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        loader(path)
    return info.value.problems


def test_agent_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, AGENT))
    assert config.name == "gw1"
    assert config.labels == {"site": "dc1"}
    assert config.snapshot == (Path("/etc/gatewayd/snapshot"),)
    assert [(str(p.cidr), p.interface) for p in config.egress_ip_pools] == [
        ("198.51.100.64/27", "eth0"),  # the uplink by default
        ("2001:db8:1::/120", "eth1"),
    ]
    assert config.tunnel.private_key_file == Path("/var/lib/gatewayd/wireguard.key")
    assert config.tunnel.mtu == 1420
    peer = config.tunnel.peers[0]
    assert peer.allowed_ips == (ipaddress.ip_network("10.244.1.0/24"),)
    assert peer.persistent_keepalive == 25
    assert config.reconcile.poll_seconds == 0.5
    assert config.reconcile.repair_seconds == 10.0


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("name: gw1", "name: [gw1]", ":1: name: must be the name of an EgressGateway"),
        ("uplink: eth0", "uplink: eth0/1", ":6: uplink: must be an interface name"),
        ("  - cidr: 198.51.100.64/27", "  - cidr: 198.51.100.65/27",
         ":8: egressIPPools[0].cidr: must be a CIDR without host bits"),
        ("  listenPort: 51820", "  listenPort: 70000",
         ":13: tunnel.listenPort: must be between 1 and 65535"),
        (f'      publicKey: "{KEY}"', '      publicKey: "abc"',
         ":17: tunnel.peers[0].publicKey: must be a WireGuard public key"),
        ('      endpoint: "192.0.2.21:51821"', '      endpoint: "192.0.2.21"',
         ":18: tunnel.peers[0].endpoint: must be HOST:PORT"),
        ('      allowedIPs: ["10.244.1.0/24"]', '      allowedIPs: ["10.244.1.0/33"]',
         ":19: tunnel.peers[0].allowedIPs: item 0 must be a CIDR"),
        ("  pollSeconds: 0.5", "  pollSeconds: 0",
         ":21: reconcile.pollSeconds: must be a number from 0.01 to 3600"),
        ("  address: 100.64.0.1/24", "  address: 100.64.0.1",
         ":14: tunnel.address: must be ADDRESS/PREFIXLEN"),
        ("  pollSeconds: 0.5", "  pollSecond: 0.5", ":21: reconcile.pollSecond: unknown setting"),
        ("uplink: eth0", "uplnk: eth0", ":6: uplnk: unknown setting"),
    ],
)
def test_agent_config_errors_name_line_and_key(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    assert old in AGENT
    path = write(tmp_path, AGENT.replace(old, new))
    found = problems(path)
    assert any(expected in p and p.startswith(str(path)) for p in found), found


def test_agent_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = AGENT.replace("name: gw1\n", "").replace("uplink: eth0", "uplink: 'a b'")
    found = problems(write(tmp_path, text))
    assert any("name: required" in p for p in found)
    assert any("uplink: must be an interface name" in p for p in found)
    # a missing uplink also breaks the pool default, which must not be a second, confusing error
    assert len(found) == 2, found


def test_missing_tunnel_section_is_required(tmp_path: Path) -> None:
    text = AGENT[: AGENT.index("tunnel:")]
    assert any("tunnel: required" in p for p in problems(write(tmp_path, text)))


def test_duplicate_peer_names(tmp_path: Path) -> None:
    peer = AGENT[AGENT.index("    - name: node1"): AGENT.index("reconcile:")]
    text = AGENT.replace(peer, peer + peer)
    assert any("'node1' is used twice" in p for p in problems(write(tmp_path, text)))


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: gw1\nuplink: [eth0\n")
    found = problems(path)
    assert len(found) == 1 and found[0].startswith(f"{path}:") and "YAML syntax error" in found[0]


def test_not_a_mapping_and_unreadable(tmp_path: Path) -> None:
    assert "must be a mapping" in problems(write(tmp_path, "- a\n- b\n"))[0]
    assert "cannot read" in problems(tmp_path / "absent.yaml")[0]


def test_steer_config_numbers_marks_and_tables_per_gateway(tmp_path: Path) -> None:
    config = load_steer_config(write(tmp_path, STEER))
    assert config.snapshot == (Path("/a"), Path("/b"))
    first, second = config.gateways
    assert (first.interface, first.mark, first.table) == ("egw-gw1", 0x10, FIRST_TABLE)
    assert (second.interface, second.mark, second.table) == ("n1-gw2", 0x20, FIRST_TABLE + 1)
    assert config.mark_mask == MARK_MASK
    # clear of kube-proxy's 0x4000/0x8000, Calico's upper half and Cilium's 0x0f00
    assert MARK_MASK & (0x4000 | 0x8000 | 0xFFFF0000 | 0x0F00) == 0
    assert first.listen_port != second.listen_port
    assert config.private_key_file == Path("/var/lib/gatewayd-steer/wireguard.key")
    # replies through a tunnel pass the kernel's rp_filter only if it has an IPv4 address
    assert first.address == second.address == "169.254.77.1/32"


def test_steer_default_interface_name_fits_the_kernel_limit(tmp_path: Path) -> None:
    text = STEER.replace("      interface: n1-gw2\n", "")
    config = load_steer_config(write(tmp_path, text))
    assert config.gateways[1].interface == "egw-gateway-wit"


def test_steer_duplicate_interfaces_rejected(tmp_path: Path) -> None:
    text = STEER.replace("interface: n1-gw2", "interface: egw-gw1")
    found = problems(write(tmp_path, text), load_steer_config)
    assert any("tunnel.gateways: 'egw-gw1' is used twice" in p for p in found), found


def test_steer_marks_follow_a_custom_mask(tmp_path: Path) -> None:
    text = STEER.replace("tunnel:\n", "tunnel:\n  markMask: 0x300\n")
    config = load_steer_config(write(tmp_path, text))
    assert [g.mark for g in config.gateways] == [0x100, 0x200]


def test_steer_mark_outside_the_mask_is_rejected(tmp_path: Path) -> None:
    text = STEER.replace("      interface: n1-gw2", "      interface: n1-gw2\n      mark: 0x4000")
    found = problems(write(tmp_path, text), load_steer_config)
    assert any("tunnel.gateways[1].mark: 0x4000 must be a non-zero value inside markMask 0xf0"
               in p for p in found), found


def test_steer_too_many_gateways_for_the_default_mask(tmp_path: Path) -> None:
    gateways = "".join(
        f"    - name: gw{i}\n      publicKey: \"{KEY}\"\n" for i in range(16)
    )
    text = f"node: n\nsnapshot: /s\ntunnel:\n  gateways:\n{gateways}"
    found = problems(write(tmp_path, text), load_steer_config)
    assert any("tunnel.gateways[15].mark: 0x100 must be" in p for p in found), found


# --- metrics: the section, and the flags winning over it ---------------------------------

METRICS = """\
metrics:
  address: "[::1]:9700"
  textfile: /var/lib/node_exporter/gatewayd.prom
"""


@pytest.mark.parametrize(("text", "loader"), [(AGENT, load_agent_config),
                                              (STEER, load_steer_config)])
def test_metrics_section_loads_in_both_configs(
    tmp_path: Path, text: str, loader: Callable[[Path], AgentConfig | SteerConfig]
) -> None:
    assert loader(write(tmp_path, text)).metrics == MetricsSettings()  # silent: None, None
    config = loader(write(tmp_path, text + METRICS))
    assert config.metrics == MetricsSettings(
        "[::1]:9700", Path("/var/lib/node_exporter/gatewayd.prom"))
    off = loader(write(tmp_path, text + "metrics: {address: none}\n"))
    assert off.metrics == MetricsSettings("none", None)


@pytest.mark.parametrize(
    ("section", "line", "expected"),
    [
        ("metrics:\n  address: 9641\n", 2,
         "metrics.address: must be HOST:PORT or none, got 9641"),
        ("metrics:\n  address: 127.0.0.1\n", 2,
         "metrics.address: must be HOST:PORT or none, got '127.0.0.1' ('127.0.0.1': must be "
         "HOST:PORT, e.g. 127.0.0.1:9641)"),
        ("metrics:\n  address: 127.0.0.1:70000\n", 2, "metrics.address: must be HOST:PORT"),
        ("metrics:\n  textfile: ''\n", 2, "metrics.textfile: must be a path, got ''"),
        ("metrics:\n  port: 9641\n", 2, "metrics.port: unknown setting"),
        ("metrics: 127.0.0.1:9641\n", 1, "metrics: must be a mapping, got '127.0.0.1:9641'"),
    ],
)
@pytest.mark.parametrize(("text", "loader"), [(AGENT, load_agent_config),
                                              (STEER, load_steer_config)])
def test_metrics_errors_name_file_line_and_field(
    tmp_path: Path, text: str, loader: Callable[[Path], AgentConfig | SteerConfig],
    section: str, line: int, expected: str,
) -> None:
    path = write(tmp_path, text + section)
    first = len(textwrap.dedent(text).splitlines())
    found = problems(path, loader)
    assert any(p.startswith(f"{path}:{first + line}: {expected}") for p in found), found


def test_metrics_flags_win_over_the_file_setting_by_setting() -> None:
    file = MetricsSettings("0.0.0.0:9700", Path("/file.prom"))
    assert resolve_options(MetricsSettings(), MetricsSettings()) == MetricsOptions(
        ("127.0.0.1", 9641), None)  # neither says anything: the default listener
    assert resolve_options(MetricsSettings(), file) == MetricsOptions(
        ("0.0.0.0", 9700), Path("/file.prom"))
    assert resolve_options(MetricsSettings("127.0.0.2:1234"), file) == MetricsOptions(
        ("127.0.0.2", 1234), Path("/file.prom"))
    assert resolve_options(MetricsSettings(None, Path("/flag.prom")), file) == MetricsOptions(
        ("0.0.0.0", 9700), Path("/flag.prom"))
    assert resolve_options(MetricsSettings("none"), file) == MetricsOptions(
        None, Path("/file.prom"))
    assert resolve_options(MetricsSettings(), MetricsSettings("none")) == MetricsOptions(None)


def test_gatewayd_flags_left_out_leave_the_choice_to_the_file() -> None:
    parser = gatewayd_cli.build_parser()
    for role in ("agent", "steer"):
        args = parser.parse_args([role])
        assert (args.metrics_address, args.metrics_textfile) == (None, None)
        args = parser.parse_args([role, "--metrics-address", "none", "--metrics-textfile", "x"])
        assert (args.metrics_address, args.metrics_textfile) == ("none", Path("x"))
