"""The ``natask`` command line: worker, server, demo (and more as the product grows)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Final

import click

from .app import Natask, find_app
from .errors import ConfigError, NataskError
from .naming import INSPECT_COMMANDS
from .shutdown import Interrupts, exit_code, run_until_signalled
from .states import State

APP_HELP = ("the app as 'package.module:attribute' or 'path/to/file.py:attribute' (attribute defaults to 'app'); "
            "or $NATASK_APP")

_APP_KEY: Final = "natask.app_spec"
"""Where ``natask -A SPEC COMMAND`` leaves SPEC for the command (``click.Context.meta``, shared by the chain)."""
WORKER_CONNECT_TIMEOUT: Final = 300.0
"""Seconds ``natask worker`` keeps trying a NATS server it cannot reach, by default."""
CONNECT_NOTICE: Final = 1.0
"""Seconds of connecting after which a command says on stderr what it is waiting for."""
EXIT_FAILED: Final = 1
"""``natask result``: the task failed (FAILURE)."""
EXIT_REVOKED: Final = 3
"""``natask result``: the task was revoked (REVOKED), or expired before it ran."""
EXIT_TIMEOUT: Final = 4
"""``natask result --wait --timeout``: no outcome within the timeout."""

_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
"""Characters a terminal acts on instead of showing: C0/C1 controls (escape sequences, newlines,
carriage returns), line separators, zero-width and bidirectional-override marks."""
_CONTROL_IN_LINES: Final = re.compile(_CONTROL.pattern.replace("\x00-\x1f", "\x00-\x08\x0b-\x1f"))
"""The same, newlines and tabs aside."""
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def printable(text: object, lines: bool = False) -> str:
    """``text`` safe to print: control characters shown escaped (``\\x1b``, ``\\n``), so data read
    from the wire can neither drive the terminal nor forge output lines. ``lines`` keeps newlines
    and tabs (a task's multi-line result)."""
    text = text if isinstance(text, str) else str(text)
    return (_CONTROL_IN_LINES if lines else _CONTROL).sub(_escaped, text)


def _number(value: object, spec: str = "") -> str:
    """A number from the wire formatted with ``spec``; ``?`` if it is not one."""
    from .events import is_number

    return format(value, spec) if is_number(value) else "?"


def app_spec_of(spec: str | None) -> str | None:
    """The app spec a command uses: its own ``-A``, else ``natask -A`` before the command, else
    ``$NATASK_APP``; a file path (``path/to/tasks.py:app``) as ``module:attr`` with its directory on
    ``sys.path`` (so process-pool children import it by name too)."""
    ctx = click.get_current_context(silent=True)
    spec = spec or (ctx.meta.get(_APP_KEY) if ctx is not None else None) or os.environ.get("NATASK_APP")
    if not spec:
        return None
    head, colon, attr = spec.rpartition(":")
    module_name = head if colon else spec
    if not (module_name.endswith(".py") or "/" in module_name or os.sep in module_name):
        return spec
    path = Path(module_name)
    if path.suffix != ".py" or not path.is_file():
        raise click.UsageError(f"-A {spec}: no Python file {module_name!r} (give path/to/file.py:app or "
                               "package.module:app)")
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return f"{path.stem}{colon}{attr}"


def load_app(spec: str | None) -> Natask:
    """Import ``module:attr`` and return the Natask it names, with errors a person can act on."""
    spec = app_spec_of(spec)
    if not spec:
        raise click.UsageError("no app given: pass -A package.module:app or set $NATASK_APP")
    module_name = spec.partition(":")[0]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`, find modules in the current directory
    try:
        app = find_app(spec)
    except ImportError as e:
        raise click.UsageError(f"cannot import {module_name!r} (from -A {spec}): {e}") from None
    except LookupError as e:
        raise click.UsageError(str(e)) from None
    except NataskError as e:  # the app refused its configuration (an http:// $NATS_URL) as it was created
        raise click.ClickException(f"{module_name} (from -A {spec}): {e}") from None
    app.finalize()
    return app


class ByteSize(click.ParamType[int]):
    """A size in bytes: ``16777216``, ``16MiB``, ``16MB``, ``512KiB``, ``1G`` (K/M/G: powers of 1024)."""

    name = "size"
    _UNITS: Final = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
                     "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in self._UNITS or int(match.group(1)) < 1:
            self.fail(f"{value!r} is not a size: give bytes (16777216) or a number with KiB, MiB, GiB (16MiB)",
                      param, ctx)
        return int(match.group(1)) * self._UNITS[unit]


app_option = click.option("-A", "--app", "app_spec", metavar="MODULE:APP", help=APP_HELP)
loglevel_option = click.option(
    "--loglevel", "-l", default="info", show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="the least severe log lines shown",
)
logformat_option = click.option("--log-format", default="text", show_default=True,
                                type=click.Choice(["text", "json"]), help="log lines as text or JSON objects")
json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


class _Main(click.Group):
    """The ``natask`` group: each command's first sentence in full, Ctrl-C exits 130 without a traceback."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))  # click cuts at ~45 characters
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # outside run_until_signalled (importing the app, a prompt): as a shell reports it
            raise click.exceptions.Exit(exit_code(signal.SIGINT)) from None


@click.group(cls=_Main)
@click.version_option(package_name="natask")
@click.option("-A", "--app", "app_spec", metavar="MODULE:APP",
              help=APP_HELP + "; for every command, which may also take it after its name")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None) -> None:
    """natask: a Celery-style task queue on NATS JetStream."""
    ctx.meta[_APP_KEY] = app_spec


async def connect(app: Natask, retry_for: float = 0.0) -> None:
    """Connect ``app``, saying on stderr what it waits for once that takes a second; while the server
    cannot be reached, try again for ``retry_for`` seconds (each try lasts the app's connect_timeout)."""
    from .client import FAILURE_MEMORY
    from .errors import BrokerError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    notice = loop.call_later(CONNECT_NOTICE, lambda: click.echo(
        f"connecting to NATS at {app.config.safe_servers}...", err=True))
    try:
        while True:
            try:
                await app.client.broker()
                return
            except BrokerError as e:
                left = deadline - loop.time()
                if left <= 0:
                    raise
                click.echo(f"{e} Trying again for {left:.0f}s more (--connect-timeout).", err=True)
                # A failed connect is remembered for FAILURE_MEMORY seconds (calls fail fast meanwhile).
                await asyncio.sleep(min(left, FAILURE_MEMORY))
    finally:
        notice.cancel()


@main.command()
@app_option
@click.option("-Q", "--queues", default=None, help="comma-separated queues (default: the app's default queue)")
@click.option("-c", "--concurrency", default=32, show_default=True, help="tasks run at once by this process")
@click.option("--grace", default=30.0, show_default=True, help="seconds to finish in-flight tasks on SIGTERM")
@click.option("--processes", default=1, show_default=True,
              help="worker processes under a supervisor that restarts crashed ones (1: no supervisor)")
@click.option("--max-tasks-per-child", default=0, help="exit (and be restarted) after this many tasks; 0: never")
@click.option("-B", "--beat", "with_beat", is_flag=True, help="also run the periodic-task beat in this process")
@click.option("--metrics-port", type=int, default=None, help="serve Prometheus metrics at :PORT/metrics")
@click.option("--health-port", type=int, default=None, help="serve :PORT/health (200 healthy, 503 not)")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="address of the metrics and health endpoints; 0.0.0.0 exposes them on every interface "
                   "(Kubernetes probes: the pod IP)")
@click.option("--without-events", is_flag=True, help="do not publish lifecycle events")
@click.option("--unknown-grace", type=click.FloatRange(0, 25), default=20.0, show_default=True,
              help="seconds a task name this worker does not know keeps coming back (for a worker with newer "
                   "code during a rolling deploy) before it is dead-lettered")
@click.option("--prefetch-bytes", type=ByteSize(), default="16MiB", show_default=True,
              help="bytes of task messages this process holds and has asked for at most (large arguments); keep "
                   "it well under the server's max_pending (64MB by default), at least its max_payload")
@click.option("--pool", type=click.Choice(["threads", "processes"]), default="threads", show_default=True,
              help="where def tasks run: threads, or child processes (a time_limit kills the child)")
@click.option("--max-memory-per-child", type=click.IntRange(min=1), default=None, metavar="KB",
              help="--pool processes: a child above this resident memory (KB) is replaced after its task")
@click.option("--autoscale", default=None, metavar="MAX,MIN",
              help="grow the concurrency up to MAX while every slot is busy and tasks wait, shrink to MIN when idle")
@click.option("--connect-timeout", type=click.FloatRange(min=0), default=WORKER_CONNECT_TIMEOUT, show_default=True,
              metavar="SECONDS", help="keep trying a NATS server that cannot be reached for this long before exiting "
                                      "(servers starting after their workers, a restart); 0: one try")
@loglevel_option
@logformat_option
def worker(app_spec: str | None, queues: str | None, concurrency: int, grace: float, processes: int,
           max_tasks_per_child: int, with_beat: bool, metrics_port: int | None, health_port: int | None,
           http_host: str, without_events: bool, unknown_grace: float, prefetch_bytes: int, pool: str,
           max_memory_per_child: int | None, autoscale: str | None, connect_timeout: float, loglevel: str,
           log_format: str) -> None:
    """Consume the given queues and run their tasks."""
    from .logs import setup_logging
    from .worker import Worker

    setup_logging(loglevel, log_format)
    app = load_app(app_spec)  # fail fast, in the supervisor too
    if processes > 1 or max_tasks_per_child:
        if processes > 1 or os.environ.get("NATASK_SUPERVISED") != "1":
            from .supervisor import Supervisor, child_argv

            os.environ["NATASK_SUPERVISED"] = "1"
            sys.exit(Supervisor(child_argv(sys.argv[1:]), processes, grace).run())
    queue_list = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    if os.environ.get("NATASK_SUPERVISED") == "1":
        from . import signals

        signals.worker_process_init.send(None)  # a child of --processes, its app (and receivers) loaded
    try:
        w = Worker(app, queues=queue_list, concurrency=concurrency, grace=grace,
                   max_tasks=max_tasks_per_child or None, events=not without_events, unknown_grace=unknown_grace,
                   prefetch_bytes=prefetch_bytes, pool=pool, app_spec=app_spec_of(app_spec),
                   max_memory_per_child=max_memory_per_child, autoscale=_autoscale(autoscale))
        run_until_signalled(_serve(w, with_beat, metrics_port, health_port, http_host, connect_timeout))
    except NataskError as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # an option the Worker refused (--max-memory-per-child without --pool processes)
        raise click.UsageError(str(e)) from None


def _banner(w: Any) -> None:
    """What a started worker does, in the log: queues, concurrency, pool, the tasks it knows."""
    import logging

    log = logging.getLogger("natask")
    tasks = sorted(w.app.tasks)
    log.info("app %r: queues %s; concurrency %d; %s pool", w.app.name, ", ".join(w.queues), w.concurrency, w.pool)
    log.info("%d registered task(s): %s", len(tasks), ", ".join(tasks) or "none (is -A the module defining them?)")


def _autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match is None or not 1 <= int(match.group(2)) <= int(match.group(1)):
        raise click.BadParameter(f"{text!r}: give MAX,MIN with 1 <= MIN <= MAX (e.g. 10,2)", param_hint="--autoscale")
    return int(match.group(1)), int(match.group(2))


async def _serve(w: Any, with_beat: bool = False, metrics_port: int | None = None,
                 health_port: int | None = None, http_host: str = "127.0.0.1", connect_timeout: float = 0.0) -> None:
    """Run a worker (and beat, HTTP endpoints) until cancelled (``run_until_signalled``: the first
    SIGTERM/SIGINT), then drain."""
    from .metrics import serve

    beat = None
    if with_beat:
        from .beat import Beat

        beat = Beat(w.app)
    servers = []
    try:
        servers = await serve(w, metrics_port, health_port, http_host)  # listening before the first task arrives
        await connect(w.app, connect_timeout)
        await w.start()
        _banner(w)
        if beat is not None:
            await beat.start()
        await w.run()
    except asyncio.CancelledError:  # the first signal: drain below
        task = asyncio.current_task()
        if task is not None and hasattr(task, "uncancel"):  # Python >= 3.11
            task.uncancel()  # handled here: timeouts inside the drain must not see it
    finally:
        if beat is not None:
            await beat.stop()
        await w.stop()
        for server in servers:
            await server.stop()


@main.group(invoke_without_command=True)
@app_option
@click.option("--list", "list_only", is_flag=True,
              help="print every entry (code-defined and stored) with its next fire time and exit")
@click.option("--health-port", type=click.IntRange(0, 65535), default=None,
              help="serve :PORT/health (200: connected, leading or standing by; 503 not)")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="address of the health endpoint; 0.0.0.0 exposes it on every interface (Kubernetes probes: "
                   "the pod IP)")
@loglevel_option
@logformat_option
@click.pass_context
def beat(ctx: click.Context, app_spec: str | None, list_only: bool, health_port: int | None, http_host: str,
         loglevel: str, log_format: str) -> None:
    """Fire periodic tasks; run any number of these, one leads at a time.

    With a subcommand, edit the stored entries instead: running beats apply a change within a second.
    """
    from .beat import Beat
    from .logs import setup_logging

    ctx.obj = app_spec
    if health_port is not None and (ctx.invoked_subcommand is not None or list_only):
        raise click.UsageError("--health-port is for running a beat, not with --list or a subcommand")
    if ctx.invoked_subcommand is not None:
        return
    if list_only:
        _list_schedules(app_spec)
        return
    app = load_app(app_spec)
    setup_logging(loglevel, log_format)

    try:
        run_until_signalled(_run_beat(Beat(app), health_port, http_host))
    except NataskError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # the health port
        reason = os.strerror(e.errno).lower() if e.errno else str(e)
        raise click.ClickException(f"cannot listen on {http_host}:{health_port}: {reason}") from None


async def _run_beat(beat: Any, health_port: int | None, http_host: str) -> None:
    """Run ``beat`` (a cancelled run hands the lease over), with its ``/health`` listening first."""
    from .beat.health import serve

    server = None if health_port is None else await serve(beat, health_port, http_host)
    try:
        await beat.run()
    finally:
        if server is not None:
            await server.stop()


def _list_schedules(app_spec: str | None) -> None:
    from .beat import describe

    app = load_app(app_spec)
    try:
        infos = _edit_schedules(app, lambda beat: beat.alist())
    except click.ClickException as e:  # no server: the code-defined entries still have fire times
        click.echo(f"stored entries unknown ({e.message}); code-defined entries:", err=True)
        for name, schedule, fire in describe(app):
            click.echo(f"{name}  {schedule}  next {fire.isoformat()}")
        return
    for info in infos:  # stored values come from whoever may write the bucket: escaped as printed
        state = f"next {info.next_fire.isoformat()}" if info.next_fire is not None else "disabled"
        extra = f"  ({info.error})" if info.error else ""
        click.echo(printable(f"{info.name}  {info.schedule}  {state}  {info.source}  {info.task}{extra}"))
    if not infos:
        click.echo("no periodic entries: define them in code (@app.periodic) or add one with `natask beat add`")


def _edit_schedules(app: Natask, fn: Any) -> Any:
    """Run ``fn(app.beat)`` (a coroutine function) on a fresh loop; a mistake exits 2 with the reason."""
    from .errors import TaskNotFound

    async def go() -> Any:
        await connect(app)
        async with app:
            return await fn(app.beat)

    try:
        result, signum = run_until_signalled(go())
    except (ConfigError, TaskNotFound) as e:
        raise click.UsageError(str(e)) from None
    except NataskError as e:
        raise click.ClickException(str(e)) from None
    if signum is not None:
        sys.exit(exit_code(signum))
    return result


def _beat_app(app_spec: str | None) -> Natask:
    """The app of a ``natask beat`` subcommand: its own ``-A``, else the group's."""
    return load_app(app_spec or click.get_current_context().obj)


def _json_arg(text: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise click.UsageError(f"{what} must be JSON: {e}") from None
    if not isinstance(value, kind):
        raise click.UsageError(f"{what} must be a JSON {'list' if kind is list else 'object'}, got {text}")
    return value


@beat.command("add")
@app_option
@click.argument("entry")
@click.argument("task")
@click.option("--every", type=float, default=None, metavar="SECONDS",
              help="fire every SECONDS (whole seconds, aligned to the Unix epoch)")
@click.option("--cron", default=None, metavar="EXPR", help="fire on a cron expression (5 fields, or 6 with seconds)")
@click.option("--args", "args_json", default="[]", show_default=True, help="positional arguments as a JSON list")
@click.option("--kwargs", "kwargs_json", default="{}", show_default=True, help="keyword arguments as a JSON object")
@click.option("-Q", "--queue", default=None, help="queue to send to (default: the task's)")
@click.option("--tz", default=None, help="time zone of --cron, an IANA name (default: UTC)")
def beat_add(app_spec: str | None, entry: str, task: str, every: float | None, cron: str | None,
             args_json: str, kwargs_json: str, queue: str | None, tz: str | None) -> None:
    """Store entry ENTRY that fires TASK.

    Replaces a stored entry of that name; a name defined in the app's code is refused."""
    if (every is None) == (cron is None):
        raise click.UsageError("give exactly one of --every SECONDS and --cron EXPR")
    args, kwargs = _json_arg(args_json, "--args", list), _json_arg(kwargs_json, "--kwargs", dict)
    app = _beat_app(app_spec)
    added = _edit_schedules(app, lambda b: b.aadd(entry, task, every=every, cron=cron, args=args, kwargs=kwargs,
                                                 queue=queue, tz=tz))
    from .beat import schedule_text

    click.echo(f"stored {entry}: {added.signature} {schedule_text(added)}")


@beat.command("remove")
@app_option
@click.argument("entry")
def beat_remove(app_spec: str | None, entry: str) -> None:
    """Delete stored entry ENTRY.

    Entries defined in the app's code cannot be removed, only disabled."""
    _edit_schedules(_beat_app(app_spec), lambda b: b.aremove(entry))
    click.echo(f"removed {entry}")


@beat.command("enable")
@app_option
@click.argument("entry")
def beat_enable(app_spec: str | None, entry: str) -> None:
    """Fire ENTRY again, from its next fire time.

    Fire times missed while it was disabled are not replayed."""
    _edit_schedules(_beat_app(app_spec), lambda b: b.aenable(entry))
    click.echo(f"enabled {entry}")


@beat.command("disable")
@app_option
@click.argument("entry")
def beat_disable(app_spec: str | None, entry: str) -> None:
    """Stop firing ENTRY until it is enabled again.

    Works for code-defined entries too: an override stored under the entry's name."""
    _edit_schedules(_beat_app(app_spec), lambda b: b.adisable(entry))
    click.echo(f"disabled {entry}")


@main.command()
@app_option
@json_option
def status(app_spec: str | None, as_json: bool) -> None:
    """Queues (pending, in flight, redelivered), DLQ size, live workers, periodic entries.

    Every queue holding tasks is listed, those no worker consumes flagged STRANDED."""
    from .control import status as read_status

    info = _run_app(app_spec, read_status)
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    click.echo("queues:")
    for q in info["queues"] or []:
        stranded = (f"  STRANDED: {q['stranded']} task(s) no worker consumes (start one with -Q {q['name']})"
                    if q["stranded"] else "")
        click.echo(printable(f"  {q['name']:<20} pending={q['pending']} in_flight={q['in_flight']} "
                             f"redelivered={q['redelivered']}{stranded}"))
    if not info["queues"]:
        click.echo("  (none: no task sent, no worker started)")
    click.echo(f"dead letters: {info['dlq']}")
    click.echo("workers:")
    for w in info["workers"]:  # replies of whoever answers on the control subject: checked as printed
        queues = w.get("queues")
        click.echo(printable(
            f"  {w.get('worker')!s:<24} queues={','.join(map(str, queues)) if isinstance(queues, list) else '?'} "
            f"concurrency={_number(w.get('concurrency'))} uptime={_number(w.get('uptime'), '.0f')}s "
            f"processed={_number(w.get('processed'))} running={_number(w.get('running'))}"))
    if not info["workers"]:
        click.echo("  (none answered)")
    click.echo("periodic:")
    for p in info["periodic"]:
        click.echo(f"  {p['name']:<24} {p['schedule']}  next {p['next']}")
    if not info["periodic"]:
        click.echo("  (none)")


destination_option = click.option("--destination", "-d", default=None, metavar="IDENT,...",
                                  help="only these workers (host:pid, as `natask inspect ping` lists them)")
timeout_option = click.option("--timeout", default=1.0, show_default=True, help="seconds to gather replies")


def _show_replies(replies: list[dict[str, Any]], command: str, as_json: bool) -> None:
    """Print the workers' replies; exit 1 if none answered or one refused."""
    if as_json:
        click.echo(json.dumps(replies, default=str))
    for r in [] if as_json else replies:
        worker = printable(r.get("worker", "?"))
        rest = {k: v for k, v in r.items() if k != "worker"}
        if "error" in r:
            click.echo(f"{worker}: error: " + printable(r["error"]))
        elif command == "ping":
            click.echo(f"{worker}: pong")
        elif command == "active":
            active = [t for t in r.get("active") or [] if isinstance(t, dict)] if isinstance(
                r.get("active"), list) else []
            click.echo(f"{worker}: {len(active)} running")
            for t in active:
                click.echo(printable(f"  {t.get('id')}  {t.get('name')}  {_number(t.get('runtime'), '.1f')}s"))
        elif command == "stats":
            click.echo(f"{worker}: " + printable(" ".join(f"{k}={v}" for k, v in rest.items())))
        else:
            click.echo(f"{worker}: " + printable(json.dumps(rest, default=str)))
    if not replies:
        click.echo("no worker answered", err=True)
        sys.exit(1)
    if any("error" in r for r in replies):
        sys.exit(1)


def _destination(value: str | None) -> list[str] | None:
    """The idents of ``--destination`` (None: every worker)."""
    idents = [d.strip() for d in (value or "").split(",") if d.strip()]
    return idents or None


@main.command()
@app_option
@click.argument("command", type=click.Choice(list(INSPECT_COMMANDS)))
@click.argument("task_ids", nargs=-1, metavar="[ID]...")
@timeout_option
@destination_option
@json_option
def inspect(app_spec: str | None, command: str, task_ids: tuple[str, ...], timeout: float, destination: str | None,
            as_json: bool) -> None:
    """Ask every live worker (answered from its event loop, even while its threads are busy).
    ``query_task`` takes task ids; ``scheduled`` is empty: eta tasks wait on the server."""
    if command == "query_task" and not task_ids:
        raise click.UsageError("query_task takes one or more task ids: natask inspect query_task ID...")
    if command != "query_task" and task_ids:
        raise click.UsageError(f"inspect {command} takes no arguments")
    _control(app_spec, command, lambda app: app.control.ainspect(
        command, _destination(destination), timeout, ids=list(task_ids) or None), as_json)


@main.group()
def control() -> None:
    """Steer live workers: rate and time limits, queues, pool size, shutdown, revokes. Sending
    needs publish permission on natask.control.<prefix>.<command> (README, "Remote control")."""


def _control(app_spec: str | None, command: str, call: Any, as_json: bool) -> None:
    try:
        replies = _run_app(app_spec, call)
    except ValueError as e:  # a bad argument, found before anything was sent
        raise click.UsageError(str(e)) from None
    _show_replies(replies, command, as_json)


@control.command("rate_limit")
@app_option
@click.argument("task")
@click.argument("rate")
@timeout_option
@destination_option
@json_option
def control_rate_limit(app_spec: str | None, task: str, rate: str, timeout: float, destination: str | None,
                       as_json: bool) -> None:
    """Set TASK's per-worker rate limit to RATE ('10/s', '100/m'; '0': none) until workers restart."""
    _control(app_spec, "rate_limit", lambda app: app.control.arate_limit(task, rate, _destination(destination),
                                                                        timeout), as_json)


@control.command("time_limit")
@app_option
@click.argument("task")
@click.argument("seconds", type=float)
@click.option("--soft", type=float, default=None, help="soft time limit in seconds (SoftTimeLimitExceeded)")
@timeout_option
@destination_option
@json_option
def control_time_limit(app_spec: str | None, task: str, seconds: float, soft: float | None, timeout: float,
                       destination: str | None, as_json: bool) -> None:
    """Set TASK's hard time limit to SECONDS (and the soft one with --soft) until workers restart."""
    _control(app_spec, "time_limit", lambda app: app.control.atime_limit(task, seconds, soft,
                                                                        _destination(destination), timeout), as_json)


@control.command("add_consumer")
@app_option
@click.argument("queue")
@timeout_option
@destination_option
@json_option
def control_add_consumer(app_spec: str | None, queue: str, timeout: float, destination: str | None,
                         as_json: bool) -> None:
    """Make the workers consume QUEUE too."""
    _control(app_spec, "add_consumer", lambda app: app.control.aadd_consumer(queue, _destination(destination),
                                                                            timeout), as_json)


@control.command("cancel_consumer")
@app_option
@click.argument("queue")
@timeout_option
@destination_option
@json_option
def control_cancel_consumer(app_spec: str | None, queue: str, timeout: float, destination: str | None,
                            as_json: bool) -> None:
    """Make the workers stop consuming QUEUE (a worker keeps its last queue)."""
    _control(app_spec, "cancel_consumer", lambda app: app.control.acancel_consumer(
        queue, _destination(destination), timeout), as_json)


@control.command("pool_grow")
@app_option
@click.argument("n", type=click.IntRange(min=1), default=1)
@timeout_option
@destination_option
@json_option
def control_pool_grow(app_spec: str | None, n: int, timeout: float, destination: str | None, as_json: bool) -> None:
    """Give each worker N more slots."""
    _control(app_spec, "pool_grow", lambda app: app.control.apool_grow(n, _destination(destination), timeout),
             as_json)


@control.command("pool_shrink")
@app_option
@click.argument("n", type=click.IntRange(min=1), default=1)
@timeout_option
@destination_option
@json_option
def control_pool_shrink(app_spec: str | None, n: int, timeout: float, destination: str | None,
                        as_json: bool) -> None:
    """Take N slots from each worker (never below 1)."""
    _control(app_spec, "pool_shrink", lambda app: app.control.apool_shrink(n, _destination(destination), timeout),
             as_json)


@control.command("shutdown")
@app_option
@timeout_option
@destination_option
@json_option
def control_shutdown(app_spec: str | None, timeout: float, destination: str | None, as_json: bool) -> None:
    """Stop the workers warmly, as SIGTERM does."""
    _control(app_spec, "shutdown", lambda app: app.control.ashutdown(_destination(destination), timeout), as_json)


@control.command("revoke")
@app_option
@click.argument("task_ids", nargs=-1, metavar="[ID]...")
@click.option("--name", "names", multiple=True, metavar="NAME|GLOB",
              help="revoke every task of this name or glob ('shop.*') sent so far (repeatable)")
@click.option("--terminate", is_flag=True, help="also cancel the running ones (async tasks)")
def control_revoke(app_spec: str | None, task_ids: tuple[str, ...], names: tuple[str, ...], terminate: bool) -> None:
    """Revoke tasks by id, or by --name: recorded durably for every worker, now and started later."""
    if not task_ids and not names:
        raise click.UsageError("give task ids or --name NAME|GLOB")

    async def go(app: Natask) -> None:
        for task_id in task_ids:
            await app.control.arevoke(task_id, terminate=terminate)
        for name in names:
            await app.control.arevoke(name=name, terminate=terminate)

    try:
        _run_app(app_spec, go)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for what in [*task_ids, *(f"every task named {n} sent so far" for n in names)]:
        click.echo(printable(f"revoked {what}"))


@main.command()
@app_option
@click.argument("queue")
@click.option("--yes", is_flag=True, help="do not ask")
def purge(app_spec: str | None, queue: str, yes: bool) -> None:
    """Delete every task waiting in QUEUE."""
    from .control import purge as do_purge

    if not yes:
        click.confirm(f"delete every task waiting in queue {queue!r}?", abort=True)
    count = _run_app(app_spec, lambda app: do_purge(app, queue))
    click.echo(f"purged {count} task(s) from {queue}")


@main.command()
@app_option
@click.argument("name")
@click.option("--args", "args_json", default="[]", help="positional arguments as a JSON list")
@click.option("--kwargs", "kwargs_json", default="{}", help="keyword arguments as a JSON object")
@click.option("-Q", "--queue", default=None, help="queue to send to (default: the task's, else the app's default)")
@click.option("--countdown", type=float, default=None, metavar="SECONDS", help="run it no sooner than this from now")
@click.option("--unregistered", is_flag=True,
              help="send NAME even if this app does not register it (a task only another codebase's workers know); "
                   "its arguments are then not checked")
def call(app_spec: str | None, name: str, args_json: str, kwargs_json: str, queue: str | None,
         countdown: float | None, unregistered: bool) -> None:
    """Enqueue task NAME by name; prints only the new task id.

    NAME must be a task of the app and the arguments must fit its signature, as for .delay():
    a mistake exits 2 with the reason."""
    args, kwargs = _json_arg(args_json, "--args", list), _json_arg(kwargs_json, "--kwargs", dict)
    app = load_app(app_spec)
    if unregistered:
        result = _run_app(app_spec, lambda app: app.asend_task(name, args, kwargs, queue=queue, countdown=countdown))
    else:
        _check_call(app, name, args, kwargs)
        task = app.tasks[name]  # its own options (queue, priority, expires) apply, as for .delay()
        result = _run_app(app_spec, lambda _: task.aapply_async(args, kwargs, queue=queue, countdown=countdown))
    click.echo(result.id)


def _check_call(app: Natask, name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse (exit 2) a name the app does not register, with the nearest names, and arguments its
    signature does not take."""
    import difflib

    task = app.tasks.get(name)
    if task is None:
        close = difflib.get_close_matches(name, list(app.tasks), n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise click.UsageError(printable(
            f"no task named {name!r} in app {app.name!r}: {hint}registered: {', '.join(sorted(app.tasks)) or 'none'} "
            "(--unregistered sends it anyway)"))
    try:
        task.check_args(args, kwargs)
    except TypeError as e:
        raise click.UsageError(printable(f"arguments do not fit: {e}")) from None


@main.command()
@app_option
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="wait for the outcome")
@click.option("--timeout", type=float, default=None, help="with --wait: give up after this many seconds (exit 4)")
@json_option
def result(app_spec: str | None, task_id: str, wait: bool, timeout: float | None, as_json: bool) -> None:
    """Print a task's result (or its state).

    Exits 0 for a result or a state that is not final, 1 if the task failed, 3 if it was revoked (or
    expired), 4 if --wait --timeout passed without an outcome, 130 on Ctrl-C."""
    from .errors import ResultError, ResultTimeout, TaskFailed

    timed_out: list[ResultTimeout] = []  # raised inside _run_app, which turns every NataskError into exit 1

    async def read(app: Natask) -> dict[str, Any]:
        res = app.AsyncResult(task_id)
        if wait:
            waiting = asyncio.ensure_future(res.aget(timeout=timeout, propagate=False))
            started = asyncio.get_running_loop().time()
            try:
                while not waiting.done():
                    await asyncio.wait({waiting}, timeout=1.0)
                    if not waiting.done() and sys.stderr.isatty():
                        elapsed = asyncio.get_running_loop().time() - started
                        click.echo(f"\rwaiting for {task_id}... {elapsed:.0f}s", err=True, nl=False)
            finally:
                waiting.cancel()  # Ctrl-C: the wait ends here, before the app closes under it
            try:
                await waiting
            except ResultTimeout as e:
                timed_out.append(e)
        else:
            await res._fetch()
        record = res._record or {"state": State.PENDING.value}
        return dict(record)

    try:
        record = _run_app(app_spec, read)
    except ResultError as e:
        raise click.ClickException(str(e)) from None
    if wait and sys.stderr.isatty():
        click.echo("", err=True)
    if timed_out:
        click.echo(f"Error: {timed_out[0]}", err=True)
        sys.exit(EXIT_TIMEOUT)
    state = record.get("state")
    if as_json:
        click.echo(json.dumps(record, default=str))
    elif state == State.SUCCESS:
        value = record.get("result")
        click.echo(json.dumps(value, default=str) if not isinstance(value, str) else printable(value, lines=True))
    elif state == State.FAILURE:
        failed = TaskFailed(str(record.get("exc_type")), str(record.get("message", "")))
        click.echo(printable(failed, lines=True), err=True)
    else:
        info = json.dumps(record.get("info"), default=str) if record.get("info") else ""
        click.echo(printable(f"{state} {info}".strip()))
    if state == State.FAILURE:
        sys.exit(EXIT_FAILED)
    if state == State.REVOKED:
        sys.exit(EXIT_REVOKED)


@main.command()
@app_option
@click.option("--kind", default=">", help="one event type, e.g. task-failed (default: all)")
@click.option("-n", "--count", type=int, default=0, help="stop after this many events (0: never)")
@json_option
def events(app_spec: str | None, kind: str, count: int, as_json: bool) -> None:
    """Follow the app's lifecycle events live, in time order.

    One line per event: local time, worker, event, task name[id], then how long the task waited
    (task-started) or ran (when it ends) as seen in the events, and the event's fields."""
    from .events import follow

    async def tail(app: Natask) -> None:
        seen = 0
        lines = _EventLines()
        async for event in _in_time_order(follow(app, kind)):
            # Events were checked on receipt (malformed ones dropped); their texts are still anyone's.
            if as_json:
                click.echo(json.dumps(event, default=str))
                continue
            for line in lines.format(event):
                click.echo(printable(line))
            seen += 1
            if count and seen >= count:
                return

    _run_app(app_spec, tail, service=True)


EVENT_HOLD: Final = 0.25
"""Seconds ``natask events`` holds an event before printing it: workers send events in batches per
kind every 50 ms, so a task's end may arrive before its start; held events go out in time order."""
_DURATIONS_KEPT: Final = 10_000
"""Task start/send times ``natask events`` remembers to print durations."""


async def _in_time_order(source: Any) -> Any:
    """The events of ``source`` (an async iterator), each held ``EVENT_HOLD`` seconds and released
    in the order of their times."""
    import heapq
    import itertools

    order = itertools.count()  # ties in time keep the arrival order
    loop = asyncio.get_running_loop()
    held: list[tuple[float, int, float, dict[str, Any]]] = []  # (event time, arrival number, arrival, event)
    arrived = asyncio.Event()
    done: list[BaseException | None] = []

    async def pump() -> None:
        try:
            async for event in source:
                ts = event.get("ts")
                heapq.heappush(held, (float(ts) if ts is not None else 0.0, next(order), loop.time(), event))
                arrived.set()
            done.append(None)
        except BaseException as e:  # re-raised by the consumer below
            done.append(e)
        arrived.set()

    reader = loop.create_task(pump())
    try:
        while True:
            now = loop.time()
            while held and (done or min(h[2] for h in held) + EVENT_HOLD <= now):
                yield heapq.heappop(held)[3]
            if done and not held:
                if done[0] is not None:
                    raise done[0]
                return
            arrived.clear()
            wait = EVENT_HOLD if not held else max(0.0, min(h[2] for h in held) + EVENT_HOLD - now)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(arrived.wait(), wait)
    finally:
        reader.cancel()


class _EventLines:
    """``natask events`` lines: local times, and durations from the events seen before."""

    def __init__(self) -> None:
        self.day = ""
        self.since: dict[tuple[str, str], float] = {}  # (task id, "sent" | "started") -> event time

    def format(self, event: dict[str, Any]) -> list[str]:
        """The event's line, after a line naming the day when it changed (the wire text in them is
        escaped by the caller, line by line)."""
        from datetime import datetime

        ts, kind, task_id = event.get("ts"), str(event.get("type")), event.get("id")
        when = datetime.fromtimestamp(ts) if isinstance(ts, (int, float)) else None
        out = []
        if when is not None and when.strftime("%Y-%m-%d") != self.day:
            self.day = when.strftime("%Y-%m-%d")
            out.append(f"-- {self.day} {when.astimezone().tzname() or ''}")
        clock = when.strftime("%H:%M:%S.%f")[:-3] if when is not None else "?"
        task = f"{event.get('name')}[{task_id}]" if task_id else ""
        took = self._duration(kind, task_id, ts)
        fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("type", "ts", "worker", "id", "name"))
        out.append("  ".join(x for x in (clock, str(event.get("worker")), f"{kind:<15}", task, took, fields) if x))
        return out

    def _duration(self, kind: str, task_id: object, ts: object) -> str:
        if not isinstance(task_id, str) or not isinstance(ts, (int, float)):
            return ""
        if len(self.since) >= _DURATIONS_KEPT:
            self.since.pop(next(iter(self.since)))
        if kind == "task-sent":
            self.since[(task_id, "sent")] = ts
        elif kind == "task-started":
            self.since[(task_id, "started")] = ts
            sent = self.since.pop((task_id, "sent"), None)
            return f"waited {ts - sent:.3f}s" if sent is not None else ""
        elif kind != "task-received":
            started = self.since.pop((task_id, "started"), None)
            return f"ran {ts - started:.3f}s" if started is not None else ""
        return ""


@main.command()
@app_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on; anything but loopback needs --basic-auth, --auth-token or --auth-header")
@click.option("-p", "--port", default=5555, show_default=True, help="HTTP port (0: any free port)")
@click.option("--basic-auth", "basic_auth", multiple=True, metavar="USER:PASSWORD",
              envvar="NATASK_DASHBOARD_BASIC_AUTH",
              help="accept HTTP basic auth with these credentials; repeatable (environment: "
                   "NATASK_DASHBOARD_BASIC_AUTH, space-separated, keeps them out of `ps`)")
@click.option("--auth-token", metavar="TOKEN", envvar="NATASK_DASHBOARD_TOKEN",
              help="accept `Authorization: Bearer TOKEN` (a browser opens URL?token=TOKEN once); at least 16 "
                   "characters (environment: NATASK_DASHBOARD_TOKEN)")
@click.option("--auth-header", metavar="HEADER",
              help="trust this header set by an authenticating proxy (e.g. X-Forwarded-User): any request "
                   "carrying it is let in, so the proxy must strip it from clients' requests")
@click.option("--insecure-no-auth", is_flag=True,
              help="serve a non-loopback --host without any authentication: anyone who reaches it can read "
                   "tasks, revoke them and replay dead letters")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="with a non-loopback --host: one more name (e.g. a proxy's) the page may be reached by; "
                   "other Host headers than this machine's names and addresses get 403 (DNS rebinding). "
                   "Repeatable")
@click.option("--history/--no-history", default=True, show_default=True,
              help="keep lifecycle events in the NATASK_EVENTS_<prefix> stream (created now) and rebuild the "
                   "task list from it when the dashboard starts")
@click.option("--history-max-age", type=click.FloatRange(min=60), default=7 * 24 * 3600.0, show_default=True,
              metavar="SECONDS", help="seconds the history stream keeps an event")
@click.option("--history-max-bytes", type=click.IntRange(min=1024 * 1024), default=1024**3, show_default=True,
              metavar="BYTES", help="bytes the history stream holds at most (oldest events dropped first)")
@click.option("--history-limit", type=click.IntRange(min=1), default=100_000, show_default=True, metavar="N",
              help="tasks kept in memory for search (an index: id, name, state, times, argument preview)")
@loglevel_option
def dashboard(app_spec: str | None, host: str, port: int, basic_auth: tuple[str, ...], auth_token: str | None,
              auth_header: str | None, insecure_no_auth: bool, allowed_hosts: tuple[str, ...], history: bool,
              history_max_age: float, history_max_bytes: int, history_limit: int, loglevel: str) -> None:
    """A web page: queues, workers, tasks (history, search, detail), charts, dead letters to replay; live."""
    from .dashboard import Auth, History, check_binding, require_web
    from .logs import setup_logging

    try:
        require_web()
        if len(basic_auth) == 1 and " " in basic_auth[0]:
            basic_auth = tuple(basic_auth[0].split())  # from the environment variable
        auth = Auth.of(basic_auth, auth_token, auth_header)
        check_binding(host, insecure_no_auth, "--insecure-no-auth", authenticated=auth.enabled)
    except ConfigError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    from .dashboard.server import serve

    setup_logging(loglevel)
    if insecure_no_auth and not auth.enabled:
        click.echo(f"WARNING: serving the dashboard on {host} WITHOUT AUTHENTICATION (--insecure-no-auth)",
                   err=True)
    app = load_app(app_spec)

    def ready(url: str) -> None:
        click.echo(url)
        click.echo(f"natask dashboard of {app.name!r}; Ctrl-C to stop", err=True)

    try:
        run_until_signalled(serve(app, host, port, ready, allow_insecure=insecure_no_auth,
                                  allowed_hosts=allowed_hosts, basic_auth=basic_auth, auth_token=auth_token,
                                  auth_header=auth_header, history_limit=history_limit,
                                  history=History(history_max_age, history_max_bytes, history)))
    except NataskError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        reason = os.strerror(e.errno).lower() if e.errno else str(e)
        raise click.ClickException(f"cannot listen on {host}:{port}: {reason}") from None


@main.group()
def dlq() -> None:
    """Dead letters: list, show, replay, purge."""


def _run_app(app_spec: str | None, fn: Any, service: bool = False) -> Any:
    """Run ``fn(app)`` (a coroutine function) on a fresh loop and close the app afterwards. A first
    SIGTERM/SIGINT stops it: a ``service`` (that runs until told to stop) then exits 0, anything
    else with 128 + the signal number."""
    app = load_app(app_spec)

    async def go() -> Any:
        await connect(app)
        async with app:
            return await fn(app)

    try:
        result, signum = run_until_signalled(go())
    except NataskError as e:
        raise click.ClickException(str(e)) from None
    if signum is not None:
        sys.exit(0 if service else exit_code(signum))
    return result


@dlq.command("list")
@app_option
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000),
              help="dead letters per page")
@click.option("--before", type=click.IntRange(1), default=None, metavar="SEQ",
              help="the page of entries older than this stream sequence (the next page's is printed on stderr)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per entry")
def dlq_list(app_spec: str | None, limit: int, before: int | None, as_json: bool) -> None:
    """One line per dead letter, newest first: task id (or seq-N placeholder), reason, task,
    attempts, error."""
    from .dlq import DeadLetters

    entries, cursor = _run_app(app_spec, lambda app: DeadLetters(app).page(limit, before))
    for e in entries:
        if as_json:
            click.echo(json.dumps(e.as_dict()))
        else:
            click.echo(printable(f"{e.id}  {e.reason}  {e.task}  attempts={e.attempts}  {e.error[:120]}"))
    if not entries:
        click.echo("no dead letters" + (f" before sequence {before}" if before else ""), err=True)
    elif cursor is not None:
        args = ["natask", "dlq", "list", *(["-A", app_spec] if app_spec else []),
                *(["--limit", str(limit)] if limit != 50 else []), *(["--json"] if as_json else []),
                "--before", str(cursor)]
        click.echo(f"more: {printable(shlex.join(args))}", err=True)


@dlq.command("show")
@app_option
@click.argument("entry_id")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
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
            click.echo(printable(f"{key}: {value!r}" if key in ("call", "headers", "raw") else f"{key}: {value}"))


@dlq.command("replay")
@app_option
@click.argument("entry_id")
def dlq_replay(app_spec: str | None, entry_id: str) -> None:
    """Publish a dead letter again to its queue and remove it from the DLQ."""
    from .dlq import DeadLetters

    entry = _run_app(app_spec, lambda app: DeadLetters(app).replay(entry_id))
    click.echo(printable(f"replayed {entry.id} to {entry.subject}"))


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


@main.group()
def failover() -> None:
    """Disaster recovery of a queue's own stream (stream_per_queue): mirror it, promote the mirror."""


@failover.command("mirror")
@app_option
@click.argument("queue")
@click.option("--cluster", default=None, help="the cluster the mirror lives in (another than the queue's)")
@click.option("--tag", "tags", multiple=True, help="a server tag the mirror's servers have (repeatable)")
@click.option("--replicas", type=click.IntRange(1, 5), default=None, help="replicas (default: the queue's)")
@click.option("--name", default=None, help="the mirror's name (default NATASK_<PREFIX>_mirror_<queue>)")
def failover_mirror(app_spec: str | None, queue: str, cluster: str | None, tags: tuple[str, ...],
                    replicas: int | None, name: str | None) -> None:
    """Create a mirror of QUEUE's stream, e.g. in another cluster."""
    from .failover import add_mirror

    placement = {k: v for k, v in (("cluster", cluster), ("tags", list(tags))) if v} or None
    made = _run_app(app_spec, lambda app: add_mirror(app, queue, placement=placement, replicas=replicas, name=name))
    click.echo(printable(f"{made} mirrors queue {queue}'s stream"))


@failover.command("promote")
@app_option
@click.argument("queue")
@click.option("--name", default=None, help="the mirror's name (default NATASK_<PREFIX>_mirror_<queue>)")
@click.option("--force", is_flag=True, help="promote even though the primary stream still answers (it is deleted)")
def failover_promote(app_spec: str | None, queue: str, name: str | None, force: bool) -> None:
    """Make QUEUE's mirror its stream once the primary is lost."""
    from .failover import promote

    done = _run_app(app_spec, lambda app: promote(app, queue, name=name, force=force))
    click.echo(printable(f"{done.stream} holds queue {queue} now: {done.waiting} task(s) to run, {done.finished} "
                         f"finished before the loss removed, {done.superseded} older copies removed"))


@main.command()
@app_option
@click.argument("task_id")
@click.option("--terminate", is_flag=True, help="also cancel it if it is running (async tasks)")
def revoke(app_spec: str | None, task_id: str, terminate: bool) -> None:
    """Revoke a task: it will not run (recorded durably for every worker)."""
    _run_app(app_spec, lambda app: app.client.revoke(task_id, terminate))
    click.echo(f"revoked {task_id}")


@main.command()
@click.option("-p", "--port", default=4222, show_default=True, help="client port (0: any free port)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--store-dir", default=None, help="JetStream data dir (default: a temp dir, deleted on exit)")
def server(port: int, host: str, store_dir: str | None) -> None:
    """Run the bundled nats-server with JetStream, for development."""
    from .server import NatsServer

    srv = NatsServer(port=port, host=host, store_dir=store_dir)
    stopping: list[int] = []

    def stop(signum: int) -> None:
        stopping.append(signum)
        if srv.proc is not None:
            srv.proc.terminate()

    interrupts = Interrupts(stop).install()  # before the server starts: a signal never finds the default action
    try:
        try:
            srv.start()
        except (RuntimeError, NataskError) as e:
            if stopping:
                return
            raise click.ClickException(str(e)) from None
        click.echo(srv.url, nl=True)
        click.echo(f"nats-server with JetStream, data in {srv.store_dir}; Ctrl-C to stop", err=True)
        proc = srv.proc
        if proc is not None and not stopping:
            proc.wait()
    finally:
        srv.close()
        interrupts.restore()


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
