"""Sentry on natask's hooks (extra ``natask[sentry]``): each run in its own isolation scope, tagged with
the task, and the exception of a failed task captured.

    import sentry_sdk, natask.sentry
    sentry_sdk.init(dsn=...)
    natask.sentry.instrument(app)

A run that will be retried is not reported: the exception of the run that ends the task (no retries
left, or none asked for) is, tagged with how many retries came before it. With sentry-sdk's default logging
integration the worker's ERROR line for a failure (traceback included) is an event too, sent in the
same scope; Sentry's dedupe integration then drops the second capture of that same exception.
"""

from __future__ import annotations

import contextvars
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Final

from .hooks import Middleware, Outcome
from .states import State

try:
    import sentry_sdk
    from sentry_sdk.scope import Scope
except ImportError:  # natask works without the extra; instrument() says how to get it
    sentry_sdk = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .app import Natask
    from .options import Request

INSTALL_HINT: Final = 'natask.sentry needs sentry-sdk 2: pip install "natask[sentry]"'
"""The error of ``instrument()`` without the extra."""

_run: contextvars.ContextVar[AbstractContextManager[Scope] | None] = contextvars.ContextVar(
    "natask_sentry_run", default=None)
"""The isolation scope of the task running in this context, still entered."""


class Reporting(Middleware):
    """The middleware ``instrument`` adds."""

    def before_task(self, request: Request) -> None:
        # Entered here and left in after_task: both run in the delivery's context, and a ``def``
        # task's thread runs in a copy of it, so whatever the task reports carries these tags.
        scope_cm = sentry_sdk.isolation_scope()
        scope = scope_cm.__enter__()
        _run.set(scope_cm)
        scope.set_transaction_name(request.task)
        scope.set_tag("natask.task", request.task)
        scope.set_tag("natask.task_id", request.id)
        scope.set_tag("natask.queue", request.queue)
        scope.set_tag("natask.retries", str(request.retries))
        scope.set_context("natask", {
            "task": request.task, "id": request.id, "queue": request.queue, "retries": request.retries,
            "parent_id": request.parent_id, "root_id": request.root_id, "eta": request.eta,
            "expires": request.expires,
        })

    def after_task(self, request: Request, outcome: Outcome) -> None:
        if outcome.state == State.FAILURE and outcome.exception is not None:
            sentry_sdk.capture_exception(outcome.exception)
        self.leave()

    def on_revoked(self, request: Request, terminated: bool, expired: bool) -> None:
        self.leave()  # cancelled while running: no after_task follows

    def leave(self) -> None:
        scope_cm = _run.get()
        if scope_cm is not None:
            _run.set(None)
            scope_cm.__exit__(None, None, None)


def instrument(app: Natask) -> Middleware:
    """Report ``app``'s task failures to Sentry with task tags (call ``sentry_sdk.init`` yourself).
    Idempotent: a second call returns the middleware of the first."""
    if sentry_sdk is None:
        raise ImportError(INSTALL_HINT)
    for middleware in app.hooks.middleware:
        if isinstance(middleware, Reporting):
            return middleware
    reporting = Reporting()
    app.add_middleware(reporting)
    return reporting

