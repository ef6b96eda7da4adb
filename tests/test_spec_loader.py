"""The garden file: strict, safe YAML with every error located at file:line:col and field path."""

from __future__ import annotations

import pytest

from gardenctl.errors import SpecError
from gardenctl.spec import load_garden, parse_garden

BASE = """\
name: lab
models:
  - name: qwen
    model: Qwen/Qwen2.5-7B-Instruct
"""


def errors_of(text: str, file: str = "garden.yaml") -> list:
    with pytest.raises(SpecError) as caught:
        parse_garden(text.encode(), file)
    return caught.value.issues


def test_valid_garden_loads_with_defaults_applied():
    loaded = parse_garden(b"""\
name: lab
defaults: {max_model_len: 8192, env: {HF_TOKEN: "${HF_TOKEN}"}}
models:
  - {name: a, model: org/a}
  - {name: b, model: org/b, max_model_len: 2048, env: {HF_HOME: /data/hf}}
""", "g.yaml")
    a, b = loaded.garden.resolved_models()
    assert (a.max_model_len, b.max_model_len) == (8192, 2048)
    assert b.env == {"HF_TOKEN": "${HF_TOKEN}", "HF_HOME": "/data/hf"}
    assert loaded.garden.placement.min_available_gpu_fraction == 0.3


def test_unknown_key_is_located_and_suggests_the_right_one():
    (issue,) = errors_of(BASE + "    max_model_lenn: 4096\n")
    assert (issue.file, issue.line, issue.column) == ("garden.yaml", 5, 5)
    assert issue.path == "models[0].max_model_lenn"
    assert "did you mean 'max_model_len'" in issue.hint


def test_wrong_type_names_field_path_and_line():
    (issue,) = errors_of(BASE + "    max_model_len: 8k\n")
    assert issue.path == "models[0].max_model_len"
    assert issue.line == 5
    assert "'8k'" in issue.message


def test_yaml_no_is_not_silently_a_boolean():
    (issue,) = errors_of(BASE + "    enforce_eager: no\n")
    assert issue.path == "models[0].enforce_eager"
    assert "true or false" in issue.hint


def test_octal_looking_number_is_not_silently_converted():
    (issue,) = errors_of(BASE + "    port: 0755\n")
    assert "leading zeros" in issue.hint


def test_number_where_text_is_expected_asks_for_quotes():
    (issue,) = errors_of(BASE + "    revision: 1.10\n")
    assert '"1.10"' in issue.hint


def test_name_like_no_stays_text_where_text_is_expected():
    loaded = parse_garden(b"name: no\nmodels: []\n", "g.yaml")
    assert loaded.garden.name == "no"


def test_duplicate_keys_are_errors_with_both_lines():
    (issue,) = errors_of(BASE + "    model: other/model\n")
    assert issue.line == 5
    assert "duplicate key 'model'" in issue.message and "line 4" in issue.message


def test_every_error_is_reported_not_only_the_first():
    issues = errors_of(BASE + "    max_model_len: x\n    replicas: -1\n    bogus: 1\n")
    assert {i.path for i in issues} == {"models[0].max_model_len", "models[0].replicas",
                                        "models[0].bogus"}


def test_missing_required_key_points_at_its_mapping():
    (issue,) = errors_of("name: lab\nmodels:\n  - name: a\n")
    assert issue.path == "models[0].model" and issue.line == 3


def test_invalid_choice_suggests_a_valid_one():
    (issue,) = errors_of(BASE + "    kv_cache_dtype: fp9\n")
    assert "fp8" in issue.hint


def test_alias_bomb_is_refused_quickly():
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n"
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        bomb += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]\n"
    (issue,) = errors_of(bomb)
    assert "expands to more than" in issue.message


def test_deep_nesting_is_refused():
    (issue,) = errors_of("name: " + "[" * 100 + "]" * 100 + "\n")
    assert "nesting deeper" in issue.message


def test_large_file_is_refused(tmp_path):
    path = tmp_path / "garden.yaml"
    path.write_text("name: lab\n" + "#" * (1024 * 1024) + "\n")
    with pytest.raises(SpecError) as caught:
        load_garden(path)
    assert "larger than" in str(caught.value)


def test_python_tags_are_refused():
    (issue,) = errors_of("name: !!python/object/apply:os.system ['true']\n")
    assert "unsupported YAML tag" in issue.message


def test_syntax_error_is_located():
    (issue,) = errors_of("name: lab\nmodels:\n  - name: a\n   model: b\n")
    assert issue.line == 4 and "not valid YAML" in issue.message


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(SpecError) as caught:
        load_garden(tmp_path / "nope.yaml")
    assert "no such file" in str(caught.value)


def test_literal_secret_in_env_is_refused():
    (issue,) = errors_of(BASE + "    env: {HF_TOKEN: hf_abc123}\n")
    assert issue.path == "models[0].env.HF_TOKEN"
    assert "${HF_TOKEN}" in issue.hint
    assert "hf_abc123" not in issue.format()


def test_partial_env_reference_is_refused():
    (issue,) = errors_of(BASE + '    env: {URL: "http://${HOST}/x"}\n')
    assert "whole value" in issue.message


def test_exposed_host_needs_an_api_key_from_the_environment():
    (issue,) = errors_of(BASE + "    host: 0.0.0.0\n")
    assert issue.path == "models[0].host" and "VLLM_API_KEY" in issue.hint
    parse_garden((BASE + '    host: 0.0.0.0\n    env: {VLLM_API_KEY: "${KEY}"}\n').encode(), "g")


def test_trust_remote_code_needs_a_pinned_revision():
    (issue,) = errors_of(BASE + "    trust_remote_code: true\n    revision: main\n")
    assert "pinned revision" in issue.message
    parse_garden((BASE + "    trust_remote_code: true\n    revision: " + "a" * 40 + "\n").encode(),
                 "g")


def test_two_workers_on_one_port_are_refused():
    issues = errors_of("""\
name: lab
models:
  - {name: a, model: org/a, port: 9000, replicas: 2}
  - {name: b, model: org/b, port: 9001}
""")
    assert any("both listen on 127.0.0.1:9001" in i.message for i in issues)


def test_duplicate_model_names_are_refused():
    issues = errors_of(BASE + "  - {name: qwen, model: x/y}\n")
    assert issues[0].line == 5 and "used twice" in issues[0].message


def test_secret_flags_and_managed_flags_in_args_are_refused():
    issues = errors_of(BASE + "    args: [--api-key, sk-1, --port, '9', --enable-prefix-caching]\n")
    messages = [i.message for i in issues if i.severity == "error"]
    assert any("--api-key would put a secret in argv" in m for m in messages)
    assert any("--port is set by gardenctl" in m for m in messages)
    assert all("sk-1" not in i.format() for i in issues)


def test_unknown_vllm_flag_is_a_warning_with_suggestion():
    loaded = parse_garden((BASE + "    args: [--enable-prefix-cachin]\n").encode(), "g")
    (warning,) = loaded.warnings
    assert warning.severity == "warning" and "--enable-prefix-caching" in warning.hint


def test_sizes_and_durations_accept_units():
    loaded = parse_garden(b"""\
name: lab
placement: {reserve: 1GiB}
inventory: {nodes: [{name: a, gpus: [{name: A10G, memory: 24GiB, count: 2}]}]}
models: [{name: a, model: org/a, start_timeout: 15m}]
""", "g")
    assert loaded.garden.placement.reserve == 1024**3
    assert loaded.garden.inventory.nodes[0].gpus[0].memory == 24 * 1024**3
    assert loaded.garden.models[0].start_timeout == 900.0


def test_content_hash_identifies_the_file_version():
    one = parse_garden(BASE.encode(), "g")
    two = parse_garden((BASE + "# comment\n").encode(), "g")
    assert one.content_hash != two.content_hash
    assert one.garden == two.garden


def test_flags_with_underscores_are_checked_like_vllm_reads_them():
    issues = errors_of(BASE + "    args: [--api_key=sk-9, --gpu_memory_utilization, '0.99', "
                              "--config, x.yaml]\n")
    messages = " ".join(i.message for i in issues if i.severity == "error")
    assert "--api-key would put a secret in argv" in messages
    assert "--gpu-memory-utilization is set by gardenctl" in messages
    assert "--config is not allowed in args" in messages


def test_an_environment_value_is_never_repeated_in_an_error():
    issues = errors_of(BASE + "    env: {HF_TOKEN: 123456789}\n")
    assert all("123456789" not in i.format() for i in issues)
