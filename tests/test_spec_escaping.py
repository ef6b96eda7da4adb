"""Values quoted from the file into an issue never carry a control character: a newline could
forge a line of `validate`'s output (or of a CI log), an ANSI escape could clear or recolour
the terminal, a bidirectional override could reorder what is read."""

from __future__ import annotations

import pytest

from gardenctl.errors import SpecError
from gardenctl.spec import parse_garden
from gardenctl.spec.yamlsource import SourceMap, format_path
from gardenctl.text import quoted, shown


@pytest.mark.parametrize("raw, escaped", [
    ("plain text: unchanged", "plain text: unchanged"),
    ("a\nb\r\tc", "a\\nb\\r\\tc"),
    ("\x1b[2J\x00\x7f\x9b", "\\x1b[2J\\x00\\x7f\\x9b"),
    ("abc\u202edef\u2028", "abc\\u202edef\\u2028"),
    ("caf\u00e9 \u00fc", "caf\u00e9 \u00fc"),  # printable non-ASCII stays as it is
])
def test_escape_control_writes_control_characters_as_escapes(raw, escaped):
    assert shown(raw) == escaped


def test_quoted_quotes_escapes_and_cuts_long_values():
    assert quoted("a\nb") == "'a\\nb'"
    assert quoted("x" * 1000) == "'" + "x" * 57 + "...' (1,000 characters)"


def test_an_issue_escapes_whatever_its_message_hint_and_path_carry():
    source = SourceMap(file="garden.yaml", values={("k\x1b",): (2, 3)})

    issue = source.issue(("k\x1b",), "bad\nline", hint="do\x1b[2J this")

    assert (issue.message, issue.hint, issue.line) == ("bad\\nline", "do\\x1b[2J this", 2)
    assert issue.path == "'k\\x1b'" == format_path(("k\x1b",))


HOSTILE_MODEL = (
    'name: lab\nmodels:\n'
    '  - name: a\n'
    '    model: "-evil\\nFORGED: all good\\x1b[2J"\n'
    '    host: "0.0.0.0\\nFORGED"\n'
    '    args: ["--x\\nFORGED\\e[31m", "--api-key\\u202e=1", "--port\\x1b", "9"]\n'
)
HOSTILE_KEY = 'name: lab\nmodels:\n  - {name: b, model: org/b, "key\\nFORGED\\x1b[2J": 1}\n'


@pytest.mark.parametrize("text, count", [(HOSTILE_MODEL, 5), (HOSTILE_KEY, 1)],
                         ids=["values", "key"])
def test_values_with_newlines_and_escapes_are_escaped_in_every_message(text, count):
    with pytest.raises(SpecError) as caught:
        parse_garden(text.encode(), "garden.yaml")

    issues = caught.value.issues
    assert len(issues) == count, issues
    for issue in issues:
        line = issue.format()
        assert line.isprintable(), line
        assert "FORGED" not in line or "\\nFORGED" in line
