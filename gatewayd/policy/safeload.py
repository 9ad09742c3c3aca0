"""One reader for every YAML and JSON document a user or a peer can feed the daemons.

PyYAML's loaders trust their input: libyaml's C composer recurses once per nesting level
(a 60 KB file nested 25,000 deep kills the process), aliases and merge keys (`<<`) expand
into structures exponentially larger than the file, and explicit tags or 5,000-digit
integers end in exceptions that are not YAML errors. This reader takes only libyaml's
event stream, which it walks without recursion, and builds the values itself:

- size, nesting depth and the number of values are bounded (`Limits`) while reading, so
  the parser never gets past the first level too many;
- anchors, aliases, merge keys and explicit tags (other than `!!str`) are refused;
- duplicate mapping keys are refused with both lines (Kubernetes' strict decoding does so);
- plain scalars resolve as in YAML 1.1 (PyYAML's SafeLoader), except that timestamps stay
  strings (as Kubernetes reads them), and numbers longer than `MAX_NUMBER_CHARACTERS`
  are refused;
- mappings and lists remember their lines (`LineDict`, `LineList`) for error messages.

Every failure is a `DocumentError` naming the file and, where known, the line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

# libyaml's parser where PyYAML was built with it (it is, from PyPI): several times faster.
_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_TAG = "tag:yaml.org,2002:"
MAX_NUMBER_CHARACTERS = 100
_QUOTE_CHARACTERS = 60


@dataclass(frozen=True)
class Limits:
    """Bounds no real input comes near; a file beyond them is refused before it is used."""

    max_bytes: int
    max_depth: int  # nested mappings and lists
    max_values: int  # scalars, mappings and lists in the whole file


# Snapshots (a `kubectl get -o yaml` dump of thousands of pods is a few MB, nested about
# 15 deep) and saved plans (a few bytes per source address).
DOCUMENT_LIMITS = Limits(max_bytes=32 * 2**20, max_depth=100, max_values=2_000_000)
# A host's config file is a page of settings.
CONFIG_LIMITS = Limits(max_bytes=2**20, max_depth=32, max_values=100_000)
# What the CLI takes for standard input in place of a file, and how errors name it.
STDIN = "-"
STDIN_NAME = "<stdin>"


class DocumentError(ValueError):
    """`str()` is `FILE[:LINE]: message`."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        super().__init__(file, line, message)
        self.file = file
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


class LineDict(dict[Any, Any]):
    """A mapping that remembers its own line and the line of each key (1-based)."""

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}


class LineList(list[Any]):
    """A list that remembers its own line and the line of each item (1-based)."""

    def __init__(self, line: int = 0) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


def describe(value: object) -> str:
    """A value for an error message: scalars quoted (and shortened), never a structure."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple | set | frozenset):
        return "a list"
    text = repr(value)
    if len(text) > _QUOTE_CHARACTERS:
        text = text[:_QUOTE_CHARACTERS] + "…"
    return text


def read_text(path: Path, limits: Limits) -> str:
    """The file as text: at most `limits.max_bytes`, UTF-8 (a byte order mark is allowed)."""
    file = str(path)
    try:
        with path.open("rb") as stream:
            return read_stream(stream, file, limits)
    except OSError as exc:
        raise DocumentError(file, None, f"cannot read: {exc.strerror or exc}") from exc


def read_stream(stream: IO[bytes], file: str, limits: Limits) -> str:
    """An open file (standard input, say) as text, bounded as `read_text`; `file` names it in
    errors."""
    try:
        data = stream.read(limits.max_bytes + 1)
    except OSError as exc:
        raise DocumentError(file, None, f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > limits.max_bytes:
        raise DocumentError(file, None, f"larger than {limits.max_bytes} bytes: refused")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DocumentError(file, line, f"not UTF-8 text (byte {exc.start})") from exc


def load_yaml_file(path: Path, limits: Limits) -> list[tuple[int, Any]]:
    return parse_yaml(read_text(path, limits), str(path), limits)


def load_json_file(path: Path, limits: Limits) -> Any:
    return parse_json(read_text(path, limits), str(path), limits)


def load_stdin_documents(stream: IO[bytes], limits: Limits) -> list[tuple[int | None, Any]]:
    """The documents piped in: JSON when the text starts with `{` or `[` (as kubectl's
    decoder decides), else YAML; errors name `<stdin>`."""
    text = read_stream(stream, STDIN_NAME, limits)
    if text.lstrip().startswith(("{", "[")):
        return [(None, parse_json(text, STDIN_NAME, limits))]
    return list(parse_yaml(text, STDIN_NAME, limits))


def parse_yaml(text: str, file: str, limits: Limits) -> list[tuple[int, Any]]:
    """The documents of a YAML stream, each with the line its value starts on; empty
    documents are None."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes:
        raise DocumentError(file, None, f"larger than {limits.max_bytes} bytes: refused")
    builder = _Builder(file, limits)
    try:
        for event in yaml.parse(text, Loader=_Parser):
            builder.take(event)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        context = f" ({exc.context})" if exc.context else ""
        raise DocumentError(file, line, f"YAML syntax error: {exc.problem}{context}") from exc
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise DocumentError(file, line, f"the character U+{code:04X} is not allowed in "
                                        "YAML") from exc
    except yaml.YAMLError as exc:
        raise DocumentError(file, None, f"YAML error: {exc}") from exc
    return builder.documents


def parse_json(text: str, file: str, limits: Limits) -> Any:
    """One JSON value; duplicate keys, NaN and Infinity are refused, and the same bounds
    as for YAML hold."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.max_bytes:
        raise DocumentError(file, None, f"larger than {limits.max_bytes} bytes: refused")

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, value in pairs:
            if name in result:
                raise DocumentError(file, None, f"JSON: duplicate key {describe(name)}")
            result[name] = value
        return result

    def refuse_constant(name: str) -> float:
        raise DocumentError(file, None, f"JSON: {name} is not a number JSON allows")

    try:
        value = json.loads(text, object_pairs_hook=refuse_duplicates,
                           parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise DocumentError(file, exc.lineno, f"JSON syntax error: {exc.msg}") from exc
    except RecursionError as exc:
        raise DocumentError(file, None,
                            f"nested deeper than {limits.max_depth} levels: refused") from exc
    except DocumentError:
        raise
    except ValueError as exc:  # e.g. an integer beyond Python's 4,300 digits
        raise DocumentError(file, None, f"JSON: unusable value: {exc}") from exc
    _check_bounds(value, file, limits)
    return value


def _check_bounds(value: Any, file: str, limits: Limits) -> None:
    """Depth and count of a decoded JSON value, walked without recursion."""
    pending: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    count = 1
    while pending:
        container, depth = pending.pop()
        if depth > limits.max_depth:
            raise DocumentError(file, None,
                                f"nested deeper than {limits.max_depth} levels: refused")
        children = container.values() if isinstance(container, dict) else container
        count += len(children)
        if count > limits.max_values:
            raise DocumentError(file, None, f"more than {limits.max_values} values: refused")
        for child in children:
            if isinstance(child, dict | list):
                pending.append((child, depth + 1))
            elif isinstance(child, float) and not math.isfinite(child):
                raise DocumentError(file, None, "JSON: a number out of range")
    if isinstance(value, float) and not math.isfinite(value):
        raise DocumentError(file, None, "JSON: a number out of range")


def _line(event: yaml.Event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 0


def _short(tag: str) -> str:
    return describe(tag.replace(_TAG, "!!"))


_NO_KEY: Any = object()


@dataclass
class _Open:
    """A mapping or list being read, and for a mapping the key waiting for its value."""

    value: LineDict | LineList
    key: Any = _NO_KEY
    key_line: int = 0


class _Builder:
    def __init__(self, file: str, limits: Limits) -> None:
        self.file = file
        self.limits = limits
        self.documents: list[tuple[int, Any]] = []
        self.stack: list[_Open] = []
        self.values = 0

    def fail(self, event: yaml.Event, message: str) -> DocumentError:
        return DocumentError(self.file, _line(event), message)

    def take(self, event: yaml.Event) -> None:
        line = _line(event)
        if isinstance(event, yaml.AliasEvent):
            raise self.fail(event, f"aliases (*{event.anchor}) are not accepted: write the "
                                   "value out")
        if isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            closed = self.stack.pop()
            self.add(closed.value, closed.value.line)
            return
        if not isinstance(event, yaml.NodeEvent):
            return  # stream start and end, document end
        if event.anchor is not None:
            raise self.fail(event, f"anchors (&{event.anchor}) are not accepted: write the "
                                   "value out")
        self.values += 1
        if self.values > self.limits.max_values:
            raise self.fail(event, f"more than {self.limits.max_values} values: refused")
        if isinstance(event, yaml.ScalarEvent):
            self.add(self.scalar(event), line)
            return
        assert isinstance(event, yaml.CollectionStartEvent)
        if event.tag not in (None, "!"):
            raise self.fail(event, f"the tag {_short(event.tag)} is not accepted")
        if self.stack and self.stack[-1].key is _NO_KEY and isinstance(
            self.stack[-1].value, LineDict
        ):
            raise self.fail(event, "a mapping key must be a single value, not a mapping or list")
        if len(self.stack) >= self.limits.max_depth:
            raise self.fail(event, f"nested deeper than {self.limits.max_depth} levels: refused")
        opened = LineDict(line) if isinstance(event, yaml.MappingStartEvent) else LineList(line)
        self.stack.append(_Open(opened))

    def scalar(self, event: yaml.ScalarEvent) -> Any:
        value: str = event.value
        if event.tag in ("!", f"{_TAG}str"):
            return value
        if event.tag is not None:
            raise self.fail(event, f"the tag {_short(event.tag)} is not accepted (quote "
                                   "the value instead)")
        tag = _RESOLVER.resolve(yaml.ScalarNode, value, event.implicit)  # type: ignore[no-untyped-call]
        if tag == f"{_TAG}merge":
            raise self.fail(event, "merge keys (<<) are not accepted: write the keys out")
        if tag == f"{_TAG}null":
            return None
        if tag == f"{_TAG}bool":
            return _CONSTRUCTOR.bool_values[value.lower()]
        if tag in (f"{_TAG}int", f"{_TAG}float"):
            if len(value) > MAX_NUMBER_CHARACTERS:
                raise self.fail(event, f"a number of more than {MAX_NUMBER_CHARACTERS} "
                                       "characters is not accepted")
            node = yaml.ScalarNode(tag, value)
            try:
                if tag == f"{_TAG}int":
                    return _CONSTRUCTOR.construct_yaml_int(node)
                return _CONSTRUCTOR.construct_yaml_float(node)
            except (ValueError, OverflowError) as exc:
                raise self.fail(event, f"not a number: {describe(value)}") from exc
        return value  # a string; timestamps stay strings, as in Kubernetes

    def add(self, value: Any, line: int) -> None:
        if not self.stack:
            self.documents.append((line, value))
            return
        top = self.stack[-1]
        if isinstance(top.value, LineList):
            top.value.append(value)
            top.value.item_lines.append(line)
        elif top.key is _NO_KEY:
            top.key, top.key_line = value, line
        else:
            mapping, key = top.value, top.key
            if key in mapping:
                raise DocumentError(
                    self.file, top.key_line,
                    f"duplicate key {describe(key)} (first on line {mapping.key_lines[key]})",
                )
            mapping[key] = value
            mapping.key_lines[key] = top.key_line
            top.key = _NO_KEY
