"""Config: the app's frozen settings, from constructor arguments over ``NATASK_*`` / ``NATS_*`` variables."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Final, TypedDict
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError
from .naming import MAX_QUEUE_NAME, is_queue_name

DEFAULT_SERVER: Final = "nats://127.0.0.1:4222"
"""Where an app connects when neither ``servers=`` nor ``$NATS_URL`` says otherwise."""
REDACTED: Final = "***"
"""What a hidden secret is shown as."""

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")

Seconds = float | timedelta


def seconds(value: Seconds, what: str) -> float:
    """Convert a duration given in seconds or as a timedelta to float seconds, rejecting negatives."""
    s = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(s) or s < 0:
        raise ConfigError(f"{what} must be >= 0 seconds, got {value!r}")
    return s


def check_queue_name(queue: str) -> str:
    """Validate a queue name: ``[A-Za-z0-9_-]+``, not starting with ``_``, at most 100 characters."""
    if not is_queue_name(queue):
        raise ConfigError(
            f"invalid queue name {queue!r}: use letters, digits, '_' and '-', not starting with '_' "
            f"(at most {MAX_QUEUE_NAME} characters)"
        )
    return queue


def redact_url(url: str) -> str:
    """Hide the credentials of a NATS URL (``nats://user:***@host``) for logs and errors."""
    if "://" not in url:  # nats-py also takes "user:pass@host:4222" and adds the scheme itself
        return f"{REDACTED}@{url.rsplit('@', 1)[1]}" if "@" in url else url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


# Environment variables that feed connect options; their values are never logged.
_ENV_CONNECT: Final = {
    "NATS_USER": "user",
    "NATS_PASSWORD": "password",
    "NATS_TOKEN": "token",
    "NATS_CREDS": "user_credentials",
    "NATS_NKEY_SEED": "nkeys_seed",
    "NATS_INBOX_PREFIX": "inbox_prefix",  # not a secret: one prefix per NATS user (see README Deployment)
}


def _prefix(value: str) -> str:
    if not _NAME_RE.match(value) or value.startswith("_"):
        raise ConfigError(f"invalid subject_prefix {value!r}: use letters, digits, '_' and '-'")
    if value.lower() == "natask":
        raise ConfigError("subject_prefix 'natask' is reserved (natask.rpc, natask.dlq, natask.events)")
    return value


def _app_domain(value: object) -> str:
    # A JetStream domain is one token of the API subject ($JS.<domain>.API.>).
    if not isinstance(value, str) or (value and not _NAME_RE.match(value)):
        raise ConfigError(f"invalid jetstream_domain {value!r:.60}: a JetStream domain is one subject token "
                          "(letters, digits, '_' and '-'), as in the server's `jetstream { domain: hub }`")
    return value


QUEUE_OPTIONS: Final = {"max_ack_pending": (1, 1_000_000), "replicas": (1, 5)}
"""What ``queue_options`` may set per queue as a number, with the bounds of each."""
QUEUE_STREAM_OPTIONS: Final = ("placement", "replicas", "jetstream_domain")
"""``queue_options`` keys that shape a queue's own stream: only with ``stream_per_queue=True``."""
PLACEMENT_KEYS: Final = ("cluster", "tags")
"""What a queue's ``placement`` may name (JetStream's stream placement)."""


def check_placement(given: Any, where: str = "placement") -> Mapping[str, Any]:
    """Validate a stream placement, ``{"cluster": str, "tags": [str, ...]}`` (either or both)."""
    example = "{'cluster': 'west'} or {'tags': ['region:west']}"
    if not isinstance(given, Mapping) or not given:
        raise ConfigError(f"{where} must be a dict like {example}, got {given!r:.100}")
    unknown = set(given) - set(PLACEMENT_KEYS)
    if unknown:
        raise ConfigError(f"{where} takes 'cluster' and 'tags', not {', '.join(map(repr, sorted(unknown)))}")
    cluster, tags = given.get("cluster"), given.get("tags")
    if cluster is not None and (not isinstance(cluster, str) or not _NAME_RE.match(cluster)):
        raise ConfigError(f"{where}['cluster'] must be a cluster name (letters, digits, '_', '-'), "
                          f"got {cluster!r:.100}")
    if tags is not None and (isinstance(tags, (str, bytes)) or not isinstance(tags, Sequence) or not tags
                             or not all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in tags)):
        raise ConfigError(f"{where}['tags'] must be a non-empty list of server tags like ['region:west'] "
                          f"(no spaces), got {tags!r:.100}")
    return MappingProxyType({k: v for k, v in (("cluster", cluster), ("tags", tuple(tags or ()))) if v})


def _domain(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(f"{what} must be a JetStream domain name (letters, digits, '_', '-'; the domain: of "
                          f"the server's jetstream block), got {value!r:.100}")
    return value


def _queue_option(queue: str, key: str, given: Any) -> Any:
    if key == "placement":
        return check_placement(given, f"queue_options[{queue!r}]['placement']")
    if key == "jetstream_domain":
        return _domain(given, f"queue_options[{queue!r}]['jetstream_domain']")
    low, high = QUEUE_OPTIONS[key]
    if isinstance(given, bool) or not isinstance(given, int) or not low <= given <= high:
        raise ConfigError(f"queue_options[{queue!r}][{key!r}] must be an int from {low} to {high}, "
                          f"got {given!r:.100}")
    return given


def _queue_options(value: Any) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"queue_options must map queue names to dicts of options, got {value!r:.100}")
    checked: dict[str, Mapping[str, Any]] = {}
    for queue, opts in value.items():
        check_queue_name(queue)
        if not isinstance(opts, Mapping):
            raise ConfigError(f"queue_options[{queue!r}] must be a dict like {{'max_ack_pending': 50}}, "
                              f"got {opts!r:.100}")
        known = (*QUEUE_OPTIONS, *QUEUE_STREAM_OPTIONS)
        for key in opts:
            if key not in known:
                raise ConfigError(f"unknown queue option {key!r} for queue {queue!r}: natask takes "
                                  f"{', '.join(dict.fromkeys(known))}")
        checked[queue] = MappingProxyType({key: _queue_option(queue, key, given) for key, given in opts.items()})
    return MappingProxyType(checked)


def option(default: Any, env: str, doc: str, *, minimum: float | None = None, maximum: float | None = None,
           check: Callable[[Any], Any] | None = None) -> Any:
    """A ``Config`` field that is an app option: its default, environment variable, bounds and
    meaning, described once (``Natask(name, **options)``, the environment and the docs read it)."""
    metadata = {"env": env, "doc": doc, "min": minimum, "max": maximum, "check": check}
    if default is None and check is not None:  # a mapping: built by its check, {} by default
        return field(default_factory=lambda: check({}), metadata={**metadata, "mapping": True})
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, repr=False)
class Config:
    """Everything an app needs to talk to NATS; built once by ``Natask`` and never mutated.

    Its ``repr`` (which error reporters capture) hides URL credentials and every connect option value.
    """

    name: str
    servers: tuple[str, ...]
    subject_prefix: str = option("tasks", "NATASK_SUBJECT_PREFIX", "First token of every task subject; names the "
                                 "task stream (NATASK_<PREFIX>) and buckets. Apps on one account need distinct ones.",
                                 check=_prefix)
    default_queue: str = option("default", "NATASK_DEFAULT_QUEUE", "Queue of tasks that do not name one.",
                                check=lambda q: check_queue_name(q))
    result_ttl: float = option(86400.0, "NATASK_RESULT_TTL", "Seconds results (and revokes, claims) are kept.",
                               minimum=1.0)
    ack_wait: float = option(30.0, "NATASK_ACK_WAIT", "Seconds a worker may hold a task without a lease "
                             "heartbeat before the server redelivers it.", minimum=1.0)
    max_ack_pending: int = option(1000, "NATASK_MAX_ACK_PENDING", "Tasks of one queue delivered and not yet "
                                  "acked, across all its workers.", minimum=1)
    stream_replicas: int = option(1, "NATASK_STREAM_REPLICAS", "Replicas of every stream and bucket natask creates "
                                  "(3 or 5 in a cluster).", minimum=1, maximum=5)
    publish_timeout: float = option(30.0, "NATASK_PUBLISH_TIMEOUT", "Seconds a publish is retried (same message "
                                    "id) across reconnects and elections before BrokerError.", minimum=0.1)
    connect_timeout: float = option(5.0, "NATASK_CONNECT_TIMEOUT", "Seconds the first connect is tried.",
                                    minimum=0.1)
    duplicate_window: float = option(120.0, "NATASK_DUPLICATE_WINDOW", "Seconds the task stream remembers message "
                                     "ids (dedupe); the server keeps ~200 bytes per task published within it. "
                                     "At least publish_timeout.", minimum=1.0)
    queue_options: Mapping[str, Mapping[str, Any]] = option(
        None, "NATASK_QUEUE_OPTIONS", "Per-queue settings (JSON in the environment): {queue: {\"max_ack_pending\": "
        "N}} caps the tasks of that queue delivered and not yet acked across all its workers; with "
        "stream_per_queue=True also \"placement\" ({\"cluster\": str, \"tags\": [str]}: where the queue's "
        "stream lives), \"replicas\" (1..5: its stream's) and \"jetstream_domain\" (the JetStream domain "
        "holding its stream, e.g. a leaf's for an edge-local queue).", check=lambda value: _queue_options(value))
    stream_per_queue: bool = option(False, "NATASK_STREAM_PER_QUEUE", "Give every queue its own stream "
                                    "(NATASK_<PREFIX>_q_<queue>, capturing that queue's subjects only) instead of "
                                    "the app's one NATASK_<PREFIX> stream: needed for per-queue placement, replicas "
                                    "and JetStream domains. Subjects stay the same; the two layouts cannot share a "
                                    "subject prefix on one account.")
    jetstream_domain: str = option("", "NATASK_JS_DOMAIN", "JetStream domain of the app's streams and buckets: "
                                   "every JetStream call goes to $JS.<domain>.API (a leaf node reaching its hub's "
                                   "JetStream; the hub's `jetstream { domain: ... }`). Empty: the JetStream of the "
                                   "server connected to.", check=_app_domain)
    always_eager: bool = option(False, "NATASK_ALWAYS_EAGER", "Run delay(), apply_async(), send_task() of a "
                                "registered task and workflows in the calling process, now, with no server "
                                "(Celery's task_always_eager; for tests). Mutable later as app.always_eager.")
    eager_propagates: bool = option(False, "NATASK_EAGER_PROPAGATES", "An eager run that fails raises the task's "
                                    "exception instead of returning a failed EagerResult (Celery's "
                                    "task_eager_propagates). Mutable later as app.eager_propagates.")
    result_extended: bool = option(False, "NATASK_RESULT_EXTENDED", "Store each task's args, kwargs and queue "
                                   "in its result record (AsyncResult.args/.kwargs/.queue), as Celery's setting.")
    large_payload_limit: int = option(64 * 1024 * 1024, "NATASK_LARGE_PAYLOAD_LIMIT", "Largest call or result "
                                      "(bytes, encoded) carried through the JetStream Object Store when it does not "
                                      "fit the server's max_payload (a claim check); 0: off, PayloadTooLarge instead.",
                                      minimum=0)
    connect_options: Mapping[str, Any] = field(default_factory=dict, metadata={
        "env": ", ".join(_ENV_CONNECT), "doc": "Passed to nats-py's connect (user, password, token, "
        "user_credentials, nkeys_seed, tls, inbox_prefix...); values are never logged."})

    @classmethod
    def build(cls, name: str, servers: str | Sequence[str] | None = None, **options: Any) -> Config:
        """Merge explicit options over the environment and validate each against the table."""
        if not isinstance(name, str) or not name:
            raise ConfigError("the app needs a non-empty name, e.g. Natask('shop')")
        if servers is None:
            servers = os.environ.get("NATS_URL") or DEFAULT_SERVER
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        server_list = tuple(servers)
        if not server_list:
            raise ConfigError("servers= is empty: give at least one nats:// URL")
        for url in server_list:
            if url.lower().startswith(("http://", "https://")):
                raise ConfigError(f"{redact_url(url)} is an HTTP URL, but NATS clients speak the NATS protocol: "
                                  "give nats://HOST:4222 (the client port; 8222 is the monitoring page), "
                                  "tls://HOST:4222 for TLS, or ws://HOST:PORT for a websocket listener")
        unknown = set(options) - {f.name for f in OPTIONS} - {"connect_options"}
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}: natask takes "
                              f"{', '.join(f.name for f in OPTIONS)} and connect_options")
        values = {f.name: _value(f, options.get(f.name)) for f in OPTIONS}
        if values["duplicate_window"] < values["publish_timeout"]:
            raise ConfigError(f"duplicate_window ({values['duplicate_window']:g}s) must be at least publish_timeout "
                              f"({values['publish_timeout']:g}s): a publish retried after a reconnect must still be "
                              "recognised as a duplicate")
        if not values["stream_per_queue"]:
            for queue, opts in values["queue_options"].items():
                shaped = [key for key in QUEUE_STREAM_OPTIONS if key in opts]
                if shaped:
                    raise ConfigError(f"queue_options[{queue!r}] sets {', '.join(shaped)}: these shape a queue's "
                                      "own stream, so they need stream_per_queue=True (NATASK_STREAM_PER_QUEUE=1); "
                                      "with one stream for every queue only max_ack_pending applies")
        connect: dict[str, Any] = {key: os.environ[var] for var, key in _ENV_CONNECT.items() if os.environ.get(var)}
        connect.update(options.get("connect_options") or {})
        return cls(name=name, servers=server_list, connect_options=connect, **values)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if f.name == "servers":
                value = tuple(redact_url(s) for s in value)
            elif f.name == "connect_options":
                value = dict.fromkeys(value, REDACTED)
            shown.append(f"{f.name}={value!r}")
        return f"Config({', '.join(shown)})"

    @property
    def queue_domains(self) -> tuple[str, ...]:
        """The JetStream domains ``queue_options`` put queue streams in (sorted, each once)."""
        return tuple(sorted({str(o["jetstream_domain"]) for o in self.queue_options.values()
                             if o.get("jetstream_domain")}))

    @property
    def safe_servers(self) -> str:
        """The server list with credentials redacted, for logs and error messages."""
        return ", ".join(redact_url(s) for s in self.servers)


OPTIONS: Final = tuple(f for f in fields(Config) if "min" in f.metadata)
"""The app options of the table above (every ``Config`` field but name, servers, connect_options)."""


class Options(TypedDict, total=False):
    """``Natask(name, servers, **options)``: the keyword arguments, typed (described in ``Config``)."""

    subject_prefix: str
    default_queue: str
    result_ttl: Seconds
    ack_wait: Seconds
    max_ack_pending: int
    stream_replicas: int
    publish_timeout: Seconds
    connect_timeout: Seconds
    duplicate_window: Seconds
    queue_options: Mapping[str, Mapping[str, Any]]
    stream_per_queue: bool
    jetstream_domain: str
    always_eager: bool
    eager_propagates: bool
    result_extended: bool
    large_payload_limit: int
    connect_options: Mapping[str, Any]


_BOOLS: Final = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                  "off": False}
"""How a boolean option is spelled in the environment."""


def _flag(spec: Field[Any], given: Any) -> bool:
    """A boolean option's value: given, else from its environment variable, else its default."""
    env, what = spec.metadata["env"], spec.name
    if given is None:
        raw = os.environ.get(env, "").strip().lower()
        if raw == "":
            return bool(spec.default)
        if raw not in _BOOLS:
            raise ConfigError(f"${env} ({what}) must be true or false (or 1/0, yes/no, on/off), got {raw!r:.40}")
        return _BOOLS[raw]
    if not isinstance(given, bool):
        raise ConfigError(f"{what} must be True or False, got {given!r:.40}")
    return given


def _value(spec: Field[Any], given: Any) -> Any:
    """An option's value: given, else from its environment variable, else its default; checked."""
    if isinstance(spec.default, bool):
        return _flag(spec, given)
    kind, env, what = type(spec.default), spec.metadata["env"], spec.name
    if given is None:
        raw = os.environ.get(env, "")
        if spec.metadata.get("mapping"):
            if raw == "":
                return spec.metadata["check"]({})
            try:
                given = json.loads(raw)
            except ValueError:
                raise ConfigError(f"${env} ({what}) must be JSON, got {raw!r:.100}") from None
            return spec.metadata["check"](given)
        if raw == "":
            return spec.default
        try:
            given = kind(raw) if kind is str else float(raw)
        except ValueError:
            raise ConfigError(f"${env} ({what}) must be a number, got {raw!r}") from None
        if kind is not str and not math.isfinite(given):
            raise ConfigError(f"${env} ({what}) must be a finite number, got {raw!r}")
        if kind is int:
            given = int(given)
    elif spec.metadata.get("mapping"):
        return spec.metadata["check"](given)
    elif kind is float:
        given = seconds(given, what)
    elif kind is int and (isinstance(given, bool) or not isinstance(given, int)):
        raise ConfigError(f"{what} must be an int, got {given!r}")
    low, high = spec.metadata["min"], spec.metadata["max"]
    if (low is not None and given < low) or (high is not None and given > high):
        bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
        unit = " seconds" if kind is float else ""
        raise ConfigError(f"{what} must be {bounds}{unit}, got {given!r}")
    check = spec.metadata["check"]
    return check(given) if check is not None else given
