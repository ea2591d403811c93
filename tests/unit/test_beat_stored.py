"""Stored periodic entries: the value read from the schedules bucket is hostile input, validated in
full; ``app.beat.add`` refuses what a beat would skip. No server."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import msgpack
import pytest

from natask import ConfigError, Natask, TaskNotFound
from natask.beat.schedules import Schedules
from natask.beat.stored import MAX_EVERY, MAX_STORED_BYTES, OVERRIDE, StoredEntry, decode

GOOD: dict[str, Any] = {"v": 1, "kind": "entry", "enabled": True, "created": 1.0, "updated": 2.0, "task": "jobs.tick",
                        "args": [1, "x"], "kwargs": {"k": [1]}, "queue": "low", "every": 30, "cron": None, "tz": None}


@pytest.fixture
def app() -> Iterator[Natask]:
    a = Natask("unit", servers=["nats://127.0.0.1:1"])  # never connects
    a.task(name="jobs.tick")(lambda x, y: None)
    a.add_periodic_task(timedelta(seconds=5), a.tasks["jobs.tick"].s(1, 2), name="code.entry")
    yield a
    a.close()


def test_a_valid_value_round_trips(app: Natask) -> None:
    stored, entry = decode("live.one", msgpack.packb(GOOD), app)
    assert stored == StoredEntry("live.one", "jobs.tick", (1, "x"), {"k": [1]}, "low", 30, None, None, True, 1.0, 2.0)
    assert entry is not None and entry.schedule == timedelta(seconds=30)
    assert entry.signature.args == (1, "x") and entry.signature.options["queue"] == "low"
    assert decode("live.one", stored.encode(), app)[0] == stored
    cron = {**GOOD, "every": None, "cron": "0 3 * * *", "tz": "Europe/Berlin"}
    assert decode("c", msgpack.packb(cron), app)[1].tz == "Europe/Berlin"  # type: ignore[union-attr]
    override = StoredEntry("code.entry", enabled=False, created=1.0, updated=1.0, kind=OVERRIDE)
    assert decode("code.entry", override.encode(), app) == (override, None)


@pytest.mark.parametrize(("change", "reason"), [
    ({"v": 2}, "unknown version"),
    ({"v": None}, "unknown version"),
    ({"kind": "job"}, "unknown kind"),
    ({"enabled": 1}, "'enabled' must be true or false"),
    ({"created": "yesterday"}, "'created' must be a unix time"),
    ({"updated": math.inf}, "'updated' must be a unix time"),
    ({"updated": -1}, "'updated' must be a unix time"),
    ({"created": True}, "'created' must be a unix time"),
    ({"task": ""}, "invalid task name"),
    ({"task": "a.>"}, "invalid task name"),
    ({"task": "x" * 300}, "invalid task name"),
    ({"task": 5}, "invalid task name"),
    ({"args": "12"}, "'args' must be a list"),
    ({"kwargs": [1]}, "'kwargs' must be a map"),
    ({"kwargs": {1: 2}}, "'kwargs' must be a map with string keys"),
    ({"queue": "a.b"}, "invalid queue name"),
    ({"queue": "_internal"}, "invalid queue name"),
    ({"queue": 3}, "invalid queue name"),
    ({"every": None}, "exactly one of 'every' and 'cron'"),
    ({"cron": "* * * * *"}, "exactly one of 'every' and 'cron'"),
    ({"every": 0}, "'every' must be whole seconds"),
    ({"every": 1.5}, "'every' must be whole seconds"),
    ({"every": True}, "'every' must be whole seconds"),
    ({"every": MAX_EVERY + 1}, "'every' must be whole seconds"),
    ({"every": 2**64 - 1}, "'every' must be whole seconds"),
    ({"every": 30, "tz": "UTC"}, "tz= applies to cron schedules only"),
    ({"every": None, "cron": "61 * * * *"}, "invalid cron"),
    ({"every": None, "cron": "* * *"}, "has 3 fields"),
    ({"every": None, "cron": "H * * * *"}, "hashed (H) or random (R)"),
    ({"every": None, "cron": "0 0 30 2 *"}, "never fires"),
    ({"every": None, "cron": 5}, "'cron' must be a text"),
    ({"every": None, "cron": "*" * 300}, "'cron' must be a text"),
    ({"every": None, "cron": "* * * * *", "tz": "Mars/Olympus"}, "unknown time zone"),
    ({"every": None, "cron": "* * * * *", "tz": "../../etc/passwd"}, "unknown time zone"),
    ({"every": None, "cron": "* * * * *", "tz": "x" * 200}, "'tz' must be a time zone name"),
])
def test_a_hostile_value_is_refused_with_the_reason(app: Natask, change: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode("live.one", msgpack.packb({**GOOD, **change}), app)
    assert reason in str(e.value)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "not a stored entry"),
    (b"\xc1", "not a stored entry"),
    (b"\x91" + b"\x91" * 5000 + b"\xc0", "not a stored entry"),  # nested beyond the decoder's depth
    (msgpack.packb([1]), "not a map"),
    (msgpack.packb("entry"), "not a map"),
    (msgpack.packb({**GOOD, "args": ["x" * MAX_STORED_BYTES]}), f"more than {MAX_STORED_BYTES}"),
    (b"\xc7\x05\x63abcde", "not a stored entry"),  # an unknown ext type
])
def test_bytes_that_are_not_an_entry_are_refused(app: Natask, data: bytes, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode("live.one", data, app)
    assert reason in str(e.value)


def test_a_key_that_is_not_an_entry_name_is_refused(app: Natask) -> None:
    with pytest.raises(ConfigError, match="invalid periodic entry name"):
        decode("a/b", msgpack.packb(GOOD), app)


def validate(app: Natask, name: str, task: Any, **kwargs: Any) -> StoredEntry:
    return Schedules(app)._stored(name, task, kwargs.pop("every", None), kwargs.pop("cron", None),
                                  kwargs.pop("args", ()), kwargs.pop("kwargs", None), kwargs.pop("queue", None),
                                  kwargs.pop("tz", None))


def test_add_validates_like_a_beat_reads(app: Natask) -> None:
    tick = app.tasks["jobs.tick"]
    assert validate(app, "a", "jobs.tick", every=timedelta(minutes=1), args=[1, 2]).every == 60
    assert validate(app, "a", tick.s(1, 2).set(queue="low"), cron="*/5  * * * *").cron == "*/5 * * * *"
    assert validate(app, "a", tick, every=1, args=(1,), kwargs={"y": 2}).kwargs == {"y": 2}
    producer = Natask("producer", servers=["nats://127.0.0.1:1"])  # no tasks: any valid name is taken
    try:
        assert validate(producer, "a", "elsewhere.task", every=5).task == "elsewhere.task"
    finally:
        producer.close()
    for call, error, reason in [
        (dict(task="jobs.tik", every=1), TaskNotFound, "did you mean 'jobs.tick'?"),
        (dict(task="other", every=1), TaskNotFound, "registered: jobs.tick"),
        (dict(task="jobs.tick", every=1, args=[1]), ConfigError, "arguments do not fit jobs.tick"),
        (dict(task="jobs.tick", args=[1, 2]), ConfigError, "exactly one of every="),
        (dict(task="jobs.tick", every=1, cron="* * * * *", args=[1, 2]), ConfigError, "exactly one of every="),
        (dict(task="jobs.tick", every=0.5, args=[1, 2]), ConfigError, "from 1 to"),
        (dict(task="jobs.tick", every=1.5, args=[1, 2]), ConfigError, "whole number of seconds"),
        (dict(task="jobs.tick", every="5", args=[1, 2]), ConfigError, "seconds or a timedelta"),
        (dict(task="jobs.tick", every=timedelta(days=9999), args=[1, 2]), ConfigError, "at most"),
        (dict(task="jobs.tick", cron="* * *", args=[1, 2]), ConfigError, "has 3 fields"),
        (dict(task="jobs.tick", cron="* * * * *", tz="Nowhere/City", args=[1, 2]), ConfigError, "unknown time zone"),
        (dict(task="jobs.tick", every=5, tz="UTC", args=[1, 2]), ConfigError, "tz= applies to cron"),
        (dict(task="jobs.tick", every=5, queue="a b", args=[1, 2]), ConfigError, "invalid queue name"),
        (dict(task=app.tasks["jobs.tick"].s(1, 2), every=5, args=[1]), ConfigError, "not both"),
        (dict(task=app.tasks["jobs.tick"].s(1, 2).set(countdown=3), every=5), ConfigError, "queue option only"),
        (dict(task="jobs.tick", every=5, args=[1, object()]), ConfigError, "cannot be stored"),
        (dict(task="jobs.tick", every=5, args=[1, "x" * MAX_STORED_BYTES]), ConfigError, "bytes stored"),
        (dict(task=42, every=5), ConfigError, "task must be a task name"),
    ]:
        with pytest.raises(error) as e:
            validate(app, "a", call.pop("task"), **call)
        assert reason in str(e.value), (call, str(e.value))
    with pytest.raises(ConfigError, match="defined in the app's code"):
        validate(app, "code.entry", "jobs.tick", every=5, args=[1, 2])
    with pytest.raises(ConfigError, match="invalid periodic entry name"):
        validate(app, "bad name", "jobs.tick", every=5, args=[1, 2])


def test_live_entries_follow_the_bucket_and_rebuild_from_a_whole_copy(
    app: Natask, caplog: pytest.LogCaptureFixture,
) -> None:
    from natask.beat.live import LiveEntries
    from natask.broker.kv import Entry

    woken: list[int] = []
    live = LiveEntries(app, lambda: woken.append(1))
    assert [e.name for e in live.entries] == ["code.entry"] and live.take() == {}

    def put(key: str, value: dict[str, Any] | bytes, rev: int) -> None:
        live._apply(Entry(key, value if isinstance(value, bytes) else msgpack.packb(value), rev))
        live._resolve(key)

    put("live.a", GOOD, 1)
    assert set(live.take()) == {"live.a"} and len(live.entries) == 2
    put("live.a", GOOD, 2)  # the same entry written again: nothing to apply
    assert live.take() == {}
    put("live.a", {**GOOD, "every": 60}, 3)
    assert live.take()["live.a"].schedule == timedelta(seconds=60)  # type: ignore[union-attr]
    put("live.a", {**GOOD, "enabled": False}, 4)
    assert live.take() == {"live.a": None}
    put("code.entry", StoredEntry("code.entry", enabled=False, kind=OVERRIDE).encode(), 5)
    assert live.take() == {"code.entry": None} and live.entries == []
    put("code.entry", {**GOOD}, 6)  # a whole entry cannot replace a code-defined one
    assert live.take()["code.entry"] is app.periodic_entries["code.entry"]
    put("code.entry", {**GOOD}, 7)
    put("live.bad", b"\xc1", 8)
    put("live.bad", b"\xc1", 8)  # the same revision again (a rebuild): logged once
    clashes = [r for r in caplog.records if "ignored" in r.getMessage()]
    skipped = [r for r in caplog.records if "'live.bad'" in r.getMessage()]
    assert len(clashes) == 1 and len(skipped) == 1

    # After a restart the whole bucket is read again: what is gone from it fires no more.
    live._rebuild({"live.b": Entry("live.b", msgpack.packb(GOOD), 1)})
    changes = live.take()
    assert set(changes) == {"live.b"} and changes["live.b"] is not None
    assert sorted(e.name for e in live.entries) == ["code.entry", "live.b"]
    live._rebuild({})
    assert live.take() == {"live.b": None}
    assert [e.name for e in live.entries] == ["code.entry"]
