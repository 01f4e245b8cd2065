"""Shared test helpers: where the optional reference data folder is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_dir() -> Path:
    """The shared reference folder: $EGRESSD_SHARED_DIR, else ``../shared`` beside the checkout."""
    env = os.environ.get("EGRESSD_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def require_shared(sub: str) -> Path:
    """The folder ``sub`` of the shared reference data, or skip naming ``../shared/<sub>``."""
    path = shared_dir() / sub
    if not path.is_dir():
        pytest.skip(f"reference data ../shared/{sub} not found ({path}); "
                    "set EGRESSD_SHARED_DIR to the shared folder")
    return path
