"""Safe YAML reading that remembers where every value came from.

`yaml.safe_load` semantics with the surprises taken out:
- one document per file; files over 1 MiB, nesting deeper than 32 and alias expansion beyond
  a fixed budget (the "billion laughs" bomb) are refused before any value is built;
- duplicate keys are errors (PyYAML silently keeps the last one);
- plain scalars resolve like YAML 1.2's core schema, minus its traps: only true/false are
  booleans (`no`, `on`, `yes` stay strings), integers with leading zeros (`0755`), underscores
  (`1_000`) or sexagesimal (`1:30`) stay strings, and timestamps stay strings. A value of the
  wrong type is then refused by the strict models instead of silently changing meaning;
- every value and every key keeps its line and column, so errors can point at them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from gardenctl.errors import SpecError, SpecIssue

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_VALUES = 200_000  # values built, alias expansions included

Path = tuple[Any, ...]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_NULL = {"", "~", "null", "Null", "NULL"}
_TRUE = {"true", "True", "TRUE"}
_FALSE = {"false", "False", "FALSE"}
_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_HEX = re.compile(r"^0x[0-9a-fA-F]+$")
_OCT = re.compile(r"^0o[0-7]+$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_INF = {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"}
_NEG_INF = {"-.inf", "-.Inf", "-.INF"}
_NAN = {".nan", ".NaN", ".NAN"}

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_KNOWN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
    _MERGE_TAG,
}


@dataclass(frozen=True)
class Mark:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of a YAML document stands in its file."""

    file: str
    values: dict[Path, Mark] = field(default_factory=dict)
    keys: dict[Path, Mark] = field(default_factory=dict)
    plain_text: dict[Path, str] = field(default_factory=dict)  # unquoted scalars as written

    def value_mark(self, path: Path) -> Mark | None:
        """The mark of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            mark = self.values.get(tuple(path[:end]))
            if mark is not None:
                return mark
        return None

    def key_mark(self, path: Path) -> Mark | None:
        return self.keys.get(tuple(path)) or self.value_mark(path)

    def issue(self, path: Path, message: str, *, hint: str = "", at_key: bool = False,
              severity: str = "error", at: Path | None = None) -> SpecIssue:
        """An issue about ``path``, located at it (or at ``at``, e.g. a missing key's mapping)."""
        where = path if at is None else at
        mark = self.key_mark(where) if at_key else self.value_mark(where)
        return SpecIssue(
            message=message,
            path=format_path(path),
            file=self.file,
            line=mark.line if mark else 0,
            column=mark.column if mark else 0,
            hint=hint,
            severity=severity,
        )


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _fail(file: str, mark: Mark | None, message: str, hint: str = "") -> SpecError:
    return SpecError(
        [SpecIssue(message=message, file=file, line=mark.line if mark else 0,
                   column=mark.column if mark else 0, hint=hint)]
    )


def read_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document into plain Python values and a SourceMap; SpecError on bad input."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise _fail(file, None, f"file is larger than {MAX_FILE_BYTES // 1024} KiB",
                    "a garden file is small; split or trim it")
    explicit = _prescan(text, file)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, file) from None
    except yaml.YAMLError as exc:  # e.g. ReaderError: a control character in the text
        raise _fail(file, _reader_mark(exc, text), _reader_message(exc)) from None
    source = SourceMap(file=file)
    if root is None:
        return None, source
    builder = _Builder(file, source, explicit)
    return builder.build(root, ()), source


def _yaml_error(exc: yaml.MarkedYAMLError, file: str) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    where = Mark(mark.line + 1, mark.column + 1) if mark else None
    problem = exc.problem or "invalid YAML"
    if exc.context:
        problem = f"{exc.context}, {problem}"
    hint = ""
    if "tab" in problem.lower():
        hint = "indent with spaces, not tabs"
    elif "mapping values are not allowed" in problem:
        hint = "a value containing ': ' must be quoted"
    return _fail(file, where, f"not valid YAML: {problem}", hint)


def _prescan(text: str, file: str) -> dict[tuple[int, int], str]:
    """Check depth, document count and alias use on the event stream, before building anything.
    Returns the explicitly tagged scalars (`!!str 123`), by position: the node tree does not
    tell an explicit tag from a resolved one."""
    depth = 0
    documents = 0
    aliases = 0
    explicit: dict[tuple[int, int], str] = {}
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _fail(file, Mark(event.start_mark.line + 1, event.start_mark.column + 1),
                                f"nesting deeper than {MAX_DEPTH} levels",
                                "a garden file is shallow; this looks like a malformed file")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise _fail(file, Mark(event.start_mark.line + 1, event.start_mark.column + 1),
                                "more than one YAML document", "a garden file holds one document; "
                                "remove the extra '---'")
            elif isinstance(event, yaml.ScalarEvent) and event.tag not in (None, "!"):
                explicit[(event.start_mark.line, event.start_mark.column)] = event.tag
            elif isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > 1000:
                    raise _fail(file, Mark(event.start_mark.line + 1, event.start_mark.column + 1),
                                "too many aliases (over 1000)")
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, file) from None
    except yaml.YAMLError as exc:  # e.g. ReaderError: a control character in the text
        raise _fail(file, _reader_mark(exc, text), _reader_message(exc)) from None
    return explicit


def _reader_message(exc: yaml.YAMLError) -> str:
    reason = getattr(exc, "reason", None)
    character = getattr(exc, "character", None)
    if reason and isinstance(character, str):
        return f"not valid YAML: {reason} (character U+{ord(character):04X})"
    return f"not valid YAML: {str(exc).splitlines()[0]}"


def _reader_mark(exc: yaml.YAMLError, text: str) -> Mark | None:
    position = getattr(exc, "position", None)
    if not isinstance(position, int):
        return None
    before = text[:position]
    return Mark(before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1)


class _Builder:
    def __init__(self, file: str, source: SourceMap,
                 explicit: dict[tuple[int, int], str] | None = None) -> None:
        self.file = file
        self.source = source
        self.explicit = explicit or {}
        self.budget = MAX_VALUES

    def _spend(self, node: yaml.Node) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _fail(self.file, _mark(node),
                        f"the document expands to more than {MAX_VALUES} values",
                        "aliases that expand exponentially are refused")

    def build(self, node: yaml.Node, path: Path) -> Any:
        self._spend(node)
        self.source.values.setdefault(path, _mark(node))
        if node.tag not in _KNOWN_TAGS:
            raise _fail(self.file, _mark(node), f"unsupported YAML tag {node.tag!r}",
                        "only plain YAML values are allowed (no Python objects)")
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        seen: dict[str, Mark] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.update(self._merge_sources(value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise _fail(self.file, _mark(key_node), "a mapping key must be a plain string")
            key = key_node.value
            key_mark = _mark(key_node)
            if key in seen:
                first = seen[key]
                raise _fail(self.file, key_mark,
                            f"duplicate key {key!r} (first defined at line {first.line})",
                            "each key may appear once; remove one of them")
            seen[key] = key_mark
            self.source.keys[path + (key,)] = key_mark
            result[key] = self.build(value_node, path + (key,))
        for key, value in merged.items():
            result.setdefault(key, value)
        return result

    def _merge_sources(self, node: yaml.Node, path: Path) -> dict[str, Any]:
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        merged: dict[str, Any] = {}
        for source in reversed(nodes):
            if not isinstance(source, yaml.MappingNode):
                raise _fail(self.file, _mark(source), "'<<' merges only mappings")
            merged.update(self._mapping(source, path))
        return merged

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        tag = self.explicit.get((node.start_mark.line, node.start_mark.column))
        if tag is not None:
            return self._tagged(node, tag)
        if node.style:  # quoted or block scalar: always a string
            return node.value
        self.source.plain_text[path] = node.value
        return resolve_plain_scalar(node.value)

    def _tagged(self, node: yaml.ScalarNode, tag: str) -> Any:
        """An explicitly tagged scalar: `!!str 123` is text, `!!int "8"` a number."""
        if tag == _STR_TAG:
            return node.value
        value = resolve_plain_scalar(node.value)
        wanted = {"tag:yaml.org,2002:int": int, "tag:yaml.org,2002:float": (int, float),
                  "tag:yaml.org,2002:bool": bool, "tag:yaml.org,2002:null": type(None)}.get(tag)
        if wanted is None:
            return node.value
        if isinstance(value, bool) and wanted is int or not isinstance(value, wanted):
            kind = tag.rsplit(":", 1)[1]
            raise _fail(self.file, _mark(node), f"{node.value!r} is not a valid {kind}")
        return float(value) if tag.endswith(":float") else value


def resolve_plain_scalar(text: str) -> Any:
    """Resolve an unquoted scalar: None, True/False, int, float, or the text itself."""
    if text in _NULL:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if _INT.match(text):
        return int(text)
    if _HEX.match(text):
        return int(text, 16)
    if _OCT.match(text):
        return int(text[2:], 8)
    if _FLOAT.match(text) and any(c.isdigit() for c in text):
        if re.match(r"^[-+]?0[0-9]", text) and "." not in text and "e" not in text.lower():
            return text  # 0755: leading zero, keep as written
        return float(text)
    if text in _INF:
        return float("inf")
    if text in _NEG_INF:
        return float("-inf")
    if text in _NAN:
        return float("nan")
    return text
