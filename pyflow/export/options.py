"""Options templates and records: interface names and sampling, for IPFIX and NetFlow v9 alike.

An :class:`OptionsTemplate` is built from IE names of the same table as the
flow templates (``ie.py``), and yields both wire forms: the IPFIX Options
Template Record (RFC 7011 §3.4.2, Set 3) and the v9 Options Template Record
(RFC 3954 §6.1, FlowSet 1).  Options records are few (one per interface, one
for sampling), so they are encoded with plain Python, field by field.

The layouts follow what collectors actually read, checked against nfcapd
1.7.1 (the probes are repeated by ``tests/unit/test_options.py`` and the
collector tests):

* Interface names.  nfdump takes the ifindex only from an ingressInterface
  (10) *option* field, never from a scope field (IPFIX: its scope loop just
  skips; v9: scope type 2 is not one it matches), and the name only from
  interfaceDescription (83) at a fixed length.  So the scope is
  ingressInterface (v9: scope type 2, Interface) as RFC 7011 §3.4.2.1
  suggests, and the option fields repeat ingressInterface, then give
  interfaceDescription (32 bytes).  interfaceName (82) is *not* sent:
  nfcapd 1.7.1 leaves option fields it does not know out of the record
  length, so with 82 anywhere in the template only the first record of a
  set was resolved (the others showed "<ingress not found>", and for IPFIX
  nfcapd logged "ifvrf data record - N extra bytes"); without it, every
  record of a multi-record set was.
* Sampling.  IPFIX: samplingInterval 34 (the 1-in-N rate), then
  selectorAlgorithm 304, samplingPacketInterval 305, samplingPacketSpace 306
  (PSAMP, RouterOS's sampling-interval/-space exactly).  34 must come
  *before* 306: nfdump stores both in the same slot and the later one wins.
  nfcapd 1.7.1 applies 34+304+305+306 and 305+306, but ignores 304+305+306.
  (goflow2 takes 305 itself as the rate, so it sees 1-in-N as 1: a known
  goflow2 misreading, flow-protocols.md §3.13.)
  v9: SAMPLING_INTERVAL 34 alone.  nfcapd 1.7.1 ignores the sampler
  whenever SAMPLING_ALGORITHM 35 is present (34+35 in either order, with 35
  of length 1 or 4, with value 0, 1 or 2: all left the counts unscaled),
  while 34 alone is scaled; pmacct and goflow2 read 34 alone as well.
* One options template record per (Options) Template Set/FlowSet: nfdump
  reads only the first record of such a set.

Scopes: interface records are scoped by the interface; sampling applies to
the whole exporter, which v9 says with scope System (1) and IPFIX with
observationDomainId (149, the message's ODID).  nfdump accepts any scope;
pmacct treats only v9 System as exporter-wide (otherwise per ODID, the same
thing here).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyflow.export.context import ExportContext, Sampling
from pyflow.export.ie import BY_NAME, AbstractType, InformationElement
from pyflow.export.templates import MIN_DATA_TEMPLATE_ID, DataQueue, WholeSet, set_bytes, v9_field_types

IPFIX_OPTIONS_TEMPLATE_SET_ID = 3
V9_OPTIONS_TEMPLATE_FLOWSET_ID = 1

# After the flow templates (256..259), stable for the same reason as theirs.
INTERFACE_NAMES_TEMPLATE_ID = 260
SAMPLING_TEMPLATE_ID = 261

# v9 has no IEs for scopes but five scope types (RFC 3954 §6.1); the IE each one stands for.
V9_SCOPE_TYPES: Mapping[str, int] = {
    "observationDomainId": 1,  # System
    "ingressInterface": 2,  # Interface
}

SELECTOR_ALGORITHM_SYSTEMATIC_COUNT = 1  # selectorAlgorithm 304: N packets in, M out (RFC 5475)
SAMPLING_ALGORITHM_DETERMINISTIC = 1  # samplingAlgorithm 35 (v9 SAMPLING_ALGORITHM)

OptionValue = int | str
_THREE_U16 = struct.Struct("!HHH")
_TWO_U16 = struct.Struct("!HH")


@dataclass(frozen=True)
class OptionsTemplate:
    """An options template: scope fields, then option fields, each an ``(IE, wire length)``.

    The same IE may appear as a scope and as an option field (interface
    names: see the module docstring); a record gives one value per IE name.
    """

    template_id: int
    scope: tuple[tuple[InformationElement, int], ...]
    fields: tuple[tuple[InformationElement, int], ...]

    def __post_init__(self) -> None:
        if not MIN_DATA_TEMPLATE_ID <= self.template_id <= 0xFFFF:
            raise ValueError(f"template id {self.template_id} is outside {MIN_DATA_TEMPLATE_ID}..65535")
        if not self.scope or not self.fields:
            # RFC 7011 §3.4.2.2: Scope Field Count MUST NOT be 0 (and nfdump drops such templates).
            raise ValueError("an options template needs at least one scope field and one option field")
        for ie, length in (*self.scope, *self.fields):
            if not (ie.abstract_type.is_integer or ie.abstract_type is AbstractType.STRING):
                raise ValueError(f"{ie.name}: options records carry integers and strings only")
            if ie.abstract_type.is_integer and length not in (1, 2, 4, 8):
                raise ValueError(f"{ie.name}: an integer cannot be {length} bytes long")

    @property
    def record_length(self) -> int:
        """Bytes in one options data record."""
        return sum(length for _, length in (*self.scope, *self.fields))

    def ipfix_record(self) -> bytes:
        """IPFIX Options Template Record: id, field count (scope included), scope field count, specifiers."""
        every = (*self.scope, *self.fields)
        header = _THREE_U16.pack(self.template_id, len(every), len(self.scope))
        return header + b"".join(_TWO_U16.pack(ie.ie_id, length) for ie, length in every)

    def v9_record(self) -> bytes:
        """v9 Options Template Record: id, scope and option *byte* lengths, then scope and option specifiers."""
        try:
            scope_types = [V9_SCOPE_TYPES[ie.name] for ie, _ in self.scope]
        except KeyError as exc:
            raise ValueError(f"NetFlow v9 has no scope type for {exc.args[0]}") from None
        option_types = v9_field_types(ie for ie, _ in self.fields)
        header = _THREE_U16.pack(self.template_id, 4 * len(self.scope), 4 * len(self.fields))
        scopes = b"".join(map(_TWO_U16.pack, scope_types, (length for _, length in self.scope)))
        options = b"".join(map(_TWO_U16.pack, option_types, (length for _, length in self.fields)))
        return header + scopes + options

    def encode_record(self, values: Mapping[str, OptionValue]) -> bytes:
        """One options data record: the value of each field's IE, in template order."""
        return b"".join(_encode_value(ie, length, values[ie.name]) for ie, length in (*self.scope, *self.fields))


def _encode_value(ie: InformationElement, length: int, value: OptionValue) -> bytes:
    """Big-endian integers; strings as UTF-8, NUL padded to the fixed length.

    Strings are cut at a character boundary to leave at least one NUL:
    nfdump overwrites the last byte with NUL anyway, and rejects invalid UTF-8.
    """
    if ie.abstract_type.is_integer:
        if not isinstance(value, int) or not 0 <= value < 1 << (8 * length):
            raise ValueError(f"{ie.name}: {value!r} is not an unsigned {8 * length}-bit integer")
        return value.to_bytes(length, "big")
    if not isinstance(value, str):
        raise ValueError(f"{ie.name}: {value!r} is not a string")
    text = value.encode()[: length - 1].decode(errors="ignore").encode()
    return text.ljust(length, b"\0")


def build_options_template(template_id: int, scope: Sequence[str], fields: Sequence[str]) -> OptionsTemplate:
    """An options template from IE names, each at the length the IE table gives."""
    try:
        return OptionsTemplate(
            template_id,
            tuple((BY_NAME[name], BY_NAME[name].length) for name in scope),
            tuple((BY_NAME[name], BY_NAME[name].length) for name in fields),
        )
    except KeyError as exc:
        raise ValueError(f"unknown information element {exc.args[0]!r}") from None


INTERFACE_NAMES = build_options_template(
    INTERFACE_NAMES_TEMPLATE_ID,
    ["ingressInterface"],
    ["ingressInterface", "interfaceDescription"],
)
IPFIX_SAMPLING = build_options_template(
    SAMPLING_TEMPLATE_ID,
    ["observationDomainId"],
    ["samplingInterval", "selectorAlgorithm", "samplingPacketInterval", "samplingPacketSpace"],
)
V9_SAMPLING = build_options_template(SAMPLING_TEMPLATE_ID, ["observationDomainId"], ["samplingInterval"])


# Rows hold every value we know for an announcement, by IE name; the options template alone
# decides which of them go on the wire (so a layout change is a one-line template change).


def interface_rows(interfaces: Sequence[tuple[int, str]]) -> list[dict[str, OptionValue]]:
    """One row per interface; the description is the name (there is no other description to give)."""
    return [
        {"ingressInterface": ifindex, "interfaceName": name, "interfaceDescription": name}
        for ifindex, name in interfaces
    ]


def sampling_row(sampling: Sampling, domain: int) -> dict[str, OptionValue]:
    """The sampler row, in both the deprecated (34/35) and the PSAMP (304/305/306) vocabulary."""
    return {
        "observationDomainId": domain,
        "samplingInterval": sampling.rate,
        "samplingAlgorithm": SAMPLING_ALGORITHM_DETERMINISTIC,
        "selectorAlgorithm": SELECTOR_ALGORITHM_SYSTEMATIC_COUNT,
        "samplingPacketInterval": sampling.selected,
        "samplingPacketSpace": sampling.skipped,
    }


def _announced(
    ctx: ExportContext, domain: int, sampling_template: OptionsTemplate
) -> list[tuple[OptionsTemplate, list[dict[str, OptionValue]]]]:
    """The options templates ``ctx`` calls for, each with its records (none without records)."""
    announced = []
    if ctx.interfaces:
        announced.append((INTERFACE_NAMES, interface_rows(ctx.interfaces)))
    if ctx.sampling is not None:
        announced.append((sampling_template, [sampling_row(ctx.sampling, domain)]))
    return announced


def ipfix_options(ctx: ExportContext, observation_domain_id: int) -> tuple[list[WholeSet], list[DataQueue]]:
    """IPFIX Options Template Sets (one record each, unpadded) and their data queues."""
    announced = _announced(ctx, observation_domain_id, IPFIX_SAMPLING)
    template_sets = [WholeSet(set_bytes(IPFIX_OPTIONS_TEMPLATE_SET_ID, [t.ipfix_record()]), 1) for t, _ in announced]
    return template_sets, [_queue(t, rows, align=1) for t, rows in announced]


def v9_options(ctx: ExportContext, source_id: int) -> tuple[list[WholeSet], list[DataQueue]]:
    """v9 Options Template FlowSets (one record each, padded to 4 bytes) and their data queues."""
    announced = _announced(ctx, source_id, V9_SAMPLING)
    flowsets = [WholeSet(set_bytes(V9_OPTIONS_TEMPLATE_FLOWSET_ID, [t.v9_record()], align=4), 1) for t, _ in announced]
    return flowsets, [_queue(t, rows, align=4) for t, rows in announced]


def _queue(template: OptionsTemplate, rows: list[dict[str, OptionValue]], align: int) -> DataQueue:
    data = b"".join(template.encode_record(row) for row in rows)
    return DataQueue(template.template_id, template.record_length, data, flow=False, align=align)
