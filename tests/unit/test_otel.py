"""natask.otel without a server: header injection, the bounded producer-span store, the missing extra."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from natask import Natask
from natask.message import Call
from natask.naming import HDR_MSG_ID
from natask.otel import SpanStore, Tracing, inject, instrument


@pytest.fixture
def provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp, exporter


def call(task_id: str = "a" * 32, headers: dict[str, str] | None = None) -> Call:
    return Call(task_id, "t.add", "default", b"x", headers if headers is not None else {HDR_MSG_ID: task_id},
                None, False)


class Clobbering:
    """A propagator that tries to write natask's and NATS's own headers."""

    fields = frozenset({"traceparent", "Nats-Msg-Id", "natask-reply"})

    def inject(self, carrier: dict[str, str], context: object = None, setter: object = None) -> None:
        carrier.update({"traceparent": "00-x", "Nats-Msg-Id": "evil", "natask-reply": "evil"})

    def extract(self, carrier: object, context: object = None, getter: object = None) -> object:
        return context


def test_inject_writes_w3c_headers_and_keeps_natask_headers(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    tp, _ = provider
    c = call()
    with tp.get_tracer("t").start_as_current_span("caller") as span:
        inject(c.headers, None)
    ctx = span.get_span_context()
    assert c.headers["traceparent"].startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    assert c.headers[HDR_MSG_ID] == "a" * 32


def test_inject_never_overwrites_natask_or_nats_headers() -> None:
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(Clobbering())  # type: ignore[arg-type]
    headers = {HDR_MSG_ID: "id1", "Natask-Reply": "_INBOX.1"}
    try:
        inject(headers, None)
    finally:
        propagate.set_global_textmap(before)
    assert headers == {HDR_MSG_ID: "id1", "Natask-Reply": "_INBOX.1", "traceparent": "00-x"}


def test_span_store_is_bounded_and_ends_what_it_drops(provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    tp, exporter = provider
    tracer = tp.get_tracer("t")
    store = SpanStore(limit=3)
    calls = [call(f"{i:032x}") for i in range(5)]
    for c in calls:
        store.put(c, tracer.start_span(c.task_id))
    assert len(store) == 3
    dropped = exporter.get_finished_spans()
    assert [s.name for s in dropped] == [calls[0].task_id, calls[1].task_id]
    assert all(s.events[0].name == "natask.publish.unconfirmed" for s in dropped)
    assert store.pop(calls[0]) is None  # dropped already: after_publish ends nothing twice
    span = store.pop(calls[4])
    assert span is not None and span.name == calls[4].task_id  # type: ignore[attr-defined]
    assert store.pop(calls[4]) is None and len(store) == 2


def test_span_store_matches_the_call_object_not_an_equal_one(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    tp, _ = provider
    store = SpanStore()
    c = call()
    store.put(c, tp.get_tracer("t").start_span("s"))
    assert store.pop(call()) is None and store.pop(c) is not None


def test_producer_span_ends_after_publish_with_semantic_attributes(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    tp, exporter = provider
    app = Natask("u", subject_prefix="otelu")
    tracing = instrument(app, tracer_provider=tp)
    assert isinstance(tracing, Tracing) and instrument(app, tracer_provider=tp) is tracing  # idempotent
    assert app.hooks.middleware == [tracing]
    c = call()
    tracing.before_publish(c)
    assert exporter.get_finished_spans() == () and "traceparent" in c.headers
    tracing.after_publish(c)
    (span,) = exporter.get_finished_spans()
    assert span.name == "publish t.add" and span.kind == trace.SpanKind.PRODUCER
    assert dict(span.attributes or {}) == {
        "messaging.system": "nats", "messaging.operation.type": "send", "messaging.operation.name": "publish",
        "messaging.destination.name": "otelu.default.t.add", "messaging.message.id": c.task_id,
        "messaging.message.body.size": 1, "natask.task.name": "t.add", "natask.task.id": c.task_id,
        "natask.queue": "default"}
    assert c.headers["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"


def test_natask_does_not_import_opentelemetry_and_instrument_names_the_extra() -> None:
    code = (
        "import sys\n"
        "import natask\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules), 'natask imported opentelemetry'\n"
        "sys.modules['opentelemetry'] = None\n"
        "import natask.otel\n"
        "try:\n"
        "    natask.otel.instrument(natask.Natask('x'))\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install "natask[otel]"' in out
