"""Streams per queue, without a server: names unique across apps, what each stream captures, and the
``queue_options`` that shape them (validated, and only with ``stream_per_queue=True``)."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest

from natask import ConfigError, Natask
from natask.naming import DLQ_STREAM, Names


def test_a_queue_stream_is_named_after_prefix_and_queue() -> None:
    assert Names("tasks").queue_stream("eu") == "NATASK_TASKS_q_eu"
    assert Names("tasks").queue_mirror("eu") == "NATASK_TASKS_mirror_eu"


def test_queue_stream_names_never_meet_another_apps_names() -> None:
    tokens = ["a", "A", "b", "a_b", "b_c", "q", "Q", "q_x", "Q_c", "EVENTS_a", "DLQ", "c-d", "mirror_c", "x_q_y"]
    others = {DLQ_STREAM, *(n for t in tokens for n in (Names(t).stream, Names(t).events_stream))}
    seen: dict[str, tuple[str, str, str]] = {}
    for prefix, queue in itertools.product(tokens, tokens):
        names = Names(prefix)
        for kind, name in (("queue", names.queue_stream(queue)), ("mirror", names.queue_mirror(queue))):
            key = (kind, prefix.upper(), queue)  # prefixes differing in case share a stream, as NATASK_<PREFIX> does
            assert seen.setdefault(name, key) == key, f"{name} names both {seen[name]} and {key}"
            assert name not in others


def test_a_queue_stream_captures_its_subjects_and_no_other_queues() -> None:
    names = Names("tasks")
    subjects = names.queue_stream_subjects("eu")
    assert subjects == ["tasks.eu.>", *(f"tasks._p{n}.eu.>" for n in range(1, 10)), "tasks._sched.eu.>"]
    made = [names.task_subject("eu", "x.y"), names.priority_subject("eu", "x", 9), names.schedule_subject("eu", "id1")]
    assert all(names.queue_of_subject(s) == "eu" for s in made)
    others = [names.task_subject("us", "eu.x"), names.priority_subject("eu_2", "x", 1), "tasks._p0.eu.x", "tasks.eu",
              "other.eu.x", "tasks._sched.eu"]
    assert [names.queue_of_subject(s) for s in others] == ["us", "eu_2", None, None, None, None]

    def captures(pattern: str, subject: str) -> bool:
        return re.fullmatch(re.escape(pattern[:-1]) + ".+", subject) is not None

    assert not any(captures(p, s) for p in subjects for s in others[:2])


@pytest.mark.parametrize(("options", "match"), [
    ({"eu": {"placement": {"cluster": "west"}}}, "need stream_per_queue=True"),
    ({"eu": {"jetstream_domain": "edge"}}, "need stream_per_queue=True"),
    ({"eu": {"replicas": 3}}, "need stream_per_queue=True"),
])
def test_stream_shaping_queue_options_need_a_stream_per_queue(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Natask("q", queue_options=options)
    Natask("q", queue_options={"eu": {"max_ack_pending": 5}})  # a consumer's option: either layout


@pytest.mark.parametrize(("given", "match"), [
    ({"placement": {"cluster": "west"}, "replicas": 3, "jetstream_domain": "edge", "max_ack_pending": 9}, None),
    ({"placement": {"tags": ["region:west", "ssd"]}}, None),
    ({"placement": {}}, "must be a dict like"),
    ({"placement": "west"}, "must be a dict like"),
    ({"placement": {"region": "x"}}, "takes 'cluster' and 'tags', not 'region'"),
    ({"placement": {"cluster": "a b"}}, "must be a cluster name"),
    ({"placement": {"tags": "ssd"}}, "non-empty list of server tags"),
    ({"placement": {"tags": ["a b"]}}, "non-empty list of server tags"),
    ({"replicas": 6}, "from 1 to 5"),
    ({"replicas": True}, "from 1 to 5"),
    ({"jetstream_domain": "a.b"}, "JetStream domain name"),
    ({"jetstream_domain": 5}, "JetStream domain name"),
    ({"domain": "edge"}, "unknown queue option 'domain'"),
])
def test_queue_stream_options_are_validated(given: dict[str, Any], match: str | None) -> None:
    if match is None:
        config = Natask("q", stream_per_queue=True, queue_options={"eu": given}).config
        assert set(config.queue_options["eu"]) == set(given)
        return
    with pytest.raises(ConfigError, match=match):
        Natask("q", stream_per_queue=True, queue_options={"eu": given})


def test_layout_and_domain_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATASK_STREAM_PER_QUEUE", "1")
    monkeypatch.setenv("NATASK_JS_DOMAIN", "hub")
    monkeypatch.setenv("NATASK_QUEUE_OPTIONS", '{"edge": {"jetstream_domain": "edge", "placement": {"tags": ["x"]}}}')
    config = Natask("q").config
    assert config.stream_per_queue and config.jetstream_domain == "hub"
    assert config.queue_options["edge"]["placement"] == {"tags": ("x",)}
    monkeypatch.setenv("NATASK_JS_DOMAIN", "a b")
    with pytest.raises(ConfigError, match="invalid jetstream_domain"):
        Natask("q")
