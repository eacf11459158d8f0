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

The second part of the module is what IPFIX and v9 messages share: whole
sets (templates) and data queues, greedily packed into bounded messages.
The last part builds the templates a target sends from its field set
(``pyflow.fields``, RouterOS's ``/ip traffic-flow ipfix`` toggles) and time
mode: :func:`export_templates`.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from types import MappingProxyType

import numpy as np

from pyflow.export.context import ExportClock, TemplateSchedule
from pyflow.export.ie import BY_NAME, InformationElement
from pyflow.fields import END_TIME, ROUTEROS_DEFAULTS, START_TIME, SYSTEM_INIT_TIME, TIME_ROLES, FieldSet
from pyflow.records import RECORD_DTYPE

IPFIX_TEMPLATE_SET_ID = 2
NO_TEMPLATES = TemplateSchedule()  # no message of the call begins with templates
V9_TEMPLATE_FLOWSET_ID = 0
MIN_DATA_TEMPLATE_ID = 256  # 0..255 are set/flowset ids, never template ids

# The default field set's flow templates (absolute times; v9 too).  Ids are stable for the
# life of the process and across restarts: collectors key their template cache on the id,
# and RFC 7011 §8.4 forbids reusing one with another layout over UDP.  Other field sets get
# other ids (export_templates, layout_template_id).
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
        # Padding at least a record long would read as one more record (RFC 7011 §3.3.1 forbids
        # it; RFC 3954 does not say).  Only v9 pads, and only records under 4 bytes can meet it:
        # 3-byte records (every field toggle off) padded by 3.  One record fewer avoids it; the
        # rest go in the next set.
        while n > 1 and self.set_length(n) - SET_HEADER_LENGTH - n * self.record_length >= self.record_length:
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
    data_records: int = 0  # every data record: flow and options data (RFC 7011's sequence counts these)


def flow_queues(
    records: np.ndarray,
    templates: ExportTemplates | Mapping[int, Template],
    clock: ExportClock,
    *,
    align: int = 1,
) -> list[DataQueue]:
    """One queue per template, fed by the records that belong to it.

    Records with ``nat_event`` 0 are flow records and go to the flow template
    of their ``ip_version``; the others are NAT events and go to the NAT
    event template of their version.  A record no template takes is an
    error (callers filter what a target cannot carry, and count it).
    Queue order is ``templates.all()`` order: IPv4 flows, IPv6 flows, then
    NAT events; within a template the batch order is kept.
    """
    if records.dtype != RECORD_DTYPE:
        raise TypeError(f"expected a RECORD_DTYPE batch, got {records.dtype}")
    if not isinstance(templates, ExportTemplates):
        templates = ExportTemplates(templates)
    versions = records["ip_version"]
    is_event = records["nat_event"] != 0
    queues = []
    for mapping, selected, what in ((templates.flows, ~is_event, "ip_version"),
                                    (templates.nat_events, is_event, "NAT events (nat_event != 0) of ip_version")):
        present = np.flatnonzero(np.bincount(versions[selected], minlength=256))
        unknown = sorted(set(present.tolist()) - set(mapping))
        if unknown:
            raise ValueError(f"no template for {what} {unknown}")
        for version, template in mapping.items():
            # take() with indices copies a structured batch ~4x faster than a boolean mask.
            chosen = records.take(np.flatnonzero(selected & (versions == version)))
            data = template.encode_records(chosen, clock)
            queues.append(DataQueue(template.template_id, template.record_length, data, flow=True, align=align))
    return queues


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


def message_bodies(sections: Sequence[Section], room: int,
                   templates: Callable[[], Sequence[Section]] | None = None,
                   schedule: TemplateSchedule = NO_TEMPLATES) -> Iterator[MessageBody]:
    """Greedily fill messages of ``room`` bytes with the sections, strictly in order.

    A whole set that does not fit, or a queue that could not be emptied,
    closes the message: nothing may overtake it (a template must precede its
    data, options must precede flow data).  :func:`check_max_size` guarantees
    every message makes progress.  Empty queues produce nothing, so a call
    with no templates and no records yields no message at all.

    ``templates`` makes fresh template (and options) sections; a message the
    ``schedule`` names begins with them.  While an earlier copy is still on
    its way (many options records), the next is not added: data always moves.
    """
    pending = deque(s for s in sections if isinstance(s, WholeSet) or s.remaining)
    due, index = schedule.first, 0
    last: Section | None = None  # the last section of the templates most recently added
    while True:
        if templates is not None and due is not None and index >= due and (pending or index == 0) \
                and not any(s is last for s in pending):
            fresh = [s for s in templates() if isinstance(s, WholeSet) or s.remaining]
            if fresh:
                pending.extendleft(reversed(fresh))
                last = fresh[-1]
            due = None if schedule.every is None else index + schedule.every
        if not pending:
            return
        yield _one_body(pending, room)
        index += 1


def _one_body(pending: deque[Section], room: int) -> MessageBody:
    """The next message's body, taken from the front of ``pending``."""
    parts: list[bytes | memoryview] = []
    left, records, flow_records, data_records = room, 0, 0, 0
    while pending:
        section = pending[0]
        if isinstance(section, WholeSet):
            if len(section.data) > left:
                break
            parts.append(section.data)
            left -= len(section.data)
            records += section.records
        else:
            while True:  # one set, or more when padding made take_set stop short (see there)
                taken, n = section.take_set(left)
                parts += taken
                left -= sum(len(p) for p in taken)
                records += n
                data_records += n
                flow_records += n if section.flow else 0
                if not n or not section.remaining or section.set_length(1) > left:
                    break
            if section.remaining:
                break
        pending.popleft()
    if not parts:  # only reachable when check_max_size was skipped; never loop forever
        raise ValueError(f"a section does not fit in {room} bytes")
    return MessageBody(b"".join(parts), records, flow_records, data_records)


# --------------------------------------------------------------------------
# Flow and NAT event templates, built from a field set and a time mode.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeMode:
    """The IEs the time roles of ``pyflow.fields`` become; ``system_init`` None: no 160."""

    start: str
    end: str
    system_init: str | None


TIME_MODES: Mapping[str, TimeMode] = MappingProxyType(
    {
        # Absolute ms: every collector places these without help (flow-protocols.md §3.10).
        "absolute": TimeMode("flowStartMilliseconds", "flowEndMilliseconds", None),
        # RouterOS IPFIX: 22/21 mean nothing without 160, which goes in every record, after them.
        "routeros": TimeMode("flowStartSysUpTime", "flowEndSysUpTime", "systemInitTimeMilliseconds"),
        # NetFlow v9 FIRST/LAST_SWITCHED: the header's sysUptime and UNIX Secs anchor them; 160
        # is sent too (sys-init-time), for collectors that read it.  nfcapd 1.7.1 ignores it
        # and places v9 flows by the header (whole seconds), checked.
        "uptime": TimeMode("flowStartSysUpTime", "flowEndSysUpTime", "systemInitTimeMilliseconds"),
    }
)

# Template ids.  The flow templates of the default field set keep the ids pyflow always used;
# 260/261 are the options templates (options.py); 262/263 the NAT event templates.  Any other
# layout gets an id derived from the layout itself (layout_template_id), from 264 up.
DEFAULT_FLOW_TEMPLATE_IDS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "absolute": (IPV4_FLOW_TEMPLATE_ID, IPV6_FLOW_TEMPLATE_ID),
        "routeros": (258, 259),
        "uptime": (IPV4_FLOW_TEMPLATE_ID, IPV6_FLOW_TEMPLATE_ID),
    }
)
NAT_EVENT_TEMPLATE_IDS: Mapping[int, int] = MappingProxyType({4: 262, 6: 263})
FIRST_LAYOUT_TEMPLATE_ID = 264
_FIXED_TEMPLATE_IDS = frozenset(range(MIN_DATA_TEMPLATE_ID, FIRST_LAYOUT_TEMPLATE_ID))

# NAT event records (nat-events=yes): the event, its time, the pre- and the post-NAT tuple.
_NAT_EVENT_TUPLES = {
    4: ("sourceIPv4Address", "destinationIPv4Address", "postNATSourceIPv4Address", "postNATDestinationIPv4Address"),
    6: ("sourceIPv6Address", "destinationIPv6Address", "postNATSourceIPv6Address", "postNATDestinationIPv6Address"),
}
_NAT_EVENT_FIELDS: Mapping[int, tuple[str, ...]] = MappingProxyType(
    {
        version: (
            *("observationTimeMilliseconds", "natEvent", "protocolIdentifier", src, dst),
            *("sourceTransportPort", "destinationTransportPort", nat_src, nat_dst),
            *("postNAPTSourceTransportPort", "postNAPTDestinationTransportPort"),
        )
        for version, (src, dst, nat_src, nat_dst) in _NAT_EVENT_TUPLES.items()
    }
)


@dataclass(frozen=True)
class ExportTemplates:
    """The templates one target sends: flow templates and, with nat-events=yes, NAT event templates.

    Both map an ``ip_version`` to its template; ``nat_events`` is empty when
    NAT events are off.  See :func:`flow_queues` for which record goes where.
    """

    flows: Mapping[int, Template]
    nat_events: Mapping[int, Template] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        ids = [t.template_id for t in self.all()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"template ids repeat: {ids}")

    def all(self) -> tuple[Template, ...]:
        """Every template, flows first: the order of the template set and of the data sets."""
        return (*self.flows.values(), *self.nat_events.values())


def layout_template_id(layout: Sequence[tuple[InformationElement, int]], taken: Iterable[int] = ()) -> int:
    """A template id that is a function of the layout: 264 + CRC-32 of its field specifiers mod 65272.

    The same field set always gives the same ids (stable across restarts,
    like the fixed ones), and a different layout a different id (RFC 7011
    §8.4: an id must not change layout within a session; a collector that
    cached a layout under an id would misread data).  A collision of two
    layouts is a 1 in 65272 chance and only matters if a collector sees both
    from one exporter session; an id in ``taken`` (or a fixed one) moves to
    the next free id, so the templates of one target never share an id.
    """
    taken = _FIXED_TEMPLATE_IDS | set(taken)
    span = 0x10000 - FIRST_LAYOUT_TEMPLATE_ID
    specifiers = b"".join(_TWO_U16.pack(ie.ie_id, length) for ie, length in layout)
    offset = zlib.crc32(specifiers) % span
    for step in range(span):
        candidate = FIRST_LAYOUT_TEMPLATE_ID + (offset + step) % span
        if candidate not in taken:
            return candidate
    raise ValueError("no template id left")  # unreachable: a target has a handful of templates


def _resolve(names: Iterable[str], time_mode: TimeMode) -> list[str]:
    """Time roles to the time mode's IEs (a role the mode lacks is dropped)."""
    roles = {START_TIME: time_mode.start, END_TIME: time_mode.end, SYSTEM_INIT_TIME: time_mode.system_init}
    resolved = (roles[name] if name in TIME_ROLES else name for name in names)
    return [name for name in resolved if name is not None]


def _layout(names: Sequence[str]) -> tuple[tuple[InformationElement, int], ...]:
    return build_template(MIN_DATA_TEMPLATE_ID, names).fields


@lru_cache(maxsize=64)
def export_templates(fields: FieldSet = ROUTEROS_DEFAULTS, time_mode: str = "absolute") -> ExportTemplates:
    """The templates for a field set and a time mode (absolute, routeros: IPFIX; uptime: v9).

    The IPv4 and IPv6 flow templates are the IEs of the enabled rows of
    ``pyflow.fields.FIELDS``, in table order.  Ids: a layout equal to the
    default field set's keeps its fixed id (256/257; 258/259 in routeros
    mode), any other gets :func:`layout_template_id`.  The NAT event
    templates (262/263) are there only with ``nat-events=yes``.
    """
    try:
        mode = TIME_MODES[time_mode]
    except KeyError:
        raise ValueError(f"unknown time mode {time_mode!r} (known: {', '.join(TIME_MODES)})") from None
    flows: dict[int, Template] = {}
    for version, default_id in zip((4, 6), DEFAULT_FLOW_TEMPLATE_IDS[time_mode], strict=True):
        names = _resolve(fields.ies(version), mode)
        layout = _layout(names)
        if layout == _layout(_resolve(ROUTEROS_DEFAULTS.ies(version), mode)):
            template_id = default_id
        else:
            template_id = layout_template_id(layout, taken=[t.template_id for t in flows.values()])
        flows[version] = build_template(template_id, names)
    nat_events = {}
    if "nat-events" in fields:
        nat_events = {v: build_template(NAT_EVENT_TEMPLATE_IDS[v], _NAT_EVENT_FIELDS[v]) for v in (4, 6)}
    return ExportTemplates(MappingProxyType(flows), MappingProxyType(nat_events))


_DEFAULT_TEMPLATES = export_templates(ROUTEROS_DEFAULTS, "absolute")
STANDARD_TEMPLATES = _DEFAULT_TEMPLATES.flows
"""The flow template of each IP version (key: ``ip_version``) for the default field set, absolute times."""

IPV4_FLOW = STANDARD_TEMPLATES[4]
IPV6_FLOW = STANDARD_TEMPLATES[6]
