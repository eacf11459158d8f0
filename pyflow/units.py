"""RouterOS value syntax: durations (``30m``, ``1h30m``, ``00:30:00``), sizes (``64k``), ``yes``/``no``.

Every parser raises ``ValueError`` with a message that names the bad value
and shows the accepted forms; config code wraps it with the setting's name.
"""

from __future__ import annotations

import re

_DURATION_UNITS_NS = {
    "w": 7 * 86400 * 10**9,
    "d": 86400 * 10**9,
    "h": 3600 * 10**9,
    "m": 60 * 10**9,
    "s": 10**9,
    "ms": 10**6,
}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|w|d|h|m|s)")
_CLOCK_RE = re.compile(r"^(?:(\d+)d)?(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")

_SIZE_UNITS = {"": 1, "k": 1024, "K": 1024, "m": 1024**2, "M": 1024**2, "g": 1024**3, "G": 1024**3}
_SIZE_RE = re.compile(r"^(\d+)([kKmMgG]?)$")


def parse_duration_ns(text: str | int | float) -> int:
    """``30m``, ``15s``, ``1h30m``, ``1d``, ``500ms``, ``00:30:00``, ``1d00:00:10`` or plain seconds."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"duration {text!r} is negative")
        return int(text * 10**9)
    s = text.strip()
    if not s.isascii():
        raise ValueError(f"{text!r} is not a duration (write it as RouterOS does: 15s, 30m, 1h30m, 1d, 500ms or "
                         "00:30:00)")
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        return int(float(s) * 10**9)
    m = _CLOCK_RE.match(s)
    if m:
        days, hours, minutes, seconds = m.groups()
        total = (int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60) * 10**9
        return total + int(float(seconds) * 10**9)
    pos = 0
    total = 0
    for part in _DURATION_RE.finditer(s):
        if part.start() != pos:
            break
        total += int(float(part.group(1)) * _DURATION_UNITS_NS[part.group(2)])
        pos = part.end()
    if pos != len(s) or not s:
        raise ValueError(
            f"{text!r} is not a duration (write it as RouterOS does: 15s, 30m, 1h30m, 1d, 500ms or 00:30:00)"
        )
    return total


def format_duration(ns: int) -> str:
    """The shortest RouterOS-style spelling: 1800 s -> ``30m``."""
    if ns % 10**9:
        return f"{ns // 10**6}ms"
    s = ns // 10**9
    if s == 0:
        return "0s"
    out = ""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            out += f"{s // size}{unit}"
            s %= size
    return out


def parse_size(text: str | int) -> int:
    """``64k`` = 65536, ``1M`` = 1048576 (binary, as RouterOS cache sizes), or a plain number."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"{text!r} is not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    m = _SIZE_RE.match(text.strip()) if text.isascii() else None
    if not m:
        raise ValueError(f"{text!r} is not a size (write 4096, 4k, 64k or 1M)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_size(n: int) -> str:
    for unit, size in (("M", 1024**2), ("k", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_count(text: str | int) -> int:
    """A whole number of 0 or more: ``20``, or an int (not a bool)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"{text!r} is not a whole number")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative")
        return text
    t = text.strip()
    if not t.isascii() or not t.isdigit():
        raise ValueError(f"{text!r} is not a whole number (0 or more)")
    return int(t)


def format_bool(value: bool) -> str:
    return "yes" if value else "no"


def parse_bool(text: str | bool) -> bool:
    """RouterOS ``yes``/``no`` (also true/false, on/off)."""
    if isinstance(text, bool):
        return text
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not yes or no")
    t = text.strip().lower()
    if t in ("yes", "true", "on", "1"):
        return True
    if t in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")
