"""`gardenctl schema`: print the garden file's JSON schema."""

from __future__ import annotations

import click


@click.command()
def schema() -> None:
    """Print the garden file's JSON schema (the one in schemas/garden.schema.json)."""
    from gardenctl.spec.schema import garden_schema_text

    click.echo(garden_schema_text(), nl=False)
