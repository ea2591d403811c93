"""``natask beat --health-port``: a beat's ``/health`` (200 healthy, 503 not; a JSON body), served by
the same small HTTP layer as the worker's."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from ..http import DEFAULT_HOST, HttpServer

if TYPE_CHECKING:
    from .leader import Beat

STALE_LEASE_TTLS: Final = 3.0
"""A beat whose lease loop got no answer from the server for this many ``lease_ttl`` is unhealthy
(a leader renews every third of it, a standby reads it every quarter)."""


def health(beat: Beat) -> dict[str, Any]:
    """Connected, loop running, the lease seen lately; ``role`` leader or standby (both healthy),
    the last tick this beat sent."""
    broker = beat.app.client.connected(asyncio.get_running_loop())
    connected = broker is not None and not broker.closed and broker.nc.is_connected
    checked = beat.lease_checked
    age = None if checked is None else time.monotonic() - checked
    fresh = age is not None and age <= STALE_LEASE_TTLS * beat.lease_ttl
    running = beat.running
    last = beat.last_tick
    return {
        "healthy": bool(connected and running and fresh),
        "connected": connected,
        "running": running,
        "role": "leader" if beat.is_leader else "standby",
        "beat": beat.id,
        "lease_checked_age": age,
        "entries": len(beat.entries),
        "last_tick": None if last is None else {"entry": last[0], "fire": _iso(last[1]), "sent": last[2]},
    }


def _iso(fire: datetime) -> str:
    return fire.isoformat().replace("+00:00", "Z")


async def serve(beat: Beat, port: int, host: str = DEFAULT_HOST) -> HttpServer:
    """Serve ``GET /health`` for ``beat`` on ``host:port`` (``0``: any free port; ``.port`` says which)."""

    async def check() -> tuple[int, str, bytes]:
        report = health(beat)
        return (200 if report["healthy"] else 503), "application/json", json.dumps(report).encode()

    server = HttpServer({"/health": check}, host, port)
    await server.start()
    return server
