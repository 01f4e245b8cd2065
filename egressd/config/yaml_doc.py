"""Reading the configuration file safely, and the error every problem is reported as.

The file is parsed with YAML's safe loader into plain values (mappings, tuples,
strings, numbers, dates), remembering the line of every key and value so that
a later check can name ``FILE:LINE`` and the key path.  Documents that would
cost too much to read are refused: files over 4 MiB, too many aliases, too many
values (the "billion laughs" attack), nesting that is too deep, custom tags and
merge keys.  :class:`ConfigError` is the one error this package raises.
"""

from __future__ import annotations

import os
import re
from datetime import date, datetime
from typing import Final

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_FILE_BYTES: Final = 4 * 1024 * 1024
"""Larger files are refused unread: a policy is a few kilobytes."""
MAX_ALIASES: Final = 100
"""YAML aliases (``*name``) allowed in one file."""
MAX_NODES: Final = 100_000
"""Values allowed in one file, counting each alias as often as it is used
(this is what stops "billion laughs" documents)."""
MAX_DEPTH: Final = 32
"""How deeply lists and mappings may nest."""

PathPart = str | int
KeyPath = tuple[PathPart, ...]


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NO_VALUE: Final = _NoValue()
"""``ConfigError.value`` when the error is not about one value (missing key, bad file)."""


_PREDICATES: Final = ("is ", "has ", "duplicates ")


class ConfigError(ValueError):
    """The configuration file is unusable; ``str()`` says where and why, in one line.

    The CLI prints the text and exits with status 2.  ``line`` is 1-based
    (None when the problem is the file itself, e.g. unreadable), ``key_path``
    is like ``routes[0].to.countries[1]`` (empty when not about a key), and
    ``value`` is the offending value (:data:`NO_VALUE` when there is none).
    """

    def __init__(
        self,
        file: str,
        line: int | None,
        key_path: str,
        message: str,
        value: object = NO_VALUE,
    ) -> None:
        self.file = file
        self.line = line
        self.key_path = key_path
        self.value = value
        self.message = message
        parts = [file if line is None else f"{file}:{line}"]
        if key_path:
            parts.append(key_path)
        text = ": ".join(parts)
        if value is not NO_VALUE:
            # "'UK' is not ..." reads as a sentence; "70000: expected ..." does not.
            sep = " " if message.startswith(_PREDICATES) else ": "
            text = f"{text}: {_show(value)}{sep}{message}"
        else:
            text = f"{text}: {message}"
        super().__init__(_one_line(text))

    def __str__(self) -> str:
        return str(self.args[0])


def read_limited(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of a file of at most ``limit`` bytes; :class:`ConfigError` naming it otherwise.

    ``what`` names the file in the message (``cannot read the <what>: …``).
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(name, None, "", f"cannot read the {what}: {reason}") from None
    if len(data) > limit:
        raise ConfigError(name, None, "", f"file is larger than the limit of "
                          f"{limit // (1024 * 1024)} MiB")
    return data


def _one_line(text: str) -> str:
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


def _plain(value: object) -> object:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _show(value: object) -> str:
    """How a value appears in messages: as close to YAML as repr allows."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date):
        return value.isoformat()
    text = repr(_plain(value))
    if len(text) > 80:
        text = text[:77] + "..."
    return _one_line(text)


def format_key_path(path: KeyPath) -> str:
    """``("routes", 0, "to", "countries", 1)`` → ``routes[0].to.countries[1]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


# ---------------------------------------------------------------------------
# YAML → plain values, remembering the line of every key and value
# ---------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp"))


class _Refused(Exception):
    """Raised inside the loader; turned into a ConfigError by the caller."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _CountingLoader(yaml.SafeLoader):
    """The safe loader, limited in aliases and nesting while it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0
        self.depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _Refused(line, f"more than {MAX_ALIASES} YAML aliases (*name)")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _Refused(line, f"lists and mappings nested more than {MAX_DEPTH} deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Document:
    """A YAML document as plain values plus the line of each key and value."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: dict[KeyPath, int] = {}
        self.key_lines: dict[KeyPath, int] = {}
        self.nodes = 0
        self._constructor = yaml.constructor.SafeConstructor()
        self._open: set[int] = set()

    def error(self, path: KeyPath, message: str, value: object = NO_VALUE) -> ConfigError:
        return ConfigError(self.name, self.line_of(path), format_key_path(path), message, value)

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the value at ``path``, or of the nearest enclosing value."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def convert(self, node: Node, path: KeyPath) -> object:
        self.nodes += 1
        line = node.start_mark.line + 1
        if self.nodes > MAX_NODES:
            raise ConfigError(
                self.name, line, "", f"more than {MAX_NODES} values (aliases count each use)"
            )
        self.lines[path] = line
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._open:
            raise self.error(path, "a YAML alias refers to a list or mapping that contains it")
        self._open.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _TAG + "seq":
                    raise self.error(path, f"unsupported YAML tag {_short_tag(node.tag)}")
                return tuple(self.convert(item, (*path, i)) for i, item in enumerate(node.value))
            if isinstance(node, MappingNode):
                if node.tag != _TAG + "map":
                    raise self.error(path, f"unsupported YAML tag {_short_tag(node.tag)}")
                return self._mapping(node, path)
        finally:
            self._open.discard(id(node))
        raise self.error(path, "unsupported YAML node")  # pragma: no cover

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, object]:
        out: dict[str, object] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                raise ConfigError(
                    self.name, key_line, format_key_path(path), "keys must be plain names"
                )
            if key_node.tag == _TAG + "merge":
                raise ConfigError(
                    self.name,
                    key_line,
                    format_key_path(path),
                    "YAML merge keys (<<) are not supported: write the keys out",
                )
            # Keys are names: a key YAML would read as a number, a date or
            # true/false is taken as written.
            key = key_node.value if key_node.tag != _TAG + "str" else str(key_node.value)
            key_path = (*path, key)
            if key in out:
                raise ConfigError(
                    self.name,
                    key_line,
                    format_key_path(key_path),
                    f"duplicates the key at line {self.key_lines[key_path]}",
                )
            self.key_lines[key_path] = key_line
            out[key] = self.convert(value_node, key_path)
        return out

    def _scalar(self, node: ScalarNode, path: KeyPath) -> object:
        tag = node.tag
        if tag == _TAG + "str":
            return node.value
        if tag not in _SCALAR_TAGS:
            raise self.error(path, f"unsupported YAML tag {_short_tag(tag)}", node.value)
        if tag == _TAG + "bool" and node.style is None and _wants_text(path):
            # A bare NO in a list of countries is Norway, not false.
            return node.value
        try:
            return self._constructor.construct_object(node)
        except (ValueError, KeyError, TypeError, OverflowError, yaml.YAMLError):
            kind = tag.removeprefix(_TAG)
            what = "date" if kind == "timestamp" else kind
            raise self.error(path, f"is not a valid {what}", node.value) from None


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _wants_text(path: KeyPath) -> bool:
    """Paths whose values are country codes, where a bare ``NO`` means Norway."""
    return (len(path) == 2 and path[0] == "home_countries") or (
        len(path) == 5 and path[0] == "routes" and path[2:4] == ("to", "countries")
    )


def _decode(data: bytes, name: str) -> str:
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            name, None, "", f"file is {len(data)} bytes, more than the limit of 4 MiB"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            name, line, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    return text.removeprefix("\ufeff")


def _compose(text: str, name: str) -> Node | None:
    loader: _CountingLoader | None = None
    try:
        loader = _CountingLoader(text)
        return loader.get_single_node()
    except _Refused as exc:
        raise ConfigError(name, exc.line, "", exc.message) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or exc.context or "unreadable"
        if exc.context and exc.problem:
            if exc.problem.startswith("but "):
                what = f"{exc.context}, {exc.problem}"
            else:
                what = f"{exc.problem} ({exc.context})"
        raise ConfigError(name, line, "", f"invalid YAML: {what}") from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            name, line, "", f"invalid YAML: character U+{exc.character:04X} is not allowed"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, None, "", f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(name, None, "", "invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_document(data: bytes, name: str) -> tuple[_Document, dict[str, object]]:
    text = _decode(data, name)
    node = _compose(text, name)
    if node is None:
        raise ConfigError(name, 1, "", "the file is empty: expected a mapping with home_countries")
    doc = _Document(name)
    value = doc.convert(node, ())
    if not isinstance(value, dict):
        raise ConfigError(
            name,
            node.start_mark.line + 1,
            "",
            "the top level must be a mapping of keys such as home_countries, not "
            + ("a list" if isinstance(value, tuple) else f"the value {_show(value)}"),
        )
    return doc, value
