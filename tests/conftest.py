"""Test tiers: every test under unit/, integration/ or e2e/ carries that tier's marker."""

from __future__ import annotations

from pathlib import Path

import pytest

_TIERS = {"unit": "unit", "integration": "integration", "e2e": "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tier of its directory, so `-m unit` selects exactly tests/unit."""
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.path)).relative_to(root).parts
        tier = _TIERS.get(parts[0]) if parts else None
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
