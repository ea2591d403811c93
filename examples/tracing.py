"""Tracing with OpenTelemetry: one trace from the caller's span through a chain of two tasks.

``natask.otel.instrument(app)`` adds a producer span per publish (``publish <task>``) and a consumer
span per run (``process <task>``); the W3C trace context travels in each message's ``traceparent``
header, so a worker in another process, or on another machine, continues the caller's trace, and the
chain's second step (sent by the worker when the first finished) continues the first step's.
Here the worker runs in this process and spans go to an in-memory exporter, printed as a tree; in
production use your SDK's exporter (OTLP, Jaeger...) in every producer and worker process.

    pip install "natask[otel]" opentelemetry-sdk
    python examples/tracing.py              # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import natask.otel
from natask import Natask, chain
from natask.worker import Worker

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("tracing", subject_prefix="tracing")
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))  # in production: BatchSpanProcessor(OTLPSpanExporter())
natask.otel.instrument(app, tracer_provider=provider)  # or leave tracer_provider out: the global one


@app.task(name="tracing.fetch")
async def fetch(order: str) -> dict[str, object]:
    return {"order": order, "items": 3}


@app.task(name="tracing.invoice")
def invoice(order: dict[str, object]) -> str:
    return f"invoice for {order['order']}: {order['items']} items"


def tree(spans: tuple[ReadableSpan, ...]) -> list[str]:
    """The spans as indented lines, children under their parent."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for span in children.get(parent, []):
            assert span.context is not None
            lines.append(f"{'  ' * depth}{span.name}  [{span.kind.name.lower()}, {span.status.status_code.name}]")
            walk(span.context.span_id, depth + 1)

    walk(None, 0)
    return lines


async def main() -> None:
    tracer = provider.get_tracer("example")
    async with app, Worker(app, concurrency=4):
        with tracer.start_as_current_span("checkout") as caller:
            result = await chain(fetch.s("A-17"), invoice.s()).adelay()
        print(await result.aget(timeout=10))
    # The worker has drained: every span of the chain has ended.
    spans = exporter.get_finished_spans()
    trace_ids = {s.context.trace_id for s in spans if s.context is not None}
    assert caller.get_span_context().trace_id in trace_ids
    print(f"trace {caller.get_span_context().trace_id:032x}: {len(spans)} spans, {len(trace_ids)} trace")
    for line in tree(spans):
        print(line)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    finally:
        if "server" in globals():
            server.close()
