"""Argument previews for the dashboard: secrets redacted at any depth, every preview bounded."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

PREVIEW_CHARS: Final = 200
"""Longest argument preview."""
DETAIL_CHARS: Final = 4000
"""Longest argument text on a task's detail page."""
REDACTED: Final = "***"
"""What a secret-looking value is replaced by."""

_SECRET_KEY: Final = re.compile(
    r"passw|passphrase|pwd|secret|token|key|auth|credential|creds|jwt|bearer|cookie|session|signature|card|cvv"
    r"|cvc|ssn|iban|^pass$|^pin$", re.IGNORECASE)
_SECRET_PART: Final = frozenset({"pw", "otp", "totp", "hotp"})
"""Secret names too short to look for inside words: hidden only as a whole part of a key (``db_pw``,
``user-otp``, ``otpCode``), so ``pwm``, ``upward`` or ``footprint`` stay visible."""
_NAME_PART: Final = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")


class _Cut:
    def __repr__(self) -> str:
        return "…"


_CUT: Final = _Cut()


def is_secret(key: object) -> bool:
    """Whether a mapping key or keyword names something to hide (password, api_key, card_number...)."""
    if not isinstance(key, str):
        return False
    return bool(_SECRET_KEY.search(key)) or any(part.lower() in _SECRET_PART for part in _NAME_PART.findall(key))


def redact(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` with the values of secret-looking keys replaced, at any depth (containers
    cut to what a preview can show)."""
    if depth > 8:
        return _CUT
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret(k) else redact(v, depth + 1) for k, v in list(value.items())[:50]}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [redact(v, depth + 1) for v in list(value)[:50]]
        return tuple(items) if isinstance(value, tuple) else items
    return value


def preview(args: Any, kwargs: Mapping[str, Any], limit: int = PREVIEW_CHARS) -> str:
    """``(1, 'a', password='***')``: the call's arguments, redacted, at most ``limit`` characters."""
    parts = [_short_repr(redact(a), limit) for a in list(args)[:50]]
    parts += [f"{k}={REDACTED!r}" if is_secret(k) else f"{k}={_short_repr(redact(v), limit)}"
              for k, v in list(kwargs.items())[:50]]
    text = "(" + ", ".join(parts) + ")"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short_repr(value: Any, limit: int) -> str:
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit]
