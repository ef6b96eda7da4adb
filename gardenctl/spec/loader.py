"""load_garden: garden.yaml -> Garden, with every error located (file:line:col + field path).

Reporting is bounded like the checks (gardenctl.spec.checks): of pydantic's errors, only the
first MAX_ERRORS in file order are turned into readable issues (with their "did you mean"
suggestions); the others are counted into one summarising issue. Values quoted in messages
go through `shown`: repr-style, control characters escaped, long values cut.
"""

from __future__ import annotations

import difflib
import hashlib
import typing
from dataclasses import dataclass, replace
from pathlib import Path as FsPath
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gardenctl.argv import is_number
from gardenctl.errors import SpecError, SpecIssue
from gardenctl.spec.checks import (
    MAX_ERRORS,
    MAX_SUGGESTED_LENGTH,
    check_garden,
    summarise_hidden,
)
from gardenctl.spec.models import Garden, ModelSpec
from gardenctl.spec.yamlsource import (
    MAX_FILE_BYTES,
    Path,
    SourceMap,
    cyclic_gc_paused,
    format_path,
    read_yaml,
)
from gardenctl.text import quoted

M = TypeVar("M", bound=BaseModel)

# What a person should write, for fields whose pydantic message would be cryptic.
FIELD_HINTS = {
    "gpu_memory_utilization": "'auto' or a number in (0, 1], e.g. 0.45",
    "memory": "a size such as 24GiB or 80GB",
    "used": "a size such as 2GiB",
    "reserve": "a size such as 1GiB or 512MiB",
    "start_timeout": "a duration such as 15m, 90s or a number of seconds",
    "shutdown_timeout": "a duration such as 30s or a number of seconds",
    "name": "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 63",
    "node": "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 63",
}


@dataclass(frozen=True)
class LoadedGarden:
    """A validated garden and where it came from."""

    garden: Garden
    source: SourceMap
    path: str
    content_hash: str  # sha256 of the file's bytes: "which version of the file is this"
    warnings: tuple[SpecIssue, ...] = ()
    # Settings changed by what failed starts taught (gardenctl.lessons), by model name:
    # ((field, value), ...). Not the file's: `declared_models` gives the models as declared.
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def declared_models(self) -> list[ModelSpec]:
        """The garden's models with defaults applied and relative local model paths
        (`./models/x`, `../x`) made absolute against the garden file's directory, so a worker
        finds its model wherever gardenctl runs from."""
        base = FsPath(self.path).resolve().parent
        return [_anchor(model, base) for model in self.garden.resolved_models()]

    def models(self) -> list[ModelSpec]:
        """The models as they will run: as declared, with the lessons' overrides."""
        changes = {name: dict(values) for name, values in self.overrides}
        return [model.model_copy(update=changes[model.name]) if model.name in changes else model
                for model in self.declared_models()]

    def with_overrides(self, changes: dict[str, dict[str, Any]]) -> LoadedGarden:
        overrides = tuple((name, tuple(sorted(changes[name].items())))
                          for name in sorted(changes) if changes[name])
        return replace(self, overrides=overrides)


def _anchor(model: ModelSpec, base: FsPath) -> ModelSpec:
    ref = model.model
    if ref.startswith(("./", "../")) or ref in (".", ".."):
        return model.model_copy(update={"model": str((base / ref).resolve())})
    return model


def load_garden(path: str | FsPath) -> LoadedGarden:
    """Read, parse and validate a garden file. Raises SpecError listing every problem found."""
    return parse_garden(read_file(path), str(path))


GARDEN_MISSING_HINT = ("create one (see garden.yaml in the gardenctl repository) or pass -f PATH")


def read_file(path: str | FsPath, missing_hint: str = GARDEN_MISSING_HINT) -> bytes:
    """A small text file's bytes, or a SpecError that says why it cannot be read."""
    name = str(path)
    try:
        fs_path = FsPath(path)
        size = fs_path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SpecError([SpecIssue(message=f"file is larger than {MAX_FILE_BYTES // 1024} KiB "
                                       f"({size} bytes)", file=name)])
        raw = fs_path.read_bytes()
    except FileNotFoundError:
        raise SpecError([SpecIssue(message="no such file", file=name,
                                   hint=missing_hint)]) from None
    except IsADirectoryError:
        raise SpecError([SpecIssue(message="is a directory, not a garden file",
                                   file=name)]) from None
    except OSError as exc:
        raise SpecError([SpecIssue(message=f"cannot read: {exc.strerror}", file=name)]) from None
    return raw


def read_mapping(raw: bytes, file: str, *, what: str, hint: str) -> tuple[dict, SourceMap]:
    """Decode and parse a YAML (or JSON) document that must be a mapping."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError([SpecIssue(message="not UTF-8 text", file=file, line=line)]) from None
    with cyclic_gc_paused():
        data, source = read_yaml(text, file)
    if data is None:
        raise SpecError([SpecIssue(message=f"the {what} is empty", file=file, hint=hint)])
    if not isinstance(data, dict):
        raise SpecError([source.issue((), f"the {what} must be a mapping of keys to values",
                                      hint=hint)])
    return data, source


def validate_document(data: dict, source: SourceMap, model: type[M]) -> M:
    """Validate parsed data with a pydantic model; SpecError with located issues otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_issues(exc, data, source, model)) from None


def parse_garden(raw: bytes, file: str) -> LoadedGarden:
    """A garden file's bytes -> LoadedGarden; SpecError listing what is wrong otherwise."""
    with cyclic_gc_paused():
        data, source = read_mapping(raw, file, what="garden file",
                                    hint="it needs at least `name:` and `models:`")
        garden = validate_document(data, source, Garden)
        issues = check_garden(garden, source)
    errors = [i for i in issues if i.severity == "error"]
    if errors:
        raise SpecError(issues)
    return LoadedGarden(
        garden=garden,
        source=source,
        path=file,
        content_hash=hashlib.sha256(raw).hexdigest(),
        warnings=tuple(issues),
    )


def validation_issues(exc: ValidationError, data: Any, source: SourceMap,
                      root: type[BaseModel] = Garden) -> list[SpecIssue]:
    """Turn pydantic's errors into located, readable issues (one per field path), in file
    order: the first MAX_ERRORS in full, then one issue that counts the others."""
    grouped: dict[Path, list[dict[str, Any]]] = {}
    kinds: dict[Path, str] = {}
    for details in exc.errors(include_url=False, include_context=True):
        error = dict(details)
        path, kind = _data_path(error, data)
        grouped.setdefault(path, []).append(error)
        kinds[path] = kind
    located = sorted(grouped, key=lambda p: (_position(p, kinds[p], source), format_path(p)))
    issues = [_issue_for(path, kinds[path], grouped[path], source, root)
              for path in located[:MAX_ERRORS]]
    if len(located) > MAX_ERRORS:
        first = located[MAX_ERRORS]
        hidden = _issue_for(first, kinds[first], grouped[first], source, root)
        summary = summarise_hidden(len(located) - MAX_ERRORS, 0, hidden)
        issues += [summary] if summary else []
    return issues


def _position(path: Path, kind: str, source: SourceMap) -> tuple[int, int]:
    """Where `_issue_for` will locate the issue of ``path``: cheap, to sort before building."""
    if kind == "missing":
        mark = source.value_mark(path[:-1])
    elif kind in ("extra", "key"):
        mark = source.key_mark(path)
    else:
        mark = source.value_mark(path)
    return (mark.line, mark.column) if mark else (0, 0)


def _data_path(error: dict[str, Any], data: Any) -> tuple[Path, str]:
    """Keep the parts of pydantic's loc that name real places in the data (drop union tags)."""
    loc = error["loc"]
    node = data
    path: list[Any] = []
    kind = "value"
    for i, part in enumerate(loc):
        if part == "[key]":
            kind = "key"
            continue
        in_mapping = isinstance(node, dict) and isinstance(part, str) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_mapping or in_list:
            path.append(part)
            node = node[part]
        elif error["type"] == "missing" and i == len(loc) - 1 and isinstance(part, str):
            path.append(part)
            kind = "missing"
            break
    if error["type"] == "extra_forbidden":
        kind = "extra"
    return tuple(path), kind


def _issue_for(path: Path, kind: str, errors: list[dict[str, Any]], source: SourceMap,
               root: type[BaseModel]) -> SpecIssue:
    field = next((p for p in reversed(path) if isinstance(p, str)), "")
    first = errors[0]
    if kind == "extra":
        valid = _valid_keys(root, path[:-1])
        key = str(path[-1])
        matches = (difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                   if len(key) <= MAX_SUGGESTED_LENGTH else [])
        hint = f"did you mean {matches[0]!r}?" if matches else ""
        listing = ", ".join(valid)
        hint = (hint + " " if hint else "") + f"valid keys here: {listing}"
        return source.issue(path, f"unknown key {quoted(path[-1])}", hint=hint, at_key=True)
    if kind == "missing":
        return source.issue(path, f"required key {field!r} is missing",
                            hint=FIELD_HINTS.get(field, ""), at=path[:-1])
    if kind == "key":
        return source.issue(path, f"invalid key {quoted(path[-1])}: {_clean(first['msg'])}",
                            hint="environment names are letters, digits and '_', "
                            "not starting with a digit", at_key=True)
    value = first.get("input")
    secret = "env" in path  # environment values may be secrets: never repeat them
    got = _describe(value, None if secret else source.plain_text.get(path))
    if secret:
        got = "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"
    if len(errors) > 1 or first["type"] == "literal_error":
        expected = FIELD_HINTS.get(field) or _expected_literals(errors)
        message = f"invalid value {got}"
        hint = f"expected {expected}" if expected else _clean(first["msg"])
        close = _close_literal(value, errors)
        if close:
            hint = f"did you mean {close!r}? " + hint
        return source.issue(path, message, hint=hint)
    message = _clean(first["msg"])
    if first["type"] != "value_error":  # our own validators already name the value
        message += f", got {got}"
    hint = FIELD_HINTS.get(field, "")
    plain = source.plain_text.get(path)
    if first["type"] == "string_type" and plain is not None:
        written = "the value" if secret else quoted(plain).replace("'", '"', 2)
        hint = f"YAML read this as {type(value).__name__}; quote it to keep it text: {written}"
    elif first["type"] in ("int_type", "float_type", "bool_type") and isinstance(value, str):
        if plain is not None and plain[:1] == "0" and plain[1:2].isdigit():
            hint = "leading zeros are ambiguous in YAML; write the number without them"
        elif first["type"] == "bool_type":
            hint = "write true or false (yes/no/on/off are text here)"
        elif plain is None and is_number(value):
            hint = "remove the quotes to give a number"
    return source.issue(path, message, hint=hint)


def _clean(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg[:1].lower() + msg[1:]


def _describe(value: Any, plain: str | None) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "an empty value (null)"
    if isinstance(value, (int, float)):
        return f"the number {plain if plain is not None else value}"
    if isinstance(value, str):
        return quoted(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _expected_literals(errors: list[dict[str, Any]]) -> str:
    for error in errors:
        expected = (error.get("ctx") or {}).get("expected")
        if expected:
            return f"one of {expected}"
    return ""


def _close_literal(value: Any, errors: list[dict[str, Any]]) -> str | None:
    if not isinstance(value, str) or len(value) > MAX_SUGGESTED_LENGTH:
        return None
    for error in errors:
        expected: str = (error.get("ctx") or {}).get("expected", "")
        words = expected.replace(" or ", ",").split(",")
        options = [o.strip().strip("'") for o in words if o.strip()]
        close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
        if close:
            return close[0]
    return None


def _valid_keys(root: type[BaseModel], path: Path) -> list[str]:
    """The field names allowed at ``path`` (a mapping), found by walking the pydantic models."""
    model: Any = root
    for part in path:
        model = _step(model, part)
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _step(annotation: Any, part: Any) -> Any:
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not isinstance(part, str) or part not in annotation.model_fields:
            return None
        return _unwrap(annotation.model_fields[part].annotation)
    origin = typing.get_origin(annotation)
    if origin in (list, tuple) and isinstance(part, int):
        return _unwrap(typing.get_args(annotation)[0])
    if origin is dict:
        return _unwrap(typing.get_args(annotation)[1])
    return None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        else:
            return annotation


__all__ = ["LoadedGarden", "load_garden", "parse_garden", "read_file", "read_mapping",
           "validate_document", "format_path"]
