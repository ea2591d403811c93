"""Generate docs/API.md from natask's docstrings: `python docs/gen_api.py` (a test keeps it current)."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

OUT = Path(__file__).with_name("API.md")

SECTIONS: list[tuple[str, str, list[str]]] = [
    ("Application", "natask.app", ["Natask"]),
    ("Celery entry points", "natask.celery", ["Celery", "shared_task", "crontab", "signature"]),
    ("Settings (app.conf)", "natask.settings", ["Settings"]),
    ("Tasks", "natask.task", ["Task", "AsyncTask", "Request", "TaskOptions"]),
    ("Results", "natask.result", ["AsyncResult"]),
    ("Canvas", "natask.canvas", ["Signature", "chain", "group", "chord", "chunks", "ResultSet", "GroupResult",
                                 "EagerResult"]),
    ("Periodic tasks", "natask.beat", ["Beat", "PeriodicEntry", "Schedules", "ScheduleInfo", "next_fire",
                                          "describe"]),
    ("Workers", "natask.worker", ["Worker"]),
    ("Testing", "natask.testing", ["nats_server", "worker"]),
    ("Bundled server", "natask.server", ["NatsServer"]),
    ("Dead letters", "natask.dlq", ["DeadLetters", "DeadLetter"]),
    ("Control and monitoring", "natask.control", ["inspect", "status", "queues", "purge"]),
    ("Fail-over", "natask.failover", ["add_mirror", "promote", "Promotion"]),
    ("Remote control", "natask.remote", ["Control"]),
    ("Events", "natask.events", ["EventStream", "follow"]),
    ("Errors", "natask.errors", []),
]


APP_PROTOCOLS = re.compile(r"\bapp: (App|Scheduled)\b")
"""What lower layers call the app they are given (small Protocols, see docs/ARCHITECTURE.md): users pass a Natask."""


def _doc(obj: object) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "(no docstring)")


def _sig(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    text = text.replace("(self, ", "(").replace("(self)", "()").replace("'", "")
    return APP_PROTOCOLS.sub("app: Natask", text)


def render() -> str:
    import importlib

    out = ["# natask API reference", "", "Generated from the docstrings by `python docs/gen_api.py`.", ""]
    for title, module_name, names in SECTIONS:
        module = importlib.import_module(module_name)
        out += [f"## {title} (`{module_name}`)", ""]
        if not names:
            out += ["```", _doc(module), "```", ""]
            continue
        for name in names:
            obj = getattr(module, name, None)
            if obj is None:
                continue
            obj = getattr(obj, "__wrapped__", obj)
            out += [f"### `{name}{_sig(obj) if not inspect.isclass(obj) else ''}`", "", _doc(obj), ""]
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") and attr not in ("__init__",):
                        continue
                    if isinstance(member, property):
                        out += [f"- `.{attr}` — {_doc(member).splitlines()[0]}"]
                    elif inspect.isfunction(member) and member.__doc__:
                        label = name if attr == "__init__" else f".{attr}"
                        out += [f"- `{label}{_sig(member)}` — {_doc(member).splitlines()[0]}"]
                out.append("")
        if module_name == "natask.app":
            out += _options()
    return "\n".join(out).rstrip() + "\n"


def _options() -> list[str]:
    """The option table of ``natask.config.Config``: what ``Natask(name, servers, **options)`` takes."""
    from dataclasses import MISSING, fields

    from natask.config import Config

    out = ["### Options: `Natask(name, servers=None, **options)`", "",
           "| option | environment | default | meaning |", "|---|---|---|---|"]
    for f in fields(Config):
        if "env" not in f.metadata:
            continue
        default = "{}" if f.default is MISSING else repr(f.default)
        low, high = f.metadata.get("min"), f.metadata.get("max")
        bounds = f" (between {low:g} and {high:g})" if high is not None else f" (>= {low:g})" if low is not None else ""
        out.append(f"| `{f.name}` | `{f.metadata['env']}` | `{default}` | {f.metadata['doc']}{bounds} |")
    return [*out, ""]


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
