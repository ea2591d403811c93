"""Django-style sync usage: plain WSGI views enqueue tasks and wait for results, from many threads at once.

No Django needed to show it: the views below are plain functions of the kind a Django view is, served
by a threaded WSGI server from the standard library (as gunicorn ``--threads`` or ``runserver``
would). They call the sync API — ``task.delay()``, ``AsyncResult.get()``, ``task.call()``,
``app.AsyncResult(id).state`` — from request threads that have no event loop: natask runs its NATS
I/O on the app's own background thread, so nothing async leaks into the web code. The worker is a
separate ``natask worker`` process, as in a real deployment.

    python examples/django_style.py        # uses $NATS_URL, or starts the bundled nats-server
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from natask import Natask, NoWorkers

if __name__ == "__main__" and not os.environ.get("NATS_URL"):
    from natask.server import NatsServer

    server = NatsServer().start()  # the bundled nats-server, for this run only
    os.environ["NATS_URL"] = server.url

app = Natask("django-style", subject_prefix="djangostyle")  # e.g. in myproject/tasks.py


@app.task(name="accounts.send_welcome")
def send_welcome(user_id: int) -> str:
    time.sleep(0.05)  # talks to a mail server
    return f"welcome mail sent to user {user_id}"


@app.task(name="reports.monthly_total")
def monthly_total(month: str) -> dict[str, Any]:
    return {"month": month, "total": sum(range(int(month[-2:]) * 1000))}


@app.task(name="accounts.ping")
def ping() -> str:
    return "pong"


# -- views: sync functions, like Django's ------------------------------------------------------------

def thread_info() -> str:
    try:
        asyncio.get_running_loop()
        loop = "running"
    except RuntimeError:
        loop = "none"
    return f"{threading.current_thread().name.split()[0]}, event loop: {loop}"


def signup(params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Enqueue and answer at once: the mail goes out in the background."""
    result = send_welcome.delay(int(params["user"]))
    return 202, {"task_id": result.id, "thread": thread_info()}


def task_status(params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = app.AsyncResult(params["id"])
    return 200, {"state": result.state, "result": result.info if result.ready() else None}


def report(params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Enqueue and wait for the result inside the request (bounded by a timeout)."""
    total = monthly_total.delay(params["month"]).get(timeout=10)
    return 200, {**total, "thread": thread_info()}


VIEWS: dict[str, Callable[[dict[str, str]], tuple[int, dict[str, Any]]]] = {
    "/signup": signup, "/status": task_status, "/report": report,
}


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI entry point (what ``myproject/wsgi.py`` exposes)."""
    view = VIEWS.get(environ["PATH_INFO"])
    params = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    status, body = view(params) if view else (404, {"error": "not found"})
    start_response(f"{status} {'OK' if status < 300 else 'Error'}", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


# -- running it ------------------------------------------------------------------------------------

class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # one thread per request


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_worker() -> subprocess.Popen[bytes]:
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "natask", "worker", "-A", "django_style:app", "-c", "8",
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


def get(base: str, path: str) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(base + path, timeout=15) as response:
        return response.status, json.loads(response.read())


def main() -> None:
    worker = start_worker()
    web = make_server("127.0.0.1", 0, application, server_class=ThreadingWSGIServer, handler_class=QuietHandler)
    serving = threading.Thread(target=web.serve_forever, name="wsgi", daemon=True)
    serving.start()
    base = f"http://127.0.0.1:{web.server_port}"
    try:
        wait_for_worker()
        print(f"worker process {worker.pid} ready; WSGI server at {base}")

        paths = [f"/signup?user={i}" for i in range(1, 7)] + [f"/report?month=2024-{m:02d}" for m in range(1, 7)]
        with ThreadPoolExecutor(max_workers=8) as clients:  # concurrent requests -> concurrent view threads
            answers = list(clients.map(lambda path: (path, *get(base, path)), paths))
        for path, status, body in answers:
            print(f"GET {path:22} -> {status} {body}")

        task_id = answers[0][2]["task_id"]
        deadline = time.monotonic() + 10
        while (answer := get(base, f"/status?id={task_id}")[1])["state"] != "SUCCESS" and time.monotonic() < deadline:
            time.sleep(0.05)
        print(f"GET /status?id={task_id} -> {answer}")
        threads = {body["thread"] for _, _, body in answers if "thread" in body}
        loops = "none of them" if all(t.endswith("event loop: none") for t in threads) else "some"
        print(f"{len(answers)} requests served by {len(threads)} request threads, {loops} with an event loop")
    finally:
        web.shutdown()
        web.server_close()
        app.close()
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


if __name__ == "__main__":
    try:
        main()
    finally:
        if "server" in globals():
            server.close()
