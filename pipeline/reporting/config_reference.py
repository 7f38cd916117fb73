"""The configuration reference (docs/configuration.md), generated from the pydantic models.

Every key, its type, default, bounds and description come from :mod:`pipeline.config`, so the reference
cannot drift from the code: ``bvpo config --reference`` prints it and a test compares it with the
checked-in file.
"""

from __future__ import annotations

import inspect
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.config import PipelineConfig

DOC_PATH = Path("docs") / "configuration.md"
"""Where the generated reference is checked in, relative to the repository root."""

_INTRO = """\
# Configuration reference

<!-- Generated from pipeline/config.py by `bvpo config --reference --output docs/configuration.md`.
     Do not edit by hand: change the field descriptions in pipeline/config.py and regenerate. -->

One typed configuration (`PipelineConfig` in `pipeline/config.py`) drives the CLI, the Prefect flow
forms and the YAML files under `configs/`. Every key is optional: a value not given keeps the default
below. Unknown keys are an error. Three ways to set values, applied in this order:

1. the defaults below;
2. a YAML file: `bvpo run --config configs/tiny.yaml` (the same nesting as the sections below);
3. `--set section.key=value` (repeatable; the value is parsed as YAML, e.g. `--set train.lora='{r: 8}'`).

`bvpo config --config FILE --set ...` prints the resulting configuration as YAML without running anything.
In the Prefect UI, *Custom run* shows the same sections as a form.
"""


def config_reference_markdown(model: type[BaseModel] = PipelineConfig) -> str:
    """The whole reference as Markdown: one table per config section, in declaration order."""
    parts = [_INTRO]
    parts += _section_markdown(model, path="", title="Top level")
    return "\n".join(parts).rstrip() + "\n"


def _section_markdown(model: type[BaseModel], path: str, title: str, note: str = "") -> list[str]:
    """The table of ``model``'s own keys, then one subsection per nested section."""
    doc = inspect.getdoc(model) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ") if model.__doc__ else ""
    heading = f"## {title}" if not path else f"## `{path}`"
    out = [heading, ""]
    if summary and path:
        out += [summary + (f" {note}" if note else ""), ""]
    elif note:
        out += [note, ""]
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        section, optional = _section_type(field.annotation)
        if section is not None:
            extra = "Optional: `null` (the default) turns it off." if optional else ""
            nested.append((key, section, extra))
            rows.append(
                f"| `{name}` | section | {'`null`' if optional else 'see below'} | "
                f"{_cell(_describe(field, section))} [`{key}`](#{_anchor(key)}) |"
            )
            continue
        for member_path, member, member_note in _union_members(key, field.annotation):
            nested.append((member_path, member, member_note))
        rows.append(
            f"| `{name}` | `{_cell(_type_name(field.annotation))}` | {_default(field)} | "
            f"{_cell(_describe(field))} |"
        )
    if len(rows) > 2:
        out += [*rows, ""]
    for key, section, extra in nested:
        out += _section_markdown(section, key, key, extra)
    return out


def _section_type(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The config section type of a field (and whether it may be null), or ``(None, False)``."""
    if _is_model(annotation):
        return annotation, False
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and _is_model(args[0]) and len(get_args(annotation)) == 2:
            return args[0], True
    return None, False


def _union_members(key: str, annotation: Any) -> list[tuple[str, type[BaseModel], str]]:
    """Subsections for a list of tagged sections (``scoring.scorers``): one per ``name``."""
    if get_origin(annotation) is not list:
        return []
    (item,) = get_args(annotation)
    if get_origin(item) is Annotated:
        item = get_args(item)[0]
    members = get_args(item) if get_origin(item) in (Union, types.UnionType) else (item,)
    out = []
    for member in members:
        if not _is_model(member) or "name" not in member.model_fields:
            continue
        tag = member.model_fields["name"].default
        out.append((f"{key}[name={tag}]", member, f"A list item with `name: {tag}`."))
    return out


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _type_name(annotation: Any) -> str:
    """A short, YAML-minded rendering of a field type."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is list:
        return f"list[{', '.join(_type_name(a) for a in get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    if _is_model(annotation):
        name = annotation.model_fields.get("name")
        return f"{{name: {name.default}, ...}}" if name is not None else "section"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    return f"`{_cell(_yaml(value))}`"


def _yaml(value: Any) -> str:
    """A value as it would be written in a config file (YAML flow style)."""
    if isinstance(value, list) and value and all(_is_model(type(v)) for v in value):
        value = [getattr(v, "name", None) or v.model_dump(mode="json") for v in value]
    elif isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, Path):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _describe(field: FieldInfo, section: type[BaseModel] | None = None) -> str:
    """The field's description (or its section's docstring summary) and its bounds."""
    text = (field.description or "").strip()
    if not text and section is not None and section.__doc__:
        text = (inspect.getdoc(section) or "").split("\n\n")[0].replace("\n", " ")
    tags = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
    if not text and len(tags) == 1:  # the tag of a list item (scoring.scorers[].name)
        text = f"Selects this kind of item: always `{tags[0]}` here."
    bounds = _bounds(field)
    if bounds:
        text = f"{text} ({bounds})" if text else bounds.capitalize()
    return text


def _bounds(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            words.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Le):
            words.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.MinLen):
            words.append(f"at least {item.min_length} item(s)")
        elif getattr(item, "pattern", None):
            words.append(f"matches `{item.pattern}`")
    return ", ".join(words)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor(key: str) -> str:
    """GitHub's heading anchor of ``## `key` ``: lowercase, punctuation other than - and _ dropped."""
    return "".join(c for c in key.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")
