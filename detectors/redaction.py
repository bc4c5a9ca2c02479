"""The one masking function: used for finding evidence, incident records, logs, span
attributes and alert bodies, so that a secret is shown the same (never whole) everywhere."""

from __future__ import annotations

import re

_EMAIL = re.compile(r"^([^@\s]{1,64})@([^@\s]+)$")


def mask(value: str, kind: str = "") -> str:
    """Return a recognisable but non-reversible rendering of ``value``.

    Emails keep the first letter and the domain (``j***@example.com``); other values keep a
    short prefix (which often names the credential type, ``sk-``, ``AKIA``) and the last four
    characters (``sk-...9f2a``); short values are fully starred.
    """
    value = value.strip()
    if not value:
        return ""
    m = _EMAIL.match(value)
    if m and kind in ("email", ""):
        return f"{m.group(1)[0]}***@{m.group(2)}"
    n = len(value)
    if n <= 6:
        return "*" * n
    if n <= 12:
        return f"{value[:1]}***{value[-2:]}"
    prefix = value[:3] if n < 24 else value[:4]
    return f"{prefix}...{value[-4:]}"


def placeholder(kind: str) -> str:
    """The typed placeholder a ``redact`` action writes in place of a span."""
    return f"[REDACTED:{kind}]"
