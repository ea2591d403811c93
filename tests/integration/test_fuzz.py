"""A bounded fuzz run against a real worker: crafted bodies and headers interleaved with good tasks.
Every crafted message is dead-lettered exactly once with a reason, the good tasks keep flowing, and
the worker keeps its connection. Seeded, so a failure reproduces."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import msgpack
import nats

from natask import Natask
from natask.dlq import DeadLetters
from natask.server import NatsServer
from natask.testing import worker

SEED = 20261129
CRAFTED = 300
GOOD = 100
SUBJECT = "tasks.default.t.ok"
FUZZ_HEADER = "X-Fuzz"


def _text(rng: random.Random) -> str:
    alphabet = "ab.*> _-/=\x1b\r\x00é$:"
    return "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 3, 40, 300, 5000))))


def _junk(rng: random.Random) -> Any:
    return rng.choice([None, True, -1, 2**63, -(2**63), 1e300, math.inf, math.nan, "", _text(rng), b"\x00" * 3,
                       [], {}, [1, [2, [3]]], {"a": 1}, {1: 2}])


def _body(rng: random.Random, **fields: Any) -> bytes:
    body: dict[Any, Any] = {"v": 1, "id": f"{rng.getrandbits(64):016x}", "task": "t.ok", "args": [1],
                            "kwargs": {}}
    body.update(fields)
    return msgpack.packb(body, use_bin_type=True)


# Each mutation makes a message that must be dead-lettered (not run, not retried, not lost).
Mutation = Callable[[random.Random], tuple[bytes, dict[str, str]]]
MUTATIONS: list[Mutation] = [
    lambda r: (r.randbytes(r.choice((0, 1, 7, 100, 5000))), {}),  # random bytes
    lambda r: (msgpack.packb(_junk(r)), {}),  # msgpack, but not a map
    lambda r: (_body(r, v=r.choice([0, 2, "1", None, 1.0001])), {}),  # wire version
    lambda r: (_body(r, id=r.choice(["", "a b", "a.b", "*", ">", "x" * 201, 7, None])), {}),  # id
    lambda r: (_body(r, task=r.choice(["", "t..ok", "t.ok.", ".t", "t ok", "t.*", "t.>", "x" * 300, 1])), {}),
    lambda r: (_body(r, task=r.choice(["t.other", "t.ok.x", "T.ok"])), {}),  # forged: not the subject's task
    lambda r: (_body(r, eta=r.choice([math.inf, -math.inf, math.nan, 1e300, -5, "soon", [1]])), {}),
    lambda r: (_body(r, expires=r.choice([math.inf, math.nan, 1e300, -1, {}])), {}),
    lambda r: (_body(r, args=r.choice([_junk(r), [1, 2, 3, 4], []])), {}),
    lambda r: (_body(r, kwargs=r.choice([{1: 2}, {"y": 1}, [1], "x"])), {}),
    lambda r: (_body(r, parent_id=r.choice(["a b", "*", 5])), {}),
    lambda r: (_body(r, links=r.choice(["x", 5, {"a": 1}])), {}),
    lambda r: (_body(r, meta=r.choice(["x", 5, [1]])), {}),
    lambda r: (_body(r), {"Natask-Retries": r.choice(["abc", "-1", "-1000000000", "1e3", "1 1", "99999999999",
                                                      "\x1b[31m", ""])}),
    lambda r: (_body(r), {"Natask-Reply": r.choice(["$KV.natask_results_tasks.x", "$KV.natask_revoked_tasks.y",
                                                    "_INBOX", "_INBOX.>", "_INBOX.*.x", "tasks.default.t.ok",
                                                    "natask.dlq.tasks.default.t.ok", "_INBOX.a..b",
                                                    "_INBOX." + "a" * 400])}),
    lambda r: (_body(r, task="t.unknown"), {"Natask-Unknown-Since": r.choice(["x", "inf", "nan", "1e300", "-1"])}),
    lambda r: (b"\xdd\xff\xff\xff\xff", {}),  # an array claiming 4 billion items
    lambda r: (b"\x91" * 5000 + b"\xc0", {}),  # nested 5,000 deep
]


async def test_crafted_messages_are_dead_lettered_once_and_good_tasks_keep_flowing(nats_server: NatsServer) -> None:
    rng = random.Random(SEED)
    app = Natask("fuzz", servers=[nats_server.url], ack_wait=5, publish_timeout=5)
    runs: list[int] = []

    @app.task(name="t.ok")
    def ok(x: int) -> int:
        runs.append(x)
        return x

    nc = await nats.connect(nats_server.url)
    try:
        async with worker(app, concurrency=4) as w:
            good = [await ok.adelay(-1)]  # the stream exists
            js = nc.jetstream()
            crafted = 0
            for i in range(CRAFTED):
                data, headers = rng.choice(MUTATIONS)(rng)
                await js.publish(SUBJECT, data, headers={**headers, FUZZ_HEADER: str(i), "Nats-Msg-Id": f"fuzz-{i}"})
                crafted += 1
                if i % (CRAFTED // GOOD) == 0:
                    good.append(await ok.adelay(i))
            values = [await r.aget(timeout=30) for r in good]
            dlq = DeadLetters(app)
            broker = await app.client.broker()
            sub = await broker.subscribe("natask.dlq.tasks.>")
            entries = await dlq.list(limit=100_000)
            while len(entries) < crafted:
                await sub.next_msg(timeout=30)
                entries = await dlq.list(limit=100_000)
            await sub.unsubscribe()
            assert w.broker_.nc.is_connected
        info = await broker.js.consumer_info("NATASK_TASKS", "default")
    finally:
        await nc.close()
        await app.aclose()
    fuzzed = sorted(int(e.headers[FUZZ_HEADER]) for e in entries)
    assert fuzzed == list(range(CRAFTED))  # every crafted message dead-lettered, none twice
    assert all(e.reason for e in entries)
    assert values == [-1, *range(0, CRAFTED, CRAFTED // GOOD)] and sorted(runs) == sorted(values)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0 and info.num_pending == 0
