"""Shared pytest setup: the repository root on sys.path (scripts are imported by module name)
and the read-only reference data that sits beside the repository."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data next to the repository (raw ReDial and INSPIRED copies); skip when absent."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path}")
    return path
