"""Canvas without a server: composition, serialisation, freezing (ids, options, checks), expansion."""

from __future__ import annotations

import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from natask import EncodeError, GroupResult, Natask, chain, chord, group
from natask.canvas import Signature, from_dict
from natask.canvas.plan import derived_id, expand, leaves
from natask.canvas.send import result_of
from natask.canvas.signature import Freezer
from natask.message import Call, Envelope, dumps, loads
from natask.result import AsyncResult


@pytest.fixture
def app() -> Iterator[Natask]:
    a = Natask("t", servers="nats://127.0.0.1:1")

    @a.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @a.task(name="t.total", queue="slow", expires=60)
    def total(values: list[int]) -> int:
        return sum(values)

    @a.task(name="t.noargs")
    def noargs() -> int:
        return 1

    yield a
    a.close()


def add(app: Natask, *args: Any) -> Signature[Any]:
    return Signature(app, "t.add", args)


def counter() -> Any:
    n = 0

    def ids() -> str:
        nonlocal n
        n += 1
        return f"id{n}"

    return ids


# -- composition --------------------------------------------------------------------------------
def test_pipe_builds_flat_chains(app: Natask) -> None:
    a, b, c = add(app, 1, 2), add(app, 3), add(app, 4)
    ab = a | b
    assert isinstance(ab, chain) and ab.tasks == (a, b)
    abc = ab | c
    assert isinstance(abc, chain) and abc.tasks == (a, b, c)
    assert (a | (b | c)).tasks == (a, b, c)  # type: ignore[attr-defined]
    assert chain(a, chain(b, c)).tasks == (a, b, c)
    assert chain([a, b]).tasks == (a, b)
    assert repr(abc) == "t.add.s(1, 2) | t.add.s(3) | t.add.s(4)"


def test_group_pipe_signature_is_a_chord(app: Natask) -> None:
    g = group(add(app, i, i) for i in range(3))
    assert len(g) == 3
    body: Signature[Any] = Signature(app, "t.total")
    c = g | body
    assert isinstance(c, chord) and c.header is g and c.body == body
    assert isinstance(c | add(app, 1), chain)
    assert isinstance(chord([add(app, 1, 1)], body).header, group)


def test_wrong_members_are_refused(app: Natask) -> None:
    with pytest.raises(TypeError, match="signatures"):
        group([add(app, 1, 1), "t.add"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="signatures"):
        chain(add(app, 1, 1), 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="link"):
        add(app, 1, 1).set(link=42)


# -- serialisation ------------------------------------------------------------------------------
def test_link_options_are_stored_as_plain_data(app: Natask) -> None:
    cb = add(app, 1)
    eb: Signature[Any] = Signature(app, "t.add", (0,), immutable=True)
    s = add(app, 1, 2).set(link=cb, link_error=[eb])
    assert s.options == {"link": [cb.to_dict()], "link_error": [eb.to_dict()]}
    assert loads(dumps(s.to_dict())) == s.to_dict()


@pytest.mark.parametrize("make", [
    lambda app: chain(add(app, 1, 2), add(app, 3)).set(queue="q", link=add(app, 9)),
    lambda app: group([add(app, 1, 1), add(app, 2, 2)]).set(countdown=5),
    lambda app: chord(group([add(app, 1, 1), chain(add(app, 1, 2), add(app, 3))]), Signature(app, "t.total")),
])
def test_canvas_round_trips_through_dict_and_wire(app: Natask, make: Any) -> None:
    original = make(app)
    back = from_dict(app, loads(dumps(original.to_dict())))
    assert type(back) is type(original)
    assert back == original
    assert back.to_dict() == original.to_dict()


def test_from_dict_rejects_unknown_kinds(app: Natask) -> None:
    with pytest.raises(ValueError, match="kind"):
        from_dict(app, {"kind": "map", "tasks": []})


# -- freezing -----------------------------------------------------------------------------------
def test_freeze_assigns_ids_and_resolves_options(app: Natask) -> None:
    node = Freezer(app, counter()).freeze(chain(add(app, 1, 2), Signature(app, "t.total")))
    first, second = node["tasks"]
    assert (first["id"], second["id"]) == ("id1", "id2")
    assert first["options"] == {"queue": "default", "ignore_result": False}
    assert second["options"] == {"queue": "slow", "ignore_result": False, "expires": 60}


def test_random_ids_are_valid_unique_task_ids(app: Natask) -> None:
    node = Freezer(app).freeze(group(add(app, i, i) for i in range(50)))
    ids = [m["id"] for m in node["tasks"]] + [node["id"]]
    assert len(set(ids)) == 51
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_chain_options_first_step_last_step_and_every_step(app: Natask) -> None:
    cb: Signature[Any] = Signature(app, "t.noargs", immutable=True)
    eb: Signature[Any] = Signature(app, "t.noargs", immutable=True)
    c = chain(add(app, 1, 2), add(app, 3), add(app, 4)).set(
        countdown=10, queue="fast", task_id="mine", link=cb, link_error=eb)
    steps = Freezer(app, counter()).freeze(c)["tasks"]
    assert [s["options"].get("countdown") for s in steps] == [10, None, None]  # delays the start only
    assert [s["options"]["queue"] for s in steps] == ["fast"] * 3
    assert [s["id"] for s in steps][-1] == "mine"  # the chain's id is its result's: the last step
    assert ["link" in s for s in steps] == [False, False, True]
    assert all(s["link_error"] == [eb.to_dict()] for s in steps)


def test_step_options_win_over_container_defaults(app: Natask) -> None:
    c = chain(add(app, 1, 2).set(queue="own"), add(app, 3)).set(queue="chain")
    steps = Freezer(app).freeze(c)["tasks"]
    assert [s["options"]["queue"] for s in steps] == ["own", "chain"]


def test_chord_options_go_to_the_body(app: Natask) -> None:
    eb: Signature[Any] = Signature(app, "t.noargs", immutable=True)
    c = chord([add(app, 1, 1), add(app, 2, 2)], Signature(app, "t.total")).set(
        link_error=eb, task_id="result", countdown=3)
    node = Freezer(app, counter()).freeze(c)
    assert node["body"]["id"] == "result"
    assert node["body"]["link_error"] == [eb.to_dict()]
    assert "countdown" not in node["body"]["options"]
    assert all(h["options"]["countdown"] == 3 and "link_error" not in h for h in node["header"])


def test_later_steps_are_checked_with_the_value_they_will_receive(app: Natask) -> None:
    with pytest.raises(TypeError, match=r"t\.add"):
        Freezer(app).freeze(chain(add(app, 1, 2), add(app, 1, 2)))  # would get 3 arguments
    with pytest.raises(TypeError, match=r"t\.noargs"):
        Freezer(app).freeze(chord([add(app, 1, 1)], Signature(app, "t.noargs")))  # gets the list
    with pytest.raises(TypeError, match=r"t\.add"):
        Freezer(app).freeze(add(app, 1, 2).set(link=add(app, 1, 2)))
    # immutable steps keep exactly their own arguments; unknown tasks are not checked
    Freezer(app).freeze(chain(add(app, 1, 2), Signature(app, "t.add", (1, 2), immutable=True)))
    Freezer(app).freeze(chain(add(app, 1, 2), Signature(app, "other.task", (1, 2, 3))))


def test_unencodable_argument_of_a_later_step_fails_at_send_naming_it(app: Natask) -> None:
    with pytest.raises(EncodeError, match=r"t\.add.*positional argument 0"):
        Freezer(app).freeze(chain(add(app, 1, 2), add(app, object())))


def test_unknown_options_are_refused(app: Natask) -> None:
    with pytest.raises(TypeError, match="urgency"):
        Freezer(app).freeze(add(app, 1, 2).set(urgency=3))


def test_derived_ids_are_deterministic_task_ids() -> None:
    a = derived_id("parent/link/0")
    assert a == derived_id("parent/link/0") != derived_id("parent/link/1")
    assert re.fullmatch(r"[0-9a-f]{32}", a)


# -- expansion ----------------------------------------------------------------------------------
def test_chain_sends_its_first_step_carrying_the_rest(app: Natask) -> None:
    node = Freezer(app, counter()).freeze(chain(add(app, 1), add(app, 3), Signature(app, "t.total")))
    (step,) = expand(node, (2,))
    assert step.sig["id"] == "id1" and step.args == (2, 1)
    assert [s["id"] for s in step.meta["chain"]] == ["id2", "id3"]
    (nxt,) = expand(step.meta["chain"][0], (3,), {}, step.meta["chain"][1:])
    assert nxt.args == (3, 3) and [s["id"] for s in nxt.meta["chain"]] == ["id3"]


def test_immutable_step_ignores_the_parent_value(app: Natask) -> None:
    node = Freezer(app).freeze(Signature(app, "t.add", (5, 5), immutable=True))
    (step,) = expand(node, (99,), {"y": 1})
    assert (step.args, step.kwargs) == ((5, 5), {})


def test_chord_members_carry_their_index_and_the_body(app: Natask) -> None:
    node = Freezer(app, counter()).freeze(chord([add(app, i, i) for i in range(3)], Signature(app, "t.total")))
    steps = expand(node)
    assert [s.args for s in steps] == [(0, 0), (1, 1), (2, 2)]
    members = [s.meta["chord"] for s in steps]
    assert [(m["id"], m["i"], m["n"]) for m in members] == [(node["id"], i, 3) for i in range(3)]
    assert all(m["body"]["task"] == "t.total" and m["rest"] == [] and m["up"] is None for m in members)


def test_group_in_the_middle_of_a_chain_waits_like_a_chord(app: Natask) -> None:
    node = Freezer(app).freeze(chain(add(app, 1, 1), group(add(app, 1), add(app, 2)), Signature(app, "t.total")))
    (first,) = expand(node)
    group_node, total = first.meta["chain"]
    steps = expand(group_node, (2,), {}, [total])
    assert [s.args for s in steps] == [(2, 1), (2, 2)]
    member = steps[0].meta["chord"]
    assert member["body"] is None and member["rest"] == [total] and member["n"] == 2
    assert "chain" not in steps[0].meta


def test_empty_chord_header_sends_the_body_at_once(app: Natask) -> None:
    node = Freezer(app).freeze(chord(group([], app=app), Signature(app, "t.total")))
    (step,) = expand(node)
    assert step.sig["task"] == "t.total" and step.args == ([],)


def test_result_handles_follow_the_shape(app: Natask) -> None:
    node = Freezer(app, counter()).freeze(group(chain(add(app, 1, 2), add(app, 3)), add(app, 1, 1)))
    assert [leaf["id"] for leaf in leaves(node)] == ["id2", "id3"]
    result = result_of(app, node, {})
    assert isinstance(result, GroupResult) and result.id == "id4"
    assert [r.id for r in result] == ["id2", "id3"]


# -- sending, offline ---------------------------------------------------------------------------
class Offline:
    """Records publishes; a fake broker gives reply inboxes without a server."""

    def __init__(self, app: Natask, monkeypatch: pytest.MonkeyPatch) -> None:
        self.published: list[Call] = []
        self.broker = SimpleNamespace(reply_prefix="_INBOX.test", generation=0, closed=False)

        async def apublish(call: Call) -> AsyncResult[Any]:
            result, _ = app.client.route(self.broker, call)  # type: ignore[arg-type]
            self.published.append(call)
            return result

        async def apublish_many(calls: list[Call]) -> list[AsyncResult[Any]]:
            return [await apublish(c) for c in calls]

        async def broker() -> Any:
            return self.broker

        monkeypatch.setattr(app.client, "publish", apublish)
        monkeypatch.setattr(app.client, "publish_many", apublish_many)
        monkeypatch.setattr(app.client, "broker", broker)

    def envelopes(self) -> list[Envelope]:
        return [Envelope.decode(c.payload, c.headers) for c in self.published]


def test_chain_delay_publishes_one_message_and_returns_the_last_steps_result(
        app: Natask, monkeypatch: pytest.MonkeyPatch) -> None:
    off = Offline(app, monkeypatch)
    result = chain(add(app, 1, 2), add(app, 3), add(app, 4)).delay()
    (env,) = off.envelopes()
    rest = env.meta["chain"]
    assert isinstance(result, AsyncResult) and result.id == rest[-1]["id"]
    assert env.args == [1, 2] and len(rest) == 2
    # the last step carries the caller's reply inbox, so its result comes back without polling
    assert rest[-1]["reply"] == f"_INBOX.test.{result.id}"
    assert "reply" not in rest[0]
    assert app.client.pending[result.id] is result


def test_signature_links_travel_in_the_envelope(app: Natask, monkeypatch: pytest.MonkeyPatch) -> None:
    off = Offline(app, monkeypatch)
    cb = add(app, 10)
    eb: Signature[Any] = Signature(app, "t.noargs", immutable=True)
    result = add(app, 1, 2).apply_async(link=cb, link_error=eb, queue="q")
    (env,) = off.envelopes()
    assert env.id == result.id and off.published[0].queue == "q"
    assert env.links == [cb.to_dict()]
    assert env.meta == {"errbacks": [eb.to_dict()]}


def test_group_delay_publishes_every_member_with_the_arguments(app: Natask, monkeypatch: pytest.MonkeyPatch) -> None:
    off = Offline(app, monkeypatch)
    result = group(add(app, i) for i in range(4)).delay(100)
    assert [e.args for e in off.envelopes()] == [[100, i] for i in range(4)]
    assert [r.id for r in result] == [e.id for e in off.envelopes()]
    assert all(not e.meta for e in off.envelopes())  # a plain group costs the worker nothing extra


def test_first_steps_are_checked_exactly(app: Natask, monkeypatch: pytest.MonkeyPatch) -> None:
    off = Offline(app, monkeypatch)
    with pytest.raises(TypeError, match=r"t\.add"):
        chain(add(app, 1, 2, 3), add(app, 1)).delay()
    with pytest.raises(TypeError, match=r"t\.add"):
        group([add(app, 1)]).delay()
    assert off.published == []
