"""The docs' settings tables are the ones the Settings fields generate."""

from __future__ import annotations

import pytest

from app.settings import Settings
from app.settings_table import DOCUMENTS, ROOT, rendered, table


@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_the_document_carries_the_generated_table(document: str) -> None:
    text = (ROOT / document).read_text()
    assert rendered(text, DOCUMENTS[document]) == text, "run: python -m app.settings_table --write"


def test_every_setting_is_in_the_full_table_with_its_description() -> None:
    full = table(DOCUMENTS["docs/configuration.md"])
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert f"| `{name.upper()}` |" in full


def test_a_document_without_the_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="settings-table"):
        rendered("# no table here\n", ("port",))
