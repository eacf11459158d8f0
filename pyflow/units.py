"""RouterOS value syntax: durations (``30m``, ``1h30m``, ``00:30:00``), sizes (``64k``), ``yes``/``no``.

Every parser raises ``ValueError`` with a message that names the bad value
and shows the accepted forms; config code wraps it with the setting's name.
A number of more than :data:`MAX_DIGITS` digits is refused before it is
converted (``int()`` of thousands of digits is slow or refused, ``float()``
of hundreds is infinite), and no value goes through a float: the ranges are
checked on exact integers.
"""

from __future__ import annotations

import math
import re

from pyflow.text import cut

#: The most digits a number in a setting may have (a whole part, or a fraction): far more than any
#: range allows (365d is 3.2e16 ns), far fewer than make int() slow or float() infinite.
MAX_DIGITS = 18

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


def _shown(text: object) -> str:
    """A value for a message: cut to a readable length, quoted, control characters escaped."""
    return repr(cut(text)) if isinstance(text, str) else repr(text)


def _digits(text: str, whole: str, frac: str = "") -> None:
    for part in (whole, frac):
        if len(part) > MAX_DIGITS:
            raise ValueError(f"{_shown(text)} has a number of {len(part)} digits (at most {MAX_DIGITS})")


def _scaled(text: str, whole: str, frac: str, unit_ns: int) -> int:
    """``whole.frac`` units in whole nanoseconds, exactly (no float), digit counts checked first."""
    _digits(text, whole, frac)
    scale = 10 ** len(frac)
    return (int(whole) * scale + int(frac or "0")) * unit_ns // scale


_DURATION_FORMS = "write it as RouterOS does: 15s, 30m, 1h30m, 1d, 500ms or 00:30:00"


def parse_duration_ns(text: str | int | float) -> int:
    """``30m``, ``15s``, ``1h30m``, ``1d``, ``500ms``, ``00:30:00``, ``1d00:00:10`` or plain seconds."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"{_shown(text)} is not a duration")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"duration {text!r} is negative")
        if isinstance(text, float) and (not math.isfinite(text) or text >= 10**MAX_DIGITS):
            raise ValueError(f"duration {text!r} is not a finite number of seconds below 1e{MAX_DIGITS}")
        return int(text * 10**9)
    s = text.strip()
    if not s.isascii():
        raise ValueError(f"{_shown(text)} is not a duration ({_DURATION_FORMS})")
    plain = re.fullmatch(r"(\d+)(?:\.(\d+))?", s)
    if plain:
        return _scaled(text, plain.group(1), plain.group(2) or "", 10**9)
    m = _CLOCK_RE.match(s)
    if m:
        days, hours, minutes, seconds = m.groups()
        _digits(text, days or "", hours)
        whole, _, frac = seconds.partition(".")
        total = (int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60) * 10**9
        return total + _scaled(text, whole, frac, 10**9)
    pos = 0
    total = 0
    for part in _DURATION_RE.finditer(s):
        if part.start() != pos:
            break
        whole, _, frac = part.group(1).partition(".")
        total += _scaled(text, whole, frac, _DURATION_UNITS_NS[part.group(2)])
        pos = part.end()
    if pos != len(s) or not s:
        raise ValueError(f"{_shown(text)} is not a duration ({_DURATION_FORMS})")
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
        raise ValueError(f"{_shown(text)} is not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    m = _SIZE_RE.match(text.strip()) if text.isascii() else None
    if not m:
        raise ValueError(f"{_shown(text)} is not a size (write 4096, 4k, 64k or 1M)")
    _digits(text, m.group(1))
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_size(n: int) -> str:
    for unit, size in (("M", 1024**2), ("k", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_count(text: str | int) -> int:
    """A whole number of 0 or more: ``20``, or an int (not a bool)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"{_shown(text)} is not a whole number")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{text} is negative")
        return text
    t = text.strip()
    if not t.isascii() or not t.isdigit():
        raise ValueError(f"{_shown(text)} is not a whole number (0 or more)")
    _digits(text, t)
    return int(t)


def parse_int(text: str) -> int:
    """A whole number written in a setting (``2055``, ``-1``): at most :data:`MAX_DIGITS` digits."""
    t = text.strip()
    digits = t[1:] if t[:1] in "+-" else t
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"{_shown(text)} is not a whole number")
    _digits(text, digits)
    return int(t)


def format_bool(value: bool) -> str:
    return "yes" if value else "no"


def parse_bool(text: str | bool) -> bool:
    """RouterOS ``yes``/``no`` (also true/false, on/off)."""
    if isinstance(text, bool):
        return text
    if not isinstance(text, str):
        raise ValueError(f"{_shown(text)} is not yes or no")
    t = text.strip().lower()
    if t in ("yes", "true", "on", "1"):
        return True
    if t in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{_shown(text)} is not yes or no")
