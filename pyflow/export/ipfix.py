"""IPFIX (RFC 7011) message encoder: a pure function from a record batch to datagrams.

The caller owns the transport and the template clock: it says when templates
are due (``send_templates``) and carries :class:`IpfixState` from one call to
the next, so this module has no hidden state and is trivial to test.

Records are encoded column-wise by numpy (see ``templates.Template.fill``);
the only Python loop is one iteration per *message*, which just slices the
already encoded bytes into Data Sets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from pyflow.export.templates import SET_HEADER_LENGTH, STANDARD_TEMPLATES, Template, ipfix_template_set
from pyflow.records import RECORD_DTYPE

IPFIX_VERSION = 10
_HEADER = struct.Struct("!HHIII")
HEADER_LENGTH = _HEADER.size
_SET_HEADER = struct.Struct("!HH")
DEFAULT_MAX_SIZE = 1472  # 1500-byte Ethernet MTU - 20 (IPv4) - 8 (UDP)
MAX_MESSAGE_SIZE = 0xFFFF  # the header's Length field is 16 bits (RFC 7011 §10)
_SEQUENCE_MODULUS = 1 << 32


@dataclass(frozen=True)
class IpfixState:
    """What one exporter (per collector and Observation Domain) carries between messages.

    ``sequence`` is RFC 7011 §3.1's Sequence Number for the *next* message:
    the count of Data Records sent before it, mod 2^32.  Template records do
    not count, so a template-only message shares its number with the next one.
    """

    sequence: int = 0
    observation_domain_id: int = 0


class _DataQueue:
    """The encoded data records of one template, handed out front to back as Data Sets."""

    def __init__(self, template: Template, records: np.ndarray) -> None:
        self._template_id = template.template_id
        self._record_length = template.record_length
        self._data = memoryview(template.encode_records(records))
        self._offset = 0

    @property
    def remaining(self) -> int:
        """Records not yet placed in a Data Set."""
        return (len(self._data) - self._offset) // self._record_length

    def take_set(self, room: int) -> tuple[bytes, memoryview, int]:
        """As many records as fit in ``room`` bytes, as one Data Set (unpadded).

        Returns the set header, the record bytes and the record count; the
        count is 0 (and the set must not be sent) when nothing fits.
        """
        fit = max(0, (room - SET_HEADER_LENGTH) // self._record_length)
        n = min(self.remaining, fit)
        start = self._offset
        self._offset += n * self._record_length
        header = _SET_HEADER.pack(self._template_id, SET_HEADER_LENGTH + n * self._record_length)
        return header, self._data[start : self._offset], n


def encode(
    records: np.ndarray,
    state: IpfixState,
    export_time_s: int,
    send_templates: bool,
    max_size: int = DEFAULT_MAX_SIZE,
    templates: Mapping[int, Template] = STANDARD_TEMPLATES,
) -> tuple[list[bytes], IpfixState]:
    """Encode a ``RECORD_DTYPE`` batch into IPFIX messages of at most ``max_size`` bytes.

    ``templates`` maps an ``ip_version`` to the template its records use (the
    standard IPv4/IPv6 flow templates by default).  Data Sets appear in that
    order, so IPv4 records precede IPv6 ones; within a version the batch
    order is kept.  With ``send_templates`` the first message starts with a
    Template Set holding every template in ``templates`` (RFC 7011 §8.2: a
    template precedes its data); an empty batch then yields that message alone.
    Returns the messages and the state for the next call.
    """
    template_set = ipfix_template_set(templates.values()) if send_templates else b""
    _check_max_size(max_size, templates, len(template_set))
    queues = _split_by_version(records, templates)
    messages = []
    sequence = state.sequence % _SEQUENCE_MODULUS
    for body, n_records in _message_bodies(queues, template_set, max_size):
        header = _HEADER.pack(
            IPFIX_VERSION, HEADER_LENGTH + len(body), export_time_s, sequence, state.observation_domain_id
        )
        messages.append(header + body)
        sequence = (sequence + n_records) % _SEQUENCE_MODULUS
    return messages, replace(state, sequence=sequence)


def _check_max_size(max_size: int, templates: Mapping[int, Template], template_set_length: int) -> None:
    """Every message must be able to carry the template set, or one record of any template."""
    if not templates:
        raise ValueError("no templates given")
    one_record = SET_HEADER_LENGTH + max(t.record_length for t in templates.values())
    needed = HEADER_LENGTH + max(one_record, template_set_length)
    if not needed <= max_size <= MAX_MESSAGE_SIZE:
        raise ValueError(f"max_size {max_size} must be within {needed}..{MAX_MESSAGE_SIZE}")


def _split_by_version(records: np.ndarray, templates: Mapping[int, Template]) -> list[_DataQueue]:
    """One queue per template, fed by the records whose ``ip_version`` maps to it."""
    if records.dtype != RECORD_DTYPE:
        raise TypeError(f"expected a RECORD_DTYPE batch, got {records.dtype}")
    versions = records["ip_version"]
    present = np.flatnonzero(np.bincount(versions, minlength=256))
    unknown = sorted(set(present.tolist()) - set(templates))
    if unknown:
        raise ValueError(f"no template for ip_version {unknown}")
    # take() with indices copies a structured batch ~4x faster than a boolean mask.
    return [
        _DataQueue(template, records.take(np.flatnonzero(versions == version)))
        for version, template in templates.items()
    ]


def _message_bodies(
    queues: list[_DataQueue], template_set: bytes, max_size: int
) -> Iterator[tuple[bytes, int]]:
    """Greedily fill messages: template set first (if any), then Data Sets in queue order.

    Yields each message body (everything after the header) and the number of
    Data Records in it.  ``_check_max_size`` guarantees every message makes
    progress.
    """
    pending_templates = template_set
    while pending_templates or any(q.remaining for q in queues):
        parts: list[bytes | memoryview] = [pending_templates]
        room = max_size - HEADER_LENGTH - len(pending_templates)
        pending_templates = b""
        n_records = 0
        for queue in queues:
            header, data, n = queue.take_set(room)
            if n:
                parts += (header, data)
                room -= len(header) + len(data)
                n_records += n
        yield b"".join(parts), n_records
