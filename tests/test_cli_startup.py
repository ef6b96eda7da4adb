"""Start-up stays light: `import gardenctl.cli` and `gardenctl --help` import no heavy library
and no command module (speed itself is measured in benchmarks/, not asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from textwrap import dedent

from gardenctl.cli import COMMANDS

HEAVY = ["torch", "vllm", "ray", "transformers", "huggingface_hub", "pynvml", "pydantic", "yaml",
         "jsonschema", "psutil", "watchfiles", "numpy", "aiohttp", "openai"]


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON document as its last line."""
    completed = subprocess.run([sys.executable, "-c", dedent(code)], capture_output=True,
                               text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_importing_the_cli_pulls_in_no_heavy_library():
    loaded = run_python(f"""\
        import json, sys
        import gardenctl.cli
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
        """)

    assert loaded == []


def test_help_lists_every_command_without_importing_any():
    report = run_python(f"""\
        import contextlib, io, json, sys
        from gardenctl.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit as exc:
                code = exc.code
        print(json.dumps({{
            "code": code,
            "help": out.getvalue(),
            "heavy": [m for m in {HEAVY!r} if m in sys.modules],
            "gardenctl": sorted(m for m in sys.modules if m.startswith("gardenctl")),
        }}))
        """)

    assert report["code"] == 0
    assert report["heavy"] == []
    assert [m for m in report["gardenctl"] if m.startswith("gardenctl.cli.")] == []
    assert "gardenctl.spec" not in report["gardenctl"]
    listed = report["help"].split("Commands:")[1]
    for name in COMMANDS:
        assert f"  {name} " in listed, name
    assert "validate   Check the garden file" in listed


def test_each_command_help_imports_no_heavy_library():
    report = run_python(f"""\
        import contextlib, io, json, sys
        from gardenctl.cli import main
        found = {{}}
        for name in {sorted(COMMANDS)!r}:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main([name, "--help"])
                except SystemExit as exc:
                    code = exc.code
            found[name] = [code, "Usage: gardenctl " + name in out.getvalue(),
                           [m for m in {HEAVY!r} if m in sys.modules]]
        print(json.dumps(found))
        """)

    assert report == {name: [0, True, []] for name in COMMANDS}


def test_python_dash_m_gardenctl_is_the_gardenctl_command():
    completed = subprocess.run([sys.executable, "-m", "gardenctl", "--version"],
                               capture_output=True, text=True, timeout=60, check=False)

    assert completed.returncode == 0
    assert completed.stdout.startswith("gardenctl, version ")
