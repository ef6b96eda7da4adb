"""The command line: the one place where errors become messages and exit codes.

Each command lives in its own module, imported only when that command runs, so that
`import gardenctl.cli` (and `gardenctl --help`) stays fast and never pulls in pydantic, NVML,
huggingface_hub, vLLM or Ray.

Exit codes: 0 ok / nothing to change; 1 error (bad file, unplaceable model, failed apply,
usage error); 2 only from `plan --detailed-exitcode` when changes are pending; 130 when
interrupted (Ctrl-C, or SIGINT during apply: workers already spawned keep loading).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import traceback

import click

# command name -> ("module:attribute", one-line help); modules are imported on first use.
COMMANDS = {
    "validate": ("gardenctl.cli.validate_cmd:validate",
                 "Check the garden file, and that it fits the hardware (for CI)."),
    "plan": ("gardenctl.cli.plan_cmd:plan", "Show what apply would change, GPU by GPU, and why."),
    "estimate": ("gardenctl.cli.estimate_cmd:estimate",
                 "Itemised GPU memory estimate of one model, with sources."),
    "inventory": ("gardenctl.cli.inventory_cmd:inventory",
                  "List the GPUs gardenctl sees: NVML, declared, or --inventory FILE."),
    "schema": ("gardenctl.cli.schema_cmd:schema", "Print the garden file's JSON schema."),
    "apply": ("gardenctl.cli.apply_cmd:apply",
              "Start, replace and stop workers until they match the garden file."),
    "status": ("gardenctl.cli.status_cmd:status",
               "What runs where: GPU ledgers, worker phases, in sync or not."),
    "down": ("gardenctl.cli.down_cmd:down", "Stop every worker of this garden."),
    "logs": ("gardenctl.cli.logs_cmd:logs", "Show (or follow) a worker's log."),
    "profiles": ("gardenctl.cli.profiles_cmd:profiles",
                 "Memory profiles learned from real starts; import more from vLLM logs."),
    "watch": ("gardenctl.cli.watch_cmd:watch",
              "Re-converge on every save of the file, on crashes and on a resync."),
    "gateway": ("gardenctl.cli.gateway_cmd:gateway",
                "Serve every model on one OpenAI-compatible endpoint (foreground)."),
}

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHANGES = 2  # plan --detailed-exitcode only
EXIT_INTERRUPTED = 130


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module_name, attribute = entry[0].split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing commands must not import them: `gardenctl --help` stays fast.
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gardenctl", prog_name="gardenctl")
def cli() -> None:
    """Keep a garden of vLLM workers in the state that garden.yaml declares."""


ERROR_FORMAT_VERSION = 1


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map every outcome to an exit code. With `-o json`, a
    failure also prints a JSON error document on stdout (the message goes to stderr too)."""
    from gardenctl.errors import GardenError, SpecError

    args = sys.argv[1:] if argv is None else argv
    json_output = _wants_json(args)
    try:
        rc = cli.main(args=args, prog_name="gardenctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        rc = exc.exit_code
    except click.Abort:
        rc = _fail(json_output, "aborted", "Aborted.", EXIT_ERROR)
    except click.ClickException as exc:  # usage errors: exit 1, never 2 (see --detailed-exitcode)
        if json_output:
            _print_error_document("usage_error", exc.format_message(), EXIT_ERROR)
        exc.show()
        rc = EXIT_ERROR
    except SpecError as exc:
        rc = _fail(json_output, "invalid_file", f"gardenctl: {exc}", exc.exit_code,
                   issues=[i.to_json() for i in exc.issues])
    except GardenError as exc:
        rc = _fail(json_output, _kind(exc), f"gardenctl: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        rc = _fail(json_output, "interrupted", "Interrupted.", EXIT_INTERRUPTED)
    except BrokenPipeError:
        rc = EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - the one place that tells bugs apart
        rc = _report_bug(exc, json_output)
    sys.exit(rc if isinstance(rc, int) else EXIT_OK)


def _wants_json(args: list[str]) -> bool:
    """Did the command line ask for `-o json` (in any spelling click accepts)?"""
    for i, word in enumerate(args):
        if word in ("-o", "--output") and i + 1 < len(args) and args[i + 1] == "json":
            return True
        if word in ("-ojson", "--output=json"):
            return True
    return False


def _kind(exc: Exception) -> str:
    """A stable name for an error class: LockHeldError -> lock_held."""
    name = type(exc).__name__.removesuffix("Error") or "Garden"
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _fail(json_output: bool, kind: str, message: str, code: int, **extra: object) -> int:
    if json_output:
        _print_error_document(kind, message.removeprefix("gardenctl: "), code, **extra)
    click.echo(message, err=True)
    return code


def _print_error_document(kind: str, message: str, code: int, **extra: object) -> None:
    import json

    document = {"format_version": ERROR_FORMAT_VERSION, "ok": False,
                "error": {"kind": kind, "message": message, "exit_code": code, **extra}}
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


def _report_bug(exc: BaseException, json_output: bool = False) -> int:
    fd, path = tempfile.mkstemp(prefix="gardenctl-crash-", suffix=".txt")
    with os.fdopen(fd, "w") as handle:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=handle)
    message = (f"gardenctl: internal error ({type(exc).__name__}: {exc}). This is a bug in "
               f"gardenctl; the traceback is in {path}. Please report it with that file.")
    return _fail(json_output, "internal_error", message, EXIT_ERROR, traceback_file=path)
