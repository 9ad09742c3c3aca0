"""Manual pages gatewayd(8) and gatewayctl(8), rendered from the argparse parsers, so the page
says what `--help` says. `python -m gatewayd.cli.manpage gatewayd|gatewayctl` prints one;
packaging/deb/build.sh installs them. The date is $SOURCE_DATE_EPOCH's (the changelog's), so a
rebuild gives the same page.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator

from gatewayd.version import VERSION

SECTION = 8


def escape(text: str) -> str:
    """Text as roff shows it literally: backslashes, hyphens (minus signs in options and paths)
    and a leading dot or quote, which roff would take for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [f"\\&{line}" if line.startswith((".", "'")) else line for line in text.split("\n")]
    return "\n".join(lines)


def render(parser: argparse.ArgumentParser, date: datetime.date, version: str = VERSION) -> str:
    """The whole page: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, then one subsection per command
    (nested commands, like `gatewayctl lab up`, under their parent)."""
    prog = parser.prog
    summary, _, details = (parser.description or prog).strip().partition("\n\n")
    lines = [
        f'.TH {prog.upper()} {SECTION} "{date.isoformat()}" "{prog} {version}" '
        '"System Administration"',
        ".SH NAME",
        f"{prog} \\- {escape(_sentence(prog, summary))}",
        ".SH SYNOPSIS",
        escape(_usage(parser)),
    ]
    if details.strip():
        lines += [".SH DESCRIPTION", escape(" ".join(details.split()))]
    lines += [".SH OPTIONS", *_options(parser)]
    commands = list(_commands(parser))
    if commands:
        lines.append(".SH COMMANDS")
        for command, help_text in commands:
            lines += [f'.SS "{escape(_usage(command))}"']
            if command.description or help_text:
                lines.append(escape(" ".join((command.description or help_text).split())))
            lines += _options(command)
    return "\n".join(lines) + "\n"


def _sentence(prog: str, text: str) -> str:
    """The description's first line without its markdown back quotes and the leading name."""
    return " ".join(text.replace("`", "").removeprefix(f"{prog}: ").split()).rstrip(".")


def _usage(parser: argparse.ArgumentParser) -> str:
    # One line: wrapping is the man reader's job.
    formatter = argparse.HelpFormatter(prog=parser.prog, width=10_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups,
                        prefix="")
    return formatter.format_help().strip()


def _options(parser: argparse.ArgumentParser) -> list[str]:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=10_000)
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        lines += [".TP", f".B {escape(invocation)}", escape(" ".join(help_text.split()))]
    return lines


def _commands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[argparse.ArgumentParser, str]]:
    """Every subcommand's parser with its one-line help, depth first."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, command in action.choices.items():
            yield command, helps.get(name, "")
            yield from _commands(command)


def main(argv: list[str] | None = None) -> int:
    from gatewayd.cli import gatewayctl, gatewayd

    parsers = {"gatewayd": gatewayd.build_parser, "gatewayctl": gatewayctl.build_parser}
    args = argparse.ArgumentParser(prog="python -m gatewayd.cli.manpage")
    args.add_argument("program", choices=sorted(parsers))
    program = args.parse_args(argv).program
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.datetime.now(datetime.UTC)
    date = datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch else now
    sys.stdout.write(render(parsers[program](), date.date()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
