"""Text for people, from values that came from a file: one line, no terminal control.

A model id, a flag or a cause may contain a newline (and so forge a line of `plan`'s output), an
ANSI escape (and clear or recolour a terminal) or a bidirectional override (and reorder what
is read). `shown` writes every such character as a visible escape; JSON output needs none of
this (its encoder escapes them).
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"}


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100
                                else f"\\u{ord(char):04x}")


def shown(text: object) -> str:
    """``text`` as one line a terminal shows as it is: control characters escaped."""
    return _UNSAFE.sub(_escape, str(text))


__all__ = ["shown"]
