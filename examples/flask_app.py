"""Flask: sync views that enqueue tasks and read their results through natask's sync API.

Flask views are plain functions run in the WSGI server's threads: ``task.delay(...)`` enqueues
(returns once the server stored the task), ``app.AsyncResult(id).state``/``.get(timeout=...)`` read
the outcome. natask does its NATS I/O on the app's own background thread, so no event loop is needed
in the web code. The worker is a separate ``natask worker`` process, as in a real deployment.

    pip install "natask[examples]"         # flask
    python examples/flask_app.py           # uses $NATS_URL, or starts the bundled nats-server
    # in production: natask worker -A flask_app:app   and   gunicorn flask_app:web
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request

from natask import Natask, NoWorkers, ResultTimeout, TaskFailed

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("flask-example", subject_prefix="flaskex")  # the natask app; `web` below is Flask's
web = Flask(__name__)


@app.task(name="billing.quote")
def quote(items: list[int]) -> dict[str, Any]:
    if any(item < 0 for item in items):
        raise ValueError(f"negative quantity in {items}")
    return {"items": len(items), "total": round(sum(items) * 9.99, 2)}


@app.task(name="example.ping")
def ping() -> str:
    return "pong"


@web.get("/quote")
def enqueue_quote() -> Any:
    items = [int(i) for i in request.args["items"].split(",")]
    return jsonify(task_id=quote.delay(items).id), 202


@web.get("/quote/<task_id>")
def quote_result(task_id: str) -> Any:
    try:
        return jsonify(app.AsyncResult(task_id).get(timeout=10))
    except TaskFailed as e:
        return jsonify(error=f"{e.exc_type}: {e.message}"), 422
    except ResultTimeout:
        return jsonify(state=app.AsyncResult(task_id).state), 504


def start_worker() -> subprocess.Popen[bytes]:
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "natask", "worker", "-A", "flask_app:app", "-c", "4",
                             "--loglevel", "warning"], env=env, cwd=here)


def wait_for_worker(timeout: float = 20.0) -> None:
    """A sync RPC answers as soon as a worker listens; ``NoWorkers`` comes back at once until then."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ping.call()
            return
        except NoWorkers:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    worker = start_worker()
    try:
        wait_for_worker()
        client = web.test_client()  # Flask's own test client: no port needed for the demo
        for items in ("1,2,3", "4,-1"):
            answer = client.get(f"/quote?items={items}")
            task_id = answer.get_json()["task_id"]
            print(f"GET /quote?items={items} -> {answer.status_code}")
            result = client.get(f"/quote/{task_id}")
            print(f"GET /quote/<id> -> {result.status_code} {result.get_json()}")
    finally:
        worker.terminate()
        worker.wait(15)
        app.close()


if __name__ == "__main__":
    main()
