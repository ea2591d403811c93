"""natask.celery without a server: task_routes precedence, app.conf mapping and its warnings, crontab,
config_from_object and shared_task resolution."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from natask import ConfigError, Natask, chain
from natask.canvas.signature import Freezer
from natask.celery import Celery, crontab, settings_of, shared_task
from natask.routes import Router

URL = "nats://127.0.0.1:1"  # never connected: preparing a call needs no server


def queue_of_call(task: Any, *args: Any, queue: str | None = None) -> str:
    return str(task._prepare(args, None, None, None, None, None, queue, None).queue)


def test_celery_defaults_and_broker() -> None:
    app = Celery("proj", broker="nats://a:4222;nats://b:4222")
    assert app.config.default_queue == "celery"
    assert app.config.servers == ("nats://a:4222", "nats://b:4222")
    assert app.main == "proj"
    with pytest.raises(ConfigError, match="NATS servers only"):
        Celery("proj", broker="amqp://guest@localhost//")


def test_routes_precedence_call_then_task_then_routes_then_default() -> None:
    app = Celery("proj", broker=URL)
    app.conf.task_routes = {"feed.*": {"queue": "feeds"}, "feed.own": "ignored"}

    @app.task(name="feed.fetch")
    def fetch() -> None: ...

    @app.task(name="feed.own", queue="mine")
    def own() -> None: ...

    @app.task(name="other.x")
    def other() -> None: ...

    assert queue_of_call(fetch) == "feeds"  # a glob route
    assert queue_of_call(fetch, queue="now") == "now"  # the call's queue beats routes
    assert queue_of_call(own) == "mine"  # the task's own queue beats routes (Celery's order)
    assert queue_of_call(other) == "celery"  # no route: the default queue
    assert app.client.default_queue("feed.x", (), {}) == "feeds"  # send_task by name is routed too


def test_route_kinds_in_order_first_match_wins() -> None:
    seen: list[tuple[Any, ...]] = []

    def by_arg(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        seen.append((name, tuple(args)))
        return "big" if args and args[0] > 100 else None

    router = Router([by_arg, {re.compile(r"(video|image)\.tasks\..*"): {"queue": "media"}},
                     [("a.*", {"queue": "first"}), ("a.?", {"queue": "second"}), ("b.c", "exact")]])
    assert router("video.tasks.x", (1,), {}, {}) == "media"
    assert router("video.tasks.x", (101,), {}, {}) == "big"
    assert router("a.b", (), {}, {}) == "first"  # patterns keep their order
    assert router("b.c", (), {}, {}) == "exact"
    assert router("none", (), {}, {}) is None
    assert seen[0] == ("video.tasks.x", (1,))


def test_route_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="routes by queue only; priority"):
        Router({"a": {"queue": "q", "priority": 5}})
    with pytest.raises(ConfigError, match="differs from queue"):
        Router({"a": {"queue": "q", "routing_key": "r"}})
    assert Router({"a": {"queue": "q", "routing_key": "q"}})("a", (), {}, {}) == "q"
    with pytest.raises(ConfigError, match="invalid queue name"):
        Router({"a": "bad queue"})
    with pytest.raises(ConfigError, match="cannot import the router"):
        Router("no.such.module.router")


def test_canvas_is_routed_at_freeze() -> None:
    app = Celery("proj", broker=URL, task_routes={"t.mul": "math"})

    @app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="t.mul")
    def mul(x: int, y: int) -> int:
        return x * y

    node: Any = Freezer(app).freeze(chain(add.s(1, 2), mul.s(3)))
    queues = [step["options"]["queue"] for step in node["tasks"]]
    assert queues == ["celery", "math"], node


def test_conf_maps_settings_onto_the_app(caplog: pytest.LogCaptureFixture) -> None:
    app = Celery("proj", broker=URL)

    @app.task(name="t.early")
    def early() -> None: ...

    @app.task(name="t.own", time_limit=5)
    def own() -> None: ...

    app.conf.update(task_default_queue="work", result_expires=timedelta(hours=2), task_time_limit=30)
    assert app.config.default_queue == app.client.config.default_queue == "work"
    assert app.conf.result_expires == timedelta(hours=2) and app.config.result_ttl == 7200
    assert app.conf["task_default_queue"] == app.conf.get("task_default_queue") == "work"
    assert early.options.time_limit == 30  # a default for tasks that set none
    assert own.options.time_limit == 5

    @app.task(name="t.late")
    def late() -> None: ...

    assert late.options.time_limit == 30  # and for tasks registered afterwards
    app.conf.task_time_limit = 40
    assert early.options.time_limit == 40 and own.options.time_limit == 5
    with caplog.at_level(logging.WARNING, "natask.conf"):
        app.conf.update(result_backend="redis://", worker_concurrency=4, broker_heartbeat=10, my_setting=1,
                        task_acks_late=True)
        app.conf.worker_concurrency = 8
    text = [r.getMessage() for r in caplog.records]
    assert len([t for t in text if "worker_concurrency" in t]) == 1  # one warning per setting
    assert any("result_backend" in t and "NATS KV" in t for t in text)
    assert any("broker_heartbeat" in t for t in text)
    assert any("my_setting" in t for t in text)
    assert not any("task_acks_late" in t for t in text)  # natask always acks late
    assert app.conf.my_setting == 1
    with pytest.raises(ConfigError, match="result_expires=None"):
        app.conf.result_expires = None


def test_natask_apps_have_conf_too() -> None:
    app = Natask("plain", servers=URL)
    assert app.conf.task_always_eager is False
    app.conf.task_routes = {"x.*": "xs"}
    assert app.client.default_queue("x.y", (), {}) == "xs"
    app.conf.task_routes = None
    assert app.client.router is None  # no routes: nothing to ask per call


def test_beat_schedule_and_crontab() -> None:
    assert crontab(minute=0, hour="*/3").cron == "0 */3 * * *"
    assert crontab(minute=[30, 0], day_of_week="monday").cron == "0,30 * * * mon"
    with pytest.raises(ConfigError, match="crontab hour"):
        crontab(hour="1 2")
    app = Celery("proj", broker=URL, timezone="Europe/Oslo")
    app.conf.beat_schedule = {
        "every-10s": {"task": "t.add", "schedule": 10.0, "args": (1, 2), "options": {"queue": "q"}},
        "nightly": {"task": "t.add", "schedule": crontab(hour=2, minute=0)},
    }
    entries = app.periodic_entries
    assert entries["every-10s"].schedule == timedelta(seconds=10)
    assert entries["every-10s"].signature.args == (1, 2)
    assert entries["nightly"].schedule == "0 2 * * *" and entries["nightly"].tz == "Europe/Oslo"
    app.conf.beat_schedule = {"only": {"task": "t.add", "schedule": timedelta(minutes=1)}}
    assert list(app.periodic_entries) == ["only"]  # the previous schedule's entries are replaced
    with pytest.raises(ConfigError, match="relative=True"):
        app.conf.beat_schedule = {"r": {"task": "t.add", "schedule": 5, "relative": True}}


def test_config_from_object_with_and_without_namespace() -> None:
    django_like = SimpleNamespace(DEBUG=True, CELERY_TASK_DEFAULT_QUEUE="dj", CELERY_TASK_ROUTES={"a": "b"})
    assert settings_of(django_like, "CELERY") == {"task_default_queue": "dj", "task_routes": {"a": "b"}}
    module_like = SimpleNamespace(task_default_queue="m", timedelta=timedelta, BROKER_URL=URL)
    assert settings_of(module_like, None) == {"task_default_queue": "m", "broker_url": URL}
    app = Celery("proj", broker=URL, namespace="CELERY")
    assert app.config_from_object(django_like)
    assert app.config.default_queue == "dj"
    assert not app.config_from_object("no.such.config", silent=True)
    with pytest.raises(ImportError):
        app.config_from_object("no.such.config")


def test_shared_task_follows_the_current_app() -> None:
    @shared_task(name="shared.double")
    def double(x: int) -> int:
        return 2 * x

    first = Celery("one", broker=URL)
    assert double.name == "shared.double"
    assert double(4) == 8
    assert "shared.double" in first.tasks  # registered on first use
    second = Celery("two", broker=URL)
    assert double.app is second  # the last app created is current
    third = Celery("three", broker=URL, set_as_current=False)
    assert double.app is second
    third.finalize()
    assert "shared.double" in third.tasks  # every app that finalizes registers shared tasks
    first.set_current()
    assert double.app is first


def test_find_app_in_a_package_as_celery_does() -> None:
    from natask.app import find_app

    app = find_app("tests.integration.celeryproj")  # no app attribute: found in celeryproj.celery
    assert isinstance(app, Celery) and app.name == "proj"
    assert find_app("tests.integration.celeryproj.celery:app") is app
    with pytest.raises(LookupError, match="no natask app"):
        find_app("tests.integration.celeryproj.tasks")
