"""`gardenctl validate`: is the garden file well-formed, and does it fit its hardware? (for CI)"""

from __future__ import annotations

import click

from gardenctl.cli import EXIT_ERROR
from gardenctl.cli.options import echo_json, garden_file, inventory_file, output_format

VALIDATE_FORMAT_VERSION = 1


@click.command()
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@garden_file
@inventory_file
@click.option("--allow-network", is_flag=True,
              help="Ask the Hugging Face Hub (unless HF_HUB_OFFLINE is set) whether each model "
              "that is neither a local folder nor cached exists, and whether it is gated.")
@output_format("text", "json", "github")
def validate(files: tuple[str, ...], garden_path: str, inventory_path: str | None,
             allow_network: bool, output: str) -> None:
    """Check the garden file (or each of FILES): schema, cross-field rules and, when an
    inventory is declared (or given with --inventory), that every worker fits. Exit 0 when
    valid, 1 otherwise.

    Pre-flight checks read each model's config.json (local folder, Hugging Face cache, the
    built-in catalog; the Hub only with --allow-network): max_model_len, tensor_parallel_size,
    dtype and quantization against the inventory's GPUs, the architecture against the vLLM
    release (docs/preflight.md).

    Never starts or stops anything, and never reads GPUs: in CI, declare the inventory.
    """
    paths = list(files) or [garden_path]
    documents = [_validate_one(path, inventory_path, output, allow_network) for path in paths]
    if output == "json":
        if len(documents) == 1:
            echo_json(documents[0])
        else:
            echo_json({"format_version": VALIDATE_FORMAT_VERSION,
                       "valid": all(d["valid"] for d in documents), "results": documents})
    if not all(d["valid"] for d in documents):
        raise click.exceptions.Exit(EXIT_ERROR)


def _validate_one(garden_path: str, inventory_path: str | None, output: str,
                  allow_network: bool = False) -> dict:
    from gardenctl.errors import SpecError
    from gardenctl.spec.loader import load_garden

    issues = []
    summary: dict = {}
    try:
        loaded = load_garden(garden_path)
    except SpecError as exc:
        issues = list(exc.issues)
        loaded = None
    if loaded is not None:
        issues = list(loaded.warnings)
        issues += _fit_issues(loaded, garden_path, inventory_path, summary, allow_network)
    valid = not any(i.severity == "error" for i in issues)
    return _report(garden_path, issues, valid, summary, output)


def _fit_issues(loaded, garden_path: str, inventory_path: str | None, summary: dict,
                allow_network: bool = False) -> list:
    garden = loaded.garden
    default_replicas = garden.defaults.replicas
    summary["models"] = len(garden.models)
    summary["workers"] = sum(m.replicas if "replicas" in m.model_fields_set else default_replicas
                             for m in garden.models)
    from gardenctl.errors import SpecError
    from gardenctl.estimate import read_model_metadata
    from gardenctl.inventory import resolve_inventory
    from gardenctl.planner import gather_estimates
    from gardenctl.preflight import ask_hub, hub_available
    from gardenctl.state import StateDir
    from gardenctl.validation import (
        SaneMetadataReader,
        check_against_inventory,
        estimate_warnings,
        preflight_issues,
    )
    from gardenctl.vllm_version import declared_or_detected

    models = loaded.models()
    inventory = None
    if inventory_path is not None or garden.inventory is not None:
        try:
            inventory = resolve_inventory(garden, garden_path, inventory_path,
                                          declared_only=True)
        except SpecError as exc:  # a broken --inventory file: its own located issues
            return list(exc.issues)
    state = StateDir()  # the release cache of apply and watch is read; nothing is run
    cache = state.root if state.root.is_dir() else None
    reader = SaneMetadataReader(read_model_metadata)
    estimates = gather_estimates(models, garden.placement.estimator, read_metadata=reader,
                                 version_of=declared_or_detected(cache))
    hub = ask_hub if allow_network and hub_available() else None
    issues = preflight_issues(loaded, models, inventory, estimates, reader, hub_info=hub)
    if inventory is None:
        summary["fit"] = "not checked: no inventory declared (add `inventory:` or --inventory)"
        return issues
    issues += estimate_warnings(loaded, models, estimates)
    report = check_against_inventory(loaded, inventory, estimates)
    issues += report.issues
    if report.placement is not None and not report.issues:
        used = sum(1 for row in report.placement.ledgers if row.workers_after)
        summary["fit"] = (f"fits: {summary['workers']} worker(s) on {used} of "
                          f"{len(report.placement.ledgers)} GPU(s) ({inventory.source})")
    return issues


def _report(path: str, issues: list, valid: bool, summary: dict, output: str) -> dict:
    document = {
        "format_version": VALIDATE_FORMAT_VERSION,
        "file": path,
        "valid": valid,
        "summary": summary,
        "issues": [i.to_json() for i in issues],
    }
    if output == "json":
        return document
    if output == "github":
        for issue in issues:
            kind = "error" if issue.severity == "error" else "warning"
            props = [f"file={_escape_property(issue.file or path)}"]
            if issue.line:
                props.append(f"line={issue.line}")
            if issue.column:
                props.append(f"col={issue.column}")
            if issue.path:
                props.append(f"title={_escape_property(issue.path)}")
            message = issue.message + (f" ({issue.hint})" if issue.hint else "")
            click.echo(f"::{kind} {','.join(props)}::{_escape_data(message)}")
        if valid:
            click.echo(f"{path}: valid. {summary.get('fit', '')}".rstrip())
        return document
    for issue in issues:
        click.echo(issue.format(), err=not valid)
    if valid:
        parts = [f"{summary.get('models', 0)} model(s), {summary.get('workers', 0)} worker(s)"]
        if summary.get("fit"):
            parts.append(summary["fit"])
        click.echo(f"{path}: valid ({'; '.join(parts)})")
    else:
        errors = sum(1 for i in issues if i.severity == "error")
        click.echo(f"{path}: invalid, {errors} error(s)", err=True)
    return document


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
