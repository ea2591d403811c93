"""The wire format: value codecs, the envelope, decode limits and header helpers (no server)."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import msgpack
import pytest

from natask import DecodeError, EncodeError
from natask.message import MAX_EXT_DEPTH, WIRE_VERSION, Envelope, at_schedule, dumps, headers_size, loads
from natask.naming import HDR_MSG_ID, HDR_TASK

UTC = dt.timezone.utc
PLUS_5_30 = dt.timezone(dt.timedelta(hours=5, minutes=30))

VALUES: list[tuple[str, Any]] = [
    ("none", None),
    ("bool", True),
    ("int", -(2**63)),
    ("big-uint", 2**64 - 1),
    ("float", 1.5),
    ("str", "häßlich ✓"),
    ("datetime-utc", dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC)),
    ("datetime-offset", dt.datetime(2024, 1, 1, 8, 0, 0, 1, tzinfo=PLUS_5_30)),
    ("datetime-naive", dt.datetime(1999, 12, 31, 23, 59, 58, 999999)),
    ("date", dt.date(2024, 2, 29)),
    ("time", dt.time(13, 14, 15, 161718)),
    ("time-aware", dt.time(1, 2, 3, tzinfo=UTC)),
    ("timedelta", dt.timedelta(days=3, seconds=7, microseconds=9)),
    ("timedelta-negative", dt.timedelta(seconds=-1.5)),
    ("timedelta-negative-days", -dt.timedelta(days=400, microseconds=1)),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("decimal", decimal.Decimal("-1234567890.000000000000000001")),
    ("decimal-exp", decimal.Decimal("1E+30")),
    ("bytes", b"\x00\xff\x80binary"),
    ("empty-bytes", b""),
    ("set", {1, "a", (2, 3)}),
    ("empty-set", set()),
    ("frozenset", frozenset({1, 2, frozenset({3})})),
    ("tuple", (1, "two", 3.0)),
    ("empty-tuple", ()),
    ("nested-tuples", ((1, (2, (3, ()))), [(4,), {"k": (5, 6)}])),
    ("list", [1, [2, [3]]]),
    ("dict", {"a": {"b": [1, {"c": None}]}}),
    ("tuple-key", {(1, 2): "pair", frozenset({3}): "set"}),
    (
        "nested-mix",
        {
            "when": [dt.datetime(2020, 1, 1, tzinfo=UTC), dt.date(2020, 1, 2)],
            "ids": {uuid.UUID(int=1), uuid.UUID(int=2)},
            "money": (decimal.Decimal("0.10"), decimal.Decimal("0.20")),
            "blob": {"raw": b"\x01\x02"},
        },
    ),
]


@pytest.mark.parametrize("value", [v for _, v in VALUES], ids=[i for i, _ in VALUES])
def test_round_trip_keeps_value_and_type(value: Any) -> None:
    back = loads(dumps(value))
    assert back == value
    assert type(back) is type(value)


def test_round_trip_keeps_nested_types() -> None:
    value = {"t": (1, [2, (3,)]), "s": {(1, 2)}, "f": frozenset({(3, 4)}), "l": [(5,)]}
    back = loads(dumps(value))
    assert type(back["t"]) is tuple and type(back["t"][1]) is list and type(back["t"][1][1]) is tuple
    assert type(back["s"]) is set and next(iter(back["s"])) == (1, 2)
    assert type(back["f"]) is frozenset
    assert type(back["l"][0]) is tuple


def test_datetime_keeps_awareness_and_offset() -> None:
    aware = dt.datetime(2024, 6, 1, 12, 0, tzinfo=PLUS_5_30)
    naive = dt.datetime(2024, 6, 1, 12, 0)
    back_aware, back_naive = loads(dumps([aware, naive]))
    assert back_aware.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert back_naive.tzinfo is None


def test_decimal_keeps_precision_and_exponent() -> None:
    back = loads(dumps(decimal.Decimal("1.10")))
    assert str(back) == "1.10"  # trailing zero is significant for Decimal


def test_bytes_and_str_stay_distinct() -> None:
    assert loads(dumps(["x", b"x"])) == ["x", b"x"]
    assert [type(v) for v in loads(dumps(["x", b"x"]))] == [str, bytes]


@pytest.mark.parametrize("value", [object(), 1j, {"k": object()}, [1, 2, lambda: 0], 2**64, -(2**63) - 1])
def test_dumps_rejects_unsupported_with_encode_error(value: Any) -> None:
    with pytest.raises(EncodeError):
        dumps(value)


def test_encode_error_is_a_type_error_naming_the_type() -> None:
    class Widget:
        pass

    with pytest.raises(TypeError, match="Widget"):
        dumps(Widget())


# -- envelope -------------------------------------------------------------------------------


def full_envelope() -> Envelope:
    return Envelope(
        id="abc123",
        task="orders.process",
        args=[1, (2, 3), dt.date(2024, 1, 1)],
        kwargs={"user": {"id": uuid.UUID(int=7)}, "amount": decimal.Decimal("9.99")},
        eta=1700000000.25,
        expires=1700003600.5,
        parent_id="parent1",
        root_id="root1",
        links=[{"task": "t.next", "args": [], "kwargs": {}, "options": {}, "immutable": False}],
        meta={"trace": "x"},
    )


def test_envelope_round_trip() -> None:
    env = full_envelope()
    assert Envelope.decode(env.encode()) == env


def test_envelope_minimal_round_trip_uses_defaults() -> None:
    env = Envelope(id="i", task="t")
    back = Envelope.decode(env.encode())
    assert back == env
    assert (back.args, back.kwargs, back.eta, back.expires, back.links, back.meta) == ([], {}, None, None, [], {})


def test_envelope_body_carries_wire_version() -> None:
    body = msgpack.unpackb(Envelope(id="i", task="t").encode(), raw=False)
    assert body["v"] == WIRE_VERSION
    assert body["id"] == "i" and body["task"] == "t"


def test_envelope_decode_ignores_unknown_keys() -> None:
    raw = dumps({"v": WIRE_VERSION, "id": "i", "task": "t", "future_field": [1, 2]})
    assert Envelope.decode(raw) == Envelope(id="i", task="t")


def test_envelope_decode_reads_optional_keys_without_args_or_kwargs() -> None:
    raw = dumps({"v": WIRE_VERSION, "id": "i", "task": "t", "eta": 5.5, "root_id": "r"})
    assert Envelope.decode(raw) == Envelope(id="i", task="t", eta=5.5, root_id="r")


def good_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"v": WIRE_VERSION, "id": "i", "task": "t", "args": [], "kwargs": {}}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()


def _nested_tuple(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = (value,)
    return value


def _first_format_tuple(depth: int) -> bytes:
    """A tuple nested ``depth`` deep in the first encoding (ext 8 wrapping a packed array), which
    decoders still read."""
    data = msgpack.packb(0)
    for _ in range(depth):
        data = msgpack.packb(msgpack.ExtType(8, msgpack.packb([msgpack.unpackb(data, ext_hook=msgpack.ExtType)])))
    return data


BAD_MESSAGES: list[tuple[str, bytes, str]] = [
    ("garbage", b"\xc1\xc1\xc1 not msgpack", "undecodable"),
    ("empty", b"", "undecodable"),
    ("truncated", full_envelope().encode()[:-5], "undecodable"),
    ("trailing-bytes", full_envelope().encode() + b"\x00", "undecodable"),
    ("list-body", dumps([1, 2, 3]), "map"),
    ("str-body", dumps("hello"), "map"),
    ("no-version", dumps({"id": "i", "task": "t"}), "wire version"),
    ("version-2", dumps(good_body(v=2)), "unknown wire version 2"),
    ("version-str", dumps(good_body(v="1")), "unknown wire version"),
    ("missing-id", dumps(good_body(id=_DROP)), "id"),
    ("missing-task", dumps(good_body(task=_DROP)), "task"),
    ("id-int", dumps(good_body(id=5)), "id"),
    ("task-none", dumps(good_body(task=None)), "task"),
    ("args-dict", dumps(good_body(args={"a": 1})), "args"),
    ("args-str", dumps(good_body(args="abc")), "args"),
    ("kwargs-list", dumps(good_body(kwargs=[1])), "kwargs"),
    ("eta-str", dumps(good_body(eta="tomorrow")), "eta"),
    ("expires-list", dumps(good_body(expires=[1])), "expires"),
    ("parent-int", dumps(good_body(parent_id=1)), "parent_id"),
    ("links-dict", dumps(good_body(links={"a": 1})), "links"),
    ("meta-list", dumps(good_body(meta=[1])), "meta"),
    ("kwargs-int-key", dumps(good_body(kwargs={1: "x"})), "kwargs"),
    ("kwargs-bytes-key", dumps(good_body(kwargs={b"k": "x"})), "kwargs"),
    ("huge-array32", b"\xdd\xff\xff\xff\xff", "undecodable"),
    ("huge-map32", b"\xdf\xff\xff\xff\xff", "undecodable"),
    ("huge-str32", b"\xdb\xff\xff\xff\xff", "undecodable"),
    ("huge-bin32", b"\xc6\xff\xff\xff\xff", "undecodable"),
    ("deep-arrays", b"\x91" * 5000, "undecodable"),
    ("deep-maps", b"\x81\xa1k" * 5000 + b"\xc0", "undecodable"),
    ("deep-first-format-tuples", _first_format_tuple(MAX_EXT_DEPTH + 5), "undecodable"),
    ("deep-tuples", b"\x92\xd4\x0a\x00" * 5000 + b"\xc0", "undecodable"),
    ("marked-set-of-lists", msgpack.packb([msgpack.ExtType(11, b""), [1]]), "undecodable"),
    ("non-empty-mark", msgpack.packb([msgpack.ExtType(10, b"x"), 1]), "undecodable"),
    ("bad-datetime-ext", msgpack.packb(msgpack.ExtType(1, b"not a date")), "undecodable"),
    ("bad-uuid-ext", msgpack.packb(msgpack.ExtType(5, b"short")), "undecodable"),
    ("bad-decimal-ext", msgpack.packb(msgpack.ExtType(6, b"1.2.3")), "undecodable"),
    ("bad-timedelta-ext", msgpack.packb(msgpack.ExtType(4, msgpack.packb([1]))), "undecodable"),
    ("unhashable-in-set", msgpack.packb(msgpack.ExtType(7, msgpack.packb([[1]]))), "undecodable"),
    ("unknown-ext", msgpack.packb(msgpack.ExtType(99, b"\x90")), "undecodable"),
]


@pytest.mark.parametrize("raw,words", [(r, w) for _, r, w in BAD_MESSAGES], ids=[i for i, _, _ in BAD_MESSAGES])
def test_decode_rejects_with_decode_error_keeping_raw(raw: bytes, words: str) -> None:
    headers = {HDR_TASK: "t", "X-Extra": "1"}
    with pytest.raises(DecodeError) as info:
        Envelope.decode(raw, headers)
    assert info.value.raw == raw
    assert info.value.headers == headers
    assert words in str(info.value)


def test_unknown_wire_version_says_so() -> None:
    with pytest.raises(DecodeError) as info:
        Envelope.decode(dumps(good_body(v=99)))
    message = str(info.value)
    assert "unknown wire version 99" in message
    assert str(WIRE_VERSION) in message  # names the version this side reads


def test_first_format_nesting_up_to_the_limit_is_fine() -> None:
    assert loads(_first_format_tuple(MAX_EXT_DEPTH)) == _nested_tuple(MAX_EXT_DEPTH)
    with pytest.raises(DecodeError, match="deeper"):
        loads(_first_format_tuple(MAX_EXT_DEPTH + 1))


def test_tuples_and_sets_stream_as_one_array_each() -> None:
    """``[mark, *items]``: no nested packing, so encoding is linear in the size at any depth."""
    assert dumps((1, 2)) == msgpack.packb([msgpack.ExtType(10, b""), 1, 2])
    assert dumps(frozenset({3})) == msgpack.packb([msgpack.ExtType(12, b""), 3])
    nested = _nested_tuple(200)  # deeper than the first format allowed
    assert loads(dumps(nested)) == nested
    value = [(1, {2}), frozenset({(3, 4)}), [(5,)]]
    assert loads(dumps(value)) == value and type(loads(dumps(value))[0]) is tuple


def test_first_format_tuples_and_sets_still_decode() -> None:
    first = msgpack.packb([msgpack.ExtType(8, msgpack.packb([1, 2])), msgpack.ExtType(7, msgpack.packb([3])),
                           msgpack.ExtType(9, msgpack.packb([4]))])
    assert loads(first) == [(1, 2), {3}, frozenset({4})]


def test_loads_refuses_bodies_over_the_limit() -> None:
    data = dumps("x" * 100)
    assert loads(data, limit=len(data)) == "x" * 100
    with pytest.raises(DecodeError, match="exceeds the decode limit") as info:
        loads(data, limit=len(data) - 1)
    assert info.value.raw == data


@pytest.mark.parametrize(
    "raw,limit_name",
    [
        (b"\xdd\x00\x01\x00\x00", "max_array_len"),  # 5 bytes claiming 65,536 items
        (b"\xdf\x00\x01\x00\x00", "max_map_len"),
    ],
)
def test_loads_length_limits_scale_with_the_message(raw: bytes, limit_name: str) -> None:
    # Claims are refused up front (no allocation for them), not merely found incomplete later.
    with pytest.raises(DecodeError, match=limit_name):
        loads(raw)


# -- headers and schedules ------------------------------------------------------------------


def wire_headers(headers: dict[str, str]) -> bytes:
    """Header bytes exactly as nats-py writes them for HPUB."""
    out = bytearray(b"NATS/1.0\r\n")
    for k, v in headers.items():
        out += k.encode() + b": " + v.encode() + b"\r\n"
    return bytes(out + b"\r\n")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {HDR_MSG_ID: "a" * 32, HDR_TASK: "orders.process"},
        {"X-Note": "ünïcödé ✓"},
        {"K": "v" * 5000},
    ],
    ids=["empty", "natask", "non-ascii", "long"],
)
def test_headers_size_never_undercounts_the_wire(headers: dict[str, str]) -> None:
    actual = len(wire_headers(headers))
    size = headers_size(headers)
    assert actual <= size <= actual + 2


def test_headers_size_grows_with_each_header() -> None:
    assert headers_size({"a": "b"}) - headers_size({}) == len(b"a: b\r\n")
    assert headers_size({"a": "b", "cc": "dd"}) - headers_size({"a": "b"}) == len(b"cc: dd\r\n")


def test_at_schedule_keeps_microseconds_and_is_utc() -> None:
    ts = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC).timestamp()
    value = at_schedule(ts)
    assert value == "@at 2031-05-06T07:08:09.123456Z"


def test_at_schedule_whole_second_still_has_fraction_and_z() -> None:
    value = at_schedule(1_700_000_000.0)
    assert value.startswith("@at ") and value.endswith("Z")
    parsed = dt.datetime.strptime(value[4:], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert parsed.timestamp() == 1_700_000_000.0


def test_at_schedule_never_fires_early_by_more_than_a_microsecond() -> None:
    ts = 1_700_000_000.987654
    parsed = dt.datetime.strptime(at_schedule(ts)[4:], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(parsed.timestamp() - ts) < 2e-6


@pytest.mark.parametrize("reply, count", [
    ("$JS.ACK.NATASK_T.default.3.17.12.1700000000000000000.5", 3),  # the usual layout
    ("$JS.ACK.hub.ACCHASH.NATASK_T.default.4.17.12.1700000000000000000.5.tok", 4),  # with a domain
])
def test_delivery_count_from_the_ack_subject(reply: str, count: int) -> None:
    from nats.aio.msg import Msg

    from natask.broker import attempt

    msg = Msg(_client=None, subject="t.default.x", reply=reply)  # type: ignore[arg-type]
    assert attempt(msg) == count == msg.metadata.num_delivered
