"""MkDocs hook: the configuration reference is generated from the settings classes, so it cannot drift.

A page writes `{{ settings_table }}` or `{{ model_fields_table }}` where the tables go.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.ops.settings import ModelSpec, Settings

# Defaults that are computed where the gateway runs, written as a reader should read them.
COMPUTED_DEFAULTS = {
    "models": "the two built-in models",
    "cache_dir": "`~/.cache/llm-gateway`",
    "engine_python": "the gateway's own Python",
}


def default_text(name: str, field: FieldInfo) -> str:
    """A field's default as the reference shows it."""
    if name in COMPUTED_DEFAULTS:
        return COMPUTED_DEFAULTS[name]
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{value}`"
    if value in ([], {}):
        return "empty"
    return f"`{value}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    """Every `GATEWAY_*` variable: its default and what it does (the field's description)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(
            f"| `GATEWAY_{name.upper()}` | {default_text(name, field)} | {_escape(field.description or '')} |"
        )
    return "\n".join(rows)


def model_fields_table() -> str:
    """Every field of a model entry in the models file."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, field in ModelSpec.model_fields.items():
        rows.append(f"| `{name}` | {default_text(name, field)} | {_escape(field.description or '')} |")
    return "\n".join(rows)


TABLES = {"{{ settings_table }}": settings_table, "{{ model_fields_table }}": model_fields_table}


def render(markdown: str) -> str:
    """`markdown` with every table placeholder replaced."""
    for placeholder, table in TABLES.items():
        if placeholder in markdown:
            markdown = markdown.replace(placeholder, table())
    return markdown


def on_page_markdown(markdown: str, **_: Any) -> str:
    """MkDocs calls this for every page."""
    return render(markdown)
