"""RouterOS in and out: ``/ip traffic-flow`` scripts read into settings, settings printed as RouterOS does.

:func:`parse_script` reads what a MikroTik user pastes from ``/export``:

* ``/ip traffic-flow set ...``, ``/ip traffic-flow target add ...``,
  ``/ip traffic-flow ipfix set ...``, ``/interface list add name=...``,
  ``/interface list member add list=... interface=...``;
* menu context lines (``/ip traffic-flow`` alone, then ``set ...``; relative
  menus such as ``target`` from there; ``/ip/traffic-flow/target``);
* ``\\`` line continuations, ``#`` comments, ``;`` between commands,
  ``"..."`` values with RouterOS's escapes (``\\"``, ``\\\\``, ``\\n``, ``\\t``,
  ``\\_``, ``\\$``, ``\\?``, ``\\XX`` hex);
* the older target syntax ``address=IP:PORT`` (RouterOS 6);
* ``print`` and ``export`` commands (they change nothing and are skipped).

It produces the same document a pyflow TOML file holds (:mod:`pyflow.configfile`),
with the line of every property, so the settings are checked by the same code and
every error names the script's line.  Anything it cannot map is an error with
the line number, never silently dropped: commands of other menus
(``/ip firewall filter add ...``) are errors, unless ``ignore_other`` is set,
which skips them with a warning each.  RouterOS interface names are mapped to
Linux names with ``interface_map`` (``{"ether1": "eth0"}``); a name that is not
a valid Linux interface name and has no mapping is an error.

:func:`print_settings` shows a settings tree the way ``/ip traffic-flow print``,
``/ip traffic-flow target print`` and ``/ip traffic-flow ipfix print`` do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyflow.config import BUILTIN_LISTS, SettingError, Settings, TargetSettings, check_ifname
from pyflow.configfile import DocPath, Locator
from pyflow.errors import ConfigError
from pyflow.fields import TOGGLES
from pyflow.files import MAX_SCRIPT_BYTES, read_text
from pyflow.text import cut, visible
from pyflow.units import MAX_DIGITS, format_bool, format_duration, format_size, parse_bool

# --------------------------------------------------------------------------
# Reading a script: words and commands.
# --------------------------------------------------------------------------


@dataclass
class Word:
    """One word of a command: ``name=value`` (``eq``) or a bare word; quotes and escapes resolved."""

    text: str  # the whole word, unquoted
    line: int
    eq: int = -1  # position of the first '=' outside quotes in ``text``, or -1

    @property
    def name(self) -> str:
        return self.text[:self.eq] if self.eq >= 0 else self.text

    @property
    def value(self) -> str:
        return self.text[self.eq + 1:] if self.eq >= 0 else ""


@dataclass
class Command:
    line: int
    words: list[Word] = field(default_factory=list)


_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t", "$": "$", "?": "?", "_": " ",
            "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_HEX = "0123456789abcdefABCDEF"


def split_commands(text: str, source: str) -> list[Command]:
    """RouterOS script text -> commands of words, with line numbers."""
    return _Scanner(text, source).commands()


class _Scanner:
    """One pass over a script: words, quotes, escapes, line continuations, comments, ';'."""

    def __init__(self, text: str, source: str) -> None:
        self.text, self.source = text, source
        self.i, self.n, self.line = 0, len(text), 1

    def fail(self, at: int, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}:{at}: {msg}")

    def continuation(self, pos: int) -> int:
        """If a backslash at ``pos`` ends the line (trailing blanks allowed): where the next line's text starts."""
        text, n, j = self.text, self.n, pos + 1
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == "\r":
            j += 1
        if j < n and text[j] == "\n":
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            return j
        return j if j >= n else -1

    def joined(self) -> bool:
        """At a backslash: if it continues the line, step over it (and count the lines)."""
        nxt = self.continuation(self.i)
        if nxt < 0:
            return False
        self.line += self.text.count("\n", self.i, nxt)
        self.i = nxt
        return True

    def commands(self) -> list[Command]:
        commands: list[Command] = []
        cmd: Command | None = None
        text, n = self.text, self.n
        while self.i < n:
            c = text[self.i]
            if c == "\\" and self.joined():
                continue
            if c in "\n;":
                cmd = None
                self.line += c == "\n"
                self.i += 1
            elif c in " \t\r":
                self.i += 1
            elif c == "#":
                while self.i < n and text[self.i] != "\n":
                    self.i += 1
            else:
                word = self.word()
                if cmd is None:
                    cmd = Command(word.line)
                    commands.append(cmd)
                cmd.words.append(word)
        return commands

    def word(self) -> Word:
        """A word: up to white space, ';' or the end of the line, outside quotes."""
        chars: list[str] = []
        eq = -1
        word_line = self.line
        text, n = self.text, self.n
        while self.i < n and text[self.i] not in " \t\r\n;":
            c = text[self.i]
            if c == "\\":
                if not self.joined():
                    chars.append(c)
                    self.i += 1
            elif c == '"':
                self.quoted(chars)
            else:
                if c == "=" and eq < 0:
                    eq = len(chars)
                chars.append(c)
                self.i += 1
        return Word("".join(chars), word_line, eq)

    def quoted(self, chars: list[str]) -> None:
        """A quoted value (at its opening quote) into ``chars``, escapes resolved."""
        text, n = self.text, self.n
        start_line = self.line
        self.i += 1
        while True:
            if self.i >= n or text[self.i] == "\n":
                raise self.fail(start_line, "unterminated quote: a \" value has no closing \" "
                                            "(a value spanning lines needs \\ at the end of each line)")
            c = text[self.i]
            if c == '"':
                self.i += 1
                return
            if c == "\\":
                if not self.joined():
                    chars.append(self.escape())
            else:
                chars.append(c)
                self.i += 1

    def escape(self) -> str:
        """The character a backslash escape at ``i`` stands for (and step over it)."""
        text, i, n = self.text, self.i, self.n
        esc = text[i + 1] if i + 1 < n else ""
        if esc in _ESCAPES and esc:
            self.i += 2
            return _ESCAPES[esc]
        if esc in _HEX and i + 2 < n and text[i + 2] in _HEX and esc:
            self.i += 3
            return chr(int(text[i + 1:i + 3], 16))
        raise self.fail(self.line, f"unknown escape \\{esc} in a quoted value (RouterOS knows "
                                   '\\" \\\\ \\n \\r \\t \\$ \\? \\_ \\a \\b \\f \\v and \\XX hex)')


# --------------------------------------------------------------------------
# Commands -> the settings document.
# --------------------------------------------------------------------------

READ_ONLY = ("print", "export", "get", "find")
COMMANDS = ("add", "set", "remove", "print", "export", "edit", "enable", "disable", "reset", "find", "get",
            "comment", "move", "unset", "reset-counters")

TRAFFIC_FLOW_PROPS = ("enabled", "interfaces", "cache-entries", "active-flow-timeout", "inactive-flow-timeout",
                      "packet-sampling", "sampling-interval", "sampling-space")
TARGET_PROPS = ("dst-address", "port", "version", "src-address", "v9-template-refresh", "v9-template-timeout",
                "disabled", "comment", "address")
LIST_PROPS = ("name", "comment", "include", "exclude")
MEMBER_PROPS = ("list", "interface", "disabled", "comment")
INT_PROPS = ("port", "v9-template-refresh", "sampling-interval", "sampling-space")

MENUS = {
    ("ip", "traffic-flow"): "/ip traffic-flow",
    ("ip", "traffic-flow", "target"): "/ip traffic-flow target",
    ("ip", "traffic-flow", "ipfix"): "/ip traffic-flow ipfix",
    ("interface", "list"): "/interface list",
    ("interface", "list", "member"): "/interface list member",
}
MAX_INCLUDE_DEPTH = 16  # /interface list include= chains: lists including lists at most this deep
UNDERSTOOD = "/ip traffic-flow set, /ip traffic-flow target add, /ip traffic-flow ipfix set, " \
             "/interface list add and /interface list member add"


@dataclass
class Imported:
    """A script read into a settings document (:mod:`pyflow.configfile`'s tables)."""

    doc: dict[str, Any]
    locator: Locator
    warnings: list[str]
    notes: dict[DocPath, str] = field(default_factory=dict)  # comment= of lists and members, for the TOML


@dataclass
class _List:
    name: str
    line: int
    comment: str = ""
    include: list[tuple[str, int]] = field(default_factory=list)
    exclude: list[tuple[str, int]] = field(default_factory=list)
    members: list[tuple[str, int]] = field(default_factory=list)  # (RouterOS interface name, line)


class _Importer:
    def __init__(self, source: str, interface_map: Mapping[str, str], ignore_other: bool) -> None:
        self.source = source
        self.interface_map = dict(interface_map)
        self.ignore_other = ignore_other
        self.lines: dict[DocPath, int] = {}
        self.traffic_flow: dict[str, Any] = {}
        self.targets: list[dict[str, Any]] = []
        self.ipfix: dict[str, Any] = {}
        self.lists: dict[str, _List] = {}
        self.members: list[tuple[str, str, int]] = []  # (list, interface, line)
        self.member_comments: dict[str, list[str]] = {}
        self.interfaces: tuple[list[str], int] | None = None
        self.used_maps: set[str] = set()
        self.warnings: list[str] = []

    def fail(self, line: int, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}:{line}: {msg}")

    def warn(self, line: int, msg: str) -> None:
        self.warnings.append(f"{self.source}:{line}: {msg}")

    def run(self, commands: Sequence[Command]) -> Imported:
        menu: tuple[str, ...] = ()
        for cmd in commands:
            path, rest = self._path(cmd, menu)
            if not rest:
                menu = path  # a context line: the commands that follow are in this menu
                continue
            self._command(cmd, path, rest)
        doc = self._document()
        notes: dict[DocPath, str] = {}
        for name, lst in self.lists.items():
            text = "; ".join(([lst.comment] if lst.comment else []) + self.member_comments.get(name, []))
            if text:
                notes[("interface-list", name)] = text
        return Imported(doc, Locator(self.source, self.lines), self.warnings, notes)

    def _path(self, cmd: Command, menu: tuple[str, ...]) -> tuple[tuple[str, ...], list[Word]]:
        path = list(menu)
        words = cmd.words
        k = 0
        while k < len(words):
            w = words[k]
            if w.eq >= 0 or w.text in COMMANDS or w.text.startswith((":", "[", "{", "}", "]")):
                break
            text = w.text
            if text.startswith("/"):
                path = []
            for seg in text.split("/"):
                if seg == "..":
                    if path:
                        path.pop()
                elif seg:
                    path.append(seg)
            k += 1
        return tuple(path), words[k:]

    def _command(self, cmd: Command, path: tuple[str, ...], words: list[Word]) -> None:
        verb = words[0]
        where = "/" + " ".join(path)
        if verb.text.startswith(":") or verb.text.startswith(("[", "{", "}", "]")):
            self._other(cmd.line, f"{verb.text} (RouterOS scripting) is not a traffic-flow setting")
            return
        ours = path[:2] in (("ip", "traffic-flow"), ("interface", "list"))
        if verb.eq >= 0:
            msg = f"{where} {verb.text}: expected a command (set, add, ...) before the properties"
            if ours:
                raise self.fail(cmd.line, msg)
            self._other(cmd.line, msg)
            return
        if path not in MENUS:
            if ours:
                raise self.fail(cmd.line, f"{where}: no such menu (pyflow reads {UNDERSTOOD})")
            self._other(cmd.line, f"{where} {verb.text} is not a traffic-flow setting")
            return
        if verb.text in READ_ONLY:
            return  # changes nothing
        args = words[1:]
        menu = MENUS[path]
        handlers = {
            ("/ip traffic-flow", "set"): self._traffic_flow,
            ("/ip traffic-flow target", "add"): self._target,
            ("/ip traffic-flow ipfix", "set"): self._ipfix,
            ("/interface list", "add"): self._list,
            ("/interface list member", "add"): self._member,
        }
        handler = handlers.get((menu, verb.text))
        if handler is None:
            raise self.fail(cmd.line, f"{menu} {verb.text} cannot be mapped to pyflow settings "
                                      f"(pyflow reads {UNDERSTOOD}; write the settings as they should end up)")
        props = self._props(menu, verb.text, args)
        handler(cmd, props)

    def _other(self, line: int, msg: str) -> None:
        if self.ignore_other:
            self.warn(line, f"skipped: {msg}")
            return
        raise self.fail(line, f"{msg} (pyflow reads {UNDERSTOOD}; --ignore-other skips other commands "
                              "with a warning)")

    def _props(self, menu: str, verb: str, args: list[Word]) -> dict[str, Word]:
        props: dict[str, Word] = {}
        for w in args:
            if w.eq < 0:
                what = ("item selection (a number or [ find ... ])" if w.text.isdigit() or w.text.startswith("[")
                        else f"{w.text!r}")
                raise self.fail(w.line, f"{menu} {verb}: unexpected {what}; expected name=value properties")
            if not w.name:
                raise self.fail(w.line, f"{menu} {verb}: {w.text!r} has no property name")
            if w.name in props:
                raise self.fail(w.line, f"{menu} {verb}: {w.name} is given twice")
            props[w.name] = w
        return props

    def _unknown(self, menu: str, verb: str, w: Word, known: Sequence[str]) -> ConfigError:
        return self.fail(w.line, f"{menu} {verb}: unknown property {w.name!r} (known: {', '.join(known)})")

    def _traffic_flow(self, cmd: Command, props: dict[str, Word]) -> None:
        self.lines.setdefault(("traffic-flow",), cmd.line)
        for name, w in props.items():
            if name not in TRAFFIC_FLOW_PROPS:
                raise self._unknown("/ip traffic-flow", "set", w, TRAFFIC_FLOW_PROPS)
            self.lines[("traffic-flow", name)] = w.line
            if name == "interfaces":
                self.interfaces = ([s.strip() for s in w.value.split(",")], w.line)
                self.traffic_flow[name] = w.value  # replaced by the mapped names at the end
            else:
                self.traffic_flow[name] = _typed(name, w.value)

    def _target(self, cmd: Command, props: dict[str, Word]) -> None:
        i = len(self.targets)
        self.lines[("target", i)] = cmd.line
        row: dict[str, Any] = {}
        for name, w in props.items():
            if name not in TARGET_PROPS:
                raise self._unknown("/ip traffic-flow target", "add", w, TARGET_PROPS)
            if name == "address":  # RouterOS 6: address=IP:PORT
                if "dst-address" in props:
                    raise self.fail(w.line, "/ip traffic-flow target add: address= and dst-address= both given "
                                            "(address=IP:PORT is RouterOS 6's spelling of dst-address and port)")
                host, port = _split_address(w.value)
                row["dst-address"] = host
                self.lines[("target", i, "dst-address")] = w.line
                if port is not None:
                    if "port" in props:
                        raise self.fail(w.line, "/ip traffic-flow target add: address= has a port and port= "
                                                "is given too")
                    row["port"] = _typed("port", port)
                    self.lines[("target", i, "port")] = w.line
                continue
            self.lines[("target", i, name)] = w.line
            value: Any = _typed(name, w.value)
            if name == "version" and isinstance(value, str):
                value = value.lower()
            row[name] = value
        if "dst-address" not in row:
            raise self.fail(cmd.line, "/ip traffic-flow target add: no dst-address (the collector's IP address)")
        order = [k for k in ("dst-address", "port", "version", "src-address", "v9-template-refresh",
                             "v9-template-timeout", "disabled", "comment") if k in row]
        self.targets.append({k: row[k] for k in order})

    def _ipfix(self, cmd: Command, props: dict[str, Word]) -> None:
        self.lines.setdefault(("ipfix",), cmd.line)
        for name, w in props.items():
            if name not in TOGGLES:
                raise self._unknown("/ip traffic-flow ipfix", "set", w, TOGGLES)
            self.lines[("ipfix", name)] = w.line
            self.ipfix[name] = w.value

    def _list(self, cmd: Command, props: dict[str, Word]) -> None:
        for name, w in props.items():
            if name not in LIST_PROPS:
                raise self._unknown("/interface list", "add", w, LIST_PROPS)
        if "name" not in props or not props["name"].value:
            raise self.fail(cmd.line, "/interface list add: no name=")
        name = props["name"].value
        if name in self.lists:
            raise self.fail(cmd.line, f"/interface list add: list {name} is added twice "
                                      f"(first on line {self.lists[name].line})")
        if name in BUILTIN_LISTS:
            raise self.fail(cmd.line, f"/interface list add: {name} is one of RouterOS's built-in lists")
        lst = _List(name, props["name"].line, props["comment"].value if "comment" in props else "")
        for key in ("include", "exclude"):
            if key in props:
                w = props[key]
                getattr(lst, key).extend((s.strip(), w.line) for s in w.value.split(",") if s.strip())
        self.lists[name] = lst

    def _member(self, cmd: Command, props: dict[str, Word]) -> None:
        for name, w in props.items():
            if name not in MEMBER_PROPS:
                raise self._unknown("/interface list member", "add", w, MEMBER_PROPS)
        for key in ("list", "interface"):
            if key not in props or not props[key].value:
                raise self.fail(cmd.line, f"/interface list member add: no {key}=")
        if "disabled" in props:
            try:
                off = parse_bool(props["disabled"].value)
            except ValueError:
                raise self.fail(props["disabled"].line, f"/interface list member add: disabled="
                                                        f"{props['disabled'].value!r} is not yes or no") from None
            if off:
                if props["interface"].value in self.interface_map:
                    self.used_maps.add(props["interface"].value)
                self.warn(cmd.line, f"member {props['interface'].value} of list {props['list'].value} is "
                                    "disabled=yes: it is not metered")
                return
        self.members.append((props["list"].value, props["interface"].value, props["interface"].line))
        if "comment" in props and props["comment"].value:
            self.member_comments.setdefault(props["list"].value, []).append(
                f"{props['interface'].value}: {props['comment'].value}")

    # -- the end: lists, interface names, the document ---------------------------------

    def _map(self, name: str, line: int) -> str:
        if name in self.interface_map:
            self.used_maps.add(name)
            name = self.interface_map[name]
        try:
            check_ifname(name, "interface")
        except SettingError:
            raise self.fail(line, f"interface {cut(name)!r} is not a Linux interface name (1-15 printable ASCII "
                                  "characters, no '/', ':', ',' or spaces): map it with --map-interface "
                                  f"{cut(name) + '=LINUX-NAME'!r}") from None
        return name

    def _resolve_lists(self, members: dict[str, list[tuple[str, int]]]) -> dict[str, list[tuple[str, int]]]:
        """Each list's members, its include= lists' added and its exclude= lists' taken out; lists may
        include lists at most MAX_INCLUDE_DEPTH deep (the chain is refused, not followed, beyond)."""
        resolved: dict[str, list[tuple[str, int]]] = {}
        depth: dict[str, int] = {}

        def resolve(name: str, stack: tuple[str, ...]) -> list[tuple[str, int]]:
            if name in resolved:
                return resolved[name]
            lst = self.lists[name]
            out = list(members[name])
            depth[name] = 0
            for key, pairs in (("include", lst.include), ("exclude", lst.exclude)):
                for other, line in _first_lines(pairs).items():
                    if other not in self.lists:
                        raise self.fail(line, f"/interface list add: {key}={other} cannot be mapped (only lists "
                                              f"added in this script can be {key}d)")
                    if other in stack or other == name:
                        raise self.fail(line, f"/interface list add: list {name} includes itself through {other}")
                    if len(stack) >= MAX_INCLUDE_DEPTH or depth.get(other, 0) >= MAX_INCLUDE_DEPTH:
                        raise self.fail(line, f"/interface list add: {key}={other}: lists include lists more than "
                                              f"{MAX_INCLUDE_DEPTH} deep")
                    theirs = resolve(other, (*stack, name))
                    depth[name] = max(depth[name], depth[other] + 1)
                    if key == "include":
                        out += theirs
                    else:
                        gone = {m for m, _ in theirs}
                        out = [(m, ln) for m, ln in out if m not in gone]
            seen: dict[str, int] = {}
            for m, ln in out:
                seen.setdefault(m, ln)
            resolved[name] = list(seen.items())
            return resolved[name]

        for name in self.lists:
            resolve(name, ())
        return resolved

    def _document(self) -> dict[str, Any]:
        for list_name, _iface, line in self.members:
            if list_name not in self.lists:
                raise self.fail(line, f"/interface list member add: list {list_name} is not added in this "
                                      f"script (add /interface list add name={list_name} before it)")
        members: dict[str, list[tuple[str, int]]] = {name: [] for name in self.lists}
        for list_name, iface, line in self.members:
            members[list_name].append((self._map(iface, line), line))
        resolved = self._resolve_lists(members)
        if self.interfaces is not None:
            names, line = self.interfaces
            mapped = [n if n in self.lists or n in BUILTIN_LISTS or not n else self._map(n, line) for n in names]
            self.traffic_flow["interfaces"] = mapped[0] if len(mapped) == 1 else mapped
        unused = sorted(set(self.interface_map) - self.used_maps)
        if unused:
            raise ConfigError(f"{self.source}: --map-interface {', '.join(unused)}: no such interface in the "
                              "script (a mapping names a RouterOS interface the script uses)")
        doc: dict[str, Any] = {}
        if self.traffic_flow:
            order = [k for k in TRAFFIC_FLOW_PROPS if k in self.traffic_flow]
            doc["traffic-flow"] = {k: self.traffic_flow[k] for k in order}
        if self.targets:
            doc["target"] = self.targets
        if self.ipfix:
            doc["ipfix"] = dict(self.ipfix)
        if self.lists:
            doc["interface-list"] = {}
            for name, lst in self.lists.items():
                doc["interface-list"][name] = [m for m, _ in resolved[name]]
                self.lines[("interface-list", name)] = lst.line
                for j, (_, line) in enumerate(resolved[name]):
                    self.lines[("interface-list", name, j)] = line
        return doc


def _first_lines(pairs: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Each name once, with the line it first appears on, in order."""
    out: dict[str, int] = {}
    for name, line in pairs:
        out.setdefault(name, line)
    return out


def _typed(name: str, value: str) -> Any:
    """A RouterOS value as the TOML document holds it: whole numbers of counting properties as integers
    (a number of more digits than any setting takes stays text, for the setting's check to refuse)."""
    if (name in INT_PROPS or name == "version") and value.isascii() and value.isdigit() and len(value) <= MAX_DIGITS:
        return int(value)
    return value


def _split_address(text: str) -> tuple[str, str | None]:
    """RouterOS 6 ``address=``: ``IP:PORT``, ``[IPv6]:PORT`` or a bare address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None


def parse_script(text: str, source: str = "<script>", interface_map: Mapping[str, str] | None = None,
                 ignore_other: bool = False) -> Imported:
    """A RouterOS script -> the settings document, its line numbers and warnings (ConfigError if it cannot)."""
    return _Importer(source, interface_map or {}, ignore_other).run(split_commands(text, source))


def load_script(path: str, interface_map: Mapping[str, str] | None = None, ignore_other: bool = False) -> Imported:
    """Read a RouterOS script: a regular file of at most 4M (``pyflow.files``)."""
    text = read_text(path, "the RouterOS script", MAX_SCRIPT_BYTES)
    return parse_script(text, path, interface_map, ignore_other)


def parse_interface_map(specs: Sequence[str]) -> dict[str, str]:
    """``--map-interface ether1=eth0`` (repeatable; one value may hold several, comma-separated)."""
    out: dict[str, str] = {}
    for spec in specs:
        for item in spec.split(","):
            ros, sep, linux = item.partition("=")
            ros, linux = ros.strip(), linux.strip()
            if not sep or not ros or not linux:
                raise ConfigError(f"--map-interface {spec!r}: expected ROUTEROS-NAME=LINUX-NAME, e.g. ether1=eth0")
            try:
                check_ifname(linux, "map-interface")
            except SettingError as exc:
                raise ConfigError(f"--map-interface {item!r}: {exc}") from None
            if ros in out and out[ros] != linux:
                raise ConfigError(f"--map-interface: {ros} is mapped twice ({out[ros]} and {linux})")
            out[ros] = linux
    return out


# --------------------------------------------------------------------------
# Printing settings as RouterOS does.
# --------------------------------------------------------------------------


def _aligned(rows: Sequence[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k.rjust(width)}: {v}" for k, v in rows]


def _table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str], str]]) -> list[str]:
    """RouterOS v7 print: a ``Columns:`` line, then ``#`` and the columns; rows are (flags, cells, comment)."""
    flag_width = max([len(f) for f, _, _ in rows] + [0])
    head = ["#", *columns]
    body = [[str(i), *cells] for i, (_, cells, _) in enumerate(rows)]
    widths = [max(len(r[c]) for r in [head, *body]) for c in range(len(head))]

    def fmt(cells: Sequence[str], flags: str) -> str:
        lead = cells[0].rjust(widths[0]) + (" " + flags.ljust(flag_width) if flag_width else "")
        rest = "  ".join(c.ljust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return f"{lead} {rest}".rstrip()

    out = [f"Columns: {', '.join(columns)}", fmt(head, "")]
    for (flags, _, comment), cells in zip(rows, body, strict=True):
        if comment:
            out.append(f"{' ' * (widths[0] + 1)};;; {visible(comment)}")
        out.append(fmt(cells, flags))
    return out


def settings_view(s: Settings) -> dict[str, Any]:
    """The settings as data, with RouterOS's names and pyflow's: what `pyflow status --json` answers,
    and the one source both renderings (`print_settings` here, `pyflow status`) print from."""
    out: dict[str, Any] = {"enabled": bool(s.enabled), "interfaces": list(s.interface_spec)}
    if tuple(s.interface_spec) != tuple(s.interfaces):
        out["interfaces-expanded"] = list(s.interfaces)
    out |= {"cache-entries": int(s.cache_entries),
            "active-flow-timeout": format_duration(s.active_flow_timeout_ns),
            "inactive-flow-timeout": format_duration(s.inactive_flow_timeout_ns),
            "packet-sampling": bool(s.packet_sampling), "sampling-interval": int(s.sampling_interval),
            "sampling-space": int(s.sampling_space),
            "ipfix": {name: format_bool(on) for name, on in s.ipfix.changes().items()},
            "sweep-interval": format_duration(s.sweep_interval_ns), "metrics-address": s.metrics_address or "",
            "xdp-mode": s.xdp_mode, "direction": s.direction, "hook": s.hook, "as-file": s.as_file or "",
            "control-socket": s.control_socket or "", "user": s.user or ""}
    options = [f"{o.name},direction={o.direction},hook={o.hook}" for o in s.interface_options]
    if options:
        out["interface-options"] = options
    return out


def traffic_flow_items(view: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``/ip traffic-flow print``'s lines of a settings view."""
    return [("enabled", format_bool(view.get("enabled", True))), ("interfaces", ",".join(view["interfaces"])),
            ("cache-entries", format_size(int(view["cache-entries"]))),
            ("active-flow-timeout", view["active-flow-timeout"]),
            ("inactive-flow-timeout", view["inactive-flow-timeout"]),
            ("packet-sampling", format_bool(view.get("packet-sampling", False))),
            ("sampling-interval", str(view.get("sampling-interval", 0))),
            ("sampling-space", str(view.get("sampling-space", 0)))]


def pyflow_items(view: Mapping[str, Any], as_prefixes: int | None = None) -> list[tuple[str, str]]:
    """pyflow's own settings' lines of a settings view (``as_prefixes``: the AS file's size, if read)."""
    as_file = visible(view.get("as-file") or "(none)") + ("" if as_prefixes is None else f" ({as_prefixes} prefixes)")
    return [("sweep-interval", view.get("sweep-interval", "")),
            ("metrics-address", visible(view.get("metrics-address", "")) or '""  (off)'),
            ("xdp-mode", view.get("xdp-mode", "auto")), ("direction", view.get("direction", "ingress")),
            ("hook", view.get("hook", "auto")), ("as-file", as_file),
            ("control-socket", visible(view.get("control-socket", "")) or '""  (off)'),
            ("user", visible(view.get("user", "")) or '""  (stays root)')]


def print_settings(s: Settings, as_prefixes: int | None = None) -> str:
    """The settings as RouterOS prints them, then pyflow's own (``as_prefixes``: the AS file's size, if read)."""
    view = settings_view(s)
    out = ["/ip traffic-flow print"]
    out += _aligned(traffic_flow_items(view))
    out += ["", "/ip traffic-flow target print"]
    targets = [("", t) for t in s.targets] + [("X", t) for t in s.disabled_targets]
    if targets:
        if s.disabled_targets:
            out.append("Flags: X - DISABLED")
        # RouterOS's columns as it prints them (version IPFIX in capitals, 0.0.0.0 for no src-address),
        # then what RouterOS shows only with `print detail`, then pyflow's own per-target settings
        out += _table(
            ["SRC-ADDRESS", "DST-ADDRESS", "PORT", "VERSION", "V9-TEMPLATE-REFRESH", "V9-TEMPLATE-TIMEOUT", "TIME",
             "MAX-RATE", "INTERFACE-NAMES", "SEQUENCE"],
            [(flags, [_src_address(t), t.dst_address, str(t.port), t.version.upper(), str(t.v9_template_refresh),
                      format_duration(t.v9_template_timeout_ns), t.time_mode, str(t.max_rate),
                      format_bool(t.interface_names), t.sequence], t.comment)
             for flags, t in targets],
        )
    else:
        out.append("(no targets)")
    out += ["", "/ip traffic-flow ipfix print"]
    out += _aligned([(name, format_bool(name in s.ipfix)) for name in TOGGLES])
    if s.interface_lists:
        out += ["", "/interface list member print"]
        rows = [("", [lst.name, m], "") for lst in s.interface_lists for m in lst.members]
        out += _table(["LIST", "INTERFACE"], rows) if rows else ["(no members)"]
    out += ["", "pyflow (its own settings)"]
    out += _aligned(pyflow_items(view, as_prefixes))
    out += analytics_lines(s)
    out += ["", "pyflow interfaces (what is metered, and how)"]
    names = list(s.interfaces) if s.interfaces != ("all",) else ["all"]
    names += [o.name for o in s.interface_options if o.name not in names]
    rows = []
    for name in names:
        o = s.options_for(name) if name != "all" else None
        rows.append(("", [name, o.direction if o else s.direction, o.hook if o else s.hook], ""))
    out += _table(["INTERFACE", "DIRECTION", "HOOK"], rows)
    return "\n".join(out) + "\n"


def analytics_lines(s: Settings) -> list[str]:
    """[analytics]: on or off, window, top N, and each signal's threshold and floor."""
    from pyflow.config import SIGNAL_DEFAULTS

    a = s.analytics
    out = ["", "pyflow analytics (traffic analytics on the metrics endpoint)"]
    out += _aligned([("enabled", format_bool(a.enabled)), ("window", format_duration(a.window_ns)),
                     ("top", str(a.top))])
    rows = [("", [name.replace("_", "-"), f"{a.threshold(name):g}", _num(a.floor(name)), SIGNAL_DEFAULTS[name][2]], "")
            for name, _ in a.thresholds]
    return out + _table(["SIGNAL", "THRESHOLD", "FLOOR", "FLOOR-UNIT"], rows)


def _num(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


def _src_address(t: TargetSettings) -> str:
    """As RouterOS prints an unset src-address: the unspecified address of the target's family."""
    if t.src_address:
        return t.src_address
    return "::" if t.family_is_v6 else "0.0.0.0"


def host_interfaces() -> set[str] | None:
    """Interface names of this host from /sys/class/net (no root, no netlink); None if unknown."""
    try:
        return set(os.listdir("/sys/class/net"))
    except OSError:
        return None
