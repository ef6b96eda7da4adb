"""The garden file's reader does bounded work on any file: alias expansion is charged by what it
expands to, the values built are counted, and a file with thousands of mistakes is reported as
a bounded number of issues plus one summary. (How long these take is measured by
benchmarks/validate_worst_case.py, never asserted here.)"""

from __future__ import annotations

import pytest

from gardenctl.errors import SpecError, SpecIssue
from gardenctl.spec import parse_garden
from gardenctl.spec.checks import MAX_ERRORS, MAX_SUGGESTIONS, MAX_WARNINGS
from gardenctl.spec.yamlsource import MAX_EXPANDED_CHARS, MAX_VALUES, read_yaml

ONE_MODEL = "name: lab\nmodels:\n  - name: a\n    model: org/a\n"


def issues_of(text: str) -> list[SpecIssue]:
    with pytest.raises(SpecError) as caught:
        parse_garden(text.encode(), "garden.yaml")
    return caught.value.issues


def only_issue(text: str) -> SpecIssue:
    issues = issues_of(text)
    assert len(issues) == 1, issues
    return issues[0]


def line_of(text: str, index: int, marker: str) -> int:
    """1-based line of the index-th (0-based) line that contains ``marker``."""
    lines = [n for n, line in enumerate(text.splitlines(), 1) if marker in line]
    return lines[index]


# -- alias expansion: bounded by size -------------------------------------------------------


def test_aliases_repeating_a_long_string_are_refused_at_the_alias_that_crosses_the_budget():
    size = 500_000  # each alias repeats half a megabyte: the 8th one passes 4 MiB in all
    text = ONE_MODEL + "    args:\n      - &big '--" + "x" * (size - 2) + "'\n"
    text += "      - *big\n" * 20

    issue = only_issue(text)

    crossing = MAX_EXPANDED_CHARS // (size + 1)  # the anchor, then this many aliases fit
    assert (issue.file, issue.line, issue.column) == (
        "garden.yaml", line_of(text, crossing - 1, "*big"), 9)
    assert "alias *big" in issue.message and f"{MAX_EXPANDED_CHARS:,} characters" in issue.message
    assert "repeating 500,001 characters" in issue.message
    assert "<<: *defaults" in issue.hint and "write a long value once" in issue.hint


def test_a_900_kb_string_aliased_990_times_is_refused_without_expanding_it():
    text = ONE_MODEL + "    args: [&a '--" + "x" * 900_000 + "'" + ", *a" * 990 + "]\n"

    issue = only_issue(text)

    assert issue.line == 5 and issue.column > 900_000  # an alias on the args line
    assert "characters of text" in issue.message and "alias *a" in issue.message


def test_an_alias_bomb_of_tiny_values_is_refused_by_the_value_budget():
    text = "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
    for prev, name in zip("abcdefghi", "bcdefghij", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"

    issue = only_issue(text)

    assert f"expands to more than {MAX_VALUES:,} values and keys at alias *" in issue.message
    assert issue.line > 1 and issue.column > 0


def test_a_file_of_many_tiny_values_is_refused_where_it_crosses_the_value_budget():
    text = "name: lab\nmodels: []\nx: [" + "0," * (MAX_VALUES + 10) + "0]\n"

    issue = only_issue(text)

    assert (issue.line, issue.message) == (
        3, f"the document holds more than {MAX_VALUES:,} values and keys")
    assert "a few thousand" in issue.hint


def test_a_garden_with_anchors_and_merges_keeps_working():
    loaded = parse_garden(b"""\
name: lab
defaults: &defaults
  max_model_len: 8192
models:
  - &small {name: a, model: org/a, min_concurrency: 2, args: &common [--enable-prefix-caching]}
  - <<: *small
    name: b
    model: org/b
  - {<<: [*small, {max_num_seqs: 8}], name: c, min_concurrency: 4, args: *common}
""", "garden.yaml")

    a, b, c = loaded.garden.resolved_models()
    assert (a.max_model_len, b.model, b.min_concurrency) == (8192, "org/b", 2)
    assert b.args == ["--enable-prefix-caching"]
    assert (c.min_concurrency, c.max_num_seqs, c.args) == (4, 8, ["--enable-prefix-caching"])


def test_an_error_in_a_merged_value_is_located_at_its_anchor_with_the_merging_path():
    text = """\
name: lab
models:
  - &base {name: a, model: org/a, max_model_len: lots}
  - {<<: *base, name: b}
"""
    issues = issues_of(text)

    assert [(i.path, i.line) for i in issues] == [("models[0].max_model_len", 3),
                                                   ("models[1].max_model_len", 3)]


def test_own_keys_win_over_merged_ones_wherever_the_merge_is_written():
    data, source = read_yaml("a: &a {x: 1, y: 2}\nb: {x: 3, <<: *a}\nc: {<<: *a, x: 4}\n", "f")

    assert data["b"] == {"x": 3, "y": 2} and data["c"] == {"x": 4, "y": 2}
    assert source.value_mark(("b", "x")).line == 2 and source.value_mark(("c", "y")).line == 1


@pytest.mark.parametrize("text, message", [
    ("a: *nowhere\n", "found undefined alias 'nowhere'"),
    ("a: &loop [1, *loop]\n", "alias *loop is inside its own anchor"),
    ("a: &x 1\nb: &x 2\n", "found duplicate anchor 'x' (first defined at line 1)"),
    ("a: &x 1\nb: {<<: *x}\n", "'<<' merges only mappings"),
])
def test_alias_mistakes_are_located_errors(text, message):
    with pytest.raises(SpecError) as caught:
        read_yaml(text, "f.yaml")

    (issue,) = caught.value.issues
    assert message in issue.message and issue.line > 0 and issue.column > 0


# -- bounded reports --------------------------------------------------------------------------


def test_thousands_of_schema_errors_are_reported_as_the_first_ones_and_a_summary():
    count = MAX_ERRORS + 400
    text = "name: lab\nmodels:\n" + "".join(
        f"  - {{name: m{i}, model: org/m, replicas: many}}\n" for i in range(count))

    issues = issues_of(text)

    assert len(issues) == MAX_ERRORS + 1
    shown, summary = issues[:-1], issues[-1]
    assert [i.line for i in shown] == list(range(3, 3 + MAX_ERRORS))  # the first, in file order
    assert summary.severity == "error" and summary.line == 3 + MAX_ERRORS
    assert summary.message.startswith("400 more errors not shown (the first of them: ")
    assert f"at most {MAX_ERRORS} errors" in summary.hint


def test_thousands_of_cross_field_errors_are_bounded_the_same_way():
    text = "name: lab\nmodels:\n" + "  - {name: same, model: org/m}\n" * 3000

    issues = issues_of(text)

    assert len(issues) == MAX_ERRORS + 1
    assert all("model name 'same' is used twice" in i.message for i in issues[:-1])
    assert issues[-1].message.startswith(f"{3000 - 1 - MAX_ERRORS:,} more errors not shown")


def test_tens_of_thousands_of_unknown_flags_give_bounded_warnings_and_suggestions():
    count = MAX_VALUES - 100
    args = ", ".join(["--seedd"] * count)  # each one close to --seed

    loaded = parse_garden((ONE_MODEL + f"    args: [{args}]\n").encode(), "garden.yaml")

    warnings = loaded.warnings
    assert len(warnings) == MAX_WARNINGS + 1
    assert all(w.severity == "warning" for w in warnings)
    assert sum("did you mean --seed?" in w.hint for w in warnings) == MAX_SUGGESTIONS
    assert warnings[-1].message.startswith(f"{count - MAX_WARNINGS:,} more warnings not shown")


def test_warnings_never_hide_an_error():
    args = ["--unknown-flag"] * (MAX_WARNINGS + 50) + ["--kv-cache-memory-bytes", "8G"]
    text = ONE_MODEL + f"    args: [{', '.join(args)}]\n"

    issues = issues_of(text)

    errors = [i for i in issues if i.severity == "error"]
    assert len(errors) == 1 and "--kv-cache-memory-bytes" in errors[0].message
    assert issues[-1].severity == "warning" and "50 more warnings" in issues[-1].message


def test_a_very_long_value_is_cut_in_the_message():
    (issue,) = issues_of("name: lab\nmodels:\n  - name: " + "n" * 900_000 + "\n    model: a\n")

    assert issue.path == "models[0].name"
    assert len(issue.format()) < 1000 and "(900,000 characters)" in issue.message


def test_a_very_long_unknown_key_is_cut_in_the_message_and_the_path():
    (issue,) = issues_of(ONE_MODEL + "    ? " + "k" * 900_000 + "\n    : 1\n")

    assert len(issue.format()) < 2000 and "unknown key 'kkk" in issue.message


# -- ports: one clash per worker, whatever the garden ------------------------------------------


def test_many_models_on_one_port_give_one_bounded_error_each():
    text = "name: lab\nmodels:\n" + "".join(
        f"  - {{name: m{i}, model: org/m, port: 9000}}\n" for i in range(3000))

    issues = issues_of(text)

    assert len(issues) == MAX_ERRORS + 1
    assert issues[0].message == "m1/0 and m0/0 would both listen on 127.0.0.1:9000"


def test_models_on_one_port_but_different_addresses_do_not_clash():
    text = "name: lab\nmodels:\n" + "".join(
        f"  - {{name: m{i}, model: org/m, port: 9000, host: 10.0.{i // 250}.{i % 250}, "
        "env: {VLLM_API_KEY: '${KEY}'}}\n" for i in range(2000))

    assert len(parse_garden(text.encode(), "garden.yaml").garden.models) == 2000


def test_a_wildcard_host_clashes_with_a_specific_one_on_an_overlapping_replica():
    (issue,) = issues_of("""\
name: lab
models:
  - {name: a, model: org/a, port: 9000, replicas: 3, host: 10.0.0.1, env: {VLLM_API_KEY: "${K}"}}
  - {name: b, model: org/b, port: 9002, host: 0.0.0.0, env: {VLLM_API_KEY: "${K}"}}
""")

    assert (issue.path, issue.line) == ("models[1].port", 4)
    assert issue.message == "b/0 and a/2 would both listen on 0.0.0.0:9002"


def test_a_message_that_quotes_a_huge_value_is_cut():
    (issue,) = issues_of("name: lab\nmodels:\n  - {name: a, model: b, start_timeout: '"
                         + "x" * 200_000 + "'}\n")

    assert issue.path == "models[0].start_timeout"
    assert len(issue.message) < 1100 and issue.message.endswith(" characters)")
