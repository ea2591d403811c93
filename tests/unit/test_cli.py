"""The command line without a server: help texts, -A forms, call's checks, the events printer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from natask.cli import _EventLines, _in_time_order, main
from natask.config import Config
from natask.errors import ConfigError

APP_FILE = '''
from natask import Natask

app = Natask("unitcli", servers="nats://127.0.0.1:1")

@app.task(name="shop.add")
def add(x: int, y: int) -> int:
    return x + y
'''


def commands(group: click.Group, path: str = "natask") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{path} {name}")


def test_every_option_of_every_command_has_help_text() -> None:
    missing = [f"{where} {param.opts[0]}" for where, command in [("natask", main), *commands(main)]
               for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()
               and param.name not in ("version", "help")]
    assert missing == []


def test_top_level_help_shows_each_commands_first_sentence_whole() -> None:
    out = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert out.exit_code == 0
    assert "..." not in out.output.partition("Commands:")[2]
    assert "Start the bundled nats-server and workers, enqueue tasks, show results and who ran them" in \
        " ".join(out.output.split())


@pytest.fixture
def app_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "unitcli_tasks.py"
    path.write_text(APP_FILE)
    monkeypatch.delenv("NATASK_APP", raising=False)
    return path


def test_call_refuses_an_unknown_name_with_the_nearest_ones(app_file: Path) -> None:
    out = CliRunner().invoke(main, ["-A", f"{app_file}:app", "call", "shop.ad", "--args", "[1, 2]"])
    assert out.exit_code == 2
    assert "no task named 'shop.ad' in app 'unitcli': did you mean 'shop.add'?" in out.output


def test_call_refuses_arguments_the_task_does_not_take(app_file: Path) -> None:
    out = CliRunner().invoke(main, ["call", "shop.add", "--args", "[1]", "-A", f"{app_file}:app"])
    assert out.exit_code == 2
    assert "arguments do not fit: shop.add(x: int, y: int) -> int: missing a required argument: 'y'" in out.output
    out = CliRunner().invoke(main, ["call", "shop.add", "--args", "{}", "-A", f"{app_file}:app"])
    assert out.exit_code == 2 and "--args must be a JSON list" in out.output


def test_a_missing_app_file_is_named(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["-A", f"{tmp_path}/nope.py:app", "call", "x"])
    assert out.exit_code == 2 and "no Python file" in out.output and "nope.py" in out.output


def test_an_http_url_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"is an HTTP URL.*nats://HOST:4222"):
        Config.build("a", servers="http://localhost:8222")


def test_event_lines_show_local_times_and_durations() -> None:
    from datetime import datetime

    lines, task = _EventLines(), "0" * 32
    sent = datetime(2026, 1, 2, 3, 4, 5, 250000).timestamp()
    first = lines.format({"type": "task-sent", "ts": sent, "worker": "w", "id": task, "name": "shop.add"})
    assert len(first) == 2 and first[0].startswith("-- 2026-01-02")  # the day, on a line of its own
    [started] = lines.format({"type": "task-started", "ts": sent + 0.5, "worker": "w", "id": task,
                              "name": "shop.add"})
    assert "03:04:05.750" in started and "waited 0.500s" in started and "shop.add[" in started
    [done] = lines.format({"type": "task-succeeded", "ts": sent + 2, "worker": "w", "id": task, "name": "shop.add"})
    assert done.startswith("03:04:07.250  w  task-succeeded") and "ran 1.500s" in done


async def test_events_come_out_in_time_order() -> None:
    arrived = asyncio.Event()

    async def source() -> AsyncIterator[dict[str, Any]]:
        # One batch per kind: the end arrives before the start.
        yield {"type": "task-succeeded", "ts": 2.0}
        yield {"type": "task-started", "ts": 1.0}
        arrived.set()

    got = [e["type"] async for e in _in_time_order(source())]
    assert arrived.is_set() and got == ["task-started", "task-succeeded"]


def test_ctrl_c_outside_the_event_loop_exits_130_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "interrupted_tasks.py").write_text("raise KeyboardInterrupt  # Ctrl-C while the app imports\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = CliRunner().invoke(main, ["status", "-A", "interrupted_tasks:app"])
    assert out.exit_code == 130 and out.output == ""
