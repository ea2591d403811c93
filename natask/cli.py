"""The ``natask`` command line: worker, server, demo (and more as the product grows)."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from typing import Any

import click

from .app import Natask
from .errors import NataskError

APP_HELP = "the app as 'package.module:attribute' (attribute defaults to 'app'); or $NATASK_APP"


def load_app(spec: str | None) -> Natask:
    """Import ``module:attr`` and return the Natask it names, with errors a person can act on."""
    spec = spec or os.environ.get("NATASK_APP")
    if not spec:
        raise click.UsageError("no app given: pass -A package.module:app or set $NATASK_APP")
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`, find modules in the current directory
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise click.UsageError(f"cannot import {module_name!r} (from -A {spec}): {e}") from None
    try:
        app = getattr(module, attr or "app")
    except AttributeError:
        raise click.UsageError(f"module {module_name!r} has no attribute {attr or 'app'!r}") from None
    if not isinstance(app, Natask):
        raise click.UsageError(f"{spec} is a {type(app).__name__}, not a natask.Natask")
    return app


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


app_option = click.option("-A", "--app", "app_spec", metavar="MODULE:APP", help=APP_HELP)
loglevel_option = click.option(
    "--loglevel", "-l", default="info", show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)


@click.group()
@click.version_option(package_name="natask")
def main() -> None:
    """natask: a Celery-style task queue on NATS JetStream."""


@main.command()
@app_option
@click.option("-Q", "--queues", default=None, help="comma-separated queues (default: the app's default queue)")
@click.option("-c", "--concurrency", default=32, show_default=True, help="tasks run at once by this process")
@click.option("--grace", default=30.0, show_default=True, help="seconds to finish in-flight tasks on SIGTERM")
@click.option("--processes", default=1, show_default=True,
              help="worker processes under a supervisor that restarts crashed ones (1: no supervisor)")
@click.option("--max-tasks-per-child", default=0, help="exit (and be restarted) after this many tasks; 0: never")
@loglevel_option
def worker(app_spec: str | None, queues: str | None, concurrency: int, grace: float, processes: int,
           max_tasks_per_child: int, loglevel: str) -> None:
    """Consume the given queues and run their tasks."""
    from .worker import Worker

    setup_logging(loglevel)
    app = load_app(app_spec)  # fail fast, in the supervisor too
    if processes > 1 or max_tasks_per_child:
        if processes > 1 or os.environ.get("NATASK_SUPERVISED") != "1":
            from .supervisor import Supervisor, child_argv

            os.environ["NATASK_SUPERVISED"] = "1"
            sys.exit(Supervisor(child_argv(sys.argv[1:]), processes, grace).run())
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    try:
        w = Worker(app, queues=queue_list, concurrency=concurrency, grace=grace,
                   max_tasks=max_tasks_per_child or None)
        asyncio.run(_serve(w))
    except NataskError as e:
        raise click.ClickException(str(e)) from None


async def _serve(w: Any) -> None:
    """Run a worker until SIGTERM/SIGINT, then drain it; a second signal exits at once."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if stopping:
            logging.getLogger("natask.worker").warning("second signal: exiting without draining")
            os._exit(1)
        logging.getLogger("natask.worker").info("%s received: draining", signal.Signals(signum).name)
        stopping.append(loop.create_task(w.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await w.run()


@main.group()
def dlq() -> None:
    """Dead letters: list, show, replay, purge."""


def _run_app(app_spec: str | None, fn: Any) -> Any:
    """Run ``fn(app)`` (a coroutine function) on a fresh loop and close the app afterwards."""
    app = load_app(app_spec)

    async def go() -> Any:
        async with app:
            return await fn(app)

    try:
        return asyncio.run(go())
    except NataskError as e:
        raise click.ClickException(str(e)) from None


@dlq.command("list")
@app_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object per entry")
def dlq_list(app_spec: str | None, as_json: bool) -> None:
    """One line per dead letter: task id (or seq-N placeholder), reason, task, attempts, error."""
    from .dlq import DeadLetters

    entries = _run_app(app_spec, lambda app: DeadLetters(app).list())
    for e in entries:
        if as_json:
            click.echo(json.dumps(e.as_dict()))
        else:
            click.echo(f"{e.id}  {e.reason}  {e.task}  attempts={e.attempts}  {e.error[:120]}")


@dlq.command("show")
@app_option
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(app_spec: str | None, entry_id: str, as_json: bool) -> None:
    """Everything about one dead letter, with its decoded call when it has one."""
    from .dlq import DeadLetters
    from .message import loads

    entry = _run_app(app_spec, lambda app: DeadLetters(app).get(entry_id))
    info = entry.as_dict()
    try:
        info["call"] = loads(entry.data)
    except NataskError:
        info["call"] = None
        info["raw"] = entry.data[:200].hex()
    info["headers"] = entry.headers
    if as_json:
        click.echo(json.dumps(info, default=repr))
    else:
        for key, value in info.items():
            click.echo(f"{key}: {value!r}" if key in ("call", "headers", "raw") else f"{key}: {value}")


@dlq.command("replay")
@app_option
@click.argument("entry_id")
def dlq_replay(app_spec: str | None, entry_id: str) -> None:
    """Publish a dead letter again to its queue and remove it from the DLQ."""
    from .dlq import DeadLetters

    entry = _run_app(app_spec, lambda app: DeadLetters(app).replay(entry_id))
    click.echo(f"replayed {entry.id} to {entry.subject}")


@dlq.command("purge")
@app_option
@click.option("--yes", is_flag=True, help="do not ask")
def dlq_purge(app_spec: str | None, yes: bool) -> None:
    """Delete every dead letter of the app."""
    from .dlq import DeadLetters

    if not yes:
        click.confirm("delete every dead letter of this app?", abort=True)
    count = _run_app(app_spec, lambda app: DeadLetters(app).purge())
    click.echo(f"purged {count} dead letter(s)")


@main.command()
@app_option
@click.argument("task_id")
@click.option("--terminate", is_flag=True, help="also cancel it if it is running (async tasks)")
def revoke(app_spec: str | None, task_id: str, terminate: bool) -> None:
    """Revoke a task: it will not run (recorded durably for every worker)."""
    _run_app(app_spec, lambda app: app._arevoke(task_id, terminate))
    click.echo(f"revoked {task_id}")


@main.command()
@click.option("-p", "--port", default=4222, show_default=True, help="client port (0: any free port)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--store-dir", default=None, help="JetStream data dir (default: a temp dir, deleted on exit)")
def server(port: int, host: str, store_dir: str | None) -> None:
    """Run the bundled nats-server with JetStream, for development."""
    from .server import NatsServer

    srv = NatsServer(port=port, host=host, store_dir=store_dir)
    try:
        srv.start()
    except (RuntimeError, NataskError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(srv.url, nl=True)
    click.echo(f"nats-server with JetStream, data in {srv.store_dir}; Ctrl-C to stop", err=True)
    try:
        assert srv.proc is not None
        srv.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.close()


@main.command()
@click.option("-n", "--tasks", "count", default=10, show_default=True, help="how many tasks to enqueue")
@click.option("-w", "--workers", default=2, show_default=True, help="worker processes to start")
def demo(count: int, workers: int) -> None:
    """Start the bundled nats-server and workers, enqueue tasks, show results and who ran them."""
    from .demo import run_demo

    try:
        run_demo(count, workers)
    except (RuntimeError, NataskError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
