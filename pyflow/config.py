"""One typed, frozen settings tree with RouterOS's names and defaults.

``/ip traffic-flow``        -> ``Settings``
``/ip traffic-flow target`` -> ``TargetSettings`` (any number)

Values are validated when the tree is built; every error names the setting
and the bad value (``ConfigError``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pyflow.errors import ConfigError
from pyflow.fields import ROUTEROS_DEFAULTS, FieldSet
from pyflow.units import format_duration, parse_duration_ns, parse_size

VERSIONS = ("1", "5", "9", "ipfix")
DEFAULT_PORT = 2055
DEFAULT_VERSION = "9"  # RouterOS's default for a new target
TIME_MODES = ("absolute", "routeros")


def normalize_version(text: str | int) -> str:
    v = str(text).strip().lower()
    if v in ("10", "ipfix"):
        return "ipfix"
    if v.startswith("v") and v[1:] in VERSIONS:
        v = v[1:]
    if v not in VERSIONS:
        raise ConfigError(f"version {text!r} is not one of 1, 5, 9, ipfix")
    return v


@dataclass(frozen=True)
class TargetSettings:
    """``/ip traffic-flow target``."""

    dst_address: str
    port: int = DEFAULT_PORT
    version: str = DEFAULT_VERSION
    src_address: str | None = None
    v9_template_refresh: int = 20  # export packets between template re-sends
    v9_template_timeout_ns: int = 30 * 60 * 10**9  # time between template re-sends
    # "absolute": flowStart/EndMilliseconds (152/153); "routeros": flowStart/EndSysUpTime
    # (22/21) plus systemInitTimeMilliseconds (160) in every record, as RouterOS sends
    time_mode: str = "absolute"

    def __post_init__(self) -> None:
        if self.time_mode not in TIME_MODES:
            raise ConfigError(f"target time mode {self.time_mode!r} is not one of {', '.join(TIME_MODES)}")
        try:
            ipaddress.ip_address(self.dst_address)
        except ValueError:
            raise ConfigError(f"target dst-address {self.dst_address!r} is not an IPv4 or IPv6 address") from None
        if self.src_address is not None:
            try:
                src = ipaddress.ip_address(self.src_address)
            except ValueError:
                raise ConfigError(f"target src-address {self.src_address!r} is not an IP address") from None
            if src.version != ipaddress.ip_address(self.dst_address).version:
                raise ConfigError(
                    f"target src-address {self.src_address} and dst-address {self.dst_address} "
                    "are of different IP versions"
                )
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"target port {self.port} is not between 1 and 65535")
        object.__setattr__(self, "version", normalize_version(self.version))
        if self.v9_template_refresh < 1:
            raise ConfigError(f"v9-template-refresh {self.v9_template_refresh} must be at least 1")
        if self.v9_template_timeout_ns <= 0:
            raise ConfigError("v9-template-timeout must be positive")

    @property
    def family_is_v6(self) -> bool:
        return ipaddress.ip_address(self.dst_address).version == 6

    def describe(self) -> str:
        host = f"[{self.dst_address}]" if self.family_is_v6 else self.dst_address
        return f"{host}:{self.port}/{self.version}"


def parse_target(text: str, default_version: str = DEFAULT_VERSION, **defaults: object) -> TargetSettings:
    """``HOST[:PORT][/VERSION][,name=value...]``; IPv6 as ``[2001:db8::1]:2055/ipfix``.

    Options use RouterOS's target property names: ``src-address``,
    ``v9-template-refresh``, ``v9-template-timeout``, and pyflow's ``time``
    (absolute or routeros).  ``defaults`` are TargetSettings fields the
    options override.
    """
    spec, *opts = text.strip().split(",")
    version = default_version
    if "/" in spec:
        spec, version = spec.rsplit("/", 1)
    port = DEFAULT_PORT
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep:
            raise ConfigError(f"target {text!r}: missing ']' after the IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"target {text!r}: expected ':PORT' after ']'")
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
            raise ConfigError(
                f"target {text!r}: unknown option {opt!r} (known: {', '.join(sorted(_TARGET_OPTIONS))}, as name=value)"
            )
        attr, conv = _TARGET_OPTIONS[name]
        fields[attr] = conv(name, value.strip())
    return TargetSettings(dst_address=host, port=port, version=version, **fields)  # type: ignore[arg-type]


def _int_option(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a whole number") from None


_TARGET_OPTIONS = {
    "src-address": ("src_address", lambda _n, v: v),
    "v9-template-refresh": ("v9_template_refresh", _int_option),
    "v9-template-timeout": ("v9_template_timeout_ns", lambda n, v: duration(n, v)),
    "time": ("time_mode", lambda _n, v: v),
}


def _port(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"target {whole!r}: port {text!r} is not a number") from None


DIRECTIONS = ("ingress", "egress", "both")
HOOKS = ("auto", "xdp", "tc")


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
        if not self.name or len(self.name) > 15 or "/" in self.name or any(c.isspace() for c in self.name):
            raise ConfigError(f"interface name {self.name!r} is not a Linux interface name (1-15 characters, "
                              "no '/' or spaces)")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"interface {self.name}: direction {self.direction!r} is not one of "
                              f"{', '.join(DIRECTIONS)}")
        if self.hook not in HOOKS:
            raise ConfigError(f"interface {self.name}: hook {self.hook!r} is not one of {', '.join(HOOKS)}")

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
            raise ConfigError(f"interface {text!r}: unknown option {opt!r} (known: direction=, hook=)")
        fields[key] = value.strip()
    return InterfaceOptions(name.strip(), **fields)


@dataclass(frozen=True)
class Settings:
    """``/ip traffic-flow`` plus pyflow's own knobs."""

    interfaces: tuple[str, ...] = ("all",)
    cache_entries: int = 64 * 1024
    active_flow_timeout_ns: int = 30 * 60 * 10**9
    inactive_flow_timeout_ns: int = 15 * 10**9
    targets: tuple[TargetSettings, ...] = field(default_factory=tuple)
    sweep_interval_ns: int = 10**9
    end_idle_ns: int = 2 * 10**9
    xdp_mode: str = "auto"
    metrics_address: str = "127.0.0.1:9796"  # Prometheus endpoint; "" = off
    # how interfaces are metered: the default for every interface, and per-interface overrides
    direction: str = "ingress"
    hook: str = "auto"
    interface_options: tuple[InterfaceOptions, ...] = ()
    as_file: str | None = None  # prefix-to-AS file for src/dst AS (RouterOS only has AS from BGP)
    # /ip traffic-flow ipfix: the fields the v9 and IPFIX templates carry (pyflow.fields)
    ipfix: FieldSet = ROUTEROS_DEFAULTS

    def __post_init__(self) -> None:
        if not isinstance(self.ipfix, FieldSet):
            raise ConfigError(f"ipfix fields must be a FieldSet (FieldSet.parse('ttl=no,...')), not {self.ipfix!r}")
        if self.metrics_address:
            _check_listen_address(self.metrics_address)
        if not self.interfaces:
            raise ConfigError("interfaces is empty: name interfaces or use 'all'")
        if not 16 <= self.cache_entries <= 64 * 1024 * 1024:
            raise ConfigError(f"cache-entries {self.cache_entries} is outside 16..64M")
        for name, ns in (("active-flow-timeout", self.active_flow_timeout_ns),
                         ("inactive-flow-timeout", self.inactive_flow_timeout_ns),
                         ("sweep-interval", self.sweep_interval_ns)):
            if ns < 10**8:
                raise ConfigError(f"{name} {format_duration(ns)} is too short (at least 100ms)")
        InterfaceOptions("default", self.direction, self.hook)  # validates both
        names = [o.name for o in self.interface_options]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"an interface is given twice: {', '.join(twice)}")
        if self.xdp_mode not in ("auto", "native", "generic"):
            raise ConfigError(f"xdp-mode {self.xdp_mode!r} is not auto, native or generic")
        # A FIN/RST flow ends after a short idle, never later than the inactive timeout.
        object.__setattr__(self, "end_idle_ns", min(self.end_idle_ns, self.inactive_flow_timeout_ns))


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
        raise ConfigError(
            f"metrics-address {text!r} is not HOST:PORT (e.g. 127.0.0.1:9796, [::1]:9796; \"\" turns it off)"
        ) from None


def duration(name: str, text: str | int | float) -> int:
    try:
        return parse_duration_ns(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def size(name: str, text: str | int) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
