"""Manual pages rendered from the argparse parsers (gatewayd/cli/manpage.py)."""

from __future__ import annotations

import argparse
import datetime
import subprocess

import pytest

from gatewayd.cli import gatewayctl, gatewayd
from gatewayd.cli.manpage import escape, render

pytestmark = pytest.mark.unit
DATE = datetime.date(2026, 12, 3)


def test_escape_keeps_hyphens_backslashes_and_leading_dots_literal() -> None:
    assert escape("--config a\\b") == "\\-\\-config a\\eb"
    assert escape(".hidden\n'quoted") == "\\&.hidden\n\\&'quoted"


def test_a_page_has_the_sections_and_every_command_with_its_options() -> None:
    parser = argparse.ArgumentParser(prog="tool", description="`tool`: does things.\n\nMore.")
    parser.add_argument("--version", action="version", version="1")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run it")
    run.add_argument("--every", type=int, default=5, help="seconds (default %(default)s)")
    page = render(parser, DATE, version="1.2.3")
    assert page.startswith('.TH TOOL 8 "2026-12-03" "tool 1.2.3" "System Administration"\n')
    assert ".SH NAME\ntool \\- does things\n" in page
    assert ".SH DESCRIPTION\nMore.\n" in page
    assert '.SS "tool run [\\-h] [\\-\\-every EVERY]"\nrun it\n' in page
    assert ".B \\-\\-every EVERY\nseconds (default 5)\n" in page


@pytest.mark.parametrize("parser", [gatewayd.build_parser(), gatewayctl.build_parser()],
                         ids=["gatewayd", "gatewayctl"])
def test_the_real_pages_render_without_groff_warnings(parser: argparse.ArgumentParser) -> None:
    page = render(parser, DATE)
    shown = subprocess.run(["man", "--warnings", "-l", "-P", "cat", "-"], input=page,
                           capture_output=True, text=True, check=True)
    assert shown.stderr == ""
    words = " ".join(shown.stdout.split())  # groff justifies: spaces vary
    for name in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        assert f"{parser.prog} {name} [-h]" in words
