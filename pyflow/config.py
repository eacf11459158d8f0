"""One typed, frozen settings tree with RouterOS's names and defaults.

``/ip traffic-flow``        -> ``Settings`` (``enabled``, ``interfaces``, ``cache-entries``,
                               the timeouts, ``packet-sampling``, ``sampling-interval``,
                               ``sampling-space``; plus pyflow's own knobs)
``/ip traffic-flow target`` -> ``TargetSettings`` (any number)
``/ip traffic-flow ipfix``  -> ``Settings.ipfix`` (``pyflow.fields.FieldSet``)
``/interface list``         -> ``InterfaceList`` (a name ``interfaces`` may use)

Values are validated when the tree is built; every error names the setting
and the bad value (``SettingError``, a ``ConfigError`` that also carries the
RouterOS name of the setting, so a config file loader can say on which line
of the file it was set).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyflow.errors import ConfigError
from pyflow.fields import ROUTEROS_DEFAULTS, FieldSet
from pyflow.paths import DEFAULT_SOCKET
from pyflow.text import cut
from pyflow.units import (
    format_duration,
    format_size,
    parse_bool,
    parse_count,
    parse_duration_ns,
    parse_int,
    parse_size,
)


class SettingError(ConfigError):
    """A bad value of one setting; ``key`` is its RouterOS name (``cache-entries``,
    ``target.1`` for the second target, ``interface.eth1``, ``interface-list.lan``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


#: Paced export: flow records a second one target sends at most (``max-rate``), chosen by
#: measurement so that nfcapd with its stock settings keeps every record of a 451k-flow
#: burst on the benchmark machine (docs/benchmarks.md, "Scale").
DEFAULT_MAX_RATE = 100_000
MAX_COUNT = 2**31 - 1  # counts (sampling, template refresh): a signed 32-bit integer, as RouterOS's
MAX_TIMEOUT_NS = 365 * 86400 * 10**9  # flow and template timeouts: at most 365d
MAX_SWEEP_NS = 3600 * 10**9  # sweep-interval: at most 1h
MIN_TIMEOUT_NS = 10**8  # 100ms
MIN_CACHE_ENTRIES, MAX_CACHE_ENTRIES = 16, 64 * 1024 * 1024

VERSIONS = ("1", "5", "9", "ipfix")
DEFAULT_PORT = 2055
DEFAULT_VERSION = "9"  # RouterOS's default for a new target
TIME_MODES = ("absolute", "routeros")
SEQUENCE_RULES = ("flows", "rfc")  # what an IPFIX target's sequence number counts (export.ipfix)


def normalize_version(text: str | int) -> str:
    v = str(text).strip().lower()
    if v in ("10", "ipfix"):
        return "ipfix"
    if v.startswith("v") and v[1:] in VERSIONS:
        v = v[1:]
    if v not in VERSIONS:
        shown = repr(cut(text)) if isinstance(text, str) else repr(text)
        raise ConfigError(f"version {shown} is not one of 1, 5, 9, ipfix")
    return v


def _check_int(key: str, value: object, lo: int, hi: int, what: str = "") -> int:
    """``value`` must be an int (not a bool) in lo..hi; the error names ``key``."""
    name = what or key
    if type(value) is not int:
        raise SettingError(key, f"{name} {value!r} is not a whole number")
    if not lo <= value <= hi:
        raise SettingError(key, f"{name} {value} is outside {lo}..{hi}")
    return value


def _check_duration(key: str, ns: object, lo: int, hi: int) -> None:
    if type(ns) is not int:
        raise SettingError(key, f"{key} {ns!r} is not a duration")
    if ns < lo:
        raise SettingError(key, f"{key} {format_duration(ns)} is too short (at least {format_duration(lo)})")
    if ns > hi:
        raise SettingError(key, f"{key} {format_duration(ns)} is too long (at most {format_duration(hi)})")


def _check_bool(key: str, value: object) -> None:
    if type(value) is not bool:
        raise SettingError(key, f"{key} {value!r} is not yes or no")


def _check_address(key: str, value: object, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(value, str):
        raise SettingError(key, f"{what} {value!r} is not an IPv4 or IPv6 address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        hint = " (a placeholder: put the collector's address here)" if value.startswith("<") else ""
        raise SettingError(key, f"{what} {value!r} is not an IPv4 or IPv6 address{hint}") from None


@dataclass(frozen=True)
class TargetSettings:
    """``/ip traffic-flow target``.  Errors are ``SettingError`` keyed by the property name."""

    dst_address: str
    port: int = DEFAULT_PORT
    version: str = DEFAULT_VERSION
    src_address: str | None = None
    v9_template_refresh: int = 20  # export packets between template re-sends
    v9_template_timeout_ns: int = 30 * 60 * 10**9  # time between template re-sends
    # "absolute": flowStart/EndMilliseconds (152/153); "routeros": flowStart/EndSysUpTime
    # (22/21) plus systemInitTimeMilliseconds (160) in every record, as RouterOS sends
    time_mode: str = "absolute"
    comment: str = ""  # RouterOS's comment= (shown by check; not sent anywhere)
    # pyflow's own: flow records a second at most (paced export; 0 = as fast as the socket takes them)
    max_rate: int = DEFAULT_MAX_RATE
    # pyflow's own (v9/IPFIX): send interface-name options records with the templates
    interface_names: bool = False
    # pyflow's own (IPFIX): what the sequence number counts: "flows" (flow records, as nfdump
    # checks) or "rfc" (every data record, options too, as RFC 7011 and Wireshark); the same
    # numbers as long as no options records are sent
    sequence: str = "flows"

    def __post_init__(self) -> None:
        if self.time_mode not in TIME_MODES:
            raise SettingError("time", f"target time mode {self.time_mode!r} is not one of {', '.join(TIME_MODES)}")
        dst = _check_address("dst-address", self.dst_address, "target dst-address")
        if dst.is_unspecified:
            raise SettingError("dst-address", f"target dst-address {self.dst_address} is not a collector's address")
        if self.src_address is not None:
            src = _check_address("src-address", self.src_address, "target src-address")
            if src.version != dst.version:
                raise SettingError(
                    "src-address",
                    f"target src-address {self.src_address} and dst-address {self.dst_address} "
                    "are of different IP versions",
                )
        if type(self.port) is not int:
            raise SettingError("port", f"target port {self.port!r} is not a number")
        if not 1 <= self.port <= 65535:
            raise SettingError("port", f"target port {self.port} is not between 1 and 65535")
        if not isinstance(self.version, str | int) or isinstance(self.version, bool):
            raise SettingError("version", f"target version {self.version!r} is not one of 1, 5, 9, ipfix")
        try:
            object.__setattr__(self, "version", normalize_version(self.version))
        except ConfigError as exc:
            raise SettingError("version", f"target {exc}") from None
        _check_int("v9-template-refresh", self.v9_template_refresh, 1, MAX_COUNT)
        _check_duration("v9-template-timeout", self.v9_template_timeout_ns, MIN_TIMEOUT_NS, MAX_TIMEOUT_NS)
        _check_int("max-rate", self.max_rate, 0, MAX_COUNT)
        _check_bool("interface-names", self.interface_names)
        if self.sequence not in SEQUENCE_RULES:
            raise SettingError("sequence", f"target sequence {self.sequence!r} is not one of "
                                           f"{', '.join(SEQUENCE_RULES)}")
        if not isinstance(self.comment, str):
            raise SettingError("comment", f"target comment {self.comment!r} is not text")

    @property
    def family_is_v6(self) -> bool:
        return ipaddress.ip_address(self.dst_address).version == 6

    @property
    def endpoint(self) -> tuple[str, int]:
        """(dst-address, port), compressed: two targets may not share it."""
        return str(ipaddress.ip_address(self.dst_address)), self.port

    def describe(self) -> str:
        host = f"[{self.dst_address}]" if self.family_is_v6 else self.dst_address
        return f"{host}:{self.port}/{self.version}"


def parse_target(text: str, default_version: str = DEFAULT_VERSION, **defaults: object) -> TargetSettings:
    """``HOST[:PORT][/VERSION][,name=value...]``; IPv6 as ``[2001:db8::1]:2055/ipfix``.

    Options use RouterOS's target property names: ``src-address``,
    ``v9-template-refresh``, ``v9-template-timeout``, and pyflow's ``time``
    (absolute or routeros), ``max-rate`` (records a second, 0 = unpaced),
    ``interface-names`` (yes/no) and ``sequence`` (flows or rfc).  ``defaults``
    are TargetSettings fields the options override.
    """
    spec, *opts = text.strip().split(",")
    version = default_version
    if "/" in spec:
        spec, version = spec.rsplit("/", 1)
    port = DEFAULT_PORT
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep:
            raise ConfigError(f"target {cut(text)!r}: missing ']' after the IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"target {cut(text)!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        port = _port(p, text)
    else:
        host = spec  # IPv4 without port, or a bare IPv6 address
    fields: dict[str, object] = dict(defaults)
    for opt in opts:
        name, sep, value = opt.partition("=")
        name = name.strip()
        if not sep or name not in _TARGET_OPTIONS:
            known = ", ".join(sorted(_TARGET_OPTIONS))
            raise ConfigError(f"target {cut(text)!r}: unknown option {cut(opt)!r} (known: {known}, as name=value)")
        attr, conv = _TARGET_OPTIONS[name]
        fields[attr] = conv(name, value.strip())
    return TargetSettings(dst_address=host, port=port, version=version, **fields)  # type: ignore[arg-type]


def _int_option(name: str, text: str) -> int:
    try:
        return parse_int(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


_TARGET_OPTIONS = {
    "src-address": ("src_address", lambda _n, v: v),
    "v9-template-refresh": ("v9_template_refresh", _int_option),
    "v9-template-timeout": ("v9_template_timeout_ns", lambda n, v: duration(n, v)),
    "time": ("time_mode", lambda _n, v: v),
    "max-rate": ("max_rate", _int_option),
    "interface-names": ("interface_names", lambda n, v: yes_no(n, v)),
    "sequence": ("sequence", lambda _n, v: v),
}


def _port(text: str, whole: str) -> int:
    try:
        return parse_int(text)
    except ValueError as exc:
        raise ConfigError(f"target {cut(whole)!r}: port {exc}") from None


DIRECTIONS = ("ingress", "egress", "both")
HOOKS = ("auto", "xdp", "tc")
# RouterOS's built-in interface lists: only ``all`` means something on a Linux host
BUILTIN_LISTS = ("all", "none", "dynamic", "static")


IFNAMSIZ = 16  # the kernel's buffer for an interface name, its NUL included


def check_ifname(name: object, key: str, what: str = "interface name") -> str:
    """A Linux interface name as the kernel takes it (``dev_valid_name``): 1 to IFNAMSIZ-1 = 15
    characters, not ``.`` or ``..``, no '/', ':' or white space; pyflow also refuses ',' (its list
    separator) and anything but printable ASCII, so a name is safe to show on a terminal."""
    if (not isinstance(name, str) or not name or len(name) > IFNAMSIZ - 1 or name in (".", "..")
            or any(not "!" <= c <= "~" or c in "/:," for c in name)):
        shown = repr(cut(name)) if isinstance(name, str) else repr(name)
        raise SettingError(key, f"{what} {shown} is not a Linux interface name (1-{IFNAMSIZ - 1} printable ASCII "
                                "characters, no '/', ':', ',' or spaces)")
    return name


@dataclass(frozen=True)
class InterfaceOptions:
    """How one interface is metered (pyflow's own knobs; RouterOS has no equivalent).

    ``direction``: what to meter, the packets the interface receives
    (``ingress``, RouterOS's behaviour and the default), sends (``egress``,
    TC), or both.  ``hook`` for the receive side: ``xdp``, ``tc`` (clsact
    ingress), or ``auto`` (XDP, and TC where XDP cannot attach).
    """

    name: str
    direction: str = "ingress"
    hook: str = "auto"

    def __post_init__(self) -> None:
        check_ifname(self.name, "name")
        if self.direction not in DIRECTIONS:
            raise SettingError("direction", f"interface {self.name}: direction {self.direction!r} is not one of "
                                            f"{', '.join(DIRECTIONS)}")
        if self.hook not in HOOKS:
            raise SettingError("hook", f"interface {self.name}: hook {self.hook!r} is not one of {', '.join(HOOKS)}")

    @property
    def ingress(self) -> bool:
        return self.direction in ("ingress", "both")

    @property
    def egress(self) -> bool:
        return self.direction in ("egress", "both")


def parse_interface(text: str, direction: str = "ingress", hook: str = "auto") -> InterfaceOptions:
    """``NAME[,direction=ingress|egress|both][,hook=auto|xdp|tc]``."""
    name, *opts = text.strip().split(",")
    fields = {"direction": direction, "hook": hook}
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"interface {cut(text)!r}: unknown option {cut(opt)!r} (known: direction=, hook=)")
        fields[key] = value.strip()
    return InterfaceOptions(name.strip(), **fields)


@dataclass(frozen=True)
class InterfaceList:
    """``/interface list`` with its ``/interface list member`` entries (Linux names)."""

    name: str
    members: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or any(not " " <= c <= "~" or c == ","
                                                                           for c in self.name):
            shown = repr(cut(self.name)) if isinstance(self.name, str) else repr(self.name)
            raise SettingError("interface-list", f"interface list name {shown} is empty, or has a ',' or a "
                                                 "character that is not printable ASCII")
        key = f"interface-list.{self.name}"
        if self.name in BUILTIN_LISTS:
            raise SettingError(key, f"interface list name {self.name!r} is one of RouterOS's built-in lists "
                                    f"({', '.join(BUILTIN_LISTS)})")
        if not isinstance(self.members, tuple):
            object.__setattr__(self, "members", tuple(self.members))
        for m in self.members:
            check_ifname(m, key, f"interface list {self.name}: member")
        twice = sorted(m for m, n in Counter(self.members).items() if n > 1)
        if twice:
            raise SettingError(key, f"interface list {self.name}: member {', '.join(twice)} is given twice")


#: what `user` may be: a POSIX portable user name (useradd's default rule)
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _default_control_socket() -> str:
    return DEFAULT_SOCKET  # one per network namespace, see pyflow.paths


@dataclass(frozen=True)
class Settings:
    """``/ip traffic-flow`` plus pyflow's own knobs.

    ``interfaces`` may name interfaces, interface lists (``interface_lists``)
    or be ``("all",)``.  Lists are expanded when the tree is built, so
    ``interfaces`` is always what is metered: Linux names, or ``("all",)``;
    ``interface_spec`` keeps what was written (``("flow-interfaces",)``) for
    printing.  ``dataclasses.replace`` works as expected: a new ``interfaces``
    gets a new spec.
    """

    interfaces: tuple[str, ...] = ("all",)
    cache_entries: int = 64 * 1024
    active_flow_timeout_ns: int = 30 * 60 * 10**9
    inactive_flow_timeout_ns: int = 15 * 10**9
    targets: tuple[TargetSettings, ...] = field(default_factory=tuple)
    sweep_interval_ns: int = 10 * 10**9
    end_idle_ns: int = 2 * 10**9
    xdp_mode: str = "auto"
    metrics_address: str = "127.0.0.1:9796"  # Prometheus endpoint; "" = off
    # how interfaces are metered: the default for every interface, and per-interface overrides
    direction: str = "ingress"
    hook: str = "auto"
    interface_options: tuple[InterfaceOptions, ...] = ()
    as_file: str | None = None  # prefix-to-AS file for src/dst AS (RouterOS only has AS from BGP)
    # where `pyflow status/flows/top` reach the running agent; "" = no control socket
    control_socket: str = field(default_factory=_default_control_socket)
    # the unprivileged user `pyflow run` becomes after its privileged start; "" = stay uid 0
    # (with only the capabilities it uses either way; see docs/security.md)
    user: str = ""
    # /ip traffic-flow ipfix: the fields the v9 and IPFIX templates carry (pyflow.fields)
    ipfix: FieldSet = ROUTEROS_DEFAULTS
    # RouterOS's master switch (default no).  `pyflow run` refuses to start with enabled=no;
    # with command-line flags alone, running pyflow is the switch (pyflow.cli).
    enabled: bool = False
    # RouterOS packet sampling: sampling-interval packets sampled, then sampling-space packets
    # skipped (space 0: one packet in sampling-interval); only with packet-sampling=yes
    packet_sampling: bool = False
    sampling_interval: int = 0
    sampling_space: int = 0
    interface_lists: tuple[InterfaceList, ...] = ()
    interface_spec: tuple[str, ...] = ()  # ``interfaces`` as written (may name lists); () = the same
    disabled_targets: tuple[TargetSettings, ...] = ()  # target entries with disabled=yes: kept, not used
    analytics: AnalyticsSettings = field(default_factory=lambda: AnalyticsSettings())  # [analytics]

    def __post_init__(self) -> None:
        for key in ("enabled", "packet-sampling"):
            _check_bool(key, getattr(self, key.replace("-", "_")))
        if not isinstance(self.ipfix, FieldSet):
            raise SettingError("ipfix", f"ipfix fields must be a FieldSet (FieldSet.parse('ttl=no,...')), "
                                        f"not {self.ipfix!r}")
        if not isinstance(self.metrics_address, str):
            raise SettingError("metrics-address", f"metrics-address {self.metrics_address!r} is not text")
        if self.metrics_address:
            _check_listen_address(self.metrics_address)
        sock = self.control_socket
        if not isinstance(sock, str) or (sock and not sock.startswith("/")):
            raise SettingError("control-socket", f"control-socket {self.control_socket!r} is not an absolute path "
                                                 "('' turns it off)")
        if not isinstance(self.user, str) or (self.user and not USER_NAME.fullmatch(self.user)):
            raise SettingError("user", f"user {self.user!r} is not a user name (letters, digits, _ and -, "
                                       "not starting with a digit or -; '' keeps root)")
        if self.as_file is not None and (not isinstance(self.as_file, str) or not self.as_file):
            raise SettingError("as-file", f"as-file {self.as_file!r} is not a file name")
        self._expand_interfaces()
        if type(self.cache_entries) is not int:
            raise SettingError("cache-entries", f"cache-entries {self.cache_entries!r} is not a whole number")
        if not MIN_CACHE_ENTRIES <= self.cache_entries <= MAX_CACHE_ENTRIES:
            raise SettingError("cache-entries", f"cache-entries {format_size(self.cache_entries)} is outside "
                                                f"{format_size(MIN_CACHE_ENTRIES)}..{format_size(MAX_CACHE_ENTRIES)}")
        _check_duration("active-flow-timeout", self.active_flow_timeout_ns, MIN_TIMEOUT_NS, MAX_TIMEOUT_NS)
        _check_duration("inactive-flow-timeout", self.inactive_flow_timeout_ns, MIN_TIMEOUT_NS, MAX_TIMEOUT_NS)
        _check_duration("sweep-interval", self.sweep_interval_ns, MIN_TIMEOUT_NS, MAX_SWEEP_NS)
        self._check_sampling()
        self._check_targets()
        if self.direction not in DIRECTIONS:
            raise SettingError("direction", f"direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if self.hook not in HOOKS:
            raise SettingError("hook", f"hook {self.hook!r} is not one of {', '.join(HOOKS)}")
        if not isinstance(self.interface_options, tuple):
            object.__setattr__(self, "interface_options", tuple(self.interface_options))
        twice = sorted(n for n, k in Counter(o.name for o in self.interface_options).items() if k > 1)
        if twice:
            raise SettingError(f"interface.{twice[0]}", f"an interface is given twice: {', '.join(twice)}")
        if self.interfaces != ("all",):
            metered = set(self.interfaces)
            for o in self.interface_options:
                if o.name not in metered:
                    raise SettingError(f"interface.{o.name}",
                                       f"interface {o.name} has options but is not metered "
                                       f"(interfaces: {','.join(self.interfaces)})")
        if self.xdp_mode not in ("auto", "native", "generic"):
            raise SettingError("xdp-mode", f"xdp-mode {self.xdp_mode!r} is not auto, native or generic")
        _check_duration("end-idle", self.end_idle_ns, 1, MAX_TIMEOUT_NS)
        # A FIN/RST flow ends after a short idle, never later than the inactive timeout.
        object.__setattr__(self, "end_idle_ns", min(self.end_idle_ns, self.inactive_flow_timeout_ns))

    def _expand_interfaces(self) -> None:
        if isinstance(self.interfaces, str) or not isinstance(self.interfaces, tuple | list):
            raise SettingError("interfaces", f"interfaces {self.interfaces!r} is not a list of names")
        lists: dict[str, InterfaceList] = {}
        for lst in self.interface_lists:
            if not isinstance(lst, InterfaceList):
                raise SettingError("interface-list", f"interface list {lst!r} is not an InterfaceList")
            if lst.name in lists:
                raise SettingError(f"interface-list.{lst.name}", f"interface list {lst.name} is defined twice")
            lists[lst.name] = lst
        object.__setattr__(self, "interface_lists", tuple(lists.values()))
        written = tuple(self.interfaces)
        expanded = self.expand(written)
        spec = tuple(self.interface_spec)
        if not spec or self.expand(spec) != expanded:
            spec = written
        object.__setattr__(self, "interfaces", expanded)
        object.__setattr__(self, "interface_spec", spec)

    def expand(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """Interface names, list names or ``all`` -> the Linux names to meter, or ``("all",)``."""
        if not names:
            raise SettingError("interfaces", "interfaces is empty: name interfaces or interface lists, or use all")
        lists = {lst.name: lst for lst in self.interface_lists}
        out: list[str] = []
        for name in names:
            if not isinstance(name, str):
                raise SettingError("interfaces", f"interfaces: {name!r} is not a name")
            if name in lists:
                if not lists[name].members:
                    raise SettingError("interfaces", f"interfaces: interface list {name} has no members")
                out.extend(lists[name].members)
            elif name == "all":
                if len(names) > 1:
                    raise SettingError("interfaces", "interfaces: all cannot be combined with other names")
                return ("all",)
            elif name in BUILTIN_LISTS:
                raise SettingError("interfaces", f"interfaces: RouterOS's built-in list {name!r} has no meaning "
                                                 "on a Linux host: name the interfaces, or use all")
            else:
                check_ifname(name, "interfaces", "interfaces: interface name")
                out.append(name)
        return tuple(dict.fromkeys(out))

    def _check_sampling(self) -> None:
        _check_int("sampling-interval", self.sampling_interval, 0, MAX_COUNT)
        _check_int("sampling-space", self.sampling_space, 0, MAX_COUNT)
        if self.packet_sampling and self.sampling_space and not self.sampling_interval:
            raise SettingError("sampling-space", f"sampling-space={self.sampling_space} needs a sampling-interval "
                                                 "(the packets sampled before sampling-space packets are skipped)")
        if self.packet_sampling and self.sampling_interval < 1:
            raise SettingError("packet-sampling", "packet-sampling=yes needs sampling-interval=N (N >= 1: "
                                                  "N packets sampled, then sampling-space packets skipped)")

    def _check_targets(self) -> None:
        for attr in ("targets", "disabled_targets"):
            value = getattr(self, attr)
            if not isinstance(value, tuple | list) or not all(isinstance(t, TargetSettings) for t in value):
                raise SettingError("target", f"{attr} {value!r} is not a list of TargetSettings")
            object.__setattr__(self, attr, tuple(value))
        seen: dict[tuple[str, int], int] = {}
        for i, t in enumerate(self.targets + self.disabled_targets):
            if t.endpoint in seen:
                host = f"[{t.endpoint[0]}]" if t.family_is_v6 else t.endpoint[0]
                raise SettingError(f"target.{i}", f"target {host}:{t.port} is given twice "
                                                  f"(targets {seen[t.endpoint]} and {i}): each target needs its "
                                                  "own dst-address and port")
            seen[t.endpoint] = i

    def warnings(self) -> list[str]:
        """What these valid settings keep but do not do (RouterOS accepts them the same way)."""
        out = []
        if not self.packet_sampling and (self.sampling_interval or self.sampling_space):
            out.append(f"sampling-interval={self.sampling_interval} sampling-space={self.sampling_space} are kept "
                       "but not applied: packet-sampling=no (every packet is metered; set packet-sampling=yes "
                       "to sample)")
        return out

    @property
    def sampling(self) -> tuple[int, int]:
        """(sampling-interval, sampling-space) the kernel applies; (0, 0) = every packet."""
        if not self.packet_sampling:
            return (0, 0)
        return (self.sampling_interval, self.sampling_space)

    def options_for(self, name: str) -> InterfaceOptions:
        """How ``name`` is metered: its own options, or the defaults."""
        for o in self.interface_options:
            if o.name == name:
                return o
        return InterfaceOptions(name, self.direction, self.hook)


def _check_listen_address(text: str) -> None:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not host:
            raise ValueError
        ipaddress.ip_address(host)
        if not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise SettingError(
            "metrics-address",
            f"metrics-address {cut(text)!r} is not HOST:PORT (e.g. 127.0.0.1:9796, [::1]:9796; \"\" turns it off)",
        ) from None


# Value parsers for one setting: RouterOS syntax in, a typed value out, errors naming the setting.

T = TypeVar("T")


def _parsed(name: str, parse: Callable[[Any], T], text: object) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        raise SettingError(name, f"{name}: {exc}") from None


def duration(name: str, text: str | int | float) -> int:
    """``30m``, ``15s``, ``1h30m``, ``00:30:00`` (or a number of seconds) -> nanoseconds."""
    return _parsed(name, parse_duration_ns, text)


def size(name: str, text: str | int) -> int:
    """``64k``, ``1M`` or a whole number."""
    return _parsed(name, parse_size, text)


def count(name: str, text: str | int) -> int:
    """A whole number, written as RouterOS does (``20``) or as a TOML integer."""
    return _parsed(name, parse_count, text)


def yes_no(name: str, text: str | bool) -> bool:
    """RouterOS ``yes``/``no`` (or true/false, or a TOML boolean)."""
    return _parsed(name, parse_bool, text)


# --------------------------------------------------------------------------
# [analytics]: traffic analytics on the metrics endpoint (pyflow.analytics)
# --------------------------------------------------------------------------

#: The five anomaly signals, in the order they are printed; each has a score threshold and a floor.
SIGNALS = ("flow_rate", "many_sources_low_bytes", "single_source_rate", "icmp_flows",
           "short_flows_many_destinations")
#: Per signal: (default score threshold, default floor, the floor's unit).  The floors are absolute
#: values of the signal itself, below which it never fires however unusual (a quiet host).
SIGNAL_DEFAULTS: dict[str, tuple[float, float, str]] = {
    "flow_rate": (6.0, 100.0, "flows/s"),
    "many_sources_low_bytes": (6.0, 50.0, "sources/s"),
    "single_source_rate": (6.0, 10_000_000.0, "bytes/s"),
    "icmp_flows": (6.0, 20.0, "flows/s"),
    "short_flows_many_destinations": (6.0, 20.0, "destinations/s"),
}
MIN_ANALYTICS_WINDOW_NS, MAX_ANALYTICS_WINDOW_NS = 10 * 10**9, 5 * 60 * 10**9
MAX_ANALYTICS_TOP = 100


def _number(key: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0 \
            or value == float("inf"):
        raise SettingError(key, f"{what} {value!r} is not a number >= 0")
    return float(value)


@dataclass(frozen=True)
class AnalyticsSettings:
    """``[analytics]``: on or off, the sliding window and top N of the talker metrics, and each
    signal's score threshold and floor (``thresholds``/``floors``: signal -> value; a signal
    left out has its default, SIGNAL_DEFAULTS)."""

    enabled: bool = True
    window_ns: int = 60 * 10**9
    top: int = 10
    thresholds: tuple[tuple[str, float], ...] = ()
    floors: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        _check_bool("analytics.enabled", self.enabled)
        w, lo, hi = self.window_ns, MIN_ANALYTICS_WINDOW_NS, MAX_ANALYTICS_WINDOW_NS
        if type(w) is not int:
            raise SettingError("analytics.window", f"analytics window {w!r} is not a duration")
        if not lo <= w <= hi:
            raise SettingError("analytics.window", f"analytics window {format_duration(w)} is outside "
                                                   f"{format_duration(lo)}..{format_duration(hi)}")
        _check_int("analytics.top", self.top, 1, MAX_ANALYTICS_TOP, "analytics top")
        for attr, what in (("thresholds", "threshold"), ("floors", "floor")):
            given = dict(getattr(self, attr))
            for name, value in given.items():
                if name not in SIGNALS:
                    raise SettingError(f"analytics.{name.replace('_', '-')}-{what}",
                                       f"unknown signal {name!r} (known: {', '.join(SIGNALS)})")
                _number(f"analytics.{name.replace('_', '-')}-{what}", value, f"{name} {what}")
            col = 0 if what == "threshold" else 1
            full = tuple((s, float(given.get(s, SIGNAL_DEFAULTS[s][col]))) for s in SIGNALS)
            object.__setattr__(self, attr, full)

    def threshold(self, signal: str) -> float:
        return dict(self.thresholds)[signal]

    def floor(self, signal: str) -> float:
        return dict(self.floors)[signal]


def signal_values(name: str, text: str) -> dict[str, float]:
    """``flow_rate=8,icmp-flows=50`` (a flag's value) -> {signal: number}."""
    out: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",")):
        sig, sep, value = item.partition("=")
        sig = sig.strip().replace("-", "_")
        if not sep or sig not in SIGNALS:
            raise SettingError(name, f"{name}: {item!r} is not SIGNAL=NUMBER (signals: {', '.join(SIGNALS)})")
        try:
            out[sig] = _number(name, float(value), f"{name} {sig}")
        except ValueError:
            raise SettingError(name, f"{name}: {value!r} is not a number (in {item!r})") from None
    return out
