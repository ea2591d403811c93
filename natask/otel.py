"""OpenTelemetry tracing on natask's hooks (extra ``natask[otel]``): a producer span per publish, a
consumer span per run, W3C trace context carried in message headers.

    import natask.otel
    natask.otel.instrument(app)   # the global tracer provider, or tracer_provider=...

Spans follow the messaging semantic conventions (``messaging.system`` ``nats``); a retry is a new run
span in the same trace, and workflow steps a worker sends continue the trace of the step that sent them.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

from .hooks import Middleware, Outcome
from .states import State

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError:  # natask works without the extra; instrument() says how to get it
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .app import Natask
    from .message import Call
    from .options import Request

MAX_PENDING_SPANS: Final = 10_000
"""Producer spans kept between ``before_publish`` and ``after_publish`` per app; past it the oldest
is ended early (a publish that raised never reaches ``after_publish``: its span must not stay forever)."""
SYSTEM: Final = "nats"
"""``messaging.system`` of every span."""
INSTALL_HINT: Final = ('natask.otel needs OpenTelemetry: pip install "natask[otel]" '
                       "(plus an SDK to export spans, e.g. opentelemetry-sdk)")
"""The error of ``instrument()`` without the extra."""
_RESERVED: Final = ("natask-", "nats-")
"""Header prefixes natask and NATS own: a propagator never writes them."""

_run: contextvars.ContextVar[tuple[Span, contextvars.Token[Context]] | None] = contextvars.ContextVar(
    "natask_otel_run", default=None)
"""The running task's consumer span and the context token that made it current."""


class SpanStore:
    """Producer spans waiting for their publish to be confirmed, keyed by the call's identity, at most
    ``limit``: adding past it ends the oldest span (event ``natask.publish.unconfirmed``)."""

    def __init__(self, limit: int = MAX_PENDING_SPANS) -> None:
        self.limit = limit
        self._spans: OrderedDict[int, tuple[Call, Span]] = OrderedDict()
        self._lock = threading.Lock()  # producers on several event loops (threads) share one app

    def __len__(self) -> int:
        return len(self._spans)

    def put(self, call: Call, span: Span) -> None:
        # The entry holds the call, so its id() cannot be reused while the entry lives.
        with self._lock:
            self._spans[id(call)] = (call, span)
            evicted = self._spans.popitem(last=False)[1][1] if len(self._spans) > self.limit else None
        if evicted is not None:
            evicted.add_event("natask.publish.unconfirmed")
            evicted.end()

    def pop(self, call: Call) -> Span | None:
        with self._lock:
            entry = self._spans.pop(id(call), None)
        return entry[1] if entry is not None and entry[0] is call else None


class Tracing(Middleware):
    """The middleware ``instrument`` adds."""

    def __init__(self, app: Natask, tracer_provider: TracerProvider | None = None) -> None:
        self.names = app.names
        self.tracer = trace.get_tracer("natask", _version(), tracer_provider=tracer_provider)
        self.pending = SpanStore()

    # -- producer -----------------------------------------------------------------------------
    def before_publish(self, call: Call) -> None:
        subject = self.names.task_subject(call.queue, call.task)
        span = self.tracer.start_span(f"publish {call.task}", kind=SpanKind.PRODUCER, attributes={
            "messaging.system": SYSTEM, "messaging.operation.type": "send", "messaging.operation.name": "publish",
            "messaging.destination.name": subject, "messaging.message.id": call.task_id,
            "messaging.message.body.size": len(call.payload),
            "natask.task.name": call.task, "natask.task.id": call.task_id, "natask.queue": call.queue,
        })
        inject(call.headers, trace.set_span_in_context(span))
        self.pending.put(call, span)

    def after_publish(self, call: Call) -> None:
        span = self.pending.pop(call)
        if span is not None:
            span.end()

    # -- worker -------------------------------------------------------------------------------
    def before_task(self, request: Request) -> None:
        span = self.start_run(request)
        # Attached in the delivery's own context: the task (and its thread) sees the span as current.
        token = otel_context.attach(trace.set_span_in_context(span))
        _run.set((span, token))

    def after_task(self, request: Request, outcome: Outcome) -> None:
        run = _run.get()
        if run is None:
            return
        span, token = run
        _run.set(None)
        if outcome.state == State.SUCCESS:
            span.set_status(Status(StatusCode.OK))
        elif outcome.exception is not None:
            span.record_exception(outcome.exception)
            span.set_status(Status(StatusCode.ERROR, f"{type(outcome.exception).__name__}: {outcome.exception}"))
        span.set_attribute("natask.task.state", outcome.state)
        span.end()
        otel_context.detach(token)

    def on_retry(self, request: Request, exception: BaseException | None, countdown: float) -> None:
        run = _run.get()
        if run is not None:
            run[0].add_event("natask.retry", {"natask.retry.countdown": countdown,
                                              "exception.type": type(exception).__name__})

    def on_dead_letter(self, request: Request | None, reason: str, subject: str) -> None:
        attributes = {"natask.dead_letter.reason": reason, "messaging.destination.name": subject}
        run = _run.get()
        if run is not None:
            run[0].add_event("natask.dead_letter", attributes)
        elif request is not None:  # dead-lettered before it ran (unknown task, arguments that do not bind...)
            span = self.start_run(request)
            span.add_event("natask.dead_letter", attributes)
            span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason}"))
            span.end()

    def on_revoked(self, request: Request, terminated: bool, expired: bool) -> None:
        attributes = {"natask.revoked.terminated": terminated, "natask.revoked.expired": expired}
        run = _run.get()
        if run is None:  # revoked before it ran: a run span that shows it
            span = self.start_run(request)
            span.add_event("natask.revoked", attributes)
            span.end()
            return
        span, token = run
        _run.set(None)  # cancelled while running: no after_task follows
        span.add_event("natask.revoked", attributes)
        span.end()
        otel_context.detach(token)

    def start_run(self, request: Request) -> Span:
        """A consumer span for one run of ``request``, its parent read from the message's headers."""
        subject = self.names.task_subject(request.queue, request.task)
        return self.tracer.start_span(
            f"process {request.task}", context=propagate.extract(request.headers), kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM, "messaging.operation.type": "process",
                "messaging.operation.name": "process", "messaging.destination.name": subject,
                "messaging.consumer.group.name": request.queue, "messaging.message.id": request.id,
                "natask.task.name": request.task, "natask.task.id": request.id,
                "natask.task.retries": request.retries, "natask.queue": request.queue,
            })


def inject(headers: dict[str, str], context: Any) -> None:
    """Write the trace context of ``context`` into ``headers`` with the global propagator, never
    touching natask's and NATS's own headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    for key, value in carrier.items():
        if not key.lower().startswith(_RESERVED):
            headers[key] = value


def _version() -> str | None:
    try:
        return importlib.metadata.version("natask")
    except importlib.metadata.PackageNotFoundError:
        return None


def instrument(app: Natask, tracer_provider: TracerProvider | None = None) -> Middleware:
    """Trace ``app``'s publishes and runs with OpenTelemetry (``tracer_provider``: the global one
    when None). Idempotent: a second call returns the middleware of the first."""
    if trace is None:
        raise ImportError(INSTALL_HINT)
    for middleware in app.hooks.middleware:
        if isinstance(middleware, Tracing):
            return middleware
    tracing = Tracing(app, tracer_provider)
    app.add_middleware(tracing)
    return tracing
