"""The settings tables of the docs, generated from the Settings fields: `python -m app.settings_table --write`.

The field descriptions are the one source of truth; the docs carry their tables between marker comments,
and a test checks that they match what this module generates.
"""

from __future__ import annotations

import argparse
import re
import sys
from enum import Enum
from pathlib import Path

from pydantic.fields import FieldInfo

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# The settings a new user meets first: the README's short table. docs/configuration.md lists them all.
MAIN_SETTINGS = (
    "backend",
    "model_path",
    "upstream_base_url",
    "upstream_api_key",
    "host",
    "port",
    "max_concurrent_requests",
    "max_queue_size",
    "request_timeout",
    "default_priority",
    "api_keys",
    "api_keys_file",
    "backends_file",
)
DOCUMENTS = {"README.md": MAIN_SETTINGS, "docs/configuration.md": tuple(Settings.model_fields)}
_BLOCK = re.compile(r"(<!-- settings-table:begin -->\n).*?(<!-- settings-table:end -->)", re.DOTALL)


def shown_default(field: FieldInfo) -> str:
    """A field's default as the docs show it."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("shown_default"), str):
        return str(extra["shown_default"])
    value = field.default
    if value is None:
        return "(none)"
    if value in ("", ()):
        return "(empty)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def table(names: tuple[str, ...]) -> str:
    """The markdown table of these settings, in this order."""
    fields = Settings.model_fields
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{name.upper()}` | {shown_default(fields[name])} | {fields[name].description} |" for name in names]
    return "\n".join(rows) + "\n"


def rendered(text: str, names: tuple[str, ...]) -> str:
    """`text` with its settings block replaced by the generated table."""
    if not _BLOCK.search(text):
        raise ValueError("no <!-- settings-table:begin --> ... <!-- settings-table:end --> block")
    return _BLOCK.sub(lambda m: m.group(1) + table(names) + m.group(2), text, count=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite the tables in place")
    args = parser.parse_args()
    stale = []
    for document, names in DOCUMENTS.items():
        path = ROOT / document
        text = path.read_text()
        new = rendered(text, names)
        if new != text:
            stale.append(document)
            if args.write:
                path.write_text(new)
    if stale and not args.write:
        print(f"settings tables out of date in {', '.join(stale)}: run python -m app.settings_table --write")
        sys.exit(1)


if __name__ == "__main__":
    main()
