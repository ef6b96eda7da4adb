"""Safe YAML reading that remembers where every value came from.

`yaml.safe_load` semantics with the surprises taken out:
- one document per file; files over 1 MiB (MAX_FILE_BYTES) and nesting deeper than 32
  (MAX_DEPTH) are refused;
- what the document expands to is bounded, not only the number of aliases: every value and
  key built counts against MAX_VALUES (50,000; the shipped gardens hold 50-130, a 50-model
  garden about 1,000), and its length plus one against MAX_EXPANDED_CHARS (4 MiB of text,
  four times the file size limit). An alias costs what its anchor cost, so the "billion
  laughs" bomb and 990 aliases of one 900 KB string are both refused at the alias that
  crosses a budget, with its file:line:col. Without aliases a file cannot reach the text
  budget (its scalars hold at most twice its size), so ordinary anchors and merges
  (`<<: *defaults`) always work. Both budgets also bound the work of everything after the
  YAML (schema, checks), whatever the file holds;
- duplicate keys are errors (PyYAML silently keeps the last one);
- plain scalars resolve like YAML 1.2's core schema, minus its traps: only true/false are
  booleans (`no`, `on`, `yes` stay strings), integers with leading zeros (`0755`), underscores
  (`1_000`) or sexagesimal (`1:30`) stay strings, and timestamps stay strings. A value of the
  wrong type is then refused by the strict models instead of silently changing meaning;
- every value and every key keeps its line and column, so errors can point at them.

The document is built in one pass over libyaml's event stream: no node tree is composed (it
costs more than the values themselves) and an alias reuses the value its anchor built (values
are never mutated afterwards) instead of copying it, so the work done is bounded by the file's
size plus the budgets above.

Text quoted from the file into a message goes through `shown` or `escape_control`, and
`SourceMap.issue` escapes whatever control character is left, so no message can carry a raw
newline or terminal escape sequence from the file into a terminal or a log.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

from gardenctl.errors import SpecError, SpecIssue
from gardenctl.text import CONTROL, SHOWN_CHARS, printable, quoted

MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_VALUES = 50_000  # values and keys built, alias expansions included
MAX_EXPANDED_CHARS = 4 * MAX_FILE_BYTES  # characters of text built, alias expansions included

Path = tuple[Any, ...]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_NULL = {"", "~", "null", "Null", "NULL"}
_TRUE = {"true", "True", "TRUE"}
_FALSE = {"false", "False", "FALSE"}
_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_HEX = re.compile(r"^0x[0-9a-fA-F]+$")
_OCT = re.compile(r"^0o[0-7]+$")
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_LEADING_ZERO = re.compile(r"^[-+]?0[0-9]")
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
_TAG_TYPES: dict[str, type | tuple[type, ...]] = {
    "tag:yaml.org,2002:int": int,
    "tag:yaml.org,2002:float": (int, float),
    "tag:yaml.org,2002:bool": bool,
    "tag:yaml.org,2002:null": type(None),
}
_UNTAGGED = (None, "!")  # "!" is YAML's non-specific tag: the value resolves as if untagged

# C0 and C1 controls, DEL, line/paragraph separators, zero-width and bidirectional controls:
# characters that move the cursor, forge lines or reorder text when printed.
class Mark(NamedTuple):
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of a YAML document stands in its file.

    Marks are stored as (line, column) tuples, 1-based; lookups return `Mark`s."""

    file: str
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)
    plain_text: dict[Path, str] = field(default_factory=dict)  # unquoted scalars as written

    def value_mark(self, path: Path) -> Mark | None:
        """The mark of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            mark = self.values.get(tuple(path[:end]))
            if mark is not None:
                return Mark(*mark)
        return None

    def key_mark(self, path: Path) -> Mark | None:
        mark = self.keys.get(tuple(path))
        return Mark(*mark) if mark is not None else self.value_mark(path)

    def issue(self, path: Path, message: str, *, hint: str = "", at_key: bool = False,
              severity: str = "error", at: Path | None = None) -> SpecIssue:
        """An issue about ``path``, located at it (or at ``at``, e.g. a missing key's mapping).
        Control characters left in the message or the hint are escaped, and a message that
        quoted a huge value is cut."""
        where = path if at is None else at
        mark = self.key_mark(where) if at_key else self.value_mark(where)
        return SpecIssue(
            message=printable(message),
            path=format_path(path),
            file=self.file,
            line=mark.line if mark else 0,
            column=mark.column if mark else 0,
            hint=printable(hint),
            severity=severity,
        )


def format_path(path: Path) -> str:
    """``("models", 0, "env", "X")`` -> ``models[0].env.X``; a key with control characters is
    escaped and a very long one shortened, since the path is printed with every issue."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if len(text) > SHOWN_CHARS or CONTROL.search(text):
            text = quoted(text)
        out += ("." if out else "") + text
    return out


def _fail(file: str, mark: Mark | None, message: str, hint: str = "") -> SpecError:
    return SpecError(
        [SpecIssue(message=printable(message), file=file, line=mark.line if mark else 0,
                   column=mark.column if mark else 0, hint=printable(hint))]
    )


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a document is built and validated.

    Building a large garden allocates a hundred thousand containers or more (values, paths,
    marks, models) that all stay alive and form no cycle: the collector, triggered every few
    hundred allocations, would re-scan them again and again (a third of the time of a large
    file) and free nothing. Reference counting still frees everything as usual. The collector
    is re-enabled only if it was enabled on entry, so nesting (and a caller that disabled it)
    is respected."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_yaml(text: str, file: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document into plain Python values and a SourceMap; SpecError on bad input."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise _fail(file, None, f"file is larger than {MAX_FILE_BYTES // 1024} KiB",
                    "a garden file is small; split or trim it")
    builder = _Builder(file)
    handlers = builder.handlers
    try:
        for event in yaml.parse(text, Loader=_Loader):
            handler = handlers.get(type(event))
            if handler is not None:
                handler(event)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, file) from None
    except yaml.YAMLError as exc:  # e.g. ReaderError: a control character in the text
        raise _fail(file, _reader_mark(exc, text), _reader_message(exc)) from None
    return builder.root, builder.source


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


def _event_mark(event: yaml.Event) -> tuple[int, int]:
    start = event.start_mark
    return (start.line + 1, start.column + 1) if start else (0, 0)


_MERGE = object()  # the pending key of a mapping whose next value is a `<<` merge

Entry = tuple[dict[Path, Any], Path, Any]  # (source-map table, path, mark or plain text)


class _Frame:
    """A mapping or sequence being built, with what its next child needs to know. Only the
    first four are set on every frame (a deeply nested file builds one per value); the rest
    keep their class defaults unless the frame needs them."""

    key: Any = None  # mappings: the key whose value comes next (None: a key comes)
    key_path: Path = ()  # path + (key,)
    merges: list[tuple[Any, tuple[int, int]]] | None = None  # `<<` values, applied at the end
    merge_list = False  # a sequence of mappings to merge: its items share its path
    anchor: str | None = None
    spent = (0, 0)  # anchored: (values, characters) spent before this container began
    log_start = 0  # anchored: where its source-map entries begin in the builder's log

    def __init__(self, value: dict[str, Any] | list[Any], path: Path, mark: tuple[int, int],
                 is_map: bool) -> None:
        self.value: Any = value  # the dict or list being built
        self.path = path
        self.mark = mark
        self.is_map = is_map


@dataclass(frozen=True)
class _Anchor:
    """What an anchored value built, so that an alias reuses it and is charged for it."""

    value: Any
    values: int
    chars: int
    entries: list[Entry]  # its source-map entries, paths relative to the anchored value


class _Builder:
    """Builds plain values from libyaml events, recording marks and spending the budgets.

    Hot path: a 1 MiB file holds up to MAX_VALUES scalars, so a scalar costs a few attribute
    reads and dict writes; the source-map entries of anchored values are also logged (to be
    replayed under each alias's path) only while an anchor is open."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.source = SourceMap(file=file)
        self.root: Any = None
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Anchor] = {}  # anchors whose value is complete
        self.defined: dict[str, tuple[int, int]] = {}  # every anchor seen, complete or not
        self.values_spent = 0
        self.chars_spent = 0
        self.documents = 0
        self.anchoring = 0  # anchored containers open: while > 0, entries are also logged
        self.log: list[Entry] = []
        self.handlers: dict[type, Callable[[Any], None]] = {  # by event type
            yaml.ScalarEvent: self._scalar,
            yaml.AliasEvent: self._alias,
            yaml.MappingStartEvent: self._start,
            yaml.SequenceStartEvent: self._start,
            yaml.MappingEndEvent: self._end,
            yaml.SequenceEndEvent: self._end,
            yaml.DocumentStartEvent: self._document,
        }

    # -- budgets and records ----------------------------------------------------------------

    def _spend(self, values: int, chars: int, mark: tuple[int, int], alias: str | None) -> None:
        self.values_spent += values
        self.chars_spent += chars
        if self.values_spent > MAX_VALUES or self.chars_spent > MAX_EXPANDED_CHARS:
            raise self._overspent(chars, mark, alias)

    def _overspent(self, chars: int, mark: tuple[int, int], alias: str | None) -> SpecError:
        """The error for the value (or the alias) at ``mark`` that crossed a budget."""
        at = Mark(*mark)
        by_alias = f" at alias *{alias} (repeating {chars:,} characters)" if alias else ""
        if self.values_spent <= MAX_VALUES:
            return _fail(self.file, at,
                         f"the document expands to more than {MAX_EXPANDED_CHARS:,} characters "
                         f"of text ({MAX_EXPANDED_CHARS // MAX_FILE_BYTES}x the file size "
                         f"limit){by_alias}",
                         "anchors and aliases may share a few settings (`<<: *defaults`), not "
                         "repeat large values: write a long value once, or shorten it")
        if alias:
            return _fail(self.file, at,
                         f"the document expands to more than {MAX_VALUES:,} values and keys"
                         f"{by_alias}", "an alias costs everything its anchor holds, so "
                         "aliases that expand exponentially are refused; share small settings")
        return _fail(self.file, at, f"the document holds more than {MAX_VALUES:,} values and keys",
                     "a garden file holds a few thousand; this one is not a garden, or must be "
                     "split")

    def _record(self, table: dict[Path, Any], path: Path, entry: Any) -> None:
        table[path] = entry
        if self.anchoring:
            self.log.append((table, path, entry))

    def _replay(self, anchor: _Anchor, path: Path) -> None:
        """Record an anchor's marks under an alias's path. Entries already there win: a
        mapping's own keys over what `<<` merges into it."""
        values, plain_text = self.source.values, self.source.plain_text
        fresh: set[Path] = set()  # values placed by this alias (their plain text goes too)
        for table, relative, entry in anchor.entries:
            new = path + relative
            if table is plain_text:
                if new not in fresh:
                    continue
            elif new in table:
                continue
            elif table is values:
                fresh.add(new)
            self._record(table, new, entry)

    def _define(self, anchor: str | None, mark: tuple[int, int]) -> None:
        """Note an anchor's definition; like PyYAML's composer, a name is defined once."""
        if anchor is None:
            return
        first = self.defined.get(anchor)
        if first is not None:
            raise _fail(self.file, Mark(*mark),
                        f"not valid YAML: found duplicate anchor {quoted(anchor)} (first "
                        f"defined at line {first[0]})", "give each anchor its own name")
        self.defined[anchor] = mark

    def _check_tag(self, tag: str | None, mark: tuple[int, int]) -> None:
        if tag not in _UNTAGGED and tag not in _KNOWN_TAGS:
            raise _fail(self.file, Mark(*mark), f"unsupported YAML tag {quoted(tag)}",
                        "only plain YAML values are allowed (no Python objects)")

    # -- where the next value goes --------------------------------------------------------

    def _child_path(self, top: _Frame | None, mark: tuple[int, int]) -> Path:
        if top is None:
            return ()
        if top.is_map:
            if top.key is None:
                raise _fail(self.file, Mark(*mark), "a mapping key must be a plain string")
            return top.path if top.key is _MERGE else top.key_path
        return top.path if top.merge_list else top.path + (len(top.value),)

    def _add(self, top: _Frame | None, value: Any, mark: tuple[int, int]) -> None:
        if top is None:
            self.root = value
        elif not top.is_map:
            top.value.append(value)
        elif top.key is _MERGE:
            if top.merges is None:
                top.merges = []
            top.merges.append((value, mark))
            top.key = None
        else:
            top.value[top.key] = value
            top.key = None

    # -- events ---------------------------------------------------------------------------

    def _document(self, event: yaml.DocumentStartEvent) -> None:
        self.documents += 1
        if self.documents > 1:
            raise _fail(self.file, Mark(*_event_mark(event)), "more than one YAML document",
                        "a garden file holds one document; remove the extra '---'")

    def _key(self, event: yaml.ScalarEvent, top: _Frame) -> None:
        """A mapping key (written out inline too: a garden has about as many keys as values)."""
        key = event.value
        tag = event.tag
        start = event.start_mark
        mark = (start.line + 1, start.column + 1) if start else (0, 0)
        if tag is not None:
            self._check_tag(tag, mark)
        if (key == "<<" and tag is None and not event.style) or tag == _MERGE_TAG:
            top.key = _MERGE
            return
        path = top.path + (key,)
        if key in top.value:  # merges are applied at the end: these are the mapping's own keys
            first = self.source.keys.get(path, mark)
            raise _fail(self.file, Mark(*mark),
                        f"duplicate key {quoted(key)} (first defined at line {first[0]})",
                        "each key may appear once; remove one of them")
        self.values_spent += 1
        self.chars_spent += len(key) + 1
        if self.values_spent > MAX_VALUES or self.chars_spent > MAX_EXPANDED_CHARS:
            raise self._overspent(len(key) + 1, mark, None)
        top.key = key
        top.key_path = path
        self.source.keys[path] = mark
        if self.anchoring:
            self.log.append((self.source.keys, path, mark))

    def _scalar(self, event: yaml.ScalarEvent) -> None:
        """A scalar: a key, or a value. The common case (an untagged, unanchored value in a
        list or under a key) is written out inline: it runs for every value of the file."""
        top = self.stack[-1] if self.stack else None
        if top is None or event.anchor is not None or event.tag not in _UNTAGGED:
            self._scalar_value(event, top)
            return
        key = top.key
        if top.is_map:
            if key is None:
                self._key(event, top)
                return
            if key is _MERGE:
                self._scalar_value(event, top)
                return
            path = top.key_path
        elif top.merge_list:
            self._scalar_value(event, top)
            return
        else:
            path = top.path + (len(top.value),)
        text = event.value
        self.values_spent += 1
        self.chars_spent += len(text) + 1
        start = event.start_mark
        mark = (start.line + 1, start.column + 1) if start else (0, 0)
        if self.values_spent > MAX_VALUES or self.chars_spent > MAX_EXPANDED_CHARS:
            raise self._overspent(len(text) + 1, mark, None)
        self.source.values[path] = mark
        if self.anchoring:
            self.log.append((self.source.values, path, mark))
        if event.style:  # quoted or block scalar: always a string
            value: Any = text
            self.source.plain_text.pop(path, None)  # a merged plain value it replaces
        else:
            self._record(self.source.plain_text, path, text)
            value = resolve_plain_scalar(text)
        if top.is_map:
            top.value[key] = value
            top.key = None
        else:
            top.value.append(value)

    def _scalar_value(self, event: yaml.ScalarEvent, top: _Frame | None) -> None:
        """Any scalar value: tagged, anchored, the whole document, or merged with `<<`."""
        if top is not None and top.is_map and top.key is None:
            self._key(event, top)
            return
        mark = _event_mark(event)
        path = self._child_path(top, mark)
        text = event.value
        self._spend(1, len(text) + 1, mark, None)
        anchor = event.anchor
        log_start = len(self.log)
        if anchor is not None:
            self._define(anchor, mark)
            self.anchoring += 1
        self._record(self.source.values, path, mark)
        tag = event.tag
        if tag not in _UNTAGGED:
            self._check_tag(tag, mark)
            value = self._tagged(text, tag, mark)
        elif event.style:
            value = text
            self.source.plain_text.pop(path, None)
        else:
            self._record(self.source.plain_text, path, text)
            value = resolve_plain_scalar(text)
        if anchor is not None:
            spent = (self.values_spent - 1, self.chars_spent - len(text) - 1)
            self._anchor(anchor, value, path, spent, log_start)
        self._add(top, value, mark)

    def _start(self, event: yaml.MappingStartEvent | yaml.SequenceStartEvent) -> None:
        mark = _event_mark(event)
        stack = self.stack
        if len(stack) >= MAX_DEPTH:
            raise _fail(self.file, Mark(*mark), f"nesting deeper than {MAX_DEPTH} levels",
                        "a garden file is shallow; this looks like a malformed file")
        if event.tag is not None:
            self._check_tag(event.tag, mark)
        top = stack[-1] if stack else None
        path = self._child_path(top, mark)
        self._spend(1, 1, mark, None)
        is_map = type(event) is yaml.MappingStartEvent
        frame = _Frame({} if is_map else [], path, mark, is_map)
        if event.anchor is not None:
            self._define(event.anchor, mark)
            self.anchoring += 1
            frame.anchor = event.anchor
            frame.spent = (self.values_spent - 1, self.chars_spent - 1)
            frame.log_start = len(self.log)
        self._record(self.source.values, path, mark)
        if top is not None and top.key is _MERGE and not is_map:
            frame.merge_list = True
        stack.append(frame)

    def _end(self, event: yaml.MappingEndEvent | yaml.SequenceEndEvent) -> None:
        frame = self.stack.pop()
        if frame.merges:
            self._merge(frame)
        if frame.anchor is not None:
            self._anchor(frame.anchor, frame.value, frame.path, frame.spent, frame.log_start)
        self._add(self.stack[-1] if self.stack else None, frame.value, frame.mark)

    def _anchor(self, name: str, value: Any, path: Path, spent: tuple[int, int],
                log_start: int) -> None:
        """Keep an anchored value complete, with its cost and its source-map entries."""
        cut = len(path)
        entries = [(table, old[cut:], entry) for table, old, entry in self.log[log_start:]]
        self.anchors[name] = _Anchor(value, self.values_spent - spent[0],
                                     self.chars_spent - spent[1], entries)
        self.anchoring -= 1
        if not self.anchoring:
            self.log.clear()

    def _merge(self, frame: _Frame) -> None:
        """Apply `<<` merges: a mapping's own keys win, then earlier merge sources."""
        merged: dict[str, Any] = {}
        for value, mark in frame.merges or ():
            sources = value if isinstance(value, list) else [value]
            for source in reversed(sources):
                if not isinstance(source, dict):
                    raise _fail(self.file, Mark(*mark), "'<<' merges only mappings",
                                "write `<<: *anchor` or `<<: [*one, *two]`, anchors of mappings")
                merged.update(source)
        result = frame.value
        for key, value in merged.items():
            result.setdefault(key, value)

    def _alias(self, event: yaml.AliasEvent) -> None:
        mark = _event_mark(event)
        name = event.anchor or ""
        anchor = self.anchors.get(name)
        if anchor is None:
            opened = name in self.defined
            raise _fail(self.file, Mark(*mark),
                        f"alias *{name} is inside its own anchor (a value that contains itself)"
                        if opened else f"not valid YAML: found undefined alias {quoted(name)}",
                        "" if opened else "define the anchor (&name) before its aliases (*name)")
        top = self.stack[-1] if self.stack else None
        path = self._child_path(top, mark)
        self._spend(anchor.values, anchor.chars, mark, name)
        self._replay(anchor, path)
        self._add(top, anchor.value, mark)

    def _tagged(self, text: str, tag: str, mark: tuple[int, int]) -> Any:
        """An explicitly tagged scalar: `!!str 123` is text, `!!int "8"` a number."""
        if tag == _STR_TAG:
            return text
        value = resolve_plain_scalar(text)
        wanted = _TAG_TYPES.get(tag)
        if wanted is None:
            return text
        valid = isinstance(value, wanted) and not (isinstance(value, bool) and wanted is int)
        if not valid:
            kind = tag.rsplit(":", 1)[1]
            raise _fail(self.file, Mark(*mark), f"{quoted(text)} is not a valid {kind}")
        return float(value) if tag.endswith(":float") else value


def resolve_plain_scalar(text: str) -> Any:
    """Resolve an unquoted scalar: None, True/False, int, float, or the text itself."""
    if text in _NULL:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    first = text[:1]
    if not (first.isdigit() or first in "+-."):
        return text  # the common case, a word: no number starts like this
    if _INT.match(text):
        return int(text)
    if _HEX.match(text):
        return int(text, 16)
    if _OCT.match(text):
        return int(text[2:], 8)
    if _FLOAT.match(text) and any(c.isdigit() for c in text):
        if _LEADING_ZERO.match(text) and "." not in text and "e" not in text.lower():
            return text  # 0755: leading zero, keep as written
        return float(text)
    if text in _INF:
        return float("inf")
    if text in _NEG_INF:
        return float("-inf")
    if text in _NAN:
        return float("nan")
    return text
