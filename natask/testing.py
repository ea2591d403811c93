"""Testing support, registered as a pytest plugin: a real ``nats_server`` fixture and ``worker(app)``.

```python
async def test_add(nats_server):
    app = Natask("t", servers=[nats_server.url])
    add = app.task(name="t.add")(lambda x, y: x + y)
    async with worker(app):
        assert await (await add.adelay(2, 3)).aget(timeout=10) == 5
```
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .server import NatsServer
from .worker import DEFAULT_GRACE, UNKNOWN_GRACE, Worker

if TYPE_CHECKING:
    from .app import Natask

__all__ = ["NatsServer", "nats_server", "worker"]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """The bundled nats-server with JetStream, on a free loopback port with a temp store dir."""
    server = NatsServer(store_dir=str(tmp_path / "nats"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@asynccontextmanager
async def worker(
    app: Natask,
    queues: Sequence[str] | None = None,
    concurrency: int = 8,
    grace: float = DEFAULT_GRACE,
    unknown_grace: float = UNKNOWN_GRACE,
) -> AsyncIterator[Worker]:
    """An in-process worker consuming ``queues`` (default: the app's default queue) on the
    running event loop; drained and stopped on exit. ``unknown_grace=0`` dead-letters a task name
    it does not know at once (no rolling-deploy grace), which keeps such tests short."""
    w = Worker(app, queues=queues, concurrency=concurrency, grace=grace, unknown_grace=unknown_grace)
    await w.start()
    try:
        yield w
    finally:
        await w.stop()
