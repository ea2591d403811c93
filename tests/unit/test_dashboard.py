"""The dashboard's pure parts: argument previews (redacted, bounded) and how feeds update a task row."""

from __future__ import annotations

import datetime as dt

from natask.dashboard import PREVIEW_CHARS, REDACTED, Model, Query, is_secret, preview, redact


def test_secret_looking_keys() -> None:
    for key in ("password", "PASSWORD", "db_passwd", "api_key", "apiKey", "token", "access_token", "secret",
                "client_secret", "Authorization", "auth", "card_number", "credit_card", "cvv", "session_id",
                "cookie", "private_key", "pin", "pass", "iban", "ssn", "signature", "credentials"):
        assert is_secret(key), key
    for key in ("name", "user", "email", "order_id", "amount", "pinned", "passenger", "notes", 3, None):
        assert not is_secret(key), key


def test_short_secret_names_are_hidden_as_name_parts_only() -> None:
    for key in ("pw", "PW", "db_pw", "db-pw", "dbPw", "pw2", "jwt", "user-jwt", "userJWT", "creds", "aws_creds",
                "otp", "otp_code", "otpCode", "user-otp", "totp", "bearer", "bearer_header"):
        assert is_secret(key), key
    for key in ("pwm", "pwm_duty", "upward", "footprint", "hotpot", "spotprice", "potpourri"):
        assert not is_secret(key), key


def test_redact_replaces_secret_values_at_any_depth() -> None:
    value = {"user": "bob", "password": "hunter2",
             "nested": {"items": [{"token": "t0k3n", "ok": 1}, ("x", {"Authorization": "Bearer abc"})]},
             "card": {"number": "4111111111111111"}}
    assert redact(value) == {"user": "bob", "password": REDACTED,
                             "nested": {"items": [{"token": REDACTED, "ok": 1}, ("x", {"Authorization": REDACTED})]},
                             "card": REDACTED}
    assert value["password"] == "hunter2"  # a copy: the original is untouched


def test_preview_redacts_keyword_and_nested_secrets() -> None:
    text = preview(["order-7", {"api_key": "sk_live_123", "qty": 2}],
                   {"password": "hunter2", "note": "hi", "headers": {"Cookie": "sid=1"}})
    assert text == ("('order-7', {'api_key': '***', 'qty': 2}, password='***', note='hi', "
                    "headers={'Cookie': '***'})")
    for secret in ("sk_live_123", "hunter2", "sid=1"):
        assert secret not in text


def test_preview_is_bounded() -> None:
    huge = preview(["x" * 100_000, list(range(100_000))], {"blob": b"\0" * 10_000})
    assert len(huge) <= PREVIEW_CHARS and huge.endswith("…")
    assert preview([b"\0" * 10_000], {}) == "(<10000 bytes>)"
    deep: list[object] = []
    for _ in range(1000):
        deep = [deep]
    assert len(preview([deep], {})) <= PREVIEW_CHARS
    assert preview([], {}) == "()"
    assert preview([dt.date(2026, 1, 2)], {}) == "(datetime.date(2026, 1, 2))"


def _dashboard() -> Model:
    return Model()


def test_events_make_a_row_with_runtime_whatever_the_order() -> None:
    d = _dashboard()
    d.on_event({"type": "task-started", "id": "a", "name": "t.add", "ts": 100.0, "worker": "w1", "retries": 0})
    assert d.rows["a"].state == "STARTED"
    d.on_event({"type": "task-succeeded", "id": "a", "name": "t.add", "ts": 100.25, "worker": "w1"})
    row = d.rows["a"]
    assert (row.state, row.runtime, row.worker) == ("SUCCESS", 0.25, "w1")

    # The outcome may overtake the start (different subjects): the row stays final, runtime still known.
    d.on_event({"type": "task-failed", "id": "b", "name": "t.div", "ts": 200.5, "worker": "w1",
                "exc_type": "ZeroDivisionError", "message": "division by zero"})
    d.on_event({"type": "task-started", "id": "b", "name": "t.div", "ts": 200.0, "worker": "w1"})
    assert (d.rows["b"].state, d.rows["b"].runtime) == ("FAILURE", 0.5)
    assert [t["id"] for t in d.search(Query(state="FAILURE"))[0]] == ["b"]
    assert {t["id"] for t in d.changes(0)} == {"a", "b"}
    assert [t["id"] for t in d.changes(d.rows["a"].version)] == ["b"]


def test_worker_events() -> None:
    d = _dashboard()
    d.on_event({"type": "worker-online", "ts": 1.0, "worker": "h:1", "queues": ["default"], "concurrency": 4})
    assert d.workers["h:1"]["status"] == "online" and d.workers["h:1"]["concurrency"] == 4
    d.on_event({"type": "worker-offline", "ts": 2.0, "worker": "h:1"})
    assert d.summary("unit", "p")["workers"][0]["status"] == "offline"


def test_events_with_odd_values_never_raise_nor_reach_the_page() -> None:
    d = _dashboard()
    d.on_event({"type": "worker-online", "ts": 1.0, "worker": "h:1", "queues": 5, "concurrency": 4})
    d.on_event({"type": "worker-online", "ts": "x", "worker": ["h"], "queues": ["q"]})
    assert d.workers == {} and d.dropped == 2
    d.on_event({"type": "task-started", "id": "a", "name": "t.add", "ts": "soon", "worker": "w1", "retries": "abc"})
    d.on_event({"type": "task-retried", "id": "a", "name": 5, "ts": float("nan"), "retries": 2.5,
                "exc_type": None, "message": None})
    d.on_event({"type": "task-finished", "id": "a", "ts": 3.0, "state": {"not": "a state"}})
    d.on_event({"type": "task-started", "id": ">", "ts": 1.0})
    d.on_event({"type": 7, "id": "b"})
    row = d.rows["a"]
    assert (row.name, row.retries, row.state, row.finished) == ("t.add", 0, "FINISHED", 3.0)
    assert isinstance(row.started, float) and list(d.rows) == ["a"]


def test_state_json_never_carries_nan() -> None:
    from natask.dashboard.web import dumps

    assert dumps({"a": [float("nan"), 1.5, {"b": float("inf")}]}) == b'{"a":[null,1.5,{"b":null}]}'


def test_every_count_agrees_after_more_tasks_than_the_index_holds() -> None:
    """FAILED once stuck at the 100 failed rows kept while the workers table said 779: every count
    now comes from the model's tallies, not from the rows it still holds."""
    d = Model(limit=10)
    for i in range(60):
        worker = f"w:{i % 3}"
        d.publish(f"t{i}", "t.job", "default", f"({i},)", msg_id=f"t{i}", ts=float(i))
        d.on_event({"type": "task-started", "id": f"t{i}", "name": "t.job", "ts": i + 0.1, "worker": worker})
        kind = "task-failed" if i % 4 == 0 else "task-succeeded"
        d.on_event({"type": kind, "id": f"t{i}", "name": "t.job", "ts": i + 0.5, "worker": worker,
                    "exc_type": "ValueError", "message": "bad"})
    counts = d.counts()
    workers = d.worker_rows()
    assert (counts["seen"], counts["failed"], counts["succeeded"], counts["indexed"]) == (60, 15, 45, 10)
    assert sum(w["failed"] for w in workers) == counts["failed"]
    assert sum(w["succeeded"] for w in workers) == counts["succeeded"]
    chart = d.series.points(now=60.0, minutes=2)
    assert sum(p["failed"] for p in chart) == 15 and sum(p["succeeded"] for p in chart) == 45
    assert d.search(Query(state="FAILURE"))[1] <= 10  # the index holds fewer; the counts do not shrink


def test_an_event_seen_twice_is_counted_once() -> None:
    """History replay and the live subscription overlap for a moment: the same event may come twice."""
    d = Model()
    events = [{"type": "task-started", "id": "a", "name": "t.x", "ts": 1.0, "worker": "w:1"},
              {"type": "task-retried", "id": "a", "name": "t.x", "ts": 1.5, "worker": "w:1", "retries": 1},
              {"type": "task-failed", "id": "a", "name": "t.x", "ts": 2.0, "worker": "w:1"}]
    for event in events + events:
        d.on_event(event)
    assert (d.counts()["failed"], d.counts()["retried"]) == (1, 1)
    assert [what for _, what, _ in d.rows["a"].timeline] == ["started", "retried", "failure"]


def test_search_pages_and_filters() -> None:
    d = Model()
    for i in range(30):
        d.publish(f"id{i:02d}", "t.even" if i % 2 == 0 else "t.odd", "q", f"('order-{i}',)", ts=1000.0 + i)
        d.on_event({"type": "task-succeeded", "id": f"id{i:02d}", "ts": 1000.5 + i, "worker": f"w:{i % 2}"})
    rows, total = d.search(Query(name="t.even", limit=5, offset=5))
    assert total == 15 and [r["id"] for r in rows] == ["id18", "id16", "id14", "id12", "id10"]
    assert [r["id"] for r in d.search(Query(text="ORDER-7"))[0]] == ["id07"]
    assert d.search(Query(worker="w:1", since=1020.0))[1] == 5
    assert d.search(Query(since=1000.0, until=1002.9))[1] == 3


def test_a_recorded_publish_restores_arguments_and_relations() -> None:
    """The dashboard records publishes as ``task-sent`` events in its history stream."""
    d = Model()
    d.on_event({"type": "task-sent", "id": "c1", "name": "t.child", "ts": 5.0, "worker": "dashboard:h:1",
                "queue": "q", "args": "(1,)", "parent_id": "p1", "root_id": "r1"})
    assert (d.rows["c1"].args, d.rows["c1"].queue, d.rows["c1"].parent_id) == ("(1,)", "q", "p1")
    assert [c["id"] for c in d.children("p1")] == ["c1"] and [c["id"] for c in d.workflow("r1")] == ["c1"]
