"""Celery's entry points over natask: ``from natask.celery import Celery, shared_task`` and the canvas.

``Celery("proj", broker="nats://...", include=[...])`` is a ``Natask`` with Celery's defaults (the
default queue is ``celery``) plus ``config_from_object``, ``autodiscover_tasks`` and ``set_current``;
``app.conf`` (every app has it) applies Celery's setting names. docs/celery.md maps every Celery
setting, option and API to natask's.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, cast

from .app import Natask
from .canvas import GroupResult, Signature, chain, chord, group
from .config import OPTIONS
from .errors import ConfigError
from .result import AsyncResult
from .settings import CELERY_SETTINGS, servers_of
from .shared import current_app, current_or_none, set_current, shared_task
from .task import Task

DEFAULT_QUEUE: Final = "celery"
"""Celery's ``task_default_queue``."""
_NATASK_OPTIONS: Final = frozenset(f.name for f in OPTIONS) | {"connect_options"}


class Celery(Natask):
    """A natask app built the way Celery apps are: ``Celery("proj", broker=..., include=[...])``.

    ``broker``: NATS URLs (a string, ``;``/``,``-separated, or a list; default ``$CELERY_BROKER_URL``,
    else ``$NATS_URL``, else ``nats://127.0.0.1:4222``). ``backend`` logs a warning: results live in
    NATS KV. Other keywords are natask options (``Natask(...)``) or Celery settings (``app.conf``).
    """

    def __init__(
        self,
        main: str | None = None,
        *,
        broker: str | Sequence[str] | None = None,
        backend: str | None = None,
        include: Iterable[str] | None = None,
        config_source: object = None,
        namespace: str | None = None,
        set_as_current: bool = True,
        **options: Any,
    ) -> None:
        natask_options = {k: v for k, v in options.items() if k in _NATASK_OPTIONS}
        settings = {k: v for k, v in options.items() if k not in _NATASK_OPTIONS}
        if "default_queue" not in natask_options and not os.environ.get("NATASK_DEFAULT_QUEUE"):
            natask_options["default_queue"] = DEFAULT_QUEUE
        url = broker if broker is not None else os.environ.get("CELERY_BROKER_URL")
        previous = current_or_none()
        super().__init__(main or "celery", servers_of(url) if url else None, **natask_options)
        if not set_as_current and previous is not None:
            set_current(previous)
        self.namespace = namespace
        """The default ``namespace`` of ``config_from_object``."""
        if backend is not None:
            self.conf["result_backend"] = backend
        if include is not None:
            self.conf["include"] = list(include)
        if settings:
            self.conf.update(settings)
        if config_source is not None:
            self.config_from_object(config_source)

    def __repr__(self) -> str:
        return f"<Celery {self.name} servers={self.config.safe_servers}>"

    @property
    def main(self) -> str:
        """Celery's name for the app's name."""
        return self.name

    def set_current(self) -> None:
        """Make this the app ``@shared_task`` proxies use (the last app created is current)."""
        set_current(self)

    def config_from_object(self, obj: object, silent: bool = False, force: bool = False,
                           namespace: str | None = None) -> bool:
        """Apply the settings of a module, class, object or dict (or the import path of one:
        ``"proj.celeryconfig"``, ``"django.conf:settings"``) at once.

        With ``namespace="CELERY"`` only ``CELERY_*`` names are read (``CELERY_TASK_ROUTES`` is
        ``task_routes``); without, the lower-case Celery setting names (other names — imports,
        helpers — are skipped). ``silent=True`` returns False instead of raising ``ImportError``.
        ``force`` is accepted for Celery's signature: settings always apply at once here."""
        del force
        if isinstance(obj, str):
            try:
                obj = _import_object(obj)
            except ImportError:
                if silent:
                    return False
                raise
        self.conf.update(settings_of(obj, namespace if namespace is not None else self.namespace))
        return True

    def config_from_envvar(self, variable_name: str, silent: bool = False, force: bool = False) -> bool:
        """``config_from_object`` of the import path in environment variable ``variable_name``."""
        path = os.environ.get(variable_name)
        if not path:
            if silent:
                return False
            raise ConfigError(f"environment variable {variable_name} is not set: it names the configuration "
                              "module to load")
        return self.config_from_object(path, silent=silent, force=force)

    def autodiscover_tasks(self, packages: Iterable[str] | Callable[[], Iterable[str]] | None = None,
                           related_name: str = "tasks", force: bool = False) -> None:
        """Import ``<package>.<related_name>`` of each package (skipped when a package has none).

        Lazily, as Celery does: when a worker or beat starts (``app.finalize()``), so a tasks module
        may import this app; ``force=True`` imports now. ``packages`` may be a function (called then)
        and defaults to Django's installed apps."""
        self.conf.discover.append((packages, related_name))
        if force:
            self.conf.import_tasks()

    def send_task(self, name: str, args: Sequence[Any] | None = (), kwargs: Mapping[str, Any] | None = None,
                  **options: Any) -> AsyncResult[Any]:
        """Enqueue a task by name; Celery passes ``args=None`` where natask takes ``()``."""
        return super().send_task(name, args or (), kwargs, **options)


def settings_of(obj: object, namespace: str | None) -> dict[str, Any]:
    """The Celery settings an object (module, class, instance or mapping) holds."""
    items = dict(obj) if isinstance(obj, Mapping) else {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_")}
    if namespace:
        prefix = f"{namespace}_"
        return {k[len(prefix):].lower(): v for k, v in items.items() if k.startswith(prefix)}
    found = {}
    for key, value in items.items():
        if key in CELERY_SETTINGS:
            found[key] = value
        elif key.isupper() and key.lower() in CELERY_SETTINGS:  # e.g. BROKER_URL in an old-style module
            found[key.lower()] = value
    return found


def _import_object(path: str) -> object:
    """A module by import path, or ``module:attribute``/``module.attribute`` (Celery's loader order)."""
    if ":" in path:
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        module, _, attr = path.rpartition(".")
        if not module or e.name != path:
            raise
        found = importlib.import_module(module)
        if not hasattr(found, attr):
            raise
        return getattr(found, attr)


_WEEKDAYS: Final = {"sunday": "sun", "monday": "mon", "tuesday": "tue", "wednesday": "wed", "thursday": "thu",
                    "friday": "fri", "saturday": "sat"}


class crontab:  # noqa: N801 - Celery's name
    """Celery's ``crontab(minute=, hour=, day_of_week=, day_of_month=, month_of_year=)`` as a cron
    string (``.cron``) for ``beat_schedule``: each field a cron field string, an int, or ints."""

    def __init__(self, minute: Any = "*", hour: Any = "*", day_of_week: Any = "*", day_of_month: Any = "*",
                 month_of_year: Any = "*") -> None:
        dow = _field(day_of_week, "day_of_week")
        for name, short in _WEEKDAYS.items():
            dow = dow.replace(name, short)
        self.cron = " ".join((_field(minute, "minute"), _field(hour, "hour"), _field(day_of_month, "day_of_month"),
                              _field(month_of_year, "month_of_year"), dow))
        """The five-field cron string beat runs on (in the ``timezone`` setting, UTC by default)."""

    def __repr__(self) -> str:
        return f"<crontab: {self.cron}>"

    def __str__(self) -> str:
        return self.cron


def _field(value: Any, what: str) -> str:
    if isinstance(value, bool):
        raise ConfigError(f"crontab {what}={value!r}: give a cron field, an int or ints")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if not text or " " in text:
            raise ConfigError(f"crontab {what}={value!r}: give one cron field such as '*/15' or '1-5'")
        return text
    if isinstance(value, Iterable):
        parts = sorted(value)
        if not parts or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
            raise ConfigError(f"crontab {what}={value!r}: a collection must hold ints")
        return ",".join(str(p) for p in parts)
    raise ConfigError(f"crontab {what}={value!r}: give a cron field, an int or ints")


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature[Any]:
    """Celery's ``signature(name, args=(), kwargs={}, **options)`` on the current app, or a
    ``Signature`` (or its dict form) as is."""
    if isinstance(varies, Signature):
        return varies
    if isinstance(varies, Mapping):
        from .canvas import from_dict

        return cast("Signature[Any]", from_dict(current_app(), dict(varies)))
    call_args = args[0] if args else kwargs.pop("args", ())
    call_kwargs = args[1] if len(args) > 1 else kwargs.pop("kwargs", None)
    app = kwargs.pop("app", None) or current_app()
    return Signature(app, varies, call_args or (), call_kwargs, kwargs)


__all__ = ["AsyncResult", "Celery", "GroupResult", "Signature", "Task", "chain", "chord", "crontab", "group",
           "settings_of", "shared_task", "signature"]
