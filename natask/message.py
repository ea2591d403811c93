"""The wire: header names, the versioned msgpack envelope, value codecs and decode limits."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import itertools
import json
import threading
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgpack

from .errors import ConfigError, DecodeError, EncodeError
from .naming import MAX_TASK_NAME, TASK_ID_RE, is_task_name

WIRE_VERSION: Final = 1
"""Version of the envelope layout; a worker rejects (dead-letters) versions it does not know."""


MAX_TIMESTAMP: Final = 253402300799.0
"""9999-12-31T23:59:59Z: the latest eta or expiry a message may carry (later ones cannot be
written as a schedule time, and inf or 1e300 would overflow date arithmetic)."""
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
"""Decode refuses larger bodies outright (nats-server's max_payload cannot exceed 64 MiB)."""
MAX_EXT_DEPTH: Final = 32
"""How deep first-format tuples/sets (nested ext values) may nest; msgpack itself bounds the depth of
arrays and maps, and so of today's tuples and sets."""

# msgpack extension codes; never reuse a number for another type.
_EXT_DATETIME: Final = 1
_EXT_DATE: Final = 2
_EXT_TIME: Final = 3
_EXT_TIMEDELTA: Final = 4
_EXT_UUID: Final = 5
_EXT_DECIMAL: Final = 6
_EXT_SET: Final = 7  # the first encoding of sets, tuples and frozensets (a nested packed array);
_EXT_TUPLE: Final = 8  # still decoded, no longer written: re-packing each level cost O(depth x size)
_EXT_FROZENSET: Final = 9  # and a packer per tuple
_EXT_MARK_TUPLE: Final = 10
_EXT_MARK_SET: Final = 11
_EXT_MARK_FROZENSET: Final = 12


class _Mark:
    """An empty ext value heading an array: ``[mark, *items]`` is a tuple, set or frozenset. The
    packer streams such an array like any list (no nested packing), so encoding stays linear."""

    __slots__ = ("ext", "kind")

    def __init__(self, code: int, kind: type) -> None:
        self.ext = msgpack.ExtType(code, b"")
        self.kind = kind


_TUPLE_MARK: Final = _Mark(_EXT_MARK_TUPLE, tuple)
_SET_MARK: Final = _Mark(_EXT_MARK_SET, set)
_FROZENSET_MARK: Final = _Mark(_EXT_MARK_FROZENSET, frozenset)
_MARKS: Final = {m.ext.code: m for m in (_TUPLE_MARK, _SET_MARK, _FROZENSET_MARK)}


def _default(obj: Any) -> Any:  # noqa: C901 - one branch per wire type, the hot path
    if type(obj) is tuple:  # the common case first: a tuple costs this one call, nothing nested
        return [_TUPLE_MARK.ext, *obj]
    # Order matters: datetime is a subclass of date.
    if isinstance(obj, dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, dt.date):
        return msgpack.ExtType(_EXT_DATE, obj.isoformat().encode())
    if isinstance(obj, dt.time):
        return msgpack.ExtType(_EXT_TIME, obj.isoformat().encode())
    if isinstance(obj, dt.timedelta):
        return msgpack.ExtType(_EXT_TIMEDELTA, _pack([obj.days, obj.seconds, obj.microseconds]))
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(_EXT_UUID, obj.bytes)
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(obj).encode())
    if isinstance(obj, tuple):
        return [_TUPLE_MARK.ext, *obj]
    if isinstance(obj, frozenset):
        return [_FROZENSET_MARK.ext, *obj]
    if isinstance(obj, set):
        return [_SET_MARK.ext, *obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    # strict_types sends subclasses here: carry them as their base type.
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise TypeError(f"cannot encode object of type {type(obj).__qualname__}")


def _pack(obj: Any) -> bytes:
    # strict_types so tuples reach _default instead of silently becoming lists.
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)  # type: ignore[no-any-return]


class _Decoder:
    """One decode call's ext hook, counting ext nesting depth."""

    __slots__ = ("depth", "limit")

    def __init__(self, limit: int) -> None:
        self.depth = 0
        self.limit = limit

    def unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            ext_hook=self.ext_hook,
            list_hook=_from_list,
            max_str_len=self.limit,
            max_bin_len=self.limit,
            max_array_len=self.limit,
            max_map_len=self.limit,
            max_ext_len=self.limit,
        )

    def ext_hook(self, code: int, data: bytes) -> Any:
        mark = _MARKS.get(code)
        if mark is not None:
            if data:
                raise ValueError(f"msgpack extension {code} must be empty")
            return mark
        if code == _EXT_DATETIME:
            return dt.datetime.fromisoformat(data.decode())
        if code == _EXT_DATE:
            return dt.date.fromisoformat(data.decode())
        if code == _EXT_TIME:
            return dt.time.fromisoformat(data.decode())
        if code == _EXT_UUID:
            return uuid.UUID(bytes=data)
        if code == _EXT_DECIMAL:
            return decimal.Decimal(data.decode())
        self.depth += 1
        if self.depth > MAX_EXT_DEPTH:
            raise ValueError(f"tuples/sets nested deeper than {MAX_EXT_DEPTH}")
        try:
            items = self.unpack(data)
        finally:
            self.depth -= 1
        if code == _EXT_TIMEDELTA:
            days, secs, micros = items
            return dt.timedelta(days=days, seconds=secs, microseconds=micros)
        if code == _EXT_TUPLE:
            return tuple(items)
        if code == _EXT_SET:
            return set(items)
        if code == _EXT_FROZENSET:
            return frozenset(items)
        raise ValueError(f"unknown msgpack extension type {code}")


def _from_list(items: list[Any]) -> Any:
    """msgpack's hook for every decoded array: ``[mark, *items]`` becomes its tuple, set or frozenset
    (a set of unhashable items raises, and the message is undecodable)."""
    if items and type(items[0]) is _Mark:
        return items[0].kind(itertools.islice(items, 1, None))
    return items


_packers = threading.local()
_PACKER_KEEP: Final = 64 * 1024
"""A thread keeps its packer (and the packer's buffer) only after messages up to this size."""


def dumps(obj: Any) -> bytes:
    """Encode a value with natask's codecs; raises ``EncodeError`` naming the type that failed."""
    # A packer per thread, reused: making one per call is most of the cost of a small message.
    # Taken out while in use, so a nested call (from a ``__del__``, say) makes its own.
    packer = _packers.__dict__.pop("packer", None) or msgpack.Packer(
        default=_default, strict_types=True, use_bin_type=True, buf_size=1024)
    try:
        data: bytes = packer.pack(obj)
    except (TypeError, ValueError, OverflowError) as e:
        _packers.packer = packer  # it resets itself on errors
        raise EncodeError(str(e)) from None
    if len(data) <= _PACKER_KEEP:
        _packers.packer = packer
    return data


def loads(data: bytes, limit: int = MAX_MESSAGE_BYTES) -> Any:
    """Decode bytes made by ``dumps``; any malformed input raises ``DecodeError``."""
    if len(data) > limit:
        raise DecodeError(f"message of {len(data)} bytes exceeds the decode limit of {limit}", data)
    try:
        return _Decoder(max(len(data), 1)).unpack(data)
    except Exception as e:  # msgpack raises outside its own hierarchy too (ValueError, RecursionError...)
        raise DecodeError(f"undecodable msgpack: {type(e).__name__}: {e}", data) from None


class PublishRetry(NamedTuple):
    """A call's own publish retries (Celery's ``retry``/``retry_policy``), instead of retrying until
    the app's ``publish_timeout``."""

    attempts: int
    """Publishes tried in all (``retry_policy`` max_retries + 1; 1 for ``retry=False``)."""
    start: float = 0.0
    step: float = 0.2
    most: float = 0.2

    def pause(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), as Celery counts them."""
        return min(self.most, self.start + self.step * (attempt - 1))


class Call(NamedTuple):
    """One encoded call, ready to publish (a tuple: the garbage collector stops tracking it, which
    matters when ``delay_many`` holds thousands)."""

    task_id: str
    task: str
    queue: str
    payload: bytes
    headers: dict[str, str]
    eta: float | None
    ignore_result: bool
    priority: int = 0
    """0..9, higher first: routes the call to its level's subject (``Names.priority_subject``)."""
    expires: float | None = None
    """When the task expires (Unix time), if it does: sets ``Nats-TTL`` where the stream allows it."""
    retry: PublishRetry | None = None
    """The call's own publish retries; None: until ``publish_timeout``."""


@dataclass(slots=True)
class Envelope:
    """One task call as it travels: the msgpack body is the source of truth, headers mirror it."""

    id: str
    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None
    expires: float | None = None
    parent_id: str | None = None
    root_id: str | None = None
    links: list[Any] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": WIRE_VERSION, "id": self.id, "task": self.task, "args": self.args,
                                "kwargs": self.kwargs}
        # Optional keys only when set: smaller messages, cheaper decode.
        if self.eta is not None:
            body["eta"] = self.eta
        if self.expires is not None:
            body["expires"] = self.expires
        if self.parent_id is not None:
            body["parent_id"] = self.parent_id
        if self.root_id is not None:
            body["root_id"] = self.root_id
        if self.links:
            body["links"] = self.links
        if self.meta:
            body["meta"] = self.meta
        return dumps(body)

    def encode_json(self) -> bytes:
        """The body as JSON (``serializer="json"`` tasks): the same keys; only JSON types travel.
        A worker tells it from msgpack by its first byte, ``{`` (a msgpack map never starts so)."""
        body = {k: v for k, v in dataclasses.asdict(self).items() if v or k in ("args", "kwargs")}
        body["v"] = WIRE_VERSION
        try:
            return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise EncodeError(f"not JSON: {e}") from None

    @classmethod
    def decode(cls, data: bytes, headers: Mapping[str, str] | None = None) -> Envelope:
        """Parse and validate a task message body; raises ``DecodeError`` keeping bytes and headers."""
        try:
            body = loads(data)
        except DecodeError as e:
            # serializer="json" or compression=: reached only when msgpack fails, told by the first
            # byte (a msgpack envelope starts with a map marker, never with these).
            first = data[:1]
            if first == b"{":
                body = _json_body(data, headers)
            elif first in _COMPRESSED:
                return cls.decode(decompress(data, headers), headers)
            else:
                raise DecodeError(str(e), data, headers) from None
        if not isinstance(body, dict):
            raise DecodeError(f"envelope must be a map, got {type(body).__name__}", data, headers)
        version = body.get("v")
        if version != WIRE_VERSION:
            raise DecodeError(
                f"unknown wire version {version!r} (this worker reads version {WIRE_VERSION}); "
                "upgrade the worker or republish with a matching producer",
                data, headers,
            )
        try:
            env = cls(_typed(body, "id", str), _typed(body, "task", str),
                      list(_typed(body, "args", (list, tuple), ())), _typed(body, "kwargs", dict, None) or {})
            if not body.keys() <= _BASE_KEYS:  # the optional keys are written only when set
                env.eta = _typed(body, "eta", (int, float), None)
                env.expires = _typed(body, "expires", (int, float), None)
                env.parent_id = _typed(body, "parent_id", str, None)
                env.root_id = _typed(body, "root_id", str, None)
                env.links = list(_typed(body, "links", list, ()))
                env.meta = _typed(body, "meta", dict, None) or {}
        except (TypeError, ValueError) as e:
            raise DecodeError(f"malformed envelope: {e}", data, headers) from None
        if not all(isinstance(k, str) for k in env.kwargs):
            raise DecodeError("malformed envelope: kwargs keys must be strings", data, headers)
        if not TASK_ID_RE.match(env.id):
            raise DecodeError(f"malformed envelope: invalid task id {env.id[:100]!r}", data, headers)
        if not is_task_name(env.task):
            raise DecodeError(f"malformed envelope: invalid task name {env.task[:MAX_TASK_NAME]!r}", data, headers)
        problem = _check_optional(env) if not body.keys() <= _BASE_KEYS else ""
        if problem:
            raise DecodeError(f"malformed envelope: {problem}", data, headers)
        return env


COMPRESSIONS: Final = ("zlib", "zstd")
"""The ``compression`` values a call may name (zstd with the ``natask[zstd]`` extra)."""
_COMPRESSED: Final = (b"\x78", b"\x28")  # the first byte of a zlib stream, of a zstd frame


def compress(payload: bytes, method: str) -> bytes:
    """``payload`` compressed with ``method`` (``"zlib"`` or ``"zstd"``); ``ConfigError`` otherwise."""
    if method == "zlib":
        return zlib.compress(payload)
    if method == "zstd":
        return _zstd().ZstdCompressor().compress(payload)  # type: ignore[no-any-return]
    raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)} (or None), got {method!r:.40}")


def decompress(data: bytes, headers: Mapping[str, str] | None = None) -> bytes:
    """A compressed body, decompressed to at most ``MAX_MESSAGE_BYTES`` (no decompression bomb);
    the result must not itself be compressed."""
    try:
        if data[:1] == b"\x78":
            inflater = zlib.decompressobj()
            out = inflater.decompress(data, MAX_MESSAGE_BYTES + 1)
            if not inflater.eof:
                raise ValueError("truncated stream, or over the decode limit")
        else:
            chunks, size = [], 0
            with _zstd().ZstdDecompressor().stream_reader(data) as reader:
                while size <= MAX_MESSAGE_BYTES and (chunk := reader.read(1 << 20)):
                    chunks.append(chunk)
                    size += len(chunk)
            out = b"".join(chunks)
    except DecodeError:
        raise
    except Exception as e:  # zlib.error, zstd.ZstdError, ValueError
        raise DecodeError(f"undecodable compressed body: {type(e).__name__}: {e}", data, headers) from None
    if len(out) > MAX_MESSAGE_BYTES or out[:1] in _COMPRESSED:
        raise DecodeError("compressed body over the decode limit, or compressed twice", data, headers)
    return out


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise ConfigError("compression='zstd' needs the zstandard package: pip install 'natask[zstd]' "
                          "(or use compression='zlib')") from None
    return zstandard


def _json_body(data: bytes, headers: Mapping[str, str] | None) -> Any:
    if len(data) > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {len(data)} bytes exceeds the decode limit of {MAX_MESSAGE_BYTES}", data,
                          headers)
    try:
        return json.loads(data)
    except Exception as e:  # ValueError, RecursionError on deep nesting, UnicodeDecodeError
        raise DecodeError(f"undecodable JSON: {type(e).__name__}: {e}", data, headers) from None


def _check_optional(env: Envelope) -> str:
    """What is wrong with an envelope's optional fields, or ``""``."""
    for key in ("eta", "expires"):
        value = getattr(env, key)
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= MAX_TIMESTAMP):
            return f"{key} {value!r} is not a Unix time between 0 and {MAX_TIMESTAMP:.0f}"
    for key in ("parent_id", "root_id"):
        value = getattr(env, key)
        if value is not None and not TASK_ID_RE.match(value):
            return f"invalid {key} {value[:100]!r}"
    return ""


_MISSING: Final[Any] = object()
_BASE_KEYS: Final = frozenset({"v", "id", "task", "args", "kwargs"})


def _typed(body: Mapping[str, Any], key: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    value = body.get(key, default)
    if value is _MISSING:
        raise ValueError(f"missing {key!r}")
    if value is not default and not isinstance(value, types):
        raise TypeError(f"{key!r} has type {type(value).__name__}")
    return value


def at_schedule(ts: float) -> str:
    """The ``Nats-Schedule`` value firing at Unix time ``ts`` (UTC, microseconds: truncating to
    whole seconds fires up to a second early)."""
    return "@at " + dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def headers_size(headers: Mapping[str, str]) -> int:
    """Bytes the headers take on the wire (``NATS/1.0`` line, ``k: v`` lines, blank line)."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()) + 2


def find_unencodable(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """Name the first argument that cannot be encoded (only used to word an EncodeError)."""
    for i, value in enumerate(args):
        try:
            _pack(value)
        except (TypeError, ValueError, OverflowError) as e:
            return f"positional argument {i} ({type(value).__qualname__}): {e}"
    for key, value in kwargs.items():
        try:
            _pack(value)
        except (TypeError, ValueError, OverflowError) as e:
            return f"argument {key!r} ({type(value).__qualname__}): {e}"
    return "an argument"
