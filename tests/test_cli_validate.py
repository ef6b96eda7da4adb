"""`gardenctl validate`: what a person or a CI job sees for valid, broken and infeasible gardens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from textwrap import dedent

import pytest
from conftest import REPO

EXAMPLE_GARDENS = sorted(REPO.glob("examples/**/garden*.yaml"))

SCHEMA_ERRORS = """\
name: lab
models:
  - name: a
    model: org/a
    max_model_lenn: 4096
  - name: b
    model: org/b
    replicas: many
"""

# Llama-3.1-8B at 8k tokens needs about 20 GiB: it cannot fit a 4 GiB GPU.
TOO_SMALL = """\
name: lab
defaults: {vllm_version: 0.32.0}
inventory:
  nodes:
    - name: tiny
      gpus: [{name: T4, memory: 4GiB}]
models:
  - name: big
    model: meta-llama/Llama-3.1-8B-Instruct
    max_model_len: 8192
"""

ROOMY_INVENTORY = """\
nodes:
  - name: big
    gpus: [{name: NVIDIA H100, memory: 80GiB, count: 2}]
"""

UNKNOWN_FLAG = """\
name: lab
models:
  - name: a
    model: org/a
    args: [--enable-prefix-cachin]
"""


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(dedent(text))
    return name


def issues_of(result) -> list[dict]:
    return json.loads(result.out)["issues"]


def only_issue(result) -> dict:
    issues = issues_of(result)
    assert len(issues) == 1, issues
    return issues[0]


@pytest.mark.parametrize(
    "garden",
    [REPO / "garden.yaml"] + list(EXAMPLE_GARDENS),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_validate_accepts_the_shipped_gardens(gardenctl, garden):
    result = gardenctl("validate", "-f", str(garden))

    assert result.code == 0, result.err
    assert f"{garden}: valid" in result.out
    assert "fits:" in result.out  # every shipped garden declares an inventory: fit is checked


def test_validate_defaults_to_garden_yaml_in_the_current_folder(gardenctl, workdir):
    shutil.copy(REPO / "garden.yaml", workdir / "garden.yaml")

    result = gardenctl("validate")

    assert result.code == 0, result.err
    assert result.out.startswith("garden.yaml: valid (3 model(s), 4 worker(s); fits: 4 worker(s)")


def test_validate_without_a_garden_file_says_which_file_is_missing(gardenctl):
    result = gardenctl("validate")

    assert result.code == 1
    assert "garden.yaml: error: no such file" in result.err
    assert "-f PATH" in result.err


def test_validate_reports_every_error_with_file_line_and_field_path(gardenctl, workdir):
    write(workdir, "garden.yaml", SCHEMA_ERRORS)

    result = gardenctl("validate")

    assert result.code == 1
    assert result.out == ""  # an invalid file's report goes to stderr
    lines = result.err.splitlines()
    assert lines[0].startswith(
        "garden.yaml:5:5: error: models[0].max_model_lenn: unknown key 'max_model_lenn' "
        "(did you mean 'max_model_len'?")
    assert lines[1] == ("garden.yaml:8:15: error: models[1].replicas: input should be a valid "
                        "integer, got 'many'")
    assert lines[2] == "garden.yaml: invalid, 2 error(s)"


CROSS_FIELD_CASES = {
    "duplicate-name": (
        """\
        name: lab
        models:
          - {name: a, model: org/a}
          - {name: a, model: org/b}
        """,
        (4, "models[1].name", "model name 'a' is used twice"),
    ),
    "port-clash": (
        """\
        name: lab
        models:
          - {name: a, model: org/a, port: 9000}
          - {name: b, model: org/b, port: 9000}
        """,
        (4, "models[1].port", "b/0 and a/0 would both listen on 127.0.0.1:9000"),
    ),
    "port-clash-through-replicas": (
        """\
        name: lab
        models:
          - {name: a, model: org/a, port: 9000, replicas: 2}
          - {name: b, model: org/b, port: 9001}
        """,
        (4, "models[1].port", "b/0 and a/1 would both listen on 127.0.0.1:9001"),
    ),
    "exposed-host-without-api-key": (
        """\
        name: lab
        models:
          - name: a
            model: org/a
            host: 0.0.0.0
        """,
        (5, "models[0].host", "host 0.0.0.0 exposes the model beyond this machine without an "
         "API key"),
    ),
    "exposed-host-from-defaults": (
        """\
        name: lab
        defaults:
          host: 0.0.0.0
        models:
          - {name: a, model: org/a}
        """,
        (3, "defaults.host", "without an API key"),
    ),
    "trust-remote-code-on-a-branch": (
        """\
        name: lab
        models:
          - name: a
            model: org/a
            revision: main
            trust_remote_code: true
        """,
        (6, "models[0].trust_remote_code", "needs a pinned revision"),
    ),
}


@pytest.mark.parametrize("text, expected", CROSS_FIELD_CASES.values(), ids=CROSS_FIELD_CASES)
def test_validate_reports_cross_field_errors_where_the_value_is_written(gardenctl, workdir,
                                                                        text, expected):
    write(workdir, "garden.yaml", text)
    line, path, message = expected

    result = gardenctl("validate", "-o", "json")

    assert result.code == 1
    issue = only_issue(result)
    assert (issue["severity"], issue["file"], issue["line"], issue["path"]) == (
        "error", "garden.yaml", line, path)
    assert issue["column"] > 0
    assert message in issue["message"]
    assert issue["hint"]  # every error says what would be valid


def test_exposed_host_hint_names_the_api_key_variable(gardenctl, workdir):
    write(workdir, "garden.yaml", CROSS_FIELD_CASES["exposed-host-without-api-key"][0])

    issue = only_issue(gardenctl("validate", "-o", "json"))

    assert "VLLM_API_KEY" in issue["hint"] and "127.0.0.1" in issue["hint"]


def test_exposed_host_with_an_api_key_reference_and_pinned_remote_code_are_valid(gardenctl,
                                                                                 workdir):
    write(workdir, "garden.yaml", """\
        name: lab
        models:
          - name: a
            model: org/a
            host: 0.0.0.0
            env: {VLLM_API_KEY: "${LAB_API_KEY}"}
            revision: 0123456789abcdef0123456789abcdef01234567
            trust_remote_code: true
        """)

    result = gardenctl("validate")

    assert result.code == 0, result.err
    assert "garden.yaml: valid" in result.out


def test_validate_never_echoes_a_secret_written_in_the_file(gardenctl, workdir):
    write(workdir, "garden.yaml", """\
        name: lab
        models:
          - name: a
            model: org/a
            env: {HF_TOKEN: hf_SuperSecretValue123}
        """)

    for output in ("text", "json", "github"):
        result = gardenctl("validate", "-o", output)

        assert result.code == 1
        assert "HF_TOKEN looks like a secret" in result.out + result.err
        assert "hf_SuperSecretValue123" not in result.out + result.err


def test_validate_reports_an_infeasible_garden_with_the_worker_and_why(gardenctl, workdir):
    write(workdir, "garden.yaml", TOO_SMALL)

    text = gardenctl("validate")
    issue = only_issue(gardenctl("validate", "-o", "json"))

    assert text.code == 1
    assert text.err.startswith("garden.yaml:8:5: error: models[0]: lab/big/0 does not fit")
    assert (issue["line"], issue["column"], issue["path"]) == (8, 5, "models[0]")
    assert "lab/big/0 does not fit on the inventory (declared in garden.yaml)" in issue["message"]
    assert "tiny GPU 0: needs" in issue["message"]
    assert "more than its 4.0 GiB in all" in issue["message"]
    assert "lower max_model_len" in issue["hint"]


def test_validate_without_inventory_checks_the_file_but_not_the_fit(gardenctl, workdir):
    write(workdir, "garden.yaml", "name: lab\nmodels:\n  - {name: a, model: org/a}\n")

    result = gardenctl("validate", "-o", "json")

    assert result.code == 0
    document = json.loads(result.out)
    assert document["valid"] is True
    assert document["summary"]["fit"].startswith("not checked: no inventory declared")


def test_validate_json_has_format_version_validity_and_located_issues(gardenctl, workdir):
    write(workdir, "garden.yaml", SCHEMA_ERRORS)

    result = gardenctl("validate", "-o", "json")
    document = json.loads(result.out)

    assert result.code == 1
    assert result.err == ""
    assert document["format_version"] == 1
    assert (document["file"], document["valid"]) == ("garden.yaml", False)
    assert [(i["line"], i["column"], i["path"]) for i in document["issues"]] == [
        (5, 5, "models[0].max_model_lenn"), (8, 15, "models[1].replicas")]
    for issue in document["issues"]:
        assert set(issue) >= {"severity", "file", "line", "column", "path", "message", "hint"}
        assert issue["severity"] == "error" and issue["file"] == "garden.yaml"


def test_validate_json_of_a_valid_garden_summarises_models_workers_and_fit(gardenctl):
    result = gardenctl("validate", "-f", str(REPO / "garden.yaml"), "-o", "json")
    document = json.loads(result.out)

    assert result.code == 0
    assert document["valid"] is True and document["issues"] == []
    assert document["summary"]["models"] == 3 and document["summary"]["workers"] == 4
    assert document["summary"]["fit"].startswith("fits: 4 worker(s) on 2 of 2 GPU(s)")


def test_validate_github_prints_one_annotation_per_issue(gardenctl, workdir):
    write(workdir, "garden.yaml", CROSS_FIELD_CASES["duplicate-name"][0])

    result = gardenctl("validate", "-o", "github")

    assert result.code == 1
    assert result.out.splitlines() == [
        "::error file=garden.yaml,line=4,col=12,title=models[1].name::model name 'a' is used "
        "twice (first used by models[0]; names must be unique in a garden)"
    ]


def test_validate_github_escapes_properties_and_message(gardenctl, workdir):
    # GitHub's workflow-command syntax: '%', CR and LF are escaped everywhere, ':' and ','
    # also in properties (file=, title=), or the annotation is cut or misplaced.
    write(workdir, "team,a:b.yaml", """\
        name: lab
        models:
          - name: a
            model: org/a
            replicas: "50%"
            env: {"MY:KEY,X": "1"}
        """)

    result = gardenctl("validate", "team,a:b.yaml", "-o", "github")
    lines = result.out.splitlines()

    assert result.code == 1
    assert len(lines) == 2
    assert all(line.startswith("::error file=team%2Ca%3Ab.yaml,line=") for line in lines)
    replicas = next(line for line in lines if "title=models[0].replicas::" in line)
    assert "'50%25'" in replicas and "50%'" not in replicas
    assert any(",title=models[0].env.MY%3AKEY%2CX::" in line for line in lines)


def test_validate_github_annotates_warnings_and_still_passes(gardenctl, workdir):
    write(workdir, "garden.yaml", UNKNOWN_FLAG)

    result = gardenctl("validate", "-o", "github")
    lines = result.out.splitlines()

    assert result.code == 0
    assert lines[0].startswith("::warning file=garden.yaml,line=5,col=12,title=models[0].args[0]"
                               "::--enable-prefix-cachin is not a `vllm serve` flag")
    assert "did you mean --enable-prefix-caching?" in lines[0]
    assert lines[1].startswith("garden.yaml: valid.")


def test_unknown_vllm_flag_is_a_warning_that_does_not_fail_validation(gardenctl, workdir):
    write(workdir, "garden.yaml", UNKNOWN_FLAG)

    text = gardenctl("validate")
    document = json.loads(gardenctl("validate", "-o", "json").out)

    assert text.code == 0
    assert text.out.splitlines()[0] == (
        "garden.yaml:5:12: warning: models[0].args[0]: --enable-prefix-cachin is not a "
        "`vllm serve` flag in vLLM 0.32 (did you mean --enable-prefix-caching? vLLM will refuse "
        "to start if it does not know it)")
    assert text.out.splitlines()[1].startswith("garden.yaml: valid")
    assert document["valid"] is True
    assert [i["severity"] for i in document["issues"]] == ["warning"]


def test_inventory_file_overrides_the_declared_inventory(gardenctl, workdir):
    write(workdir, "garden.yaml", TOO_SMALL)
    write(workdir, "h100.yaml", ROOMY_INVENTORY)

    result = gardenctl("validate", "--inventory", "h100.yaml")

    assert result.code == 0, result.err
    assert "fits: 1 worker(s) on 1 of 2 GPU(s) (file h100.yaml)" in result.out


def test_inventory_file_is_checked_even_when_the_garden_declares_a_larger_one(gardenctl,
                                                                              workdir):
    write(workdir, "garden.yaml", TOO_SMALL.replace("T4, memory: 4GiB", "H100, memory: 80GiB"))
    write(workdir, "t4.yaml", "nodes:\n  - name: t4-box\n    gpus: [{name: T4, memory: 16GiB}]\n")

    assert gardenctl("validate").code == 0
    result = gardenctl("validate", "--inventory", "t4.yaml", "-o", "json")

    assert result.code == 1
    issue = only_issue(result)
    assert "does not fit on the inventory (file t4.yaml)" in issue["message"]
    assert "t4-box GPU 0" in issue["message"]


def test_broken_inventory_file_gives_issues_located_in_that_file(gardenctl, workdir):
    write(workdir, "garden.yaml", TOO_SMALL)
    write(workdir, "inventory.yaml", """\
        nodes:
          - name: big
            gpus: [{name: H100, memory: lots, cnt: 2}]
        """)

    result = gardenctl("validate", "--inventory", "inventory.yaml", "-o", "json")
    document = json.loads(result.out)

    assert result.code == 1
    assert (document["file"], document["valid"]) == ("garden.yaml", False)
    located = [(i["file"], i["line"], i["column"], i["path"]) for i in document["issues"]]
    assert located == [("inventory.yaml", 3, 33, "nodes[0].gpus[0].memory"),
                       ("inventory.yaml", 3, 39, "nodes[0].gpus[0].cnt")]
    assert "did you mean 'count'?" in document["issues"][1]["hint"]


def test_validate_checks_several_files_and_fails_if_any_is_invalid(gardenctl, workdir):
    shutil.copy(REPO / "garden.yaml", workdir / "good.yaml")
    write(workdir, "bad.yaml", SCHEMA_ERRORS)

    result = gardenctl("validate", "good.yaml", "bad.yaml")

    assert result.code == 1
    assert result.out.startswith("good.yaml: valid")
    assert "bad.yaml:5:5: error: models[0].max_model_lenn" in result.err
    assert result.err.rstrip().endswith("bad.yaml: invalid, 2 error(s)")


def test_validate_json_of_several_files_lists_each_result_in_order(gardenctl, workdir):
    shutil.copy(REPO / "garden.yaml", workdir / "good.yaml")
    write(workdir, "bad.yaml", SCHEMA_ERRORS)
    write(workdir, "warn.yaml", UNKNOWN_FLAG)

    mixed = gardenctl("validate", "good.yaml", "bad.yaml", "-o", "json")
    clean = gardenctl("validate", "good.yaml", "warn.yaml", "-o", "json")
    document = json.loads(mixed.out)

    assert mixed.code == 1 and clean.code == 0
    assert document["format_version"] == 1 and document["valid"] is False
    assert [(r["file"], r["valid"]) for r in document["results"]] == [
        ("good.yaml", True), ("bad.yaml", False)]
    assert json.loads(clean.out)["valid"] is True


def test_validate_exit_status_and_streams_as_the_shell_sees_them(gardenctl_process, workdir):
    write(workdir, "bad.yaml", SCHEMA_ERRORS)
    shutil.copy(REPO / "garden.yaml", workdir / "garden.yaml")

    bad = gardenctl_process("validate", "bad.yaml")
    good = gardenctl_process("validate")

    assert (bad.code, bad.out) == (1, "")
    assert "bad.yaml:8:15: error: models[1].replicas" in bad.err
    assert "Traceback" not in bad.err
    assert (good.code, good.err) == (0, "")
    assert good.out.startswith("garden.yaml: valid")


def test_the_alias_bomb_that_took_100_s_is_refused_at_its_alias_by_the_cli(gardenctl_process,
                                                                          workdir):
    """The issue's file: 0.9 MB, 990 aliases to one long flag (how fast: benchmarks)."""
    text = ("name: lab\nmodels:\n  - name: a\n    model: org/a\n"
            "    args: [&a '--" + "x" * 900_000 + "'" + ", *a" * 990 + "]\n")
    write(workdir, "garden.yaml", text)

    run = gardenctl_process("validate", "-o", "json")

    assert run.code == 1, run.err
    (issue,) = json.loads(run.out)["issues"]
    assert issue["line"] == 5 and "alias *a" in issue["message"]


# -- bugs found while writing these tests ------------------------------------------------------


def test_bad_size_or_duration_names_the_value_once(gardenctl, workdir):
    write(workdir, "garden.yaml", """\
        name: lab
        placement: {reserve: lots}
        models:
          - {name: a, model: org/a, start_timeout: soon}
        """)

    result = gardenctl("validate", "-o", "json")
    messages = [i["message"] for i in issues_of(result)]

    assert result.code == 1
    assert len(messages) == 2
    assert messages[0].count("'lots'") == 1, messages[0]
    assert messages[1].count("'soon'") == 1, messages[1]


def test_missing_inventory_file_hint_points_at_the_inventory_option(gardenctl, workdir):
    write(workdir, "garden.yaml", TOO_SMALL)

    result = gardenctl("validate", "--inventory", "missing.yaml", "-o", "json")
    issue = only_issue(result)

    assert result.code == 1
    assert (issue["file"], issue["message"]) == ("missing.yaml", "no such file")
    assert "-f PATH" not in issue["hint"]
    assert "--inventory" in issue["hint"]


def test_quoted_text_where_a_number_is_expected_is_not_told_to_drop_the_quotes(gardenctl,
                                                                            workdir):
    write(workdir, "garden.yaml", 'name: lab\nmodels:\n  - {name: a, model: org/a, '
          'replicas: "50%"}\n')

    issue = only_issue(gardenctl("validate", "-o", "json"))

    assert issue["path"] == "models[0].replicas"
    assert "remove the quotes" not in issue["hint"]


# -- control characters from the file never reach the terminal raw ----------------------------

HOSTILE = (
    'name: lab\nmodels:\n'
    '  - name: a\n'
    '    model: "-evil\\nFORGED: garden.yaml is valid\\x1b[2J"\n'
    '    args: ["--x\\ngarden.yaml: valid (FORGED)\\x1b[2J"]\n'
)


def assert_no_raw_control_or_forged_line(output: str) -> None:
    assert all(c == "\n" or c.isprintable() for c in output), repr(output)
    for line in output.splitlines():
        assert line.startswith(("garden.yaml:", "::")), line
        assert "FORGED" not in line or "\\nFORGED" in line or "\\ngarden.yaml" in line


@pytest.mark.parametrize("output", ["text", "github"])
def test_validate_escapes_newlines_and_terminal_escapes_from_the_file(gardenctl, workdir,
                                                                      output):
    write(workdir, "garden.yaml", HOSTILE)

    result = gardenctl("validate", "-o", output)

    assert result.code == 1
    text = result.out + result.err
    assert "\x1b" not in text
    assert_no_raw_control_or_forged_line(text)
    assert "'-evil\\nFORGED: garden.yaml is valid\\x1b[2J'" in text
    assert "--x\\ngarden.yaml: valid (FORGED)\\x1b[2J is not a `vllm serve` flag" in text


def test_validate_escapes_control_characters_in_warnings_of_a_valid_garden(gardenctl, workdir):
    write(workdir, "garden.yaml", HOSTILE.replace('"-evil', '"evil'))

    result = gardenctl("validate")

    assert result.code == 0
    assert_no_raw_control_or_forged_line(result.out)
    assert result.out.splitlines()[-1].startswith("garden.yaml: valid (1 model(s)")
