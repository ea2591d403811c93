"""Config: the app's frozen settings, from constructor arguments over ``NATASK_*`` / ``NATS_*`` variables."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Final
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


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"${name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"${name} ({name.removeprefix('NATASK_').lower()}) must be a finite number, got {raw!r}")
    return value


# Environment variables that feed connect options; their values are never logged.
_ENV_CONNECT: Final = {
    "NATS_USER": "user",
    "NATS_PASSWORD": "password",
    "NATS_TOKEN": "token",
    "NATS_CREDS": "user_credentials",
    "NATS_NKEY_SEED": "nkeys_seed",
    "NATS_INBOX_PREFIX": "inbox_prefix",  # not a secret: one prefix per NATS user (see README Deployment)
}


@dataclass(frozen=True, repr=False)
class Config:
    """Everything an app needs to talk to NATS; built once by ``Natask`` and never mutated.

    Its ``repr`` (which error reporters capture) hides URL credentials and every connect option value.
    """

    name: str
    servers: tuple[str, ...]
    subject_prefix: str = "tasks"
    default_queue: str = "default"
    result_ttl: float = 86400.0
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    stream_replicas: int = 1
    publish_timeout: float = 30.0
    connect_timeout: float = 5.0
    connect_options: Mapping[str, Any] = field(default_factory=dict)
    duplicate_window: float = 120.0
    """Seconds the task stream remembers message ids (dedupe). The server keeps ~200 bytes of memory
    per task published within the window: shorten it for high rates, not below ``publish_timeout``."""

    @classmethod
    def build(
        cls,
        name: str,
        servers: str | Sequence[str] | None = None,
        subject_prefix: str | None = None,
        default_queue: str | None = None,
        result_ttl: Seconds | None = None,
        ack_wait: Seconds | None = None,
        max_ack_pending: int | None = None,
        stream_replicas: int | None = None,
        publish_timeout: Seconds | None = None,
        connect_options: Mapping[str, Any] | None = None,
        connect_timeout: Seconds | None = None,
        duplicate_window: Seconds | None = None,
    ) -> Config:
        """Merge explicit arguments over the environment and validate the result."""
        if not isinstance(name, str) or not name:
            raise ConfigError("the app needs a non-empty name, e.g. Natask('shop')")
        if servers is None:
            servers = os.environ.get("NATS_URL") or DEFAULT_SERVER
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        server_list = tuple(servers)
        if not server_list:
            raise ConfigError("servers= is empty: give at least one nats:// URL")
        prefix = subject_prefix or os.environ.get("NATASK_SUBJECT_PREFIX") or "tasks"
        if not _NAME_RE.match(prefix) or prefix.startswith("_"):
            raise ConfigError(f"invalid subject_prefix {prefix!r}: use letters, digits, '_' and '-'")
        if prefix.lower() == "natask":
            raise ConfigError("subject_prefix 'natask' is reserved (natask.rpc, natask.dlq, natask.events)")
        queue = check_queue_name(default_queue or os.environ.get("NATASK_DEFAULT_QUEUE") or "default")
        opts: dict[str, Any] = {
            key: os.environ[var] for var, key in _ENV_CONNECT.items() if os.environ.get(var)
        }
        opts.update(connect_options or {})
        replicas = stream_replicas if stream_replicas is not None else int(
            _env_float("NATASK_STREAM_REPLICAS", 1)
        )
        if replicas not in (1, 2, 3, 4, 5):
            raise ConfigError(f"stream_replicas must be between 1 and 5, got {replicas}")
        pending = max_ack_pending if max_ack_pending is not None else int(
            _env_float("NATASK_MAX_ACK_PENDING", 1000)
        )
        if pending < 1:
            raise ConfigError(f"max_ack_pending must be >= 1, got {pending}")

        def dur(value: Seconds | None, env: str, default: float, what: str, minimum: float) -> float:
            s = seconds(value, what) if value is not None else _env_float(env, default)
            if s < minimum:
                raise ConfigError(f"{what} must be >= {minimum} seconds, got {s}")
            return s

        timeout = dur(publish_timeout, "NATASK_PUBLISH_TIMEOUT", 30.0, "publish_timeout", 0.1)
        window = dur(duplicate_window, "NATASK_DUPLICATE_WINDOW", 120.0, "duplicate_window", 1.0)
        if window < timeout:
            raise ConfigError(f"duplicate_window ({window:g}s) must be at least publish_timeout ({timeout:g}s): "
                              "a publish retried after a reconnect must still be recognised as a duplicate")
        return cls(
            name=name,
            servers=server_list,
            subject_prefix=prefix,
            default_queue=queue,
            result_ttl=dur(result_ttl, "NATASK_RESULT_TTL", 86400.0, "result_ttl", 1.0),
            ack_wait=dur(ack_wait, "NATASK_ACK_WAIT", 30.0, "ack_wait", 1.0),
            max_ack_pending=pending,
            stream_replicas=replicas,
            publish_timeout=timeout,
            duplicate_window=window,
            connect_timeout=dur(connect_timeout, "NATASK_CONNECT_TIMEOUT", 5.0, "connect_timeout", 0.1),
            connect_options=opts,
        )

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
    def safe_servers(self) -> str:
        """The server list with credentials redacted, for logs and error messages."""
        return ", ".join(redact_url(s) for s in self.servers)
