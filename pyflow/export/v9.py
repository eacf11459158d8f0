"""NetFlow v9 (RFC 3954) export packet encoder: a pure function from a record batch to datagrams.

Same shape as ``ipfix.py`` (the caller owns transport, template clock and
:class:`V9State`), and the same templates, sets and options machinery from
``templates.py`` / ``options.py``; only the v9 specifics live here:

* the 20-byte header: Count = every record in the packet (templates, options
  templates, flow and options data), sysUptime, UNIX Secs, a Sequence Number
  that grows by one per export packet (template-only packets too), Source ID;
* flowsets padded with at most 3 zero bytes so the next starts 4-byte aligned;
* times as FIRST_SWITCHED (22) / LAST_SWITCHED (21): ms of the same wrapping
  uptime clock as the header's sysUptime (a derived column, see
  ``templates.DERIVED_COLUMNS``).  Counters go out as 8 bytes, so they never wrap.

``ExportContext.time_mode`` does not apply: v9 always sends uptimes, as
RouterOS does; the header anchors them.  ``ExportContext.fields`` does: the
templates are built from the same field set as IPFIX's (time mode "uptime").
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from pyflow.export.context import MAX_PAYLOAD_V4, ExportClock, ExportContext
from pyflow.export.options import v9_options
from pyflow.export.templates import (
    ExportTemplates,
    Section,
    Template,
    TemplateSchedule,
    WholeSet,
    check_max_size,
    export_templates,
    flow_queues,
    message_bodies,
    v9_template_flowset,
)

V9_VERSION = 9
_HEADER = struct.Struct("!HHIIII")
HEADER_LENGTH = _HEADER.size
DEFAULT_MAX_SIZE = MAX_PAYLOAD_V4  # one definition: the IPv4 target payload
FLOWSET_ALIGNMENT = 4  # RFC 3954 §5.3: pad so the next FlowSet starts on a 4-byte boundary
_MODULUS = 1 << 32

V9_TIME_MODE = "uptime"  # FIRST/LAST_SWITCHED (22/21), and 160 with sys-init-time

V9_TEMPLATES: Mapping[int, Template] = export_templates(time_mode=V9_TIME_MODE).flows
"""The v9 flow template for each IP version for the default field set: 256 (IPv4) / 257 (IPv6)."""


def templates_for(ctx: ExportContext) -> ExportTemplates:
    """The v9 templates of ``ctx.fields`` (``ctx.time_mode`` does not apply to v9)."""
    return export_templates(ctx.fields, V9_TIME_MODE)


_DEFAULT_CONTEXT = ExportContext()


@dataclass(frozen=True)
class V9State:
    """What one exporter (per collector and Source ID) carries between packets.

    ``sequence`` is the Sequence Number of the *next* export packet: packets
    sent before it, mod 2^32 (RFC 3954 §5.1; nfdump checks ``seq - last == 1``).
    """

    sequence: int = 0
    source_id: int = 0


def encode(
    records: np.ndarray,
    state: V9State,
    clock: ExportClock,
    send_templates: bool | TemplateSchedule,
    max_size: int = DEFAULT_MAX_SIZE,
    ctx: ExportContext = _DEFAULT_CONTEXT,
    templates: ExportTemplates | Mapping[int, Template] | None = None,
) -> tuple[list[bytes], V9State]:
    """Encode a ``RECORD_DTYPE`` batch into v9 export packets of at most ``max_size`` bytes.

    ``templates`` are the templates records use (a plain mapping is
    ``ip_version`` -> flow template); by default those of ``ctx.fields``
    (:func:`templates_for`).  Data FlowSets follow template order: IPv4
    flows, IPv6 flows, then NAT events (records with ``nat_event`` != 0,
    which need ``nat-events=yes``); batch order within a template.  With
    ``send_templates`` (True, or a :class:`~pyflow.export.templates.TemplateSchedule`
    naming the packets) a packet carries, before any flow data, the Template
    FlowSet, then the options templates and options records ``ctx`` calls for
    (``options.py``).  The header's clock: UNIX Secs ``clock.unix_s`` and
    sysUptime ``clock.whole_second_uptime_ms`` mod 2^32, the uptime at that
    whole second, so ``UNIX Secs x 1000 - sysUptime`` is ``clock.boot_unix_ms``
    in every packet (what nfdump and pmacct take as the exporter's boot
    time, and add FIRST/LAST_SWITCHED to).  Returns the packets and the
    state for the next call.
    """
    if templates is None:
        templates = templates_for(ctx)
    elif not isinstance(templates, ExportTemplates):
        templates = ExportTemplates(templates)
    schedule = TemplateSchedule.of(send_templates)
    every = templates.all()

    def template_sections() -> list[Section]:
        options_flowsets, options_data = v9_options(ctx, state.source_id)
        return [WholeSet(v9_template_flowset(every), len(every)), *options_flowsets, *options_data]

    sections: list[Section] = [*flow_queues(records, templates, clock, align=FLOWSET_ALIGNMENT)]
    check_max_size([*template_sections(), *sections] if schedule.first is not None else sections, HEADER_LENGTH,
                   max_size)

    packets = []
    sequence = state.sequence % _MODULUS
    uptime = clock.whole_second_uptime_ms % _MODULUS
    for body in message_bodies(sections, max_size - HEADER_LENGTH, template_sections, schedule):
        packets.append(
            _HEADER.pack(V9_VERSION, body.records, uptime, clock.unix_s, sequence, state.source_id) + body.data
        )
        sequence = (sequence + 1) % _MODULUS
    return packets, replace(state, sequence=sequence)


def carries_templates(packet: bytes) -> bool:
    """Whether a v9 packet begins with a Template FlowSet (as every packet with templates does)."""
    return len(packet) >= HEADER_LENGTH + 2 and packet[HEADER_LENGTH:HEADER_LENGTH + 2] == b"\x00\x00"
