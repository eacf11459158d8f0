"""Information elements (IEs): the one table every template and encoder is built from.

Each row says, for one IANA IPFIX information element, how pyflow puts it on
the wire: the length we send, the NetFlow v9 field type that carries the same
meaning, and which column of a record batch (``pyflow.records.RECORD_DTYPE``)
feeds it.  Keeping this in one data table (rather than in per-format code)
means the IPFIX and v9 encoders can never disagree about an element.

Facts come from the IANA registry and RFC 3954 §8 as summarised in
``flow-protocols.md`` §2.7, §3 and §4.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType


class AbstractType(enum.StrEnum):
    """RFC 7012 abstract data types used by the table (the value is the RFC spelling)."""

    UNSIGNED8 = "unsigned8"
    UNSIGNED16 = "unsigned16"
    UNSIGNED32 = "unsigned32"
    UNSIGNED64 = "unsigned64"
    DATE_TIME_MILLISECONDS = "dateTimeMilliseconds"
    IPV4_ADDRESS = "ipv4Address"
    IPV6_ADDRESS = "ipv6Address"
    MAC_ADDRESS = "macAddress"
    STRING = "string"

    @property
    def is_integer(self) -> bool:
        """True when the wire form is a big-endian unsigned integer (RFC 7011 §6.1.1, §6.1.9)."""
        return self in _INTEGER_TYPES


_INTEGER_TYPES = frozenset(
    {
        AbstractType.UNSIGNED8,
        AbstractType.UNSIGNED16,
        AbstractType.UNSIGNED32,
        AbstractType.UNSIGNED64,
        AbstractType.DATE_TIME_MILLISECONDS,
    }
)


@dataclass(frozen=True, slots=True)
class InformationElement:
    """One IANA information element as pyflow exports it.

    ``length`` is the fixed length we send (which may be a reduced-size
    encoding of the IANA type, RFC 7011 §6.2).  ``v9_type`` is the NetFlow v9
    field type with the same meaning, or None when v9 cannot carry it.
    ``column`` names the column that feeds the element: a ``RECORD_DTYPE``
    column, or a derived column (``templates.DERIVED_COLUMNS``) computed at
    export time from the records and the export clock.  For address elements
    and MAC addresses the value is the last ``length`` bytes of the raw
    column (IPv4 is stored v4-mapped in 16 bytes; a MAC column is exactly 6).
    None means no column holds it (the row exists for options records).
    """

    ie_id: int
    name: str
    abstract_type: AbstractType
    length: int
    v9_type: int | None
    column: str | None = None


_U8 = AbstractType.UNSIGNED8
_U16 = AbstractType.UNSIGNED16
_U32 = AbstractType.UNSIGNED32
_U64 = AbstractType.UNSIGNED64
_MS = AbstractType.DATE_TIME_MILLISECONDS
_V4 = AbstractType.IPV4_ADDRESS
_V6 = AbstractType.IPV6_ADDRESS
_MAC = AbstractType.MAC_ADDRESS
_STR = AbstractType.STRING

# v9 type: RFC 3954 defines ids < 128 with the same meaning as IANA (incl. the
# Cisco-defined 52/53/80/82/83); for ids >= 128 every collector checked reads a
# v9 field type as the IANA id (flow-protocols.md §2.7), so the v9 type is the
# IANA id throughout this table.
INFORMATION_ELEMENTS: tuple[InformationElement, ...] = (
    # (IANA id, name, abstract type, length we send, v9 type, record column)
    InformationElement(1, "octetDeltaCount", _U64, 8, 1, "bytes"),
    InformationElement(2, "packetDeltaCount", _U64, 8, 2, "packets"),
    InformationElement(4, "protocolIdentifier", _U8, 1, 4, "protocol"),
    InformationElement(5, "ipClassOfService", _U8, 1, 5, "tos"),
    # tcpControlBits is unsigned16 since RFC 7125; we send it reduced-size in one
    # byte (RFC 7011 §6.2), as MikroTik does and as v9 TCP_FLAGS defaults.  Both
    # lengths were tried: nfdump 1.7.1 and tshark 4.0 decode 1 and 2 alike, but
    # pmacct keeps the flags only when the length is exactly 1 (pkt_handlers.c,
    # NF_tcp_flags_handler) and scapy reads one byte whatever the length (every
    # later field then misaligns).  The record column is 8 bits anyway, so the
    # second byte would always be zero.
    InformationElement(6, "tcpControlBits", _U16, 1, 6, "tcp_flags"),
    InformationElement(7, "sourceTransportPort", _U16, 2, 7, "src_port"),
    InformationElement(8, "sourceIPv4Address", _V4, 4, 8, "src_addr"),
    InformationElement(9, "sourceIPv4PrefixLength", _U8, 1, 9, "src_mask"),
    # 10/14: v9's default is 2 bytes, but 4 is common and Linux ifindex is 32-bit.
    InformationElement(10, "ingressInterface", _U32, 4, 10, "ifindex"),
    InformationElement(11, "destinationTransportPort", _U16, 2, 11, "dst_port"),
    InformationElement(12, "destinationIPv4Address", _V4, 4, 12, "dst_addr"),
    InformationElement(13, "destinationIPv4PrefixLength", _U8, 1, 13, "dst_mask"),
    InformationElement(14, "egressInterface", _U32, 4, 14, "egress_ifindex"),
    InformationElement(15, "ipNextHopIPv4Address", _V4, 4, 15, "next_hop"),
    # Origin/peer AS from pyflow's optional prefix-to-AS file (0 = unknown); v9 SRC_AS/DST_AS in 4 bytes.
    InformationElement(16, "bgpSourceAsNumber", _U32, 4, 16, "src_as"),
    InformationElement(17, "bgpDestinationAsNumber", _U32, 4, 17, "dst_as"),
    # 21/22 are ms since systemInitTimeMilliseconds (160), mod 2^32 (v9's
    # LAST/FIRST_SWITCHED against the header sysUptime): derived at export
    # time from the absolute record times and the export clock.
    InformationElement(21, "flowEndSysUpTime", _U32, 4, 21, "end_uptime_ms"),
    InformationElement(22, "flowStartSysUpTime", _U32, 4, 22, "start_uptime_ms"),
    # RouterOS ip-total-length: IP total length (IPv6: payload length + 40) over the flow's
    # packets.  IANA types them unsigned64; we send 2 bytes (RFC 7011 §6.2 reduced size, an IP
    # length always fits), which is also the length of v9's Cisco MIN_PKT_LNGTH/MAX_PKT_LNGTH.
    InformationElement(25, "minimumIpTotalLength", _U64, 2, 25, "length_min"),
    InformationElement(26, "maximumIpTotalLength", _U64, 2, 26, "length_max"),
    InformationElement(27, "sourceIPv6Address", _V6, 16, 27, "src_addr"),
    InformationElement(28, "destinationIPv6Address", _V6, 16, 28, "dst_addr"),
    InformationElement(29, "sourceIPv6PrefixLength", _U8, 1, 29, "src_mask"),
    InformationElement(30, "destinationIPv6PrefixLength", _U8, 1, 30, "dst_mask"),
    # v9 IPV6_FLOW_LABEL defaults to 3 bytes; we send the IANA 4.  tshark decodes 4 in v9 and
    # IPFIX, and nfdump's v9 table has it as 4; scapy 2.x reads 3 whatever the template says.
    InformationElement(31, "flowLabelIPv6", _U32, 4, 31, "flow_label"),
    InformationElement(33, "igmpType", _U8, 1, 33, "igmp_type"),
    InformationElement(34, "samplingInterval", _U32, 4, 34),
    InformationElement(35, "samplingAlgorithm", _U8, 1, 35),
    # IPv4 TTL / IPv6 hop limit, lowest and highest over the flow's packets (Cisco v9 MIN_TTL/MAX_TTL).
    InformationElement(52, "minimumTTL", _U8, 1, 52, "ttl_min"),
    InformationElement(53, "maximumTTL", _U8, 1, 53, "ttl_max"),
    # MACs come from V6 columns: the byte-valued fill takes all 6 bytes, in wire order.
    InformationElement(56, "sourceMacAddress", _MAC, 6, 56, "src_mac"),
    # v9 SRC_VLAN: the outer 802.1Q/802.1ad tag's VLAN id (0 = untagged).
    InformationElement(58, "vlanId", _U16, 2, 58, "vlan_id"),
    InformationElement(60, "ipVersion", _U8, 1, 60, "ip_version"),
    InformationElement(61, "flowDirection", _U8, 1, 61, "direction"),
    InformationElement(62, "ipNextHopIPv6Address", _V6, 16, 62, "next_hop"),
    InformationElement(80, "destinationMacAddress", _MAC, 6, 80, "dst_mac"),
    # Interface names go out fixed-length, NUL padded: nfdump sizes records from
    # the template and cannot take variable-length (65535) strings.  16 is
    # Linux IFNAMSIZ; 32 leaves room for a short interface alias.  Only 83 is
    # sent (options.py says why 82 breaks nfdump 1.7.1).
    InformationElement(82, "interfaceName", _STR, 16, 82),
    InformationElement(83, "interfaceDescription", _STR, 32, 83),
    InformationElement(136, "flowEndReason", _U8, 1, 136, "end_reason"),
    InformationElement(152, "flowStartMilliseconds", _MS, 8, 152, "start_ms"),
    InformationElement(153, "flowEndMilliseconds", _MS, 8, 153, "end_ms"),
    # Options scope for exporter-wide facts (sampling): the IPFIX counterpart of v9's System scope.
    InformationElement(149, "observationDomainId", _U32, 4, 149),
    InformationElement(160, "systemInitTimeMilliseconds", _MS, 8, 160, "system_init_ms"),
    InformationElement(176, "icmpTypeIPv4", _U8, 1, 176, "icmp_type"),
    InformationElement(177, "icmpCodeIPv4", _U8, 1, 177, "icmp_code"),
    InformationElement(178, "icmpTypeIPv6", _U8, 1, 178, "icmp_type"),
    InformationElement(179, "icmpCodeIPv6", _U8, 1, 179, "icmp_code"),
    InformationElement(184, "tcpSequenceNumber", _U32, 4, 184, "tcp_seq"),
    InformationElement(185, "tcpAcknowledgementNumber", _U32, 4, 185, "tcp_ack"),
    InformationElement(186, "tcpWindowSize", _U16, 2, 186, "tcp_window"),
    InformationElement(189, "ipHeaderLength", _U8, 1, 189, "ip_header_length"),
    InformationElement(190, "totalLengthIPv4", _U16, 2, 190),
    InformationElement(192, "ipTTL", _U8, 1, 192),
    InformationElement(205, "udpMessageLength", _U16, 2, 205, "udp_length"),
    # isMulticast is a flags octet.  The IANA registry's diagram (RFC 5102 Errata 1736, which
    # replaced the RFC's; IETF bit 0 = most significant) puts the IPv6 multicast scope in bits
    # 0-3, the T flag in bit 4 and "IPv4 multicast" in bit 7.  So, for the enrichment that
    # fills ``is_multicast`` from the destination address:
    #   IPv4 destination in 224.0.0.0/4          -> 0x01
    #   IPv6 destination in ff00::/8             -> (scope << 4) | (T << 3), where scope is the
    #       low nibble of the address's second byte and T its 0x10 bit: ff02::1 -> 0x20,
    #       ff05::2 -> 0x50, ff15::1 (transient, site) -> 0x58, ff0e::1 -> 0xe0
    #   anything else                            -> 0
    # (The registry's prose still says "the first bit" for IPv4; its diagram and bit legend,
    # "Bit 7: set to 1 if IPv4 multicast", are the errata's correction.  Wireshark and
    # nfdump show the raw octet, so no collector depends on the reading.)
    InformationElement(206, "isMulticast", _U8, 1, 206, "is_multicast"),
    # Post-NAT tuple from conntrack.  An untranslated flow has all-zero columns: 0.0.0.0 / :: and
    # port 0 on the wire.
    InformationElement(225, "postNATSourceIPv4Address", _V4, 4, 225, "nat_src_addr"),
    InformationElement(226, "postNATDestinationIPv4Address", _V4, 4, 226, "nat_dst_addr"),
    InformationElement(227, "postNAPTSourceTransportPort", _U16, 2, 227, "nat_src_port"),
    InformationElement(228, "postNAPTDestinationTransportPort", _U16, 2, 228, "nat_dst_port"),
    # natEvent values (flow-protocols.md §3.12): 4/5 NAT44 session create/delete.  0 (reserved)
    # marks an ordinary flow record; only NAT event records carry this IE (templates.py).
    InformationElement(230, "natEvent", _U8, 1, 230, "nat_event"),
    # QinQ: the customer (inner) tag's VLAN id, 0 = none; outer stays in vlanId (docs/architecture.md).
    InformationElement(245, "dot1qCustomerVlanId", _U16, 2, 245, "inner_vlan_id"),
    InformationElement(281, "postNATSourceIPv6Address", _V6, 16, 281, "nat_src_addr"),
    InformationElement(282, "postNATDestinationIPv6Address", _V6, 16, 282, "nat_dst_addr"),
    InformationElement(304, "selectorAlgorithm", _U16, 2, 304),
    InformationElement(305, "samplingPacketInterval", _U32, 4, 305),
    InformationElement(306, "samplingPacketSpace", _U32, 4, 306),
    # The time of a NAT event (conntrack's event, stored as the record's start_ms = end_ms).
    # As v9 field 323 it is Cisco NSEL's NF_F_EVENT_TIME_MSEC, which nfdump reads in v9 too.
    InformationElement(323, "observationTimeMilliseconds", _MS, 8, 323, "start_ms"),
)

BY_NAME = MappingProxyType({ie.name: ie for ie in INFORMATION_ELEMENTS})
BY_ID = MappingProxyType({ie.ie_id: ie for ie in INFORMATION_ELEMENTS})
