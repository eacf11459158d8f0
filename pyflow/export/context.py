"""What an encoder is given: the export clock, the context (fields, sampling, interface names,
time mode) and the schedule of templates -- and the encoder protocol.  Pure data: no socket here
(pyflow.export.target owns those), so encoders and templates depend on this module only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pyflow.fields import ROUTEROS_DEFAULTS, FieldSet

# UDP payload that fits a 1500-byte MTU without fragmentation.
MAX_PAYLOAD_V4 = 1500 - 20 - 8
MAX_PAYLOAD_V6 = 1500 - 40 - 8


@dataclass(frozen=True)
class ExportClock:
    """The export instant in every form a format needs (taken once per encoded slice).

    ``uptime_ms`` is ms since the exporter's boot instant ``boot_unix_ms``
    (wall time), the sysUptime of v1/v5/v9.  Every header derives its clock
    fields from this one pair, so the boot time a collector works out from a
    header (v1/v5: ``unix_secs x 1000 + unix_nsecs // 10^6 - sysUptime``; v9:
    ``unix_secs x 1000 - sysUptime``) is exactly ``boot_unix_ms``: the same
    in every datagram of a session, as long as the agent keeps its boot
    instant fixed (:meth:`at`).
    """

    unix_ns: int  # wall clock
    uptime_ms: int  # ms since the exporter's boot instant: the sysUptime of v1/v5/v9

    @classmethod
    def at(cls, unix_ns: int, boot_unix_ms: int) -> ExportClock:
        """The clock at wall time ``unix_ns`` of an exporter whose sysUptime was 0 at ``boot_unix_ms``."""
        return cls(unix_ns=unix_ns, uptime_ms=unix_ns // 10**6 - boot_unix_ms)

    @property
    def unix_s(self) -> int:
        return self.unix_ns // 10**9

    @property
    def unix_ms(self) -> int:
        return self.unix_ns // 10**6

    @property
    def boot_unix_ms(self) -> int:
        """Wall time (ms) at which sysUptime was 0: systemInitTimeMilliseconds."""
        return self.unix_ms - self.uptime_ms

    @property
    def whole_second_uptime_ms(self) -> int:
        """sysUptime at the whole second ``unix_s`` (v9, whose header has whole seconds only)."""
        return self.unix_s * 1000 - self.boot_unix_ms


@dataclass(frozen=True)
class Sampling:
    """RouterOS packet-sampling (``sampling-interval`` N, ``sampling-space`` M).

    M > 0: N consecutive packets sampled, then M consecutive packets omitted
    (IPFIX samplingPacketInterval 305 = N, samplingPacketSpace 306 = M).
    M = 0: one packet in every N (305 = 1, 306 = N - 1).
    """

    interval: int
    space: int = 0

    @property
    def selected(self) -> int:
        return 1 if self.space == 0 else self.interval

    @property
    def skipped(self) -> int:
        return self.interval - 1 if self.space == 0 else self.space

    @property
    def rate(self) -> int:
        """The "1 in N" multiplier collectors scale counts by (integer, as pmacct computes it)."""
        return (self.selected + self.skipped) // self.selected


@dataclass(frozen=True)
class ExportContext:
    """What an encoder needs besides the records, the same for every call of one target.

    ``interfaces`` (ifindex, name) feed the interface-name options records;
    ``time_mode`` "absolute" sends flowStart/EndMilliseconds (152/153),
    "routeros" sends flowStart/EndSysUpTime (22/21) plus systemInitTimeMilliseconds
    (160) in every record, as RouterOS does.  ``fields`` are RouterOS's
    ``/ip traffic-flow ipfix`` toggles (``pyflow.fields``): the v9 and IPFIX
    templates are built from them, and with ``nat-events`` on, records whose
    ``nat_event`` is not 0 go out as NAT events (v1/v5 never carry those).
    """

    sampling: Sampling | None = None
    interfaces: tuple[tuple[int, str], ...] = ()
    time_mode: str = "absolute"
    engine_type: int = 0
    engine_id: int = 0
    fields: FieldSet = ROUTEROS_DEFAULTS
    sequence: str = "flows"  # IPFIX: what the Sequence Number counts ("flows" or "rfc", ipfix.SEQUENCE_RULES)


class VersionEncoder(Protocol):
    """What a target needs of one export format."""

    @property
    def name(self) -> str: ...

    @property
    def uses_templates(self) -> bool: ...

    @property
    def carries_ipv6(self) -> bool: ...

    def initial_state(self, observation_domain: int) -> Any: ...

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool | TemplateSchedule,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]: ...

    def carries_templates(self, datagram: bytes) -> bool: ...

    def state_doc(self, state: Any) -> Any: ...

    def state_from(self, doc: Any, observation_domain: int) -> Any: ...


@dataclass(frozen=True)
class TemplateSchedule:
    """Which messages of one encode call begin with the templates (and options).

    The message at index ``first`` (0: the first one; None: none is due by the
    packet count), then every ``every``-th message after the last one that did
    (None: no more in this call).  A target's ``v9-template-refresh`` R gives
    ``every`` = R + 1: R packets without templates between two with.  A call
    with nothing to send yields a template-only message only when ``first`` is 0.
    """

    first: int | None = None
    every: int | None = None

    def __post_init__(self) -> None:
        if self.first is not None and self.first < 0:
            raise ValueError(f"first {self.first} is negative")
        if self.every is not None and self.every < 1:
            raise ValueError(f"every {self.every} is not a positive number of messages")

    @classmethod
    def of(cls, send: bool | TemplateSchedule) -> TemplateSchedule:
        """``True``: templates in the first message only; ``False``: none."""
        if isinstance(send, TemplateSchedule):
            return send
        return cls(0) if send else cls()
