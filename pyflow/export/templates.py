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

Some elements are not stored in the batch but follow from it and the export
clock (flowStart/EndSysUpTime, systemInitTimeMilliseconds).  They are
*derived columns* (:data:`DERIVED_COLUMNS`): computed column-wise at fill
time, so every encoder gets them from this one place.

The second half of the module is what IPFIX and v9 messages share: whole
sets (templates) and data queues, greedily packed into bounded messages.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from pyflow.export.ie import BY_NAME, InformationElement
from pyflow.records import RECORD_DTYPE

if TYPE_CHECKING:
    from pyflow.export.target import ExportClock

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
MAX_MESSAGE_SIZE = 0xFFFF  # both headers carry 16-bit lengths (RFC 7011 §10; v9 by its UDP payload)
_UPTIME_MODULUS = 1 << 32


# --------------------------------------------------------------------------
# Derived columns: values computed from a batch and the export clock.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DerivedColumn:
    """A column an IE can be filled from that the batch does not store.

    ``compute`` returns the column for a batch (or one scalar for all of it);
    ``dtype`` is its width, checked against the wire length like a batch column.
    """

    dtype: np.dtype
    compute: Callable[[np.ndarray, ExportClock], np.ndarray | np.generic]


def _uptime_ms(column: str) -> Callable[[np.ndarray, ExportClock], np.ndarray]:
    """``(column - boot) mod 2^32``: v9's FIRST/LAST_SWITCHED and IPFIX 22/21.

    This is the same wrapping millisecond clock as the v9 header's sysUptime
    (``clock.uptime_ms mod 2^32``), so a collector's ``header time - (sysUptime
    - FIRST_SWITCHED)`` gives back the absolute time even across the 49.7-day
    wrap.  uint64 subtraction wraps mod 2^64, and mod 2^32 of that is exact.
    """

    def compute(records: np.ndarray, clock: ExportClock) -> np.ndarray:
        boot = np.uint64(clock.boot_unix_ms % (1 << 64))
        return ((records[column] - boot) % np.uint64(_UPTIME_MODULUS)).astype(np.uint32)

    return compute


def _system_init_ms(records: np.ndarray, clock: ExportClock) -> np.generic:
    """systemInitTimeMilliseconds (160): the wall time of sysUptime 0, the same for every record."""
    return np.uint64(clock.boot_unix_ms % (1 << 64))


DERIVED_COLUMNS: Mapping[str, DerivedColumn] = MappingProxyType(
    {
        "start_uptime_ms": DerivedColumn(np.dtype(np.uint32), _uptime_ms("start_ms")),
        "end_uptime_ms": DerivedColumn(np.dtype(np.uint32), _uptime_ms("end_ms")),
        "system_init_ms": DerivedColumn(np.dtype(np.uint64), _system_init_ms),
    }
)


def _column_dtype(column: str) -> np.dtype:
    if column in DERIVED_COLUMNS:
        return DERIVED_COLUMNS[column].dtype
    return RECORD_DTYPE[column]


# --------------------------------------------------------------------------
# Templates.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A data template: its id and the ``(information element, wire length)`` of each field.

    Construction validates that every field can be filled from a record batch,
    so any Template that exists can encode data.  An integer field narrower
    than its column is refused unless ``reduced_size`` is set: then it is RFC
    7011 §6.2 reduced-size encoding (MikroTik sends 4-byte counters), and a
    value that does not fit saturates at the field's maximum rather than
    wrapping to a small, plausible-looking number.
    """

    template_id: int
    fields: tuple[tuple[InformationElement, int], ...]
    reduced_size: bool = False

    def __post_init__(self) -> None:
        if not MIN_DATA_TEMPLATE_ID <= self.template_id <= 0xFFFF:
            raise ValueError(f"template id {self.template_id} is outside {MIN_DATA_TEMPLATE_ID}..65535")
        if not self.fields:
            raise ValueError("a template needs at least one field (zero fields means withdrawal)")
        names = [ie.name for ie, _ in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"template {self.template_id} repeats an information element: {names}")
        for ie, length in self.fields:
            _check_fillable(ie, length, self.reduced_size)

    @cached_property
    def dtype(self) -> np.dtype:
        """Packed big-endian dtype of one data record; itemsize is the record length."""
        return np.dtype([(ie.name, _wire_format(ie, length)) for ie, length in self.fields])

    @property
    def record_length(self) -> int:
        """Bytes in one data record."""
        return int(self.dtype.itemsize)

    @cached_property
    def needs_clock(self) -> bool:
        """True when a field is a derived column, so filling needs the export clock."""
        return any(ie.column in DERIVED_COLUMNS for ie, _ in self.fields)

    def ipfix_record(self) -> bytes:
        """The IPFIX Template Record (RFC 7011 §3.4.1): id, count, IANA field specifiers."""
        return self._template_record([ie.ie_id for ie, _ in self.fields])

    def v9_record(self) -> bytes:
        """The v9 template record (RFC 3954 §5.2): same layout, v9 field types."""
        return self._template_record(v9_field_types(ie for ie, _ in self.fields))

    def _template_record(self, field_types: list[int]) -> bytes:
        header = _TWO_U16.pack(self.template_id, len(self.fields))
        lengths = [length for _, length in self.fields]
        return header + b"".join(map(_TWO_U16.pack, field_types, lengths))

    def fill(self, records: np.ndarray, clock: ExportClock | None = None) -> np.ndarray:
        """Data records for a ``RECORD_DTYPE`` batch, one numpy column operation per field.

        ``clock`` is needed only by templates with derived columns.
        """
        if records.dtype != RECORD_DTYPE:
            raise TypeError(f"expected a RECORD_DTYPE batch, got {records.dtype}")
        if self.needs_clock and clock is None:
            raise ValueError(f"template {self.template_id} has derived fields: an export clock is needed")
        out = np.empty(len(records), dtype=self.dtype)
        for ie, length in self.fields:
            out[ie.name] = _column_values(records, ie, length, clock)
        return out

    def encode_records(self, records: np.ndarray, clock: ExportClock | None = None) -> bytes:
        """The wire bytes of the data records for ``records``, back to back, no padding."""
        return self.fill(records, clock).tobytes()


def v9_field_types(ies: Iterable[InformationElement]) -> list[int]:
    """The v9 field type of each IE, refusing IEs v9 cannot carry."""
    ies = list(ies)
    missing = [ie.name for ie in ies if ie.v9_type is None]
    if missing:
        raise ValueError(f"NetFlow v9 has no field type for {missing}")
    return [ie.v9_type for ie in ies if ie.v9_type is not None]


def _check_fillable(ie: InformationElement, length: int, reduced_size: bool) -> None:
    """Refuse fields no column feeds, or that would silently lose bits."""
    if ie.column is None:
        raise ValueError(f"{ie.name} has no record column to fill it from")
    column = _column_dtype(ie.column)
    if ie.abstract_type.is_integer:
        if length not in (1, 2, 4, 8) or (length < column.itemsize and not reduced_size):
            raise ValueError(f"{ie.name}: cannot send {ie.column} ({column.itemsize} bytes) in {length}")
    elif column.kind != "V" or length > column.itemsize:
        raise ValueError(f"{ie.name}: {ie.column} ({column}) cannot give {length} raw bytes")


def _wire_format(ie: InformationElement, length: int) -> str | tuple[str, int]:
    """Big-endian unsigned for integers; a raw byte run for addresses, strings and other octets."""
    if ie.abstract_type.is_integer:
        return f">u{length}"
    return ("u1", length)


def _column_values(
    records: np.ndarray, ie: InformationElement, length: int, clock: ExportClock | None
) -> np.ndarray | np.generic:
    """The values of ``ie`` for every record.

    Integers are returned as the column (numpy casts and byte-swaps on
    assignment), saturated first when the field is narrower than the column.
    Byte-valued elements take the *last* ``length`` bytes of the raw column:
    that is the IPv4 address inside a v4-mapped 16-byte one.
    """
    assert ie.column is not None  # guaranteed by _check_fillable
    if ie.column in DERIVED_COLUMNS:
        assert clock is not None  # guaranteed by Template.fill
        values = DERIVED_COLUMNS[ie.column].compute(records, clock)
    else:
        values = records[ie.column]
    if ie.abstract_type.is_integer:
        if length < values.dtype.itemsize:
            return np.minimum(values, np.uint64((1 << (8 * length)) - 1))
        return values
    width = values.dtype.itemsize
    return np.ascontiguousarray(values).view(np.uint8).reshape(-1, width)[:, width - length :]


def build_template(template_id: int, fields: Iterable[str | tuple[str, int]]) -> Template:
    """A template sending the named IEs, in order.

    Each field is an IE name (sent at the length the IE table gives) or a
    ``(name, length)`` pair; asking for an integer length narrower than the
    column opts the template into reduced-size encoding (see :class:`Template`).
    """
    resolved = []
    for field in fields:
        name, length = (field, None) if isinstance(field, str) else field
        try:
            ie = BY_NAME[name]
        except KeyError:
            raise ValueError(f"unknown information element {name!r}") from None
        resolved.append((ie, ie.length if length is None else length))
    reduced = any(
        ie.column is not None and length < _column_dtype(ie.column).itemsize and ie.abstract_type.is_integer
        for ie, length in resolved
    )
    return Template(template_id, tuple(resolved), reduced_size=reduced)


def set_bytes(set_id: int, records: Iterable[bytes], align: int = 1) -> bytes:
    """One set/flowset: header, records, and zero padding up to a multiple of ``align`` bytes."""
    body = b"".join(records)
    padding = -(SET_HEADER_LENGTH + len(body)) % align
    return _TWO_U16.pack(set_id, SET_HEADER_LENGTH + len(body) + padding) + body + bytes(padding)


def ipfix_template_set(templates: Iterable[Template]) -> bytes:
    """An IPFIX Template Set (id 2) holding ``templates``; records are 4-byte multiples, no padding."""
    return set_bytes(IPFIX_TEMPLATE_SET_ID, (t.ipfix_record() for t in templates))


def v9_template_flowset(templates: Iterable[Template]) -> bytes:
    """A NetFlow v9 Template FlowSet (id 0); already 4-byte aligned, so no padding is needed."""
    return set_bytes(V9_TEMPLATE_FLOWSET_ID, (t.v9_record() for t in templates))


# --------------------------------------------------------------------------
# Sets and messages: what the IPFIX and v9 encoders share.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class WholeSet:
    """A set that travels whole in one message: a (options) template set.

    ``records`` is how many records it holds (v9 counts them in its header).
    """

    data: bytes
    records: int


class DataQueue:
    """The encoded data records of one template, handed out front to back as data sets.

    ``flow`` says whether these are flow records (IPFIX sequence numbers count
    only those, see ``ipfix.py``) or options data.  ``align`` pads each set to
    a multiple of that many bytes (v9: 4, with at most 3 zero bytes; IPFIX: 1).
    """

    def __init__(self, set_id: int, record_length: int, data: bytes, *, flow: bool, align: int = 1) -> None:
        if record_length <= 0 or len(data) % record_length:
            raise ValueError(f"{len(data)} bytes are not whole records of {record_length}")
        self.set_id = set_id
        self.record_length = record_length
        self.flow = flow
        self._align = align
        self._data = memoryview(data)
        self._offset = 0

    @property
    def remaining(self) -> int:
        """Records not yet placed in a data set."""
        return (len(self._data) - self._offset) // self.record_length

    def set_length(self, n: int) -> int:
        """Bytes a data set of ``n`` records takes, padding included."""
        unpadded = SET_HEADER_LENGTH + n * self.record_length
        return unpadded + -unpadded % self._align

    def take_set(self, room: int) -> tuple[list[bytes | memoryview], int]:
        """As many records as fit in ``room`` bytes, as one data set.

        Returns the set's parts (header, records, padding) and the record
        count; the count is 0, and nothing must be sent, when nothing fits.
        """
        n = min(self.remaining, max(0, (room - SET_HEADER_LENGTH) // self.record_length))
        while n and self.set_length(n) > room:
            n -= 1
        if n == 0:
            return [], 0
        start = self._offset
        self._offset += n * self.record_length
        length = self.set_length(n)
        padding = length - SET_HEADER_LENGTH - n * self.record_length
        return [_TWO_U16.pack(self.set_id, length), self._data[start : self._offset], bytes(padding)], n


Section = WholeSet | DataQueue


@dataclass(frozen=True)
class MessageBody:
    """Everything after the message header, and what the header needs to know about it."""

    data: bytes
    records: int  # every record: templates, options templates, flow and options data (v9 Count)
    flow_records: int  # flow data records only


def flow_queues(
    records: np.ndarray, templates: Mapping[int, Template], clock: ExportClock, *, align: int = 1
) -> list[DataQueue]:
    """One queue per template, fed by the records whose ``ip_version`` maps to it.

    Queue order is ``templates`` order, so IPv4 records precede IPv6 ones;
    within a version the batch order is kept.
    """
    if records.dtype != RECORD_DTYPE:
        raise TypeError(f"expected a RECORD_DTYPE batch, got {records.dtype}")
    if not templates:
        raise ValueError("no templates given")
    versions = records["ip_version"]
    present = np.flatnonzero(np.bincount(versions, minlength=256))
    unknown = sorted(set(present.tolist()) - set(templates))
    if unknown:
        raise ValueError(f"no template for ip_version {unknown}")
    # take() with indices copies a structured batch ~4x faster than a boolean mask.
    return [
        DataQueue(
            template.template_id,
            template.record_length,
            template.encode_records(records.take(np.flatnonzero(versions == version)), clock),
            flow=True,
            align=align,
        )
        for version, template in templates.items()
    ]


def check_max_size(sections: Sequence[Section], header_length: int, max_size: int) -> None:
    """Every message must be able to carry any whole set, or one record of any queue.

    Empty queues are checked too, so a max_size that suits IPv4-only batches
    fails at once rather than on the first IPv6 record.
    """
    needed = header_length + max(
        (len(s.data) if isinstance(s, WholeSet) else s.set_length(1)) for s in sections
    )
    if not needed <= max_size <= MAX_MESSAGE_SIZE:
        raise ValueError(f"max_size {max_size} must be within {needed}..{MAX_MESSAGE_SIZE}")


def message_bodies(sections: Sequence[Section], room: int) -> Iterator[MessageBody]:
    """Greedily fill messages of ``room`` bytes with the sections, strictly in order.

    A whole set that does not fit, or a queue that could not be emptied,
    closes the message: nothing may overtake it (a template must precede its
    data, options must precede flow data).  :func:`check_max_size` guarantees
    every message makes progress.  Empty queues produce nothing, so a call
    with no templates and no records yields no message at all.
    """
    pending = deque(s for s in sections if isinstance(s, WholeSet) or s.remaining)
    while pending:
        parts: list[bytes | memoryview] = []
        left, records, flow_records = room, 0, 0
        while pending:
            section = pending[0]
            if isinstance(section, WholeSet):
                if len(section.data) > left:
                    break
                parts.append(section.data)
                left -= len(section.data)
                records += section.records
            else:
                taken, n = section.take_set(left)
                parts += taken
                left -= sum(len(p) for p in taken)
                records += n
                flow_records += n if section.flow else 0
                if section.remaining:
                    break
            pending.popleft()
        if not parts:  # only reachable when check_max_size was skipped; never loop forever
            raise ValueError(f"a section does not fit in {room} bytes")
        yield MessageBody(b"".join(parts), records, flow_records)


# --------------------------------------------------------------------------
# The standard flow templates: one field group, only addresses and times differ.
# --------------------------------------------------------------------------

_FIELDS_BEFORE_TIME: tuple[str, ...] = (
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
)
_FIELDS_AFTER_TIME: tuple[str, ...] = ("flowEndReason",)

TIME_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        # Absolute ms: every collector places these without help (flow-protocols.md §3.10).
        "absolute": ("flowStartMilliseconds", "flowEndMilliseconds"),
        # v9 FIRST/LAST_SWITCHED: the v9 header's sysUptime and UNIX Secs anchor them.
        "uptime": ("flowStartSysUpTime", "flowEndSysUpTime"),
        # RouterOS IPFIX: 22/21 mean nothing without 160, so 160 goes in every record, after them.
        "routeros": ("flowStartSysUpTime", "flowEndSysUpTime", "systemInitTimeMilliseconds"),
    }
)
_ADDRESS_FIELDS = {
    4: ("sourceIPv4Address", "destinationIPv4Address"),
    6: ("sourceIPv6Address", "destinationIPv6Address"),
}


def flow_templates(ipv4_id: int, ipv6_id: int, time_fields: Sequence[str]) -> Mapping[int, Template]:
    """The flow template for each IP version (key: ``ip_version``), with the given time fields."""
    ids = {4: ipv4_id, 6: ipv6_id}
    return MappingProxyType(
        {
            version: build_template(
                ids[version], (*_ADDRESS_FIELDS[version], *_FIELDS_BEFORE_TIME, *time_fields, *_FIELDS_AFTER_TIME)
            )
            for version in (4, 6)
        }
    )


STANDARD_TEMPLATES = flow_templates(IPV4_FLOW_TEMPLATE_ID, IPV6_FLOW_TEMPLATE_ID, TIME_FIELDS["absolute"])
"""The absolute-time flow template for each IP version (key: ``ip_version``)."""

IPV4_FLOW = STANDARD_TEMPLATES[4]
IPV6_FLOW = STANDARD_TEMPLATES[6]
