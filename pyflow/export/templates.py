"""Templates: which information elements a data record carries, and how to fill them.

A :class:`Template` is pure data (an id and a tuple of ``(IE, length)``)
built from IE names by :func:`build_template`.  From that one definition it
derives everything the encoders need, so the IPFIX and v9 forms of a template
and its data records cannot drift apart:

* the template record bytes (IPFIX Set 2 and v9 FlowSet 0 share the layout,
  only the field type numbers may differ);
* a packed big-endian numpy dtype whose ``tobytes()`` *is* the data record
  wire form (RFC 7011 §3.4.3: values in template order, no alignment);
* a vectorised fill from a ``RECORD_DTYPE`` batch into that dtype.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

import numpy as np

from pyflow.export.ie import BY_NAME, InformationElement
from pyflow.records import RECORD_DTYPE

IPFIX_TEMPLATE_SET_ID = 2
V9_TEMPLATE_FLOWSET_ID = 0
MIN_DATA_TEMPLATE_ID = 256  # 0..255 are set/flowset ids, never template ids

# Stable for the life of the process and across releases: collectors key their
# template cache on the id, and RFC 7011 §8.4 forbids quick reuse over UDP.
IPV4_FLOW_TEMPLATE_ID = 256
IPV6_FLOW_TEMPLATE_ID = 257

# Set header, template record header and field specifier are all two u16s.
_TWO_U16 = struct.Struct("!HH")
SET_HEADER_LENGTH = _TWO_U16.size


@dataclass(frozen=True)
class Template:
    """A data template: its id and the ``(information element, wire length)`` of each field.

    Construction validates that every field can be filled from a record batch,
    so any Template that exists can encode data.
    """

    template_id: int
    fields: tuple[tuple[InformationElement, int], ...]

    def __post_init__(self) -> None:
        if not MIN_DATA_TEMPLATE_ID <= self.template_id <= 0xFFFF:
            raise ValueError(f"template id {self.template_id} is outside {MIN_DATA_TEMPLATE_ID}..65535")
        if not self.fields:
            raise ValueError("a template needs at least one field (zero fields means withdrawal)")
        names = [ie.name for ie, _ in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"template {self.template_id} repeats an information element: {names}")
        for ie, length in self.fields:
            _check_fillable(ie, length)

    @cached_property
    def dtype(self) -> np.dtype:
        """Packed big-endian dtype of one data record; itemsize is the record length."""
        return np.dtype([(ie.name, _wire_format(ie, length)) for ie, length in self.fields])

    @property
    def record_length(self) -> int:
        """Bytes in one data record."""
        return int(self.dtype.itemsize)

    def ipfix_record(self) -> bytes:
        """The IPFIX Template Record (RFC 7011 §3.4.1): id, count, IANA field specifiers."""
        return self._template_record([ie.ie_id for ie, _ in self.fields])

    def v9_record(self) -> bytes:
        """The v9 template record (RFC 3954 §5.2): same layout, v9 field types."""
        missing = [ie.name for ie, _ in self.fields if ie.v9_type is None]
        if missing:
            raise ValueError(f"NetFlow v9 has no field type for {missing}")
        return self._template_record([ie.v9_type for ie, _ in self.fields if ie.v9_type is not None])

    def _template_record(self, field_types: list[int]) -> bytes:
        header = _TWO_U16.pack(self.template_id, len(self.fields))
        lengths = [length for _, length in self.fields]
        return header + b"".join(map(_TWO_U16.pack, field_types, lengths))

    def fill(self, records: np.ndarray) -> np.ndarray:
        """Data records for a ``RECORD_DTYPE`` batch, one numpy column copy per field."""
        if records.dtype != RECORD_DTYPE:
            raise TypeError(f"expected a RECORD_DTYPE batch, got {records.dtype}")
        out = np.empty(len(records), dtype=self.dtype)
        for ie, length in self.fields:
            out[ie.name] = _column_values(records, ie, length)
        return out

    def encode_records(self, records: np.ndarray) -> bytes:
        """The wire bytes of the data records for ``records``, back to back, no padding."""
        return self.fill(records).tobytes()


def _check_fillable(ie: InformationElement, length: int) -> None:
    """Refuse fields no record column feeds, or that would silently lose bits."""
    if ie.column is None:
        raise ValueError(f"{ie.name} has no record column to fill it from")
    column = RECORD_DTYPE[ie.column]
    if ie.abstract_type.is_integer:
        if length not in (1, 2, 4, 8) or length < column.itemsize:
            raise ValueError(f"{ie.name}: cannot send {ie.column} ({column.itemsize} bytes) in {length}")
    elif column.kind != "V" or length > column.itemsize:
        raise ValueError(f"{ie.name}: {ie.column} ({column}) cannot give {length} raw bytes")


def _wire_format(ie: InformationElement, length: int) -> str | tuple[str, int]:
    """Big-endian unsigned for integers; a raw byte run for addresses and other octets."""
    if ie.abstract_type.is_integer:
        return f">u{length}"
    return ("u1", length)


def _column_values(records: np.ndarray, ie: InformationElement, length: int) -> np.ndarray:
    """The values of ``ie`` for every record.

    Integers are returned as the column (numpy casts and byte-swaps on
    assignment).  Byte-valued elements take the *last* ``length`` bytes of
    the raw column: that is the IPv4 address inside a v4-mapped 16-byte one.
    """
    assert ie.column is not None  # guaranteed by _check_fillable
    values = records[ie.column]
    if ie.abstract_type.is_integer:
        return values
    width = values.dtype.itemsize
    return np.ascontiguousarray(values).view(np.uint8).reshape(-1, width)[:, width - length :]


def build_template(template_id: int, ie_names: Iterable[str]) -> Template:
    """A template sending the named IEs, in order, each at the length the IE table gives."""
    try:
        ies = [BY_NAME[name] for name in ie_names]
    except KeyError as exc:
        raise ValueError(f"unknown information element {exc.args[0]!r}") from None
    return Template(template_id, tuple((ie, ie.length) for ie in ies))


def _set(set_id: int, records: Iterable[bytes]) -> bytes:
    body = b"".join(records)
    return _TWO_U16.pack(set_id, SET_HEADER_LENGTH + len(body)) + body


def ipfix_template_set(templates: Iterable[Template]) -> bytes:
    """An IPFIX Template Set (id 2) holding ``templates``; records are 4-byte multiples, no padding."""
    return _set(IPFIX_TEMPLATE_SET_ID, (t.ipfix_record() for t in templates))


def v9_template_flowset(templates: Iterable[Template]) -> bytes:
    """A NetFlow v9 Template FlowSet (id 0); already 4-byte aligned, so no padding is needed."""
    return _set(V9_TEMPLATE_FLOWSET_ID, (t.v9_record() for t in templates))


# The standard flow templates: one field group, only the address IEs differ.
FLOW_FIELDS: tuple[str, ...] = (
    "sourceTransportPort",
    "destinationTransportPort",
    "protocolIdentifier",
    "ipClassOfService",
    "tcpControlBits",
    "ingressInterface",
    "egressInterface",
    "ipVersion",
    "flowDirection",
    "octetDeltaCount",
    "packetDeltaCount",
    "flowStartMilliseconds",
    "flowEndMilliseconds",
    "flowEndReason",
)
_ADDRESS_FIELDS = {
    4: ("sourceIPv4Address", "destinationIPv4Address"),
    6: ("sourceIPv6Address", "destinationIPv6Address"),
}
_FLOW_TEMPLATE_IDS = {4: IPV4_FLOW_TEMPLATE_ID, 6: IPV6_FLOW_TEMPLATE_ID}

STANDARD_TEMPLATES: Mapping[int, Template] = MappingProxyType(
    {
        version: build_template(_FLOW_TEMPLATE_IDS[version], (*_ADDRESS_FIELDS[version], *FLOW_FIELDS))
        for version in (4, 6)
    }
)
"""The flow template for each IP version (key: ``ip_version``)."""

IPV4_FLOW = STANDARD_TEMPLATES[4]
IPV6_FLOW = STANDARD_TEMPLATES[6]
