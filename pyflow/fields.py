"""Which fields a flow record carries: RouterOS's ``/ip traffic-flow ipfix`` toggles.

:data:`FIELDS` is the one table.  Each row is a toggle (RouterOS's name, or
pyflow's own for the two fields RouterOS has no toggle for) and the
information elements it adds to the IPv4 and to the IPv6 flow template,
by IANA name (``pyflow.export.ie``).  The *row order is the wire order*:
a template is the IEs of the enabled rows, top to bottom, so any field set
gives a stable layout with no per-template field lists anywhere.

The order starts as RouterOS 6.39.2's template (flow-protocols.md §5.2:
60, 22, 21, 2, 1, 7, 11, 10, 14, 4, 6, 8, 12, 15, 225, 226; with 160 right
after 22/21 as RouterOS v7 sends it, §5.3), then the fields 6.39.2 did not
send, grouped by layer: ToS and routing (masks, AS), link (MACs, VLAN), IP
(TTL, lengths), transport (TCP, UDP, ICMP, IGMP), IPv6 flow label,
multicast, and pyflow's flowDirection and flowEndReason last.

Three rows have no fixed IE: ``first-forwarded``, ``last-forwarded`` and
``sys-init-time`` name the *time roles* :data:`START_TIME`,
:data:`END_TIME` and :data:`SYSTEM_INIT_TIME`, which the export time mode
resolves (``pyflow.export.templates.TIME_MODES``: flowStart/EndMilliseconds
152/153 in absolute mode, flowStart/EndSysUpTime 22/21 in the uptime
modes; 160 only where the times are uptimes).

``nat-events`` adds nothing to the flow templates: it switches on the NAT
event templates (natEvent 230 with the pre- and post-NAT tuple), which carry
the records whose ``nat_event`` is not 0.

Rows of kind :attr:`Kind.ALWAYS` (ipVersion, flowDirection, flowEndReason)
are not toggles: every pyflow template has them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from pyflow.errors import ConfigError
from pyflow.units import parse_bool

# Time roles: placeholders the export time mode turns into IEs.
START_TIME = "@flow-start"
END_TIME = "@flow-end"
SYSTEM_INIT_TIME = "@system-init"
TIME_ROLES = frozenset({START_TIME, END_TIME, SYSTEM_INIT_TIME})


class Kind(enum.StrEnum):
    """Where a row comes from."""

    ROUTEROS = "routeros"  # a RouterOS ``/ip traffic-flow ipfix`` toggle, same name and default
    PYFLOW = "pyflow"  # pyflow's own toggle (RouterOS has none for this field)
    ALWAYS = "always"  # in every template, not a toggle


@dataclass(frozen=True, slots=True)
class Field:
    """One row: a toggle and the IEs it adds to the IPv4 and the IPv6 flow template, in wire order."""

    name: str
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    kind: Kind = Kind.ROUTEROS
    default: bool = True

    def ies(self, ip_version: int) -> tuple[str, ...]:
        """The IE names (or time roles) this row adds to the template of ``ip_version``."""
        if ip_version == 4:
            return self.ipv4
        if ip_version == 6:
            return self.ipv6
        raise ValueError(f"no flow template for IP version {ip_version}")


def _both(name: str, *ies: str, kind: Kind = Kind.ROUTEROS, default: bool = True) -> Field:
    """A row adding the same IEs to both templates."""
    return Field(name, ies, ies, kind, default)


def _each(name: str, ipv4: tuple[str, ...], ipv6: tuple[str, ...], default: bool = True) -> Field:
    """A RouterOS row with different IEs per IP version (an empty tuple: not in that template)."""
    return Field(name, ipv4, ipv6, Kind.ROUTEROS, default)


FIELDS: tuple[Field, ...] = (
    _both("ip-version", "ipVersion", kind=Kind.ALWAYS),
    _both("first-forwarded", START_TIME),
    _both("last-forwarded", END_TIME),
    _both("sys-init-time", SYSTEM_INIT_TIME),
    _both("packets", "packetDeltaCount"),
    _both("bytes", "octetDeltaCount"),
    _both("src-port", "sourceTransportPort"),
    _both("dst-port", "destinationTransportPort"),
    _both("in-interface", "ingressInterface"),
    _both("out-interface", "egressInterface"),
    _both("protocol", "protocolIdentifier"),
    _both("tcp-flags", "tcpControlBits"),
    _each("src-address", ("sourceIPv4Address",), ("sourceIPv6Address",)),
    _each("dst-address", ("destinationIPv4Address",), ("destinationIPv6Address",)),
    _each("gateway", ("ipNextHopIPv4Address",), ("ipNextHopIPv6Address",)),
    _each("nat-src-address", ("postNATSourceIPv4Address",), ("postNATSourceIPv6Address",)),
    _each("nat-dst-address", ("postNATDestinationIPv4Address",), ("postNATDestinationIPv6Address",)),
    _both("nat-src-port", "postNAPTSourceTransportPort"),
    _both("nat-dst-port", "postNAPTDestinationTransportPort"),
    _both("tos", "ipClassOfService"),
    _each("src-address-mask", ("sourceIPv4PrefixLength",), ("sourceIPv6PrefixLength",)),
    _each("dst-address-mask", ("destinationIPv4PrefixLength",), ("destinationIPv6PrefixLength",)),
    # pyflow: BGP AS numbers from an optional prefix-to-AS file (0 without one). RouterOS has
    # no IPFIX toggle for them (it sends AS only in v5, as 0). On by default so that an AS file
    # shows up without a second setting; as=no saves the 8 bytes per record.
    _both("as", "bgpSourceAsNumber", "bgpDestinationAsNumber", kind=Kind.PYFLOW),
    _both("src-mac-address", "sourceMacAddress"),
    _both("dst-mac-address", "destinationMacAddress"),
    # pyflow: the outer 802.1Q/802.1ad VLAN id the kernel parses anyway (0 = untagged), and
    # for QinQ the inner (customer) one (off by default: most hosts see no QinQ; both ids are
    # part of the flow key either way).
    _both("vlan-id", "vlanId", kind=Kind.PYFLOW),
    _both("inner-vlan-id", "dot1qCustomerVlanId", kind=Kind.PYFLOW, default=False),
    _both("ttl", "minimumTTL", "maximumTTL"),
    _both("ip-total-length", "minimumIpTotalLength", "maximumIpTotalLength"),
    _both("ip-header-length", "ipHeaderLength"),
    _both("tcp-seq-num", "tcpSequenceNumber"),
    _both("tcp-ack-num", "tcpAcknowledgementNumber"),
    _both("tcp-window-size", "tcpWindowSize"),
    _both("udp-length", "udpMessageLength"),
    _each("icmp-type", ("icmpTypeIPv4",), ("icmpTypeIPv6",)),
    _each("icmp-code", ("icmpCodeIPv4",), ("icmpCodeIPv6",)),
    _each("igmp-type", ("igmpType",), ()),
    _each("ipv6-flow-label", (), ("flowLabelIPv6",)),
    _both("is-multicast", "isMulticast"),
    _both("flow-direction", "flowDirection", kind=Kind.ALWAYS),
    _both("flow-end-reason", "flowEndReason", kind=Kind.ALWAYS),
    # No flow IE: switches on the NAT event templates (pyflow.export.templates). RouterOS default: no.
    _each("nat-events", (), (), default=False),
)

BY_NAME: Mapping[str, Field] = MappingProxyType({f.name: f for f in FIELDS})
TOGGLES: tuple[str, ...] = tuple(sorted(f.name for f in FIELDS if f.kind is not Kind.ALWAYS))
"""Every toggle name, sorted as RouterOS prints them."""
ROUTEROS_TOGGLES: tuple[str, ...] = tuple(sorted(f.name for f in FIELDS if f.kind is Kind.ROUTEROS))
_DEFAULT_ON = frozenset(f.name for f in FIELDS if f.kind is not Kind.ALWAYS and f.default)


@dataclass(frozen=True)
class FieldSet:
    """The toggles that are on: RouterOS's ``/ip traffic-flow ipfix`` (plus pyflow's ``as``, ``vlan-id``).

    ``FieldSet()`` is RouterOS's default: every field but ``nat-events``
    (and pyflow's two toggles on).  Hashable, so templates built from it
    can be cached.
    """

    enabled: frozenset[str] = _DEFAULT_ON

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, frozenset):
            object.__setattr__(self, "enabled", frozenset(self.enabled))
        for name in sorted(self.enabled):
            _check_toggle(name)

    def __contains__(self, name: object) -> bool:
        """Whether toggle ``name`` is on (an always-sent field counts as on)."""
        if not isinstance(name, str):
            return False
        if name in BY_NAME and BY_NAME[name].kind is Kind.ALWAYS:
            return True
        _check_toggle(name)
        return name in self.enabled

    def with_values(self, values: Mapping[str, bool]) -> FieldSet:
        """A copy with the given toggles set (``{"ttl": False}``)."""
        enabled = set(self.enabled)
        for name, on in values.items():
            if name in BY_NAME and BY_NAME[name].kind is Kind.ALWAYS:
                if on:
                    continue
                raise ConfigError(f"ipfix field {name} is always sent by pyflow and cannot be turned off")
            _check_toggle(name)
            (enabled.add if on else enabled.discard)(name)
        return FieldSet(frozenset(enabled))

    @classmethod
    def parse(cls, text: str, base: FieldSet | None = None) -> FieldSet:
        """``name=yes|no[,name=yes|no...]`` (RouterOS yes/no, also true/false) applied to ``base``.

        ``base`` defaults to RouterOS's defaults; a name given twice takes
        its last value.
        """
        values: dict[str, bool] = {}
        items = [item.strip() for item in text.split(",")]
        if not any(items):
            raise ConfigError(f"ipfix fields {text!r}: expected NAME=yes|no[,NAME=yes|no...]")
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ConfigError(f"ipfix fields {text!r}: {item!r} is not NAME=yes|no")
            try:
                values[name] = parse_bool(value)
            except ValueError:
                raise ConfigError(f"ipfix field {name}: {value.strip()!r} is not yes or no") from None
        return (cls() if base is None else base).with_values(values)

    def ies(self, ip_version: int) -> tuple[str, ...]:
        """IE names and time roles of the flow template of ``ip_version``, in wire order."""
        return tuple(ie for f in FIELDS if f.name in self for ie in f.ies(ip_version))

    def changes(self) -> dict[str, bool]:
        """The toggles that differ from RouterOS's defaults."""
        return {name: name in self.enabled for name in TOGGLES if (name in self.enabled) != (name in _DEFAULT_ON)}

    def describe(self) -> str:
        """Every toggle as RouterOS prints it: ``as=yes,bytes=yes,...,nat-events=no,...``."""
        return ",".join(f"{name}={'yes' if name in self.enabled else 'no'}" for name in TOGGLES)


def _check_toggle(name: str) -> None:
    if name not in BY_NAME or BY_NAME[name].kind is Kind.ALWAYS:
        always = ", ".join(f.name for f in FIELDS if f.kind is Kind.ALWAYS)
        raise ConfigError(
            f"unknown ipfix field {name!r} (known: {', '.join(TOGGLES)}; always sent: {always})"
        )


ROUTEROS_DEFAULTS = FieldSet()


def parse_fields(specs: Iterable[str], base: FieldSet | None = None) -> FieldSet:
    """Several ``--ipfix`` values applied in order: a later value wins."""
    fields = ROUTEROS_DEFAULTS if base is None else base
    for spec in specs:
        fields = FieldSet.parse(spec, fields)
    return fields
