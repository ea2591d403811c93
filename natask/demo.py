"""The README demo: the bundled nats-server, worker processes, tasks, results, who ran each."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from datetime import timedelta

from .app import Natask

app = Natask("demo", subject_prefix="demo")


@app.task(name="demo.checksum")
def checksum(text: str, rounds: int = 2000) -> str:
    """Iterated SHA-256 of ``text``, after a pause standing in for I/O."""
    time.sleep(0.2)
    digest = text.encode()
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


@app.task(name="demo.add")
async def add(x: int, y: int) -> int:
    return x + y


@app.periodic(timedelta(seconds=30), name="demo.tick")
def tick() -> str:
    """Fired by `natask beat` every 30 s (the docker-compose beat service)."""
    return time.strftime("%H:%M:%S")


def run_demo(count: int = 10, workers: int = 2) -> None:
    from .server import NatsServer

    with NatsServer() as server:
        print(f"nats-server (bundled) with JetStream at {server.url}")
        env = {**os.environ, "NATS_URL": server.url}
        client = Natask("demo", servers=[server.url], subject_prefix="demo")
        send_checksum = client.task(name="demo.checksum")(checksum.fn)
        send_add = client.task(name="demo.add")(add.fn)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            started = time.perf_counter()
            # Enqueued before any worker exists: the WorkQueue stream keeps them until one starts.
            results = [send_checksum.delay(f"order-{i}") for i in range(count)]
            total = send_add.delay(2, 3)
            print(f"enqueued {count + 1} tasks")
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "natask", "worker", "-A", "natask.demo:app", "-c", "2",
                     "--loglevel", "warning"],
                    env=env,
                )
                for _ in range(workers)
            ]
            print(f"started {workers} worker process(es): {', '.join(str(p.pid) for p in procs)}")
            for i, result in enumerate(results):
                value = result.get(timeout=30)
                print(f"  demo.checksum('order-{i}') = {value}   ran on worker {result.worker}")
            print(f"  demo.add(2, 3) = {total.get(timeout=30)}   ran on worker {total.worker}")
            print(f"all results back in {time.perf_counter() - started:.2f}s")
        finally:
            client.close()
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
