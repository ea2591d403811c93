"""Shared fixtures. ``nats_server`` comes from the natask.testing plugin (a real server per test)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from natask import Natask
from natask.server import NatsServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def app(nats_server: NatsServer) -> AsyncIterator[Natask]:
    """An app on the test's own server; closed after the test."""
    a = Natask("test", servers=[nats_server.url], ack_wait=5, publish_timeout=5)
    try:
        yield a
    finally:
        await a.aclose()


@pytest.fixture
def python() -> str:
    return sys.executable
