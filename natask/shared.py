"""``@shared_task``: tasks defined without an app, as in reusable Celery packages and Django apps.

The decorated function is remembered; every app registers it when it finalizes (workers and beat
finalize their app at start), and the app current at decoration time registers it at once. What the
decorator returns is a proxy: each use (``add.delay(...)``, ``add.s(...)``, ``add(...)``) goes to the
task of the *current* app — the last ``Natask``/``Celery`` created, or the one given to
``set_current`` — so a tasks module may be imported before the app exists.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, TypeVar, cast, overload

from .errors import ConfigError

P = ParamSpec("P")
R = TypeVar("R")


_SHARED: Final[dict[str, tuple[Callable[..., Any], dict[str, Any]]]] = {}
"""Every ``@shared_task`` by task name: the function and its options."""
_current: weakref.ref[Any] | None = None


def set_current(app: Any) -> None:
    """Make ``app`` the one ``@shared_task`` proxies use (every new app calls it)."""
    global _current
    _current = weakref.ref(app)


def current_app() -> Any:  # a Natask: this layer cannot name it
    """The app shared tasks resolve to; ``ConfigError`` when none exists."""
    app = _current() if _current is not None else None
    if app is None:
        raise ConfigError("no natask app exists yet: create one (Celery('proj') or Natask('proj')) before "
                          "calling a @shared_task")
    return app


def current_or_none() -> Any:
    """The current app, or None."""
    return _current() if _current is not None else None


def register_shared(app: Any) -> None:
    """Register every shared task the app does not have yet."""
    for name, (fn, options) in list(_SHARED.items()):
        if name not in app.tasks:
            app.task(**{**options, "name": name})(fn)


class SharedTask:
    """The task of the current app, looked up on each use (see the module docstring)."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__

    def _task(self) -> Any:
        app = current_app()
        task = app.tasks.get(self.name)
        if task is None:
            fn, options = _SHARED[self.name]
            task = app.task(**{**options, "name": self.name})(fn)
        return task

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._task(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._task()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<shared task {self.name}>"


@overload
def shared_task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> Any: ...
@overload
def shared_task(fn: Callable[P, R], /) -> Any: ...
@overload
def shared_task(**options: Any) -> Callable[[Callable[..., Any]], Any]: ...
def shared_task(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """``@shared_task`` or ``@shared_task(bind=True, ...)``: a task of whichever app is current, with
    the options of ``@app.task``."""

    def register(func: Callable[..., Any]) -> SharedTask:
        if not callable(func):
            raise ConfigError(f"@shared_task decorates functions, got {func!r}")
        name = options.get("name") or f"{func.__module__}.{func.__qualname__}"
        if "<" in name:
            raise ConfigError(f"cannot derive a task name for {func.__qualname__!r}: pass name='...'")
        _SHARED[name] = (func, {k: v for k, v in options.items() if k != "name"})
        app = _current() if _current is not None else None
        if app is not None and name not in app.tasks:
            app.task(**{**options, "name": name})(func)
        return SharedTask(name, func)

    return cast(Any, register(fn) if fn is not None else register)


__all__ = ["SharedTask", "current_app", "register_shared", "set_current", "shared_task"]
