"""A small NetFlow v1/v5/v9 and IPFIX decoder, for ``pyflow collect`` (debugging a setup).

An independent reading of the wire formats: it shares no code with the
encoders in ``pyflow.export`` (only IE *names* may come from
``pyflow.export.ie``, for elements the table here lacks), so it can show
what actually went on the wire, from pyflow or from any other exporter.

:func:`decode` is a pure function of the datagram bytes, the exporter's
address and a :class:`TemplateCache` (the only state: v9/IPFIX templates,
and data sets held until their template arrives).  It never raises on bad
input: what it cannot decode goes into :attr:`Decoded.problems`, with the
reason, and everything it could decode is returned.

* v1 / v5: fixed 48-byte records after a 16 / 24-byte header.  A datagram
  shorter than its header's count says is reported as truncated; its whole
  records are still decoded.
* v9 (RFC 3954) and IPFIX (RFC 7011): templates and options templates are
  kept per (exporter address, version, observation domain / source id) --
  the exporter's source port is not part of the key, as in nfdump -- and a
  new definition of an id replaces the old one.  IPFIX variable-length
  fields (length 65535: one length byte, or 255 and two), enterprise
  specifiers (PEN), and set / flowset padding (anything shorter than the
  smallest possible record, zero or not, as RFC 7011 §3.3.1 allows) are
  handled.
* Data before its template (RFC 7011 §9.3 allows it over UDP): the data set
  is *held* (at most :data:`MAX_HELD_SETS` sets, :data:`MAX_HELD_BYTES`
  bytes per exporter stream; beyond that the oldest is dropped, and that is
  reported), reported once as held, and decoded -- with its own datagram's
  header -- in the :func:`decode` call whose datagram brings the template.

Values: addresses and MACs as text, strings as text (NULs stripped),
integers (any length up to 8 bytes: reduced-size encoding) as ``int``,
other octet arrays as ``bytes``.  Every record carries its absolute
start/end time when the format allows it: IPFIX from 150-153; 21/22 (which
wrap every 2^32 ms) from 160 when the record has it, taking the wrap nearest
the header's time, else -- v1/v5/v9 -- from the header's sysUptime and clock
(v9's in whole seconds only).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pyflow.export import ie as _ie_names
from pyflow.text import has_control, visible

VARIABLE_LENGTH = 0xFFFF
# Caps on what exporters can make the decoder keep (TemplateCache) and return (decode):
MAX_HELD_SETS = 64  # data sets held per stream until their template arrives
MAX_HELD_BYTES = 1 << 20  # bytes held per stream
MAX_HELD_BYTES_TOTAL = 4 << 20  # bytes held in all
MAX_TEMPLATES = 1024  # templates and options templates in all, least recently used evicted
MAX_TEMPLATE_FIELDS = 256  # fields of one template (a longer one is refused)
MAX_STREAMS = 256  # exporter streams (address, version, domain), least recently used evicted
MAX_RECORDS = 16384  # records one decode() returns (held ones included); the rest are skipped, and said so
MAX_PROBLEMS = 100  # problems one decode() reports; the rest are counted
REVERSE_PEN = 29305  # RFC 5103 reverse-direction elements
_U32 = 1 << 32

Value = int | str | bytes


class Kind(enum.Enum):
    """How a field's bytes are shown."""

    UINT = "unsigned"
    IPV4 = "ipv4Address"
    IPV6 = "ipv6Address"
    MAC = "macAddress"
    STRING = "string"
    MILLISECONDS = "dateTimeMilliseconds"
    SECONDS = "dateTimeSeconds"
    OCTETS = "octetArray"


_U, _4, _6, _M, _S, _MS, _SEC, _O = (Kind.UINT, Kind.IPV4, Kind.IPV6, Kind.MAC, Kind.STRING, Kind.MILLISECONDS,
                                      Kind.SECONDS, Kind.OCTETS)

# IANA IPFIX information elements (also NetFlow v9 field types below 128, which share
# the numbers and meanings; RFC 3954 §8).  Names are IANA's.
IES: dict[int, tuple[str, Kind]] = {
    1: ("octetDeltaCount", _U), 2: ("packetDeltaCount", _U), 3: ("deltaFlowCount", _U),
    4: ("protocolIdentifier", _U), 5: ("ipClassOfService", _U), 6: ("tcpControlBits", _U),
    7: ("sourceTransportPort", _U), 8: ("sourceIPv4Address", _4), 9: ("sourceIPv4PrefixLength", _U),
    10: ("ingressInterface", _U), 11: ("destinationTransportPort", _U), 12: ("destinationIPv4Address", _4),
    13: ("destinationIPv4PrefixLength", _U), 14: ("egressInterface", _U), 15: ("ipNextHopIPv4Address", _4),
    16: ("bgpSourceAsNumber", _U), 17: ("bgpDestinationAsNumber", _U), 18: ("bgpNextHopIPv4Address", _4),
    19: ("postMCastPacketDeltaCount", _U), 20: ("postMCastOctetDeltaCount", _U),
    21: ("flowEndSysUpTime", _U), 22: ("flowStartSysUpTime", _U), 23: ("postOctetDeltaCount", _U),
    24: ("postPacketDeltaCount", _U), 25: ("minimumIpTotalLength", _U), 26: ("maximumIpTotalLength", _U),
    27: ("sourceIPv6Address", _6), 28: ("destinationIPv6Address", _6), 29: ("sourceIPv6PrefixLength", _U),
    30: ("destinationIPv6PrefixLength", _U), 31: ("flowLabelIPv6", _U), 32: ("icmpTypeCodeIPv4", _U),
    33: ("igmpType", _U), 34: ("samplingInterval", _U), 35: ("samplingAlgorithm", _U),
    36: ("flowActiveTimeout", _U), 37: ("flowIdleTimeout", _U), 38: ("engineType", _U), 39: ("engineId", _U),
    40: ("exportedOctetTotalCount", _U), 41: ("exportedMessageTotalCount", _U),
    42: ("exportedFlowRecordTotalCount", _U), 44: ("sourceIPv4Prefix", _4), 45: ("destinationIPv4Prefix", _4),
    46: ("mplsTopLabelType", _U), 47: ("mplsTopLabelIPv4Address", _4), 48: ("samplerId", _U),
    49: ("samplerMode", _U), 50: ("samplerRandomInterval", _U), 52: ("minimumTTL", _U), 53: ("maximumTTL", _U),
    54: ("fragmentIdentification", _U), 55: ("postIpClassOfService", _U), 56: ("sourceMacAddress", _M),
    57: ("postDestinationMacAddress", _M), 58: ("vlanId", _U), 59: ("postVlanId", _U), 60: ("ipVersion", _U),
    61: ("flowDirection", _U), 62: ("ipNextHopIPv6Address", _6), 63: ("bgpNextHopIPv6Address", _6),
    64: ("ipv6ExtensionHeaders", _U), 80: ("destinationMacAddress", _M), 81: ("postSourceMacAddress", _M),
    82: ("interfaceName", _S), 83: ("interfaceDescription", _S), 84: ("samplerName", _S),
    85: ("octetTotalCount", _U), 86: ("packetTotalCount", _U), 88: ("fragmentOffset", _U),
    89: ("forwardingStatus", _U), 94: ("applicationDescription", _S), 95: ("applicationId", _O),
    96: ("applicationName", _S), 98: ("postIpDiffServCodePoint", _U), 128: ("bgpNextAdjacentAsNumber", _U),
    129: ("bgpPrevAdjacentAsNumber", _U), 130: ("exporterIPv4Address", _4), 131: ("exporterIPv6Address", _6),
    132: ("droppedOctetDeltaCount", _U), 133: ("droppedPacketDeltaCount", _U), 136: ("flowEndReason", _U),
    137: ("commonPropertiesId", _U), 138: ("observationPointId", _U), 139: ("icmpTypeCodeIPv6", _U),
    141: ("lineCardId", _U), 142: ("portId", _U), 143: ("meteringProcessId", _U),
    144: ("exportingProcessId", _U), 145: ("templateId", _U), 148: ("flowId", _U),
    149: ("observationDomainId", _U), 150: ("flowStartSeconds", _SEC), 151: ("flowEndSeconds", _SEC),
    152: ("flowStartMilliseconds", _MS), 153: ("flowEndMilliseconds", _MS),
    154: ("flowStartMicroseconds", _O), 155: ("flowEndMicroseconds", _O),
    156: ("flowStartNanoseconds", _O), 157: ("flowEndNanoseconds", _O),
    158: ("flowStartDeltaMicroseconds", _U), 159: ("flowEndDeltaMicroseconds", _U),
    160: ("systemInitTimeMilliseconds", _MS), 161: ("flowDurationMilliseconds", _U),
    162: ("flowDurationMicroseconds", _U), 163: ("observedFlowTotalCount", _U),
    164: ("ignoredPacketTotalCount", _U), 165: ("ignoredOctetTotalCount", _U),
    166: ("notSentFlowTotalCount", _U), 167: ("notSentPacketTotalCount", _U),
    168: ("notSentOctetTotalCount", _U), 176: ("icmpTypeIPv4", _U), 177: ("icmpCodeIPv4", _U),
    178: ("icmpTypeIPv6", _U), 179: ("icmpCodeIPv6", _U), 180: ("udpSourcePort", _U),
    181: ("udpDestinationPort", _U), 182: ("tcpSourcePort", _U), 183: ("tcpDestinationPort", _U),
    184: ("tcpSequenceNumber", _U), 185: ("tcpAcknowledgementNumber", _U), 186: ("tcpWindowSize", _U),
    187: ("tcpUrgentPointer", _U), 188: ("tcpHeaderLength", _U), 189: ("ipHeaderLength", _U),
    190: ("totalLengthIPv4", _U), 191: ("payloadLengthIPv6", _U), 192: ("ipTTL", _U),
    193: ("nextHeaderIPv6", _U), 195: ("ipDiffServCodePoint", _U), 196: ("ipPrecedence", _U),
    197: ("fragmentFlags", _U), 204: ("ipPayloadLength", _U), 205: ("udpMessageLength", _U),
    206: ("isMulticast", _U), 207: ("ipv4IHL", _U), 208: ("ipv4Options", _U), 209: ("tcpOptions", _U),
    210: ("paddingOctets", _O), 211: ("collectorIPv4Address", _4), 212: ("collectorIPv6Address", _6),
    213: ("exportInterface", _U), 214: ("exportProtocolVersion", _U), 215: ("exportTransportProtocol", _U),
    216: ("collectorTransportPort", _U), 217: ("exporterTransportPort", _U), 218: ("tcpSynTotalCount", _U),
    219: ("tcpFinTotalCount", _U), 220: ("tcpRstTotalCount", _U), 221: ("tcpPshTotalCount", _U),
    222: ("tcpAckTotalCount", _U), 223: ("tcpUrgTotalCount", _U), 224: ("ipTotalLength", _U),
    225: ("postNATSourceIPv4Address", _4), 226: ("postNATDestinationIPv4Address", _4),
    227: ("postNAPTSourceTransportPort", _U), 228: ("postNAPTDestinationTransportPort", _U),
    229: ("natOriginatingAddressRealm", _U), 230: ("natEvent", _U), 231: ("initiatorOctets", _U),
    232: ("responderOctets", _U), 233: ("firewallEvent", _U), 234: ("ingressVRFID", _U),
    235: ("egressVRFID", _U), 236: ("VRFname", _S), 238: ("tcpWindowScale", _U), 239: ("biflowDirection", _U),
    243: ("dot1qVlanId", _U), 245: ("dot1qCustomerVlanId", _U),
    256: ("ethernetType", _U), 281: ("postNATSourceIPv6Address", _6), 282: ("postNATDestinationIPv6Address", _6),
    283: ("natPoolId", _U), 284: ("natPoolName", _S), 302: ("selectorId", _U),
    303: ("informationElementId", _U), 304: ("selectorAlgorithm", _U), 305: ("samplingPacketInterval", _U),
    306: ("samplingPacketSpace", _U), 307: ("samplingTimeInterval", _U), 308: ("samplingTimeSpace", _U),
    309: ("samplingSize", _U), 310: ("samplingPopulation", _U), 322: ("observationTimeSeconds", _SEC),
    323: ("observationTimeMilliseconds", _MS),
}  # fmt: skip

# NetFlow v9 options scope field types (RFC 3954 §6.1).
V9_SCOPES = {1: "scopeSystem", 2: "scopeInterface", 3: "scopeLineCard", 4: "scopeCache", 5: "scopeTemplate"}

PROTOCOLS = {1: "icmp", 2: "igmp", 4: "ipip", 6: "tcp", 17: "udp", 41: "ipv6", 47: "gre", 50: "esp", 51: "ah",
             58: "icmpv6", 89: "ospf", 103: "pim", 112: "vrrp", 132: "sctp"}
VERSION_NAMES = {1: "v1", 5: "v5", 9: "v9", 10: "ipfix"}


def protocol_name(proto: int) -> str:
    return PROTOCOLS.get(proto, str(proto))


# --------------------------------------------------------------------------
# Templates and the cache
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One field specifier: an element (or, with ``v9_scope``, a v9 scope type), its length, its PEN."""

    element: int
    length: int
    pen: int = 0
    v9_scope: bool = False

    @property
    def name(self) -> str:
        if self.v9_scope:
            return V9_SCOPES.get(self.element, f"scope{self.element}")
        if self.pen == REVERSE_PEN and self.element in IES:
            base = IES[self.element][0]
            return "reverse" + base[0].upper() + base[1:]
        if self.pen:
            return f"pen{self.pen}.ie{self.element}"
        if self.element in IES:
            return IES[self.element][0]
        known = _ie_names.BY_ID.get(self.element)
        return known.name if known is not None else f"ie{self.element}"

    @property
    def kind(self) -> Kind:
        if self.v9_scope:
            return Kind.UINT
        if self.pen in (0, REVERSE_PEN) and self.element in IES:
            return IES[self.element][1]
        return Kind.UINT if 1 <= self.length <= 8 else Kind.OCTETS


@functools.lru_cache(maxsize=4096)
def _spec(element: int, length: int, pen: int = 0, v9_scope: bool = False) -> FieldSpec:
    """One shared FieldSpec per distinct specifier: templates hold references, not copies."""
    return FieldSpec(element, length, pen, v9_scope)


@dataclass(frozen=True)
class Template:
    """A (v9 or IPFIX) template or options template; the first ``scope_count`` fields are the scope."""

    template_id: int
    fields: tuple[FieldSpec, ...]
    scope_count: int = 0

    @property
    def options(self) -> bool:
        return self.scope_count > 0

    @property
    def min_length(self) -> int:
        """The shortest record: variable-length fields at their 1-byte minimum."""
        return sum(1 if f.length == VARIABLE_LENGTH else f.length for f in self.fields)

    def describe(self) -> str:
        kind = "options template" if self.options else "template"
        specs = " ".join(f"{f.name}({'var' if f.length == VARIABLE_LENGTH else f.length})" for f in self.fields)
        scope = f", scope {self.scope_count}" if self.options else ""
        return f"{kind} {self.template_id}{scope}: {specs}"


StreamKey = tuple[str, int, int]  # exporter address, version (9 or 10), observation domain / source id


@dataclass(frozen=True)
class Header:
    """What a record needs of its datagram's header."""

    version: int
    export_ms: int  # the header's clock, Unix ms
    uptime_ms: int | None  # sysUptime (v1/v5/v9), None for IPFIX
    sequence: int
    domain: int  # IPFIX observation domain, v9 source id, v5 engine type << 8 | engine id
    count: int  # the header's count (v1/v5/v9: records; IPFIX: 0)


@dataclass(frozen=True)
class _Held:
    header: Header
    exporter: str
    template_id: int
    body: bytes


@dataclass
class TemplateCache:
    """Templates per exporter stream, and data sets held until their template arrives.

    Bounded whatever exporters send: at most :data:`MAX_STREAMS` streams (exporter, version,
    domain), :data:`MAX_TEMPLATES` templates in all (each of at most :data:`MAX_TEMPLATE_FIELDS`
    fields: a longer one is refused when it is read), :data:`MAX_HELD_SETS` sets and
    :data:`MAX_HELD_BYTES` bytes held per stream, :data:`MAX_HELD_BYTES_TOTAL` in all.  Beyond a
    cap the least recently used template or stream, or the oldest held set, goes; ``evicted``
    counts what went (``template``, ``stream``, ``held``), for the warnings :func:`decode` gives.
    """

    templates: OrderedDict[tuple[StreamKey, int], Template] = field(default_factory=OrderedDict)
    held: dict[StreamKey, deque[_Held]] = field(default_factory=dict)
    streams: OrderedDict[StreamKey, None] = field(default_factory=OrderedDict)  # least recently used first
    evicted: Counter[str] = field(default_factory=Counter)
    _fields: int = 0
    _held_bytes: int = 0

    def use(self, key: StreamKey) -> None:
        """``key``'s stream is in use: it becomes the most recent; the least recent goes beyond MAX_STREAMS."""
        if key in self.streams:
            self.streams.move_to_end(key)
            return
        self.streams[key] = None
        while len(self.streams) > MAX_STREAMS:
            old, _ = self.streams.popitem(last=False)
            for k in [k for k in self.templates if k[0] == old]:
                self._fields -= len(self.templates.pop(k).fields)
            self._held_bytes -= sum(len(h.body) for h in self.held.pop(old, ()))
            self.evicted["stream"] += 1

    def get(self, key: StreamKey, template_id: int) -> Template | None:
        template = self.templates.get((key, template_id))
        if template is not None:
            self.templates.move_to_end((key, template_id))
        return template

    def learn(self, key: StreamKey, template: Template) -> list[_Held]:
        """Keep ``template``; returns the held data sets that were waiting for it (removed)."""
        self.use(key)
        old = self.templates.pop((key, template.template_id), None)
        self._fields += len(template.fields) - (len(old.fields) if old else 0)
        self.templates[(key, template.template_id)] = template
        while len(self.templates) > MAX_TEMPLATES:
            _, gone = self.templates.popitem(last=False)
            self._fields -= len(gone.fields)
            self.evicted["template"] += 1
        queue = self.held.get(key)
        if not queue:
            return []
        ready = [h for h in queue if h.template_id == template.template_id]
        if ready:
            self.held[key] = deque(h for h in queue if h.template_id != template.template_id)
            self._held_bytes -= sum(len(h.body) for h in ready)
        return ready

    def hold(self, key: StreamKey, item: _Held) -> list[_Held]:
        """Hold a data set whose template is unknown; returns what had to be dropped to stay bounded
        (this stream's oldest beyond its caps, then the least recently used stream's oldest)."""
        self.use(key)
        queue = self.held.setdefault(key, deque())
        queue.append(item)
        self._held_bytes += len(item.body)
        dropped = []
        while len(queue) > MAX_HELD_SETS or sum(len(h.body) for h in queue) > MAX_HELD_BYTES:
            dropped.append(queue.popleft())
            self._held_bytes -= len(dropped[-1].body)
        for stream in list(self.streams):
            while self._held_bytes > MAX_HELD_BYTES_TOTAL and self.held.get(stream):
                dropped.append(self.held[stream].popleft())
                self._held_bytes -= len(dropped[-1].body)
        self.evicted["held"] += len(dropped)
        return dropped

    def held_sets(self) -> int:
        return sum(len(q) for q in self.held.values())

    def held_bytes(self) -> int:
        return self._held_bytes

    def template_count(self) -> int:
        return len(self.templates)

    def field_count(self) -> int:
        """Field specifiers of every template kept."""
        return self._fields

    def stream_count(self) -> int:
        return len(self.streams)


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------

_SRC = ("sourceIPv4Address", "sourceIPv6Address")
_DST = ("destinationIPv4Address", "destinationIPv6Address")
SUMMARY_FIELDS = frozenset({*_SRC, *_DST, "sourceTransportPort", "destinationTransportPort", "protocolIdentifier",
                            "packetDeltaCount", "octetDeltaCount"})


@dataclass(frozen=True)
class Record:
    """One decoded data record (flow or options)."""

    version: int  # 1, 5, 9, 10
    exporter: str  # "address:port" the datagram came from
    domain: int
    template_id: int  # 0 for v1/v5
    fields: tuple[tuple[str, Value], ...]  # in wire order; options records: scope fields first
    scope_count: int
    export_ms: int
    start_ms: int | None
    end_ms: int | None

    @property
    def options(self) -> bool:
        return self.scope_count > 0

    def get(self, name: str, default: Value | None = None) -> Value | None:
        for n, v in self.fields:
            if n == name:
                return v
        return default

    def _first(self, names: Iterable[str]) -> Value | None:
        for name in names:
            v = self.get(name)
            if v is not None:
                return v
        return None

    @property
    def src(self) -> str | None:
        v = self._first(_SRC)
        return None if v is None else str(v)

    @property
    def dst(self) -> str | None:
        v = self._first(_DST)
        return None if v is None else str(v)

    def _int(self, *names: str) -> int | None:
        v = self._first(names)
        return v if isinstance(v, int) else None

    @property
    def sport(self) -> int | None:
        return self._int("sourceTransportPort")

    @property
    def dport(self) -> int | None:
        return self._int("destinationTransportPort")

    @property
    def proto(self) -> int | None:
        return self._int("protocolIdentifier")

    @property
    def packets(self) -> int | None:
        return self._int("packetDeltaCount", "packetTotalCount")

    @property
    def bytes(self) -> int | None:
        return self._int("octetDeltaCount", "octetTotalCount")

    @property
    def time_ms(self) -> int:
        """The record's time: when the flow ended, else when the datagram left."""
        return self.end_ms if self.end_ms is not None else self.export_ms

    def others(self) -> list[tuple[str, Value]]:
        """Fields not in the summary (addresses, ports, protocol, packets, bytes)."""
        if self.options:
            return list(self.fields)
        return [(n, v) for n, v in self.fields if n not in SUMMARY_FIELDS]


@dataclass
class Decoded:
    """What one datagram gave: records (held ones included once their template came), templates, problems."""

    version: int | None = None
    records: list[Record] = field(default_factory=list)
    templates: list[Template] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped_bytes: int = 0  # of data sets not decoded: MAX_RECORDS were reached


class _Truncated(Exception):
    pass


def _value(spec: FieldSpec, raw: bytes) -> Value:
    kind = spec.kind
    n = len(raw)
    if kind in (Kind.UINT, Kind.MILLISECONDS, Kind.SECONDS) and 1 <= n <= 8:
        return int.from_bytes(raw, "big")
    if kind is Kind.IPV4 and n == 4:
        return str(ipaddress.IPv4Address(raw))
    if kind is Kind.IPV6 and n == 16:
        return str(ipaddress.IPv6Address(raw))
    if kind is Kind.MAC and n == 6:
        return ":".join(f"{b:02x}" for b in raw)
    if kind is Kind.STRING:
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if 1 <= n <= 8 and kind is not Kind.OCTETS:
        return int.from_bytes(raw, "big")  # an unusual length for the element: still a number
    return bytes(raw)


def _times(values: dict[str, Value], header: Header) -> tuple[int | None, int | None]:
    """Absolute start/end (Unix ms) from whichever time elements the record carries."""

    def ms(name: str) -> int | None:
        v = values.get(name)
        return v if isinstance(v, int) else None

    def secs(name: str) -> int | None:
        v = values.get(name)
        return v * 1000 if isinstance(v, int) else None

    def uptime(name: str) -> int | None:
        v = values.get(name)
        if not isinstance(v, int):
            return None
        # v1/v5/v9: the header's sysUptime and clock (v9's in whole seconds), right across the wrap
        estimate = None if header.uptime_ms is None else header.export_ms - (header.uptime_ms - v) % _U32
        init = values.get("systemInitTimeMilliseconds")  # ms since 160: exact, but 21/22 wrap at 2^32 ms
        if isinstance(init, int):
            exact = init + v
            reference = header.export_ms if estimate is None else estimate
            return exact + (reference - exact + _U32 // 2) // _U32 * _U32  # the wrap nearest the reference
        return estimate

    start = ms("flowStartMilliseconds")
    end = ms("flowEndMilliseconds")
    if start is None:
        start = secs("flowStartSeconds")
    if end is None:
        end = secs("flowEndSeconds")
    if start is None:
        start = uptime("flowStartSysUpTime")
    if end is None:
        end = uptime("flowEndSysUpTime")
    if end is None:
        end = ms("observationTimeMilliseconds")
    return start, end


def _record(header: Header, exporter: str, template_id: int, specs: Iterable[FieldSpec], raws: Iterable[bytes],
            scope_count: int = 0) -> Record:
    fields = tuple((s.name, _value(s, r)) for s, r in zip(specs, raws, strict=True))
    start, end = _times(dict(fields), header)
    return Record(header.version, exporter, header.domain, template_id, fields, scope_count, header.export_ms,
                  start, end)


# --------------------------------------------------------------------------
# NetFlow v1 / v5
# --------------------------------------------------------------------------

_PAD = -1
_COMMON = ((8, 4), (12, 4), (15, 4), (10, 2), (14, 2), (2, 4), (1, 4), (22, 4), (21, 4), (7, 2), (11, 2))
# After the common part: v1 pad(2) prot tos flags pad(3) reserved(4); v5 pad(1) flags prot tos
# src_as dst_as src_mask dst_mask pad(2) (flow-protocols.md §1.2, §1.4).
_V1_LAYOUT = (*_COMMON, (_PAD, 2), (4, 1), (5, 1), (6, 1), (_PAD, 3), (_PAD, 4))
_V5_LAYOUT = (*_COMMON, (_PAD, 1), (6, 1), (4, 1), (5, 1), (16, 2), (17, 2), (9, 1), (13, 1), (_PAD, 2))
LEGACY_RECORD = 48


def _legacy(data: bytes, version: int, exporter: str, out: Decoded) -> None:
    layout: tuple[tuple[int, int], ...]
    if version == 1:
        hsize, layout = 16, _V1_LAYOUT
        if len(data) < hsize:
            raise _Truncated(f"v1 header needs 16 bytes, the datagram has {len(data)}")
        _, count, uptime, secs, nsecs = struct.unpack_from("!HHIII", data)
        sequence, domain = 0, 0
    else:
        hsize, layout = 24, _V5_LAYOUT
        if len(data) < hsize:
            raise _Truncated(f"v5 header needs 24 bytes, the datagram has {len(data)}")
        _, count, uptime, secs, nsecs, sequence, etype, eid, _sampling = struct.unpack_from("!HHIIIIBBH", data)
        domain = etype << 8 | eid
    header = Header(version, secs * 1000 + nsecs // 1_000_000, uptime, sequence, domain, count)
    whole = (len(data) - hsize) // LEGACY_RECORD
    if whole < count:
        out.problems.append(f"truncated v{version} datagram: the header says {count} records "
                            f"({hsize + LEGACY_RECORD * count} bytes), it has {len(data)} bytes; "
                            f"decoded the {whole} whole records")
    elif len(data) > hsize + LEGACY_RECORD * count:
        out.problems.append(f"v{version} datagram has {len(data) - hsize - LEGACY_RECORD * count} bytes after its "
                            f"{count} records (ignored)")
    specs = [FieldSpec(e, n) for e, n in layout if e != _PAD]
    for i in range(min(count, whole)):
        pos = hsize + LEGACY_RECORD * i
        raws = []
        for element, length in layout:
            if element != _PAD:
                raws.append(data[pos:pos + length])
            pos += length
        out.records.append(_record(header, exporter, 0, specs, raws))


# --------------------------------------------------------------------------
# NetFlow v9 / IPFIX
# --------------------------------------------------------------------------


def _parse_specs(body: bytes, pos: int, count: int, ipfix: bool, end: int) -> tuple[list[FieldSpec], int]:
    specs = []
    for _ in range(count):
        if pos + 4 > end:
            raise _Truncated("field specifiers run past the end of the set")
        element, length = struct.unpack_from("!HH", body, pos)
        pos += 4
        pen = 0
        if ipfix and element & 0x8000:
            if pos + 4 > end:
                raise _Truncated("enterprise number runs past the end of the set")
            (pen,) = struct.unpack_from("!I", body, pos)
            pos += 4
            element &= 0x7FFF
        if length == 0:
            raise _Truncated(f"field {element} has length 0")
        if length == VARIABLE_LENGTH and not ipfix:
            raise _Truncated(f"field {element} has length 65535 (variable length is IPFIX only)")
        specs.append(_spec(element, length, pen))
    return specs, pos


def _template_set(body: bytes, ipfix: bool, what: str, problems: list[str]) -> list[Template]:
    """Set 2 / FlowSet 0: template records until what is left is padding."""
    found = []
    pos = 0
    while len(body) - pos >= 4:
        template_id, count = struct.unpack_from("!HH", body, pos)
        if template_id == 0 and count == 0:
            break  # padding
        pos += 4
        if count == 0:
            problems.append(f"{what}: template withdrawal of {template_id} ignored (not allowed over UDP, "
                            "RFC 7011 §8.4)")
            continue
        if template_id < 256:
            problems.append(f"{what}: template id {template_id} is below 256; rest of the set skipped")
            break
        if count > MAX_TEMPLATE_FIELDS:
            problems.append(f"{what}: template {template_id} has {count} fields, more than {MAX_TEMPLATE_FIELDS}: "
                            "refused; rest of the set skipped")
            break
        try:
            specs, pos = _parse_specs(body, pos, count, ipfix, len(body))
        except _Truncated as exc:
            problems.append(f"{what}: template {template_id}: {exc}; rest of the set skipped")
            break
        found.append(Template(template_id, tuple(specs)))
    return found


def _options_template_set(body: bytes, ipfix: bool, what: str, problems: list[str]) -> list[Template]:
    """IPFIX Set 3 / v9 FlowSet 1: options template records until what is left is padding."""
    found = []
    pos = 0
    while len(body) - pos >= 6:
        template_id, a, b = struct.unpack_from("!HHH", body, pos)
        if template_id == 0:
            break  # padding
        pos += 6
        try:
            if template_id < 256:
                raise _Truncated(f"template id {template_id} is below 256")
            fields = a if ipfix else (a + b) // 4
            if fields > MAX_TEMPLATE_FIELDS:
                raise _Truncated(f"{fields} fields, more than {MAX_TEMPLATE_FIELDS}: refused")
            if ipfix:  # field count (scope included), scope field count
                count, scope = a, b
                if scope == 0 or scope > count:
                    raise _Truncated(f"scope field count {scope} of {count} fields")
                specs, pos = _parse_specs(body, pos, count, True, len(body))
            else:  # scope and option lengths in bytes
                if a % 4 or b % 4 or a == 0:
                    raise _Truncated(f"option scope length {a} / option length {b} are not multiples of 4 "
                                     "(or no scope)")
                scope = a // 4
                scopes, pos = _parse_specs(body, pos, scope, False, len(body))
                options, pos = _parse_specs(body, pos, b // 4, False, len(body))
                specs = [_spec(s.element, s.length, 0, True) for s in scopes] + options
        except _Truncated as exc:
            problems.append(f"{what}: options template {template_id}: {exc}; rest of the set skipped")
            break
        found.append(Template(template_id, tuple(specs), scope_count=scope))
    return found


def _split_record(body: bytes, pos: int, template: Template) -> tuple[list[bytes], int]:
    raws = []
    for spec in template.fields:
        length = spec.length
        if length == VARIABLE_LENGTH:
            if pos >= len(body):
                raise _Truncated("variable-length field runs past the end of the set")
            length = body[pos]
            pos += 1
            if length == 255:
                if pos + 2 > len(body):
                    raise _Truncated("variable-length field runs past the end of the set")
                (length,) = struct.unpack_from("!H", body, pos)
                pos += 2
        if pos + length > len(body):
            raise _Truncated(f"record of template {template.template_id} runs past the end of the set")
        raws.append(body[pos:pos + length])
        pos += length
    return raws, pos


def _data_set(body: bytes, template: Template, header: Header, exporter: str, what: str,
              out: Decoded) -> list[Record]:
    """The records of one data set, as many as ``out`` has room for; what is left shorter than a record
    is padding."""
    problems = out.problems
    records: list[Record] = []
    pos = 0
    least = template.min_length
    if least == 0:
        problems.append(f"{what}: template {template.template_id} has no fields with a length")
        return records
    room = MAX_RECORDS - len(out.records)
    while len(body) - pos >= least:
        if len(records) >= room:
            out.skipped_bytes += len(body) - pos
            break
        try:
            raws, pos = _split_record(body, pos, template)
        except _Truncated as exc:
            problems.append(f"{what}: {exc}")
            break
        records.append(_record(header, exporter, template.template_id, template.fields, raws, template.scope_count))
    return records


def _templated_header(data: bytes, version: int, out: Decoded) -> tuple[Header, int, int]:
    """A v9 / IPFIX header: (header, where its sets end, where they start)."""
    if version == 10:
        if len(data) < 16:
            raise _Truncated(f"IPFIX header needs 16 bytes, the datagram has {len(data)}")
        _, length, export_s, sequence, domain = struct.unpack_from("!HHIII", data)
        if length < 16:
            raise _Truncated(f"IPFIX message length {length} is shorter than its header")
        end = length
        if length > len(data):
            out.problems.append(f"truncated IPFIX message: its header says {length} bytes, the datagram has "
                                f"{len(data)}")
            end = len(data)
        elif length < len(data):
            out.problems.append(f"IPFIX datagram has {len(data) - length} bytes after its message (ignored)")
        return Header(10, export_s * 1000, None, sequence, domain, 0), end, 16
    if len(data) < 20:
        raise _Truncated(f"v9 header needs 20 bytes, the datagram has {len(data)}")
    _, count, uptime, export_s, sequence, domain = struct.unpack_from("!HHIIII", data)
    return Header(9, export_s * 1000, uptime, sequence, domain, count), len(data), 20


def _templated(data: bytes, version: int, exporter: str, address: str, cache: TemplateCache, out: Decoded) -> None:
    ipfix = version == 10
    name = "IPFIX" if ipfix else "v9"
    header, end, pos = _templated_header(data, version, out)
    domain = header.domain
    template_sets, options_sets = ((2,), (3,)) if ipfix else ((0,), (1,))
    key: StreamKey = (address, version, domain)
    cache.use(key)
    n_records = n_held = 0
    while end - pos >= 4:
        set_id, set_length = struct.unpack_from("!HH", data, pos)
        what = f"{name} set {set_id} at byte {pos}"
        if set_length < 4:
            out.problems.append(f"{what}: length {set_length} is shorter than a set header; rest of the "
                                "datagram skipped")
            break
        if pos + set_length > end:
            out.problems.append(f"{what}: length {set_length} runs past the end ({end - pos} bytes left); "
                                "rest of the datagram skipped")
            break
        body = data[pos + 4:pos + set_length]
        pos += set_length
        if set_id in template_sets or set_id in options_sets:
            parse = _template_set if set_id in template_sets else _options_template_set
            found = parse(body, ipfix, what, out.problems)
            n_records += len(found)
            for template in found:
                out.templates.append(template)
                for held in cache.learn(key, template):
                    out.records += _data_set(held.body, template, held.header, held.exporter,
                                             f"{name} held set {template.template_id}", out)
        elif set_id < 256:
            out.problems.append(f"{what}: reserved set id, skipped")
        else:
            known = cache.get(key, set_id)
            if known is None:
                n_held += 1
                out.problems.append(f"{what}: data before its template {set_id} (domain {domain}): held until "
                                    "the template arrives")
                for dropped in cache.hold(key, _Held(header, exporter, set_id, body)):
                    out.problems.append(f"{name}: dropped a held data set of template {dropped.template_id} "
                                        f"(more than {MAX_HELD_SETS} sets or {MAX_HELD_BYTES} bytes held for a "
                                        f"stream, or {MAX_HELD_BYTES_TOTAL} in all; {cache.evicted['held']} "
                                        "dropped so far)")
                continue
            records = _data_set(body, known, header, exporter, what, out)
            n_records += len(records)
            out.records += records
    if not ipfix and not n_held and n_records != header.count:
        out.problems.append(f"v9 header count is {header.count}, the datagram has {n_records} records")


def decode(data: bytes, exporter: tuple[str, int] | str, cache: TemplateCache) -> Decoded:
    """Decode one datagram from ``exporter`` (address, port); never raises on bad input."""
    if isinstance(exporter, tuple):
        address = str(exporter[0])
        label = f"[{address}]:{exporter[1]}" if ":" in address else f"{address}:{exporter[1]}"
    else:
        address = label = str(exporter)
    out = Decoded()
    data = bytes(data)
    if len(data) < 2:
        out.problems.append(f"datagram of {len(data)} bytes is too short for any NetFlow/IPFIX header")
        return out
    (version,) = struct.unpack_from("!H", data)
    if version not in VERSION_NAMES:
        out.problems.append(f"unknown version {version} (not NetFlow v1, v5, v9 or IPFIX 10); "
                            f"{len(data)} bytes ignored")
        return out
    out.version = version
    before = Counter(cache.evicted)
    try:
        if version in (1, 5):
            _legacy(data, version, label, out)
        else:
            _templated(data, version, label, address, cache, out)
    except _Truncated as exc:
        out.problems.append(f"truncated: {exc}")
    except (struct.error, IndexError, ValueError) as exc:  # belt and braces: report, never crash
        out.problems.append(f"malformed {VERSION_NAMES[version]} datagram: {exc}")
    _bounded(out, cache, before)
    return out


def _bounded(out: Decoded, cache: TemplateCache, before: Counter[str]) -> None:
    """What the caps cost this datagram, as counted warnings; at most MAX_PROBLEMS problems."""
    if out.skipped_bytes:
        out.problems.append(f"more than {MAX_RECORDS} records from one datagram: {out.skipped_bytes} bytes of data "
                            "sets not decoded")
    for what, cap in (("template", f"{MAX_TEMPLATES} templates in all"),
                      ("stream", f"{MAX_STREAMS} exporter streams (address, version, domain), each with its "
                                 "templates and held data")):
        n = cache.evicted[what] - before[what]
        if n:
            out.problems.append(f"evicted {n} least recently used {what}{'s' if n > 1 else ''} (at most {cap}; "
                                f"{cache.evicted[what]} evicted so far)")
    if len(out.problems) > MAX_PROBLEMS:
        more = len(out.problems) - MAX_PROBLEMS + 1
        out.problems[MAX_PROBLEMS - 1:] = [f"{more} more problems in this datagram (not shown)"]


# --------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------


def format_time(ms: int, sep: str = " ") -> str:
    """Local time with milliseconds: ``2024-05-01 12:00:00.123``."""
    try:
        t = datetime.fromtimestamp(ms / 1000)
    except (OverflowError, OSError, ValueError):
        return f"@{ms}ms"
    return t.strftime(f"%Y-%m-%d{sep}%H:%M:%S.") + f"{ms % 1000:03d}"


def _endpoint(addr: str | None, port: int | None) -> str:
    a = addr if addr is not None else "?"
    if ":" in a:
        a = f"[{a}]"
    return a if port is None else f"{a}:{port}"


def _show(name: str, value: Value) -> str:
    if isinstance(value, bytes):
        text = "0x" + value.hex()
    elif isinstance(value, int) and (name.endswith("Milliseconds") and name != "flowDurationMilliseconds"):
        text = format_time(value, "T")
    elif isinstance(value, str) and (not value or has_control(value) or any(c.isspace() or c in '"=\\'
                                                                            for c in value)):
        # quoted, backslashes and quotes escaped, then control characters (terminal escapes, newlines) too
        text = visible('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
    else:
        text = str(value)
    return f"{name}={text}"


def format_record(record: Record) -> str:
    """One line: time, version, src -> dst with ports, protocol, packets, bytes, then every other field."""
    parts = [format_time(record.time_ms), VERSION_NAMES.get(record.version, str(record.version))]
    if record.options:
        parts.append(f"options template={record.template_id}")
        scope = [_show(n, v) for n, v in record.fields[:record.scope_count]]
        parts.append("scope(" + " ".join(scope) + ")")
        parts += [_show(n, v) for n, v in record.fields[record.scope_count:]]
    else:
        parts.append(f"{_endpoint(record.src, record.sport)} -> {_endpoint(record.dst, record.dport)}")
        proto = record.proto
        parts.append("?" if proto is None else protocol_name(proto))
        parts.append(f"packets={'?' if record.packets is None else record.packets}")
        parts.append(f"bytes={'?' if record.bytes is None else record.bytes}")
        parts += [_show(n, v) for n, v in record.others()]
    if record.template_id and not record.options:
        parts.append(f"template={record.template_id}")
    parts.append(f"exporter={record.exporter}")
    return " ".join(parts)


def _json_value(value: Value) -> Any:
    return value.hex() if isinstance(value, bytes) else value


def record_json(record: Record) -> dict[str, Any]:
    """A record as a JSON-ready dict (times as Unix ms and local text)."""
    out: dict[str, Any] = {
        "time": format_time(record.time_ms, "T"),
        "time_ms": record.time_ms,
        "version": VERSION_NAMES.get(record.version, str(record.version)),
        "exporter": record.exporter,
        "domain": record.domain,
        "template": record.template_id,
        "options": record.options,
        "start_ms": record.start_ms,
        "end_ms": record.end_ms,
        "export_ms": record.export_ms,
    }
    if record.options:
        out["scope"] = {n: _json_value(v) for n, v in record.fields[:record.scope_count]}
        out["fields"] = {n: _json_value(v) for n, v in record.fields[record.scope_count:]}
    else:
        out |= {"src": record.src, "dst": record.dst, "sport": record.sport, "dport": record.dport,
                "proto": record.proto, "packets": record.packets, "bytes": record.bytes}
        out["fields"] = {n: _json_value(v) for n, v in record.fields}
    return out


def iter_flow_records(decoded: Iterable[Decoded]) -> Iterator[Record]:
    """Every flow (not options) record of several decode results, in order."""
    for d in decoded:
        for r in d.records:
            if not r.options:
                yield r
