"""The natask dashboard (Flower's job): queues, workers, tasks with history and search, a task's
detail, charts, dead letters to replay, the broker's sizes and limits, periodic schedules to edit
(through ``app.beat``). A Starlette ASGI app, ``asgi_app(app)``, mountable in your own app,
served by uvicorn in ``natask dashboard`` (extra ``natask[dashboard]``).

Importing this package needs no web framework: ``asgi_app``, ``Dashboard`` and ``serve`` import
Starlette and uvicorn when called."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from .auth import Auth, check_binding, is_loopback, local_names
from .feed import HISTORY_MAX_AGE, HISTORY_MAX_BYTES, MAX_DEAD_LETTERS, REFRESH, History
from .model import DEFAULT_HISTORY_LIMIT, Model, Query, TaskRow
from .previews import PREVIEW_CHARS, REDACTED, is_secret, preview, redact

if TYPE_CHECKING:
    from ..app import Natask
    from .server import Dashboard, serve
    from .web import DashboardApp

DEFAULT_PORT: Final = 5555
"""Flower's port: an operator's muscle memory."""
INSTALL: Final = 'pip install "natask[dashboard]"'
"""What to run when Starlette or uvicorn is missing."""


def require_web() -> None:
    """Raise ``ConfigError`` naming the pip command when the dashboard extra is not installed."""
    from ..errors import ConfigError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"the dashboard needs Starlette and uvicorn ({e.name} is missing): {INSTALL}") from None


def asgi_app(app: Natask, *, basic_auth: Iterable[str | tuple[str, str]] = (), auth_token: str | None = None,
             auth_header: str | None = None, history: bool = True, history_max_age: float = HISTORY_MAX_AGE,
             history_max_bytes: int = HISTORY_MAX_BYTES, history_limit: int = DEFAULT_HISTORY_LIMIT,
             ) -> DashboardApp:
    """The dashboard as an ASGI app: ``web.mount("/natask", asgi_app(app, basic_auth=["admin:s3cret"]))``.

    ``basic_auth`` (``"user:password"`` or pairs), ``auth_token`` (``Authorization: Bearer``, or open
    ``?token=…`` once in a browser) and ``auth_header`` (a header your authenticating proxy sets):
    any one lets a request in; none configured, every request is let in (protect the mount yourself).
    ``history``: keep lifecycle events in the ``NATASK_EVENTS_<prefix>`` stream (created on start,
    ``history_max_age`` seconds, ``history_max_bytes``) and rebuild from it on start, keeping at most
    ``history_limit`` tasks in memory."""
    require_web()
    from .web import DashboardApp

    return DashboardApp(app, basic_auth=basic_auth, auth_token=auth_token, auth_header=auth_header,
                        history=History(history_max_age, history_max_bytes, history), history_limit=history_limit)


def __getattr__(name: str) -> Any:
    if name in ("Dashboard", "serve", "DashboardApp"):
        require_web()
        from . import server, web

        return getattr(server if name != "DashboardApp" else web, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_HISTORY_LIMIT", "DEFAULT_PORT", "HISTORY_MAX_AGE", "HISTORY_MAX_BYTES", "MAX_DEAD_LETTERS",
           "PREVIEW_CHARS", "REDACTED", "REFRESH", "Auth", "Dashboard", "DashboardApp", "History", "Model", "Query",
           "TaskRow", "asgi_app", "check_binding", "is_loopback", "is_secret", "local_names", "preview", "redact",
           "require_web", "serve"]
