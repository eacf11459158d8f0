"""pyflow's TOML config file: RouterOS's names in tables, read into the settings tree.

The file (``pyflow run --config FILE``)::

    [traffic-flow]            # /ip traffic-flow
    enabled = "yes"
    interfaces = ["eth0", "lan"]      # names, interface lists, or "all"
    cache-entries = "64k"
    active-flow-timeout = "30m"
    inactive-flow-timeout = "15s"
    packet-sampling = "no"
    sampling-interval = 0
    sampling-space = 0

    [[target]]                # /ip traffic-flow target, one table per target
    dst-address = "192.0.2.50"
    port = 2055
    version = "ipfix"
    v9-template-refresh = 20
    v9-template-timeout = "30m"

    [ipfix]                   # /ip traffic-flow ipfix
    nat-events = "yes"

    [interface-list]          # /interface list + /interface list member
    lan = ["eth1", "eth2"]

    [[interface]]             # pyflow: how one interface is metered
    name = "eth1"
    direction = "both"

    [pyflow]                  # pyflow's own knobs
    sweep-interval = "10s"

Values are written as RouterOS writes them (``64k``, ``30m``, ``1h30m``,
``00:30:00``, ``yes``/``no``); TOML integers and booleans are accepted too.
Every unknown key, wrong type or bad value is a ``ConfigError`` that names
the key and the line it is on.

The same reader takes the document :mod:`pyflow.routeros` builds from a
RouterOS script (the same tables, with the script's line numbers), so both
sources are checked by one piece of code.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyflow.config import (
    SIGNALS,
    InterfaceList,
    InterfaceOptions,
    SettingError,
    TargetSettings,
    check_ifname,
    count,
    duration,
    size,
    yes_no,
)
from pyflow.errors import ConfigError
from pyflow.fields import BY_NAME, TOGGLES, Kind
from pyflow.files import MAX_CONFIG_BYTES, read_text
from pyflow.text import cut, visible

DocPath = tuple[str | int, ...]


# --------------------------------------------------------------------------
# Where a key is: file and line.
# --------------------------------------------------------------------------


class Locator:
    """Maps a key's path in the document (``("target", 0, "port")``) to ``FILE:LINE``.

    A path not known is looked up without its last parts (a target's header
    line for a key of that target), and at worst gives the file name.
    """

    def __init__(self, source: str, lines: Mapping[DocPath, int] | None = None) -> None:
        self.source = source
        self.lines: dict[DocPath, int] = dict(lines or {})

    def line(self, path: DocPath) -> int | None:
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None

    def where(self, path: DocPath) -> str:
        n = self.line(path)
        return self.source if n is None else f"{self.source}:{n}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(text: str) -> list[str] | None:
    """``a.b``, ``"a b".c`` -> the parts; None when it is not a TOML key."""
    parts: list[str] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] in "\"'":
            q = text[pos]
            end = pos + 1
            while end < len(text) and text[end] != q:
                end += 2 if q == '"' and text[end] == "\\" else 1
            if end >= len(text):
                return None
            raw = text[pos:end + 1]
            try:
                parts.append(json.loads(raw) if q == '"' else raw[1:-1])
            except ValueError:
                parts.append(raw[1:-1])
            pos = end + 1
        else:
            m = _BARE_KEY.match(text, pos)
            if not m:
                return None
            parts.append(m.group())
            pos = m.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text):
            if text[pos] != ".":
                return None
            pos += 1
    return parts or None


def _scan_value(text: str, depth: int, in_string: str | None) -> tuple[int, str | None]:
    """Bracket depth and open multi-line string after ``text`` (comments and strings skipped)."""
    i = 0
    while i < len(text):
        if in_string:
            if text.startswith(in_string, i):
                i += len(in_string)
                in_string = None
                continue
            i += 2 if text[i] == "\\" and in_string.startswith('"') else 1
            continue
        c = text[i]
        if c == "#":
            break
        if text.startswith('"""', i) or text.startswith("'''", i):
            in_string = text[i:i + 3]
            i += 3
            continue
        if c in "\"'":
            end = i + 1
            while end < len(text) and text[end] != c:
                end += 2 if c == '"' and text[end] == "\\" else 1
            i = end + 1
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return depth, in_string


def scan_toml_lines(text: str) -> dict[DocPath, int]:
    """The line of every ``[table]``, ``[[table]]`` header and ``key = value`` in ``text``.

    tomllib does not report where a key is; this scan is good enough for the
    line-per-key files people write (headers, ``key = value`` lines, values
    spanning lines inside brackets or triple quotes).
    """
    lines: dict[DocPath, int] = {}
    table: DocPath = ()
    arrays: dict[tuple[str, ...], int] = {}
    depth, in_string = 0, None
    for n, raw in enumerate(text.splitlines(), 1):
        if depth or in_string:
            depth, in_string = _scan_value(raw, depth, in_string)
            continue
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            is_array = line.startswith("[[")
            close = line.find("]]" if is_array else "]")
            parts = _split_key(line[2 if is_array else 1:close]) if close > 0 else None
            if parts is None:
                continue
            path: list[str | int] = []
            for i, part in enumerate(parts):
                path.append(part)
                key = tuple(str(p) for p in parts[:i + 1])
                last = i == len(parts) - 1
                if is_array and last:
                    arrays[key] = arrays.get(key, -1) + 1
                    path.append(arrays[key])
                elif key in arrays:
                    path.append(arrays[key])
            table = tuple(path)
            lines.setdefault(table, n)
            continue
        key_text, sep, value = _split_assignment(line)
        if not sep:
            continue
        parts = _split_key(key_text)
        if parts is None:
            continue
        for i in range(len(parts)):
            lines.setdefault((*table, *parts[:i + 1]), n)
        depth, in_string = _scan_value(value, 0, None)
    return lines


def _split_assignment(line: str) -> tuple[str, str, str]:
    """``key = value`` at the first ``=`` outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "=":
            return line[:i], "=", line[i + 1:]
    return line, "", ""


# --------------------------------------------------------------------------
# Document -> settings values.
# --------------------------------------------------------------------------


@dataclass
class Layer:
    """Settings values from one source (a config file, a RouterOS script, the flags).

    ``values`` are ``Settings`` fields; ``ipfix`` holds the toggles the source
    set (merged toggle by toggle) and ``interface_options`` the per-interface
    options by name.  ``where`` tells, for a ``SettingError`` key, where the
    source set it (``pyflow.toml:7``, ``router.rsc:3``, ``--cache-entries``).
    """

    source: str
    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    ipfix: dict[str, bool] = field(default_factory=dict)
    interface_options: dict[str, InterfaceOptions] = field(default_factory=dict)


Convert = Callable[[str, Any], Any]


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SettingError(name, f"{name}: {_show(value)} is not text (write it in quotes)")
    return value


def _version(name: str, value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise SettingError(name, f"{name}: {_show(value)} is not one of 1, 5, 9, ipfix")
    return value


def _names(name: str, value: Any) -> tuple[str, ...]:
    """``"all"``, ``"eth0,eth1"`` or ``["eth0", "lan"]`` -> the names."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v for item in value for v in item.split(",")]
    else:
        raise SettingError(name, f"{name}: {_show(value)} is not a name or a list of names")
    out = tuple(i.strip() for i in items)
    if not out or any(not i for i in out):
        raise SettingError(name, f"{name}: {_show(value)} has an empty name")
    return out


def _duration(name: str, value: Any) -> int:
    if isinstance(value, float):
        raise SettingError(name, f"{name}: {value!r} is not a duration (write it as RouterOS does: "
                                 "500ms, 15s, 30m, 1h30m)")
    return duration(name, value)


def _show(value: Any) -> str:
    """A TOML value as the user wrote it, for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return cut(repr(value), 60)


# key -> (Settings field, converter)
TRAFFIC_FLOW_KEYS: dict[str, tuple[str, Convert]] = {
    "enabled": ("enabled", yes_no),
    "interfaces": ("interfaces", _names),
    "cache-entries": ("cache_entries", size),
    "active-flow-timeout": ("active_flow_timeout_ns", _duration),
    "inactive-flow-timeout": ("inactive_flow_timeout_ns", _duration),
    "packet-sampling": ("packet_sampling", yes_no),
    "sampling-interval": ("sampling_interval", count),
    "sampling-space": ("sampling_space", count),
}
TARGET_KEYS: dict[str, tuple[str, Convert]] = {
    "dst-address": ("dst_address", _text),
    "port": ("port", count),
    "version": ("version", _version),
    "src-address": ("src_address", _text),
    "v9-template-refresh": ("v9_template_refresh", count),
    "v9-template-timeout": ("v9_template_timeout_ns", _duration),
    "time": ("time_mode", _text),
    "max-rate": ("max_rate", count),
    "interface-names": ("interface_names", yes_no),
    "sequence": ("sequence", _text),
    "comment": ("comment", _text),
    "disabled": ("disabled", yes_no),
}
INTERFACE_KEYS: dict[str, tuple[str, Convert]] = {
    "name": ("name", _text),
    "direction": ("direction", _text),
    "hook": ("hook", _text),
}
PYFLOW_KEYS: dict[str, tuple[str, Convert]] = {
    "sweep-interval": ("sweep_interval_ns", _duration),
    "metrics-address": ("metrics_address", _text),
    "xdp-mode": ("xdp_mode", _text),
    "direction": ("direction", _text),
    "hook": ("hook", _text),
    "as-file": ("as_file", _text),
    "control-socket": ("control_socket", _text),
    "user": ("user", _text),
}
#: [analytics]: key -> (AnalyticsSettings argument, converter); plus SIGNAL-threshold and SIGNAL-floor
ANALYTICS_KEYS: dict[str, tuple[str, Convert]] = {
    "enabled": ("enabled", yes_no),
    "window": ("window_ns", _duration),
    "top": ("top", count),
}
ANALYTICS_SIGNAL_KEYS = {f"{sig.replace('_', '-')}-{what}": (sig, what) for sig in SIGNALS
                         for what in ("threshold", "floor")}
TABLES = ("traffic-flow", "target", "ipfix", "interface-list", "interface", "pyflow", "analytics")
ARRAY_TABLES = ("target", "interface")
_TABLE_KEYS: dict[str, Sequence[str]] = {
    "traffic-flow": tuple(TRAFFIC_FLOW_KEYS),
    "target": tuple(TARGET_KEYS),
    "ipfix": TOGGLES,
    "interface": tuple(INTERFACE_KEYS),
    "pyflow": tuple(PYFLOW_KEYS),
    "analytics": (*ANALYTICS_KEYS, *ANALYTICS_SIGNAL_KEYS),
}


class _Reader:
    """Turns one document into a Layer, every error prefixed with where it is."""

    def __init__(self, loc: Locator, base_dir: Path | None) -> None:
        self.loc = loc
        self.base_dir = base_dir
        self.layer = Layer(loc.source)

    def fail(self, path: DocPath, message: str) -> ConfigError:
        return ConfigError(f"{self.loc.where(path)}: {message}")

    def unknown(self, path: DocPath, key: str, table: str) -> ConfigError:
        known = _TABLE_KEYS.get(table, ())
        if table == "ipfix":
            always = [f.name for f in BY_NAME.values() if f.kind is Kind.ALWAYS]
            msg = f"unknown ipfix field {key!r} (known: {', '.join(known)})"
            if key in always:
                msg = f"ipfix field {key!r} is always sent by pyflow and has no toggle"
            return self.fail(path, msg)
        home = [t for t, keys in _TABLE_KEYS.items() if key in keys and t != table]
        hint = f"; it belongs in [{home[0]}]" if home else f" (known: {', '.join(known)})"
        return self.fail(path, f"unknown key {key!r} in [{table}]{hint}")

    def convert(self, path: DocPath, conv: Convert, key: str, value: Any) -> Any:
        try:
            return conv(key, value)
        except ConfigError as exc:
            raise self.fail(path, str(exc)) from None

    def read(self, doc: Mapping[str, Any]) -> Layer:
        for name, value in doc.items():
            if name not in TABLES:
                home = [t for t, keys in _TABLE_KEYS.items() if name in keys]
                hint = (f"; put it in [{home[0]}]" if home else
                        f" (known tables: {', '.join(f'[{t}]' for t in TABLES)})")
                what = "table" if isinstance(value, dict | list) else "key"
                raise self.fail((name,), f"unknown {what} {name!r} at the top level{hint}")
            if name in ARRAY_TABLES:
                if isinstance(value, dict):
                    raise self.fail((name,), f"[{name}] must be written [[{name}]] (one table per {name})")
                if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                    raise self.fail((name,), f"{name} must be [[{name}]] tables")
            elif not isinstance(value, dict):
                raise self.fail((name,), f"{name} must be a table: [{name}]")
        self._scalar_table(doc, "traffic-flow", TRAFFIC_FLOW_KEYS)
        self._scalar_table(doc, "pyflow", PYFLOW_KEYS)
        self._targets(doc.get("target", []))
        self._ipfix(doc.get("ipfix", {}))
        self._lists(doc.get("interface-list", {}))
        self._interfaces(doc.get("interface", []))
        self._analytics(doc.get("analytics", {}))
        return self.layer

    def _analytics(self, table: Mapping[str, Any]) -> None:
        """[analytics] -> ``values["analytics"]``: AnalyticsSettings arguments (cli.build_settings)."""
        out: dict[str, Any] = {}
        for key, value in table.items():
            path = ("analytics", key)
            if key in ANALYTICS_KEYS:
                attr, conv = ANALYTICS_KEYS[key]
                out[attr] = self.convert(path, conv, f"analytics {key}", value)
            elif key in ANALYTICS_SIGNAL_KEYS:
                sig, what = ANALYTICS_SIGNAL_KEYS[key]
                out.setdefault(f"{what}s", {})[sig] = self.convert(path, _signal_number, f"analytics {key}", value)
            else:
                raise self.unknown(path, key, "analytics")
            self.layer.where[f"analytics.{key}"] = self.loc.where(path)
        if table:
            self.layer.values["analytics"] = out
            self.layer.where["analytics"] = self.loc.where(("analytics",))

    def _scalar_table(self, doc: Mapping[str, Any], table: str, keys: dict[str, tuple[str, Convert]]) -> None:
        for key, value in doc.get(table, {}).items():
            path = (table, key)
            if key not in keys:
                raise self.unknown(path, key, table)
            attr, conv = keys[key]
            converted = self.convert(path, conv, key, value)
            if key == "as-file" and self.base_dir is not None:
                converted = str(self.base_dir / converted)
            self.layer.values[attr] = converted
            self.layer.where[key] = self.loc.where(path)
        if table in doc:
            self.layer.where.setdefault(table, self.loc.where((table,)))

    def _targets(self, tables: list[dict[str, Any]]) -> None:
        enabled: list[tuple[TargetSettings, int]] = []
        disabled: list[tuple[TargetSettings, int]] = []
        for i, table in enumerate(tables):
            kwargs: dict[str, Any] = {}
            off = False
            for key, value in table.items():
                path = ("target", i, key)
                if key not in TARGET_KEYS:
                    raise self.unknown(path, key, "target")
                attr, conv = TARGET_KEYS[key]
                if key == "disabled":
                    off = self.convert(path, conv, key, value)
                else:
                    kwargs[attr] = self.convert(path, conv, key, value)
            if "dst_address" not in kwargs:
                raise self.fail(("target", i), f"target {i}: no dst-address (the collector's IP address)")
            try:
                t = TargetSettings(**kwargs)
            except SettingError as exc:
                raise self.fail(("target", i, exc.key), str(exc)) from None
            (disabled if off else enabled).append((t, i))
        self.layer.values["targets"] = tuple(t for t, _ in enabled)
        self.layer.values["disabled_targets"] = tuple(t for t, _ in disabled)
        for n, (_, i) in enumerate(enabled + disabled):
            self.layer.where[f"target.{n}"] = self.loc.where(("target", i))
        if tables:
            self.layer.where["target"] = self.loc.where(("target", 0))

    def _ipfix(self, table: Mapping[str, Any]) -> None:
        for key, value in table.items():
            path = ("ipfix", key)
            if key not in TOGGLES:
                raise self.unknown(path, key, "ipfix")
            self.layer.ipfix[key] = self.convert(path, yes_no, f"ipfix field {key}", value)
        if table:
            self.layer.where["ipfix"] = self.loc.where(("ipfix",))

    def _lists(self, table: Mapping[str, Any]) -> None:
        lists = []
        for name, value in table.items():
            path = ("interface-list", name)
            members = self.convert(path, _member_names, f"interface list {name}", value)
            for j, member in enumerate(members):
                try:
                    check_ifname(member, name, f"interface list {name}: member")
                except SettingError as exc:
                    raise self.fail((*path, j), str(exc)) from None
            try:
                lists.append(InterfaceList(name, members))
            except SettingError as exc:
                raise self.fail(path, str(exc)) from None
            self.layer.where[f"interface-list.{name}"] = self.loc.where(path)
        if table:
            self.layer.values["interface_lists"] = tuple(lists)

    def _interfaces(self, tables: list[dict[str, Any]]) -> None:
        for i, table in enumerate(tables):
            kwargs: dict[str, str] = {}
            for key, value in table.items():
                path = ("interface", i, key)
                if key not in INTERFACE_KEYS:
                    raise self.unknown(path, key, "interface")
                kwargs[key] = self.convert(path, _text, key, value)
            if "name" not in kwargs:
                raise self.fail(("interface", i), f"[[interface]] {i}: no name (the Linux interface name)")
            if kwargs["name"] in self.layer.interface_options:
                raise self.fail(("interface", i), f"interface {kwargs['name']} has two [[interface]] tables")
            options = {k: v for k, v in kwargs.items() if k != "name"}
            try:
                opts = InterfaceOptions(kwargs["name"], **options)
            except SettingError as exc:
                raise self.fail(("interface", i, exc.key), str(exc)) from None
            self.layer.interface_options[opts.name] = opts
            self.layer.where[f"interface.{opts.name}"] = self.loc.where(("interface", i))


def _signal_number(name: str, value: Any) -> float:
    """A score threshold or a floor: a number >= 0 (TOML integer or float, or in quotes)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SettingError(name, f"{name}: {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise SettingError(name, f"{name}: {_show(value)} is not a number >= 0")
    return float(value)


def _member_names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and not value:
        return ()
    return _names(name, value)


def read_document(doc: Mapping[str, Any], loc: Locator, base_dir: Path | None = None) -> Layer:
    """A parsed document (the TOML tables) -> a Layer; errors name the key and ``loc``'s line.

    ``base_dir``: where a relative ``as-file`` is (the config file's directory).
    """
    return _Reader(loc, base_dir).read(doc)


def load_toml(path: str | Path) -> Layer:
    """Read a pyflow TOML config file: a regular file of at most 1M (``pyflow.files``)."""
    text = read_text(path, "the config file", MAX_CONFIG_BYTES)
    return read_toml_text(text, str(path), Path(path).parent)


# What a pyflow config file needs is far below these; tomllib is recursive (RecursionError past
# ~1000 levels) and quadratic in a dotted key's parts (10,000 parts: 1 GB), so they are checked first.
MAX_TOML_NESTING = 8  # arrays and inline tables in a value (a [[table]] header counts 2)
MAX_TOML_KEY_PARTS = 8  # a dotted key's parts (pyflow's keys have at most 2: interface-list.lan)
MAX_TOML_DIGITS = 40  # digits of a number written in the file

_TOML_TOKEN = re.compile(r"""
    (?P<string>"{3}(?:[^\\]|\\.)*?"{3}|'{3}.*?'{3}|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')
  | (?P<comment>\#[^\n]*)
  | (?P<newline>\n)
  | (?P<open>[\[{])
  | (?P<close>[\]}])
  | (?P<bare>[A-Za-z0-9_+:-]+)
  | (?P<dot>\.)
  | (?P<space>[ \t\r]+)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)


def _toml_statement(text: str, line: int) -> str:
    """The key a line's statement sets (or its [table]), for a message."""
    lines = text.split("\n", line)
    raw = lines[line - 1].strip() if 1 <= line <= len(lines) else ""
    key = raw.strip("[]").strip() if raw.startswith("[") else _split_assignment(raw)[0].strip()
    return cut(key, 40)


def check_toml_limits(text: str, source: str) -> None:
    """Refuse, naming FILE:LINE and the key, what would make tomllib recurse, go quadratic or
    convert a huge number: values nested too deep, keys of too many parts, numbers of too many digits."""
    line = start = 1
    depth = parts = 0
    after_dot = fresh = True
    for m in _TOML_TOKEN.finditer(text):
        kind, tok = m.lastgroup, m.group()
        if kind in ("space", "comment"):
            continue
        if kind == "newline":
            line += 1
            fresh = depth == 0
            continue
        if fresh:
            start, fresh = line, False
        if kind in ("string", "bare"):
            parts = parts + 1 if after_dot else 1
            if parts > MAX_TOML_KEY_PARTS:
                raise ConfigError(f"{source}:{line}: a key of more than {MAX_TOML_KEY_PARTS} dotted parts "
                                  "(pyflow's keys have at most 2)")
            digits = max((len(d) for d in re.findall(r"\d+", tok)), default=0) if kind == "bare" else 0
            if digits > MAX_TOML_DIGITS:
                raise ConfigError(f"{source}:{line}: {_toml_statement(text, start)}: a number of {digits} digits "
                                  f"(at most {MAX_TOML_DIGITS})")
        elif kind == "open":
            depth += 1
            if depth > MAX_TOML_NESTING:
                raise ConfigError(f"{source}:{line}: {_toml_statement(text, start)}: arrays or inline tables "
                                  f"nested more than {MAX_TOML_NESTING} deep")
        elif kind == "close":
            depth = max(0, depth - 1)
        line += tok.count("\n")  # a multi-line string
        after_dot = kind == "dot"


_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def read_toml_text(text: str, source: str, base_dir: Path | None = None) -> Layer:
    check_toml_limits(text, source)
    try:
        doc = tomllib.loads(text)
    except (RecursionError, MemoryError):  # belt and braces: check_toml_limits keeps far below
        raise ConfigError(f"{source}: the TOML is too deeply nested or too big to read") from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_POS.search(msg)
        if m:
            msg = _TOML_POS.sub("", msg).strip()
            raise ConfigError(f"{source}:{m.group(1)}: TOML syntax error: {msg} (column {m.group(2)})") from None
        raise ConfigError(f"{source}: TOML syntax error: {msg}") from None
    return read_document(doc, Locator(source, scan_toml_lines(text)), base_dir)


# --------------------------------------------------------------------------
# Writing a document as TOML (pyflow import-routeros).
# --------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):  # JSON escapes C0; TOML wants DEL escaped too, and C1 is escaped for terminals
        return _C1_DEL.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


_C1_DEL = re.compile(r"[\x7f-\x9f]")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_value(key)


def dump_toml(doc: Mapping[str, Any], header: str = "", notes: Mapping[DocPath, str] | None = None) -> str:
    """A document (the tables :func:`read_document` takes) as TOML text, tables in a fixed order.

    ``notes``: a comment to put after a key, by its path (``("interface-list", "lan")``).
    """
    notes = notes or {}
    out: list[str] = [f"# {visible(line)}".rstrip() for line in header.splitlines()]
    comments = {"traffic-flow": "/ip traffic-flow", "target": "/ip traffic-flow target",
                "ipfix": "/ip traffic-flow ipfix", "interface-list": "/interface list, /interface list member",
                "interface": "pyflow: how an interface is metered", "pyflow": "pyflow's own settings",
                "analytics": "pyflow: traffic analytics on the metrics endpoint"}
    for table in TABLES:
        if table not in doc or not doc[table]:
            continue
        rows = doc[table] if table in ARRAY_TABLES else [doc[table]]
        for i, row in enumerate(rows):
            if out:
                out.append("")
            head = f"[[{table}]]" if table in ARRAY_TABLES else f"[{table}]"
            out.append(f"{head}  # {comments[table]}")
            for k, v in row.items():
                note = notes.get((table, i, k) if table in ARRAY_TABLES else (table, k))
                line = f"{_toml_key(k)} = {_toml_value(v)}"
                out.append(f"{line}  # {visible(' '.join(note.split()))}" if note else line)
    return "\n".join(out) + "\n"
