"""Shared fixtures: the anyio backend; daemon and fake upstream fixtures live beside them."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio (aiohttp needs it), the backend the daemon uses."""
    return "asyncio"
