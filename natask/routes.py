"""Celery's ``task_routes``: which queue a call goes to when neither the call nor the task names one.

Celery's order (``celery/app/routes.py``, docs "Specifying task destination"): the call's ``queue=``
first, then the task's own ``queue``, then the routers of ``task_routes`` in order — the first one
that returns a route wins — then the default queue. A router is a dict (exact task names, glob
patterns such as ``"feed.*"``, compiled regexes as keys), a list of ``(pattern, route)`` pairs (order
kept), or a function ``(name, args, kwargs, options, task=None, **kw) -> dict | str | None``; a
route is a queue name or a dict with ``"queue"``.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .config import check_queue_name
from .errors import ConfigError

Route = str | Mapping[str, Any]
RouterFn = Callable[..., Route | None]

_SAME_AS_QUEUE: Final = frozenset({"routing_key", "exchange"})
"""Route keys that name the queue itself with Celery's default direct exchange (queue, exchange and
routing key of one name, as ``task_create_missing_queues`` makes them): accepted when they agree."""


class MapRoute:
    """A router built from a dict or a list of ``(pattern, route)`` pairs: exact names first, then
    patterns (globs and regexes) in the given order, as Celery's ``MapRoute``."""

    def __init__(self, table: Mapping[Any, Route] | Sequence[tuple[Any, Route]]) -> None:
        items = table.items() if isinstance(table, Mapping) else table
        self.exact: dict[str, Route] = {}
        self.patterns: list[tuple[re.Pattern[str], Route]] = []
        for item in items:
            try:
                key, route = item
            except (TypeError, ValueError):
                raise ConfigError(f"task_routes: expected (pattern, route) pairs, got {item!r:.100}") from None
            queue_of(route, f"task_routes[{key!r}]")  # validate now, not at the first call
            if isinstance(key, re.Pattern):
                self.patterns.append((key, route))
            elif not isinstance(key, str):
                raise ConfigError(f"task_routes: keys are task names, glob patterns or re.compile() "
                                  f"patterns, got {key!r:.100}")
            elif "*" in key or "?" in key or "[" in key:
                self.patterns.append((re.compile(fnmatch.translate(key)), route))
            else:
                self.exact[key] = route

    def __call__(self, name: str, *args: Any, **kwargs: Any) -> Route | None:
        route = self.exact.get(name)
        if route is not None:
            return route
        for pattern, route in self.patterns:
            if pattern.match(name):
                return route
        return None


def queue_of(route: object, where: str) -> str | None:
    """The queue a route names; ``ConfigError`` for what natask cannot honour."""
    if route is None:
        return None
    if isinstance(route, str):
        return check_queue_name(route)
    if not isinstance(route, Mapping):
        raise ConfigError(f"{where}: a route is a queue name or a dict like {{'queue': 'feeds'}}, got {route!r:.100}")
    queue = route.get("queue")
    unknown = sorted(set(route) - {"queue"} - _SAME_AS_QUEUE)
    if unknown:
        raise ConfigError(f"{where}: natask routes by queue only; {', '.join(unknown)} cannot be set by a route "
                          "(give it to the task or the call instead)")
    for key in _SAME_AS_QUEUE & set(route):
        if queue is None:
            queue = route[key]
        elif route[key] != queue:
            raise ConfigError(f"{where}: {key}={route[key]!r} differs from queue={queue!r}; natask has no "
                              "exchanges or bindings, a task goes to the queue it names: give only 'queue'")
    if queue is None:
        return None
    if not isinstance(queue, str):
        raise ConfigError(f"{where}: the queue must be a name (str), got {queue!r:.100}")
    return check_queue_name(queue)


class Router:
    """The compiled ``task_routes``: ``router(name, args, kwargs, options)`` is the queue of the first
    router that returns a route, or None (then the default queue)."""

    def __init__(self, routes: object) -> None:
        if routes is None:
            routes = ()
        elif not isinstance(routes, (list, tuple)) or _is_pairs(routes):
            routes = (routes,)
        self.routers: list[RouterFn] = [_router(r) for r in routes]

    def __bool__(self) -> bool:
        return bool(self.routers)

    def __call__(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                 options: Mapping[str, Any], task: object = None) -> str | None:
        for router in self.routers:
            route = router(name, args, kwargs, options, task=task)
            if route:
                return queue_of(route, f"the route {router!r:.80} returned for {name}")
        return None


def _is_pairs(routes: list[Any] | tuple[Any, ...]) -> bool:
    """A bare list of ``(pattern, route)`` pairs is one ordered map, not a list of routers."""
    return bool(routes) and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], (str, re.Pattern))
                                for r in routes)


def _router(spec: object) -> RouterFn:
    if isinstance(spec, (Mapping, list, tuple)):
        return MapRoute(spec)
    if isinstance(spec, str):
        spec = _import(spec)
    if hasattr(spec, "route_for_task"):  # Celery < 4 router classes (an instance, or the class to make one)
        obj = spec() if isinstance(spec, type) else spec
        return lambda name, args, kwargs, options, task=None, **kw: obj.route_for_task(name, args, kwargs)
    if callable(spec):
        return spec
    raise ConfigError(f"task_routes: expected a dict, a list of (pattern, route) pairs or a router function, "
                      f"got {spec!r:.100}")


def _import(path: str) -> object:
    """``"pkg.module.router"`` or ``"pkg.module:router"``, as Celery's ``symbol_by_name``."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"task_routes: cannot import the router {path!r}: {e}") from None


__all__ = ["MapRoute", "Router", "queue_of"]
