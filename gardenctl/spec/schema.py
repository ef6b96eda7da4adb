"""The garden file's JSON schema, generated from the pydantic models (never edited by hand).

`schemas/garden.schema.json` is this output, committed; a test fails when it is stale.
Editors use it through the `# yaml-language-server: $schema=...` comment in garden files.
"""

from __future__ import annotations

import json

from gardenctl.spec.models import FORMAT_VERSION, Garden

SCHEMA_ID = "https://gardenctl.dev/schemas/garden.schema.json"


def garden_schema() -> dict:
    schema = Garden.model_json_schema()
    schema.pop("title", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"gardenctl garden file (format v{FORMAT_VERSION})",
        **schema,
    }


def garden_schema_text() -> str:
    return json.dumps(garden_schema(), indent=2, ensure_ascii=False) + "\n"
