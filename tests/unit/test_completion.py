"""Bash completion generated from the argparse parsers (gatewayd/cli/completion.py), loaded
and run by bash itself."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from gatewayd.cli import gatewayctl, gatewayd
from gatewayd.cli.completion import commands, render_bash

pytestmark = pytest.mark.unit

# Loads the script as bash-completion would, then does what bash does on TAB: COMP_WORDS is
# the line split into words, COMP_CWORD the word under the cursor.
COMPLETE = """\
source "$1" || exit 99
complete -p "$2" || exit 98
function=$(complete -p "$2" | sed -n 's/^complete -F \\([^ ]*\\) .*/\\1/p')
shift
COMP_WORDS=("$@")
COMP_CWORD=$(($# - 1))
"$function"
printf '%s\\n' "${COMPREPLY[@]}"
"""


def script_for(parser: argparse.ArgumentParser, tmp_path: Path) -> Path:
    path = tmp_path / parser.prog
    path.write_text(render_bash(parser.prog, list(commands(parser))))
    return path


def complete(script: Path, *words: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last of `words` (the program name first)."""
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", COMPLETE, "bash", str(script), *words],
        capture_output=True, text=True, check=True, cwd=cwd, timeout=60,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == f"complete -F _{words[0]} {words[0]}"  # `complete -p` found it
    return [line for line in lines[1:] if line]


@pytest.fixture(scope="module")
def gatewayctl_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return script_for(gatewayctl.build_parser(), tmp_path_factory.mktemp("completion"))


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def subcommand_names(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(subparsers(parser))


def test_bash_completes_every_subcommand_of_both_programs(tmp_path: Path) -> None:
    for parser in (gatewayctl.build_parser(), gatewayd.build_parser()):
        script = script_for(parser, tmp_path)
        names = subcommand_names(parser)
        assert complete(script, parser.prog, "") == names
        for name in names:
            assert name in complete(script, parser.prog, name[:2])


def test_a_prefix_completes_to_the_one_subcommand(gatewayctl_script: Path) -> None:
    assert complete(gatewayctl_script, "gatewayctl", "la") == ["lab"]
    assert complete(gatewayctl_script, "gatewayctl", "lab", "ve") == ["verify"]


def test_options_choices_and_option_values_are_skipped(gatewayctl_script: Path) -> None:
    assert complete(gatewayctl_script, "gatewayctl", "explain", "-o", "") == ["text", "json"]
    # --src takes a value: 10.0.0.1 is not taken for a subcommand or positional argument.
    assert complete(gatewayctl_script, "gatewayctl", "explain", "--src", "10.0.0.1", "--o"
                    ) == ["--output"]
    assert complete(gatewayctl_script, "gatewayctl", "explain", "--src", "") == []
    assert complete(gatewayctl_script, "gatewayctl", "completion", "bash", "") == [
        "gatewayctl", "gatewayd"]
    # --output=js: bash splits the word at the =.
    assert complete(gatewayctl_script, "gatewayctl", "rules", "--output", "=") == [
        "text", "json"]
    assert complete(gatewayctl_script, "gatewayctl", "rules", "--output", "=", "j") == ["json"]
    assert complete(gatewayctl_script, "gatewayctl", "rules", "--output", "=", "json", "--c"
                    ) == ["--config"]


def test_file_arguments_complete_file_names(gatewayctl_script: Path, tmp_path: Path) -> None:
    (tmp_path / "snapshot.yaml").touch()
    (tmp_path / "other").touch()
    assert complete(gatewayctl_script, "gatewayctl", "validate", "-f", "sn", cwd=tmp_path
                    ) == ["snapshot.yaml"]
    assert complete(gatewayctl_script, "gatewayctl", "check-config", "ot", cwd=tmp_path
                    ) == ["other"]


def test_a_new_option_appears_without_touching_the_generator(tmp_path: Path) -> None:
    parser = gatewayctl.build_parser()
    rules = subparsers(parser)["rules"]
    rules.add_argument("--colour", choices=("always", "never"))
    script = script_for(parser, tmp_path)
    assert complete(script, "gatewayctl", "rules", "--col") == ["--colour"]
    assert complete(script, "gatewayctl", "rules", "--colour", "") == ["always", "never"]


def test_a_choice_that_needs_quoting_is_refused() -> None:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--mode", choices=("a b", "c"))
    with pytest.raises(ValueError, match=r"mode: choices \['a b'\] need shell quoting"):
        list(commands(parser))


def test_gatewayctl_completion_prints_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert gatewayctl.main(["completion", "bash", "gatewayd"]) == 0
    parser = gatewayd.build_parser()
    assert capsys.readouterr().out == render_bash("gatewayd", list(commands(parser)))
