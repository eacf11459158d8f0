"""Text from outside (settings, the wire) shown on a terminal: control characters escaped, long values cut.

A setting's value, an interface name from an options record or a path may hold
anything; shown raw, ``ESC [ 2 J`` clears the user's screen and a newline forges
a line of its own.  :func:`visible` escapes every C0 control character, DEL and
every C1 control character (Unicode category Cc) as ``\\n``, ``\\t`` or
``\\xNN``; everything else is left as it is.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def visible(text: str) -> str:
    """``text`` with C0, DEL and C1 control characters escaped (``\\x1b``, ``\\n``)."""
    return _CONTROL.sub(_escape, text)


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def cut(text: str, limit: int = 40) -> str:
    """At most ``limit`` characters of ``text``: a long value in a message is shown by its start and length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
