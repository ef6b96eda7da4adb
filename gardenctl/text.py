"""Text for people, from values that came from a file: one line, no terminal control.

A model id, a flag or a cause may contain a newline (and so forge a line of `plan`'s output), an
ANSI escape (and clear or recolour a terminal), or a bidirectional override or zero-width
character (and reorder or hide what is read). Every such character is written as a visible
Python-style escape (`\\n`, `\\x1b`, `\\u202e`). JSON output needs none of this (its encoder
escapes them). The one home of these rules: the spec's error messages, plans, status and the
event log all use it.
"""

from __future__ import annotations

import re

SHOWN_CHARS = 60  # longest piece of a value quoted in a message
MAX_MESSAGE_CHARS = 1000  # longer, a message or hint has quoted a value it should not have

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: object) -> str:
    """``text`` as one line a terminal shows as it is: control characters escaped."""
    return CONTROL.sub(_escape_one, str(text))


def quoted(value: object, limit: int = SHOWN_CHARS) -> str:
    """A value from the file as a message quotes it: repr-style, control characters escaped,
    cut to about ``limit`` characters (a 1 MiB value is not worth repeating)."""
    if isinstance(value, str) and len(value) > limit:
        return shown(repr(value[: limit - 3] + "...")) + f" ({len(value):,} characters)"
    return shown(repr(value))


def inline(text: str, limit: int = SHOWN_CHARS) -> str:
    """Text from the file inside a message, unquoted (a flag, a host): escaped and cut."""
    if len(text) > limit:
        return shown(text[: limit - 3]) + f"... ({len(text):,} characters)"
    return shown(text)


def printable(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message or hint as an issue carries it: escaped, and cut if some validator quoted a
    whole (perhaps megabyte-long) value into it."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text):,} characters)"
    return shown(text)


__all__ = ["CONTROL", "MAX_MESSAGE_CHARS", "SHOWN_CHARS", "inline", "printable", "quoted",
           "shown"]
