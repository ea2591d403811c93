"""``app.conf``: Celery's setting names, each applied to what natask has for it.

A setting natask honours changes the app at once (``task_default_queue`` and ``result_expires``
rebuild its ``Config``, ``task_routes`` its router, ``task_time_limit`` and friends the options of
its tasks that did not set their own, ``beat_schedule`` its periodic entries). A Celery setting
natask has no equivalent for logs one warning naming it and why; names Celery does not know are
kept (your own settings) with a warning. ``docs/celery.md`` lists every setting.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from datetime import timedelta
from typing import Any, Final, Protocol

from .beat.schedule import PeriodicEntry, make_entry
from .canvas import Signature
from .client import App, Registered
from .config import Config, seconds
from .errors import ConfigError
from .options import TaskOptions

log = logging.getLogger("natask.conf")


class _App(App, Protocol):
    config: Config
    periodic_entries: dict[str, PeriodicEntry]


TASK_DEFAULTS: Final = {
    "task_time_limit": "time_limit",
    "task_soft_time_limit": "soft_time_limit",
    "task_ignore_result": "ignore_result",
    "task_track_started": "track_started",
    "task_default_rate_limit": "rate_limit",
    "task_serializer": "serializer",
    "task_default_priority": "priority",
    "task_store_errors_even_if_ignored": "store_errors_even_if_ignored",
    "task_reject_on_worker_lost": "reject_on_worker_lost",
}
"""Settings that are the default of a task option: applied to every task that does not set its own
(those whose option has its ``TaskOptions`` default), now and when tasks register later."""
_SECONDS: Final = frozenset({"time_limit", "soft_time_limit"})
_BUILT_IN: Final[dict[str, Any]] = {"task_serializer": "msgpack", "task_reject_on_worker_lost": True,
                                    "task_default_priority": None}
"""What natask does without the task option: setting this value needs no option."""

NOT_HERE: Final = {
    "worker_concurrency": "use `natask worker -c N`",
    "worker_pool": "use `natask worker --pool threads|processes`",
    "worker_max_tasks_per_child": "use `natask worker --max-tasks-per-child N`",
    "worker_max_memory_per_child": "use `natask worker --max-memory-per-child KB`",
    "worker_autoscaler": "use `natask worker --autoscale MAX,MIN`",
    "worker_send_task_events": "workers send events unless `natask worker --without-events`",
    "worker_prefetch_multiplier": "natask fetches by credit: `natask worker --prefetch-bytes` and "
                                  "queue_options max_ack_pending",
    "task_queues": "natask queues need no declaration: route with task_routes or queue=, and consume "
                   "with `natask worker -Q`",
    "task_default_exchange": "natask has no exchanges: a task goes to the queue it names",
    "task_default_routing_key": "natask has no routing keys: a task goes to the queue it names",
    "task_annotations": "set the option on the task (@app.task(...)) or task_routes for queues",
    "task_publish_retry_policy": "publishes are retried for publish_timeout seconds (Natask(publish_timeout=))",
    "task_compression": "pass compression=\"zlib\" or \"zstd\" to the call (apply_async)",
    "result_extended": "natask stores name, args, kwargs and queue with every result",
    "beat_scheduler": "natask beat keeps its state in NATS KV (`natask beat`, app.beat)",
    "beat_schedule_filename": "natask beat keeps its state in NATS KV, no file",
    "broker_transport_options": "pass NATS connect options as Natask(connect_options={...})",
    "broker_use_ssl": "pass tls= in connect_options or use a tls:// URL",
}
"""Celery settings with a natask equivalent elsewhere: the warning names it."""

IGNORED: Final = {
    "result_backend": "results live in NATS KV beside the tasks (result_expires sets how long)",
    "cache_backend": "results live in NATS KV",
}

_CONTENT: Final = frozenset({"json", "msgpack", "application/json", "application/x-msgpack"})
OK_VALUES: Final[dict[str, Callable[[Any], bool]]] = {
    "task_acks_late": lambda v: bool(v),  # natask always acks after the task ran
    "task_create_missing_queues": lambda v: bool(v),  # queues are subjects: they always exist
    "enable_utc": lambda v: bool(v),
    "result_persistent": lambda v: bool(v),
    "task_protocol": lambda v: v == 2,
    "result_serializer": lambda v: v in ("json", "msgpack"),  # natask stores msgpack, JSON values included
    "accept_content": lambda v: all(c in _CONTENT for c in v),
    "result_accept_content": lambda v: v is None or all(c in _CONTENT for c in v),
    "broker_connection_retry": lambda v: bool(v),
    "broker_connection_retry_on_startup": lambda v: bool(v),
    "task_remote_tracebacks": lambda v: True,
    "worker_hijack_root_logger": lambda v: True,
    "worker_redirect_stdouts": lambda v: True,
}
"""Settings whose value natask always has (or whose given value changes nothing observable): other
values log a warning."""

_APPLIED: Final = frozenset({"task_routes", "task_default_queue", "result_expires", "broker_url",
                             "broker_connection_timeout", "beat_schedule", "timezone", "include", "imports",
                             "task_always_eager", "task_eager_propagates", "task_store_eager_result",
                             *TASK_DEFAULTS})
"""The settings natask honours (``_apply_honoured``)."""

DEFAULTS: Final[dict[str, Any]] = {
    "task_routes": None,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "task_store_eager_result": False,
    "beat_schedule": {},
    "timezone": None,
    "enable_utc": True,
    "include": (),
    "imports": (),
    "task_acks_late": True,
    "task_serializer": "msgpack",
    "result_backend": None,
}
"""What ``app.conf`` reads for settings nobody set (besides those derived from ``app.config``)."""


class Settings(MutableMapping[str, Any]):
    """``app.conf``: attribute and dict access (``app.conf.task_routes = {...}``,
    ``app.conf["timezone"]``, ``update()``, ``get()``) over Celery's setting names."""

    def __init__(self, app: _App) -> None:
        object.__setattr__(self, "_app", app)
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_warned", set())
        object.__setattr__(self, "_beat_names", set())
        object.__setattr__(self, "discover", [])
        self.discover: list[tuple[Any, str]]
        """``autodiscover_tasks`` calls still to import: (packages or a function giving them, module name)."""

    # -- mapping ----------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        config = self._app.config
        if key in self._values:
            return self._values[key]
        if key == "task_default_queue":
            return config.default_queue
        if key == "result_expires":
            return timedelta(seconds=config.result_ttl)
        if key == "broker_url":
            return ",".join(config.servers)
        if key == "broker_connection_timeout":
            return config.connect_timeout
        if key in DEFAULTS:
            return DEFAULTS[key]
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def __delitem__(self, key: str) -> None:
        raise ConfigError(f"app.conf[{key!r}] cannot be deleted: set it to another value")

    def __iter__(self) -> Iterator[str]:
        seen = {"task_default_queue", "result_expires", "broker_url", "broker_connection_timeout",
                *DEFAULTS, *self._values}
        return iter(sorted(seen))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"app.conf has no setting {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __repr__(self) -> str:
        return f"<Settings of {self._app.name}: {', '.join(sorted(self._values))}>"

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Apply settings (a mapping or pairs, and keywords); each is checked and applied at once."""
        items = dict(other.items() if isinstance(other, Mapping) else other)
        items.update(kwargs)
        for key, value in items.items():
            if not isinstance(key, str):
                raise ConfigError(f"setting names are strings, got {key!r}")
            self._apply(key, value)
            self._values[key] = value

    # -- applying ---------------------------------------------------------------------------
    def _apply(self, key: str, value: Any) -> None:
        if key in _APPLIED:
            self._apply_honoured(key, value)
        elif key in IGNORED:
            if value:
                self._warn(key, f"ignored: {IGNORED[key]}")
        elif key in OK_VALUES:
            if not OK_VALUES[key](value):
                self._warn(key, f"natask cannot honour {key}={value!r} (docs/celery.md says what it does instead)")
        elif key in NOT_HERE:
            self._warn(key, f"not read from the configuration: {NOT_HERE[key]}")
        elif key in CELERY_SETTINGS:
            self._warn(key, "natask has no equivalent (docs/celery.md)")
        else:
            self._warn(key, "not a Celery setting natask knows; kept in app.conf for your own code")

    def _apply_honoured(self, key: str, value: Any) -> None:  # noqa: C901 - one branch per setting
        app = self._app
        if key == "task_routes":
            from .routes import Router

            router = Router(value)
            app.client.router = router if router else None
        elif key == "task_default_queue":
            self._config(default_queue=value)
        elif key == "result_expires":
            if value is None:
                raise ConfigError("result_expires=None (keep forever) is not possible: results live in a NATS KV "
                                  "bucket with a TTL; give a duration")
            self._config(result_ttl=seconds(value, "result_expires"))
        elif key == "broker_url":
            if value is not None:
                self._config(servers=servers_of(value))
        elif key == "broker_connection_timeout":
            self._config(connect_timeout=seconds(value, "broker_connection_timeout"))
        elif key in TASK_DEFAULTS:
            self._task_default(key, value)
        elif key == "beat_schedule":
            self._beat(value, self.get("timezone"))
        elif key == "timezone":
            if value is not None:
                from .beat.schedule import _check_tz

                _check_tz(str(value), "timezone")
            if self.get("beat_schedule"):
                self._beat(self["beat_schedule"], value)
        elif key in ("include", "imports"):
            if isinstance(value, str):
                raise ConfigError(f"{key} is a list of module names, got the string {value!r}: wrap it in a list")
        elif key == "task_always_eager":
            app.always_eager = bool(value)
        elif key == "task_eager_propagates":
            app.eager_propagates = bool(value)
        elif key == "task_store_eager_result" and value:
            self._warn(key, "eager results stay in the process (EagerResult): nothing is stored in NATS")

    def _warn(self, key: str, why: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("setting %s: %s", key, why)

    def _config(self, **changes: Any) -> None:
        app = self._app
        fields = {**{f.name: getattr(app.config, f.name) for f in dataclasses.fields(Config)}, **changes}
        name, servers = fields.pop("name"), fields.pop("servers")
        config = Config.build(name, servers, **fields)  # checked like Natask(...) arguments
        app.config = config
        app.client.config = config

    def _task_default(self, key: str, value: Any) -> None:
        option = TASK_DEFAULTS[key]
        spec = {f.name: f for f in dataclasses.fields(TaskOptions)}.get(option)
        if spec is None:
            if _BUILT_IN.get(key, _BUILT_IN) != value:
                self._warn(key, f"this natask's tasks have no {option} option yet (issue 18)")
            return
        if option in _SECONDS and value is not None:
            value = seconds(value, key)
        previous = self._values.get(key, spec.default)
        for task in list(self._app.tasks.values()):
            self._configure(task, option, spec.default, previous, value)

    @staticmethod
    def _configure(task: Registered, option: str, default: Any, previous: Any, value: Any) -> None:
        current = getattr(task.options, option)
        if current == default or current == previous:  # the task did not set its own
            object.__setattr__(task, "options", dataclasses.replace(task.options, **{option: value}))

    def configure_task(self, task: Registered) -> None:
        """Give a task registered after the settings their task defaults (``task_time_limit``...)."""
        fields = {f.name: f for f in dataclasses.fields(TaskOptions)}
        for key, option in TASK_DEFAULTS.items():
            if key in self._values and option in fields:
                value = self._values[key]
                if option in _SECONDS and value is not None:
                    value = seconds(value, key)
                self._configure(task, option, fields[option].default, fields[option].default, value)

    def _beat(self, schedule: Any, tz: Any) -> None:
        if not isinstance(schedule, Mapping):
            raise ConfigError(f"beat_schedule maps entry names to dicts like {{'task': 'proj.tasks.add', "
                              f"'schedule': 30.0}}, got {schedule!r:.100}")
        entries = [beat_entry(self._app, name, spec, tz) for name, spec in schedule.items()]
        periodic = self._app.periodic_entries
        for name in self._beat_names:
            periodic.pop(name, None)
        for entry in entries:
            if entry.name in periodic:
                raise ConfigError(f"beat_schedule entry {entry.name!r}: a periodic entry of that name exists "
                                  "already (@app.periodic or add_periodic_task)")
        for entry in entries:
            periodic[entry.name] = entry
        object.__setattr__(self, "_beat_names", {e.name for e in entries})

    # -- task modules -----------------------------------------------------------------------
    def import_tasks(self) -> None:
        """Import the modules of ``include``/``imports`` and of pending ``autodiscover_tasks`` calls."""
        for key in ("imports", "include"):
            for module in self.get(key) or ():
                importlib.import_module(module)
        while self.discover:
            packages, related = self.discover.pop(0)
            for package in _packages(packages):
                _import_related(package, related)


def servers_of(url: Any) -> tuple[str, ...]:
    """The NATS URLs of ``broker=``/``broker_url`` (a string, ``;``- or ``,``-separated, or a list);
    AMQP, Redis and other schemes raise ``ConfigError``."""
    parts = url if isinstance(url, (list, tuple)) else str(url).replace(";", ",").split(",")
    servers = tuple(p.strip() for p in parts if p and p.strip())
    for server in servers:
        scheme = server.partition("://")[0].lower() if "://" in server else "nats"
        if scheme not in ("nats", "tls", "ws", "wss"):
            raise ConfigError(f"broker URL scheme {scheme!r}: natask speaks to NATS servers only "
                              "(nats://host:4222, tls://, ws://, wss://)")
    if not servers:
        raise ConfigError("broker_url is empty: give a nats:// URL")
    return servers


def beat_entry(app: _App, name: str, spec: Any, tz: Any) -> PeriodicEntry:
    """A periodic entry from one ``beat_schedule`` item: ``task``, ``schedule`` (seconds, a
    timedelta, a ``crontab`` or a cron string), ``args``, ``kwargs``, ``options``."""
    if not isinstance(spec, Mapping) or "task" not in spec or "schedule" not in spec:
        raise ConfigError(f"beat_schedule[{name!r}] needs 'task' and 'schedule', got {spec!r:.100}")
    unknown = sorted(set(spec) - {"task", "schedule", "args", "kwargs", "options", "relative"})
    if unknown:
        raise ConfigError(f"beat_schedule[{name!r}]: unknown key(s) {', '.join(unknown)}")
    if spec.get("relative"):
        raise ConfigError(f"beat_schedule[{name!r}]: relative=True is not supported: intervals are aligned "
                          "to the Unix epoch so every beat computes the same fire times")
    schedule = spec["schedule"]
    cron = getattr(schedule, "cron", None)  # natask.celery.crontab
    if isinstance(cron, str):
        schedule = cron
    elif not isinstance(schedule, (str, timedelta, int, float)) or isinstance(schedule, bool):
        raise ConfigError(f"beat_schedule[{name!r}]: schedule must be seconds, a timedelta, a crontab(...) "
                          f"or a cron string, got {schedule!r:.100} (solar schedules are not supported)")
    options = dict(spec.get("options") or {})
    sig: Signature[Any] = Signature(app, spec["task"], spec.get("args") or (), spec.get("kwargs"), options)
    return make_entry(schedule, sig, name=name, tz=str(tz) if tz and isinstance(schedule, str) else None)


def _packages(packages: Any) -> Iterable[str]:
    if callable(packages):
        packages = packages()
    if packages is None:
        try:
            from django.apps import apps  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            raise ConfigError("autodiscover_tasks() without packages reads Django's INSTALLED_APPS, and Django "
                              "is not installed: pass the packages, autodiscover_tasks(['proj'])") from None
        return [config.name for config in apps.get_app_configs()]
    if isinstance(packages, str):
        raise ConfigError(f"autodiscover_tasks takes a list of packages, got the string {packages!r}")
    return list(packages)


def _import_related(package: str, related: str) -> None:
    """Import ``<package>.<related>`` if it exists, as Celery does: a package without one is skipped,
    an error inside it is raised."""
    module = f"{package}.{related}"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in (module, package):
            raise


CELERY_SETTINGS: Final = frozenset("""
accept_content result_accept_content enable_utc imports include timezone beat_max_loop_interval beat_schedule
beat_scheduler beat_schedule_filename beat_sync_every beat_cron_starting_deadline broker_url broker_read_url
broker_write_url broker_transport broker_transport_options broker_connection_timeout broker_connection_retry
broker_connection_retry_on_startup broker_connection_max_retries broker_channel_error_retry
broker_failover_strategy broker_heartbeat broker_heartbeat_checkrate broker_login_method
broker_native_delayed_delivery_queue_type broker_pool_limit broker_pool_acquire_timeout broker_use_ssl
broker_host broker_port broker_user broker_password broker_vhost cache_backend cache_backend_options
cassandra_entry_ttl cassandra_keyspace cassandra_port cassandra_read_consistency cassandra_servers
cassandra_bundle_path cassandra_table cassandra_write_consistency cassandra_auth_provider cassandra_auth_kwargs
cassandra_options s3_access_key_id s3_secret_access_key s3_bucket s3_base_path s3_endpoint_url s3_region
azureblockblob_container_name azureblockblob_retry_initial_backoff_sec azureblockblob_retry_increment_base
azureblockblob_retry_max_attempts azureblockblob_base_path azureblockblob_connection_timeout
azureblockblob_read_timeout gcs_bucket gcs_project gcs_base_path gcs_ttl control_queue_ttl control_queue_expires
control_queue_exclusive control_queue_durable control_exchange couchbase_backend_settings
arangodb_backend_settings mongodb_backend_settings cosmosdbsql_database_name cosmosdbsql_collection_name
cosmosdbsql_consistency_level cosmosdbsql_max_retry_attempts cosmosdbsql_max_retry_wait_time
event_queue_expires event_queue_ttl event_queue_prefix event_queue_exclusive event_queue_durable
event_serializer event_exchange redis_backend_use_ssl redis_db redis_host redis_max_connections redis_username
redis_password redis_port redis_socket_timeout redis_socket_connect_timeout redis_retry_on_timeout
redis_socket_keepalive result_backend result_cache_max result_compression result_exchange result_exchange_type
result_expires result_persistent result_extended result_serializer result_backend_transport_options
result_chord_retry_interval result_chord_join_timeout result_backend_max_sleep_between_retries_ms
result_backend_max_retries result_backend_base_sleep_between_retries_ms result_backend_always_retry
elasticsearch_retry_on_timeout elasticsearch_max_retries elasticsearch_timeout elasticsearch_save_meta_as_text
security_certificate security_cert_store security_key security_key_password security_digest database_url
database_engine_options database_engine_callback database_short_lived_sessions database_table_schemas
database_table_names database_create_tables_at_setup task_acks_late task_acks_on_failure_or_timeout
task_acks_on_failure task_acks_on_timeout task_always_eager task_annotations task_compression
task_create_missing_queues task_create_missing_queue_type task_create_missing_queue_exchange_type
task_inherit_parent_priority task_default_delivery_mode task_default_queue task_default_queue_type
task_default_exchange task_default_exchange_type task_default_routing_key task_default_rate_limit
task_default_priority task_eager_propagates task_ignore_result task_store_eager_result task_protocol
task_publish_retry task_publish_retry_policy task_queues task_queue_max_priority task_reject_on_worker_lost
task_remote_tracebacks task_routes task_send_sent_event task_serializer task_soft_time_limit task_time_limit
task_store_errors_even_if_ignored task_track_started task_allow_error_cb_on_chord_header worker_agent
worker_autoscaler worker_cancel_long_running_tasks_on_connection_loss worker_soft_shutdown_timeout
worker_enable_soft_shutdown_on_idle worker_concurrency worker_consumer worker_direct worker_disable_rate_limits
worker_deduplicate_successful_tasks worker_enable_remote_control worker_hijack_root_logger worker_log_color
worker_log_format worker_lost_wait worker_max_memory_per_child worker_max_tasks_per_child worker_pool
worker_pool_putlocks worker_pool_restarts worker_proc_alive_timeout worker_prefetch_multiplier
worker_eta_task_limit worker_enable_prefetch_count_reduction worker_disable_prefetch worker_redirect_stdouts
worker_redirect_stdouts_level worker_send_task_events worker_state_db worker_task_log_format worker_timer
worker_timer_precision worker_detect_quorum_queues
""".split())
"""Every setting name of Celery 5 (``celery/app/defaults.py``)."""


__all__ = ["CELERY_SETTINGS", "Settings", "beat_entry", "servers_of"]
