"""A collector target: one socket, its own sequence numbers, template clock, pace and stats.

Each target encodes the same record batch independently, so a target that
fails (collector down, ICMP port unreachable, no route) only counts its own
errors: it never raises into the agent and never stalls the other targets
(sockets are non-blocking; UDP has no back-pressure to wait on).

Records reach a target through its queue (``enqueue``) and leave it at the
target's pace (``pump``): at most ``max-rate`` records a second, in steps of
``PACE_STEP_NS``, so that a sweep that expires half a million flows at once
does not arrive at the collector as one burst bigger than its socket buffer.
The queue holds at most ``QUEUE_LIMIT`` records; what does not fit is
counted (``stats.queue_dropped``), never dropped silently.
"""

from __future__ import annotations

import collections
import errno
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pyflow.config import TargetSettings
from pyflow.fields import ROUTEROS_DEFAULTS, FieldSet

# UDP payload that fits a 1500-byte MTU without fragmentation.
MAX_PAYLOAD_V4 = 1500 - 20 - 8
MAX_PAYLOAD_V6 = 1500 - 40 - 8


@dataclass(frozen=True)
class ExportClock:
    """The export instant in every form a format needs (taken once per sweep)."""

    unix_ns: int  # wall clock
    uptime_ms: int  # ms since the agent's start: the sysUptime of v1/v5/v9

    @property
    def unix_s(self) -> int:
        return self.unix_ns // 10**9

    @property
    def boot_unix_ms(self) -> int:
        """Wall time (ms) at which sysUptime was 0: systemInitTimeMilliseconds."""
        return self.unix_ns // 10**6 - self.uptime_ms


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


class VersionEncoder(Protocol):
    """What a target needs of one export format."""

    @property
    def name(self) -> str: ...

    @property
    def uses_templates(self) -> bool: ...

    @property
    def carries_ipv6(self) -> bool: ...

    def initial_state(self, observation_domain: int) -> Any: ...

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]: ...


@dataclass
class TemplateClock:
    """RouterOS's rules: re-send templates every ``refresh`` export packets and every ``timeout``."""

    refresh_packets: int
    timeout_ns: int
    last_sent_ns: int | None = None
    packets_since: int = 0

    def due(self, now_ns: int) -> bool:
        if self.last_sent_ns is None:
            return True
        return self.packets_since >= self.refresh_packets or now_ns - self.last_sent_ns >= self.timeout_ns

    def sent(self, now_ns: int, datagrams: int, with_templates: bool) -> None:
        if with_templates:
            self.last_sent_ns = now_ns
            self.packets_since = max(0, datagrams - 1)
        else:
            self.packets_since += datagrams


#: Records one target holds waiting to be sent, at most (about 250 bytes each).
QUEUE_LIMIT = 1 << 20
#: The pace's step: a paced target sends what ``max-rate`` allows at most every this often, and
#: never more than one step's worth at once.
PACE_STEP_NS = 2_000_000
#: Records encoded at once (then sent datagram by datagram at the pace): big enough that encoding
#: runs at full speed, small enough that the export time in their headers is at most tens of ms old.
ENCODE_RECORDS = 2048


@dataclass
class Pace:
    """A token bucket of records: ``rate`` a second, sent a step's worth at a time (no bigger bursts)."""

    rate: int  # records a second; 0 = unpaced
    tokens: float = 0.0
    last_ns: int | None = None

    @property
    def step(self) -> int:
        """Records one step carries: what the rate allows in PACE_STEP_NS, at least one."""
        return max(1, int(self.rate * PACE_STEP_NS / 1e9))

    def allowance(self, now_ns: int, cap: float) -> float:
        """Records that may go now (tokens saved up to ``cap``: a step's worth, or one datagram's)."""
        if self.last_ns is None:
            self.tokens = cap
        else:
            self.tokens = min(cap, self.tokens + (now_ns - self.last_ns) * self.rate / 1e9)
        self.last_ns = now_ns
        return self.tokens

    def spend(self, records: float) -> None:
        self.tokens -= records

    def next_ns(self, now_ns: int, want: float) -> int:
        """When ``want`` records may go."""
        return now_ns + max(1, math.ceil((want - self.tokens) * 1e9 / self.rate))


@dataclass
class TargetStats:
    records: int = 0
    datagrams: int = 0
    bytes: int = 0
    templates: int = 0  # datagrams that carried templates
    send_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    not_representable: int = 0  # records the target cannot carry (IPv6 to v1/v5, NAT events)
    queue_dropped: int = 0  # records that did not fit in the queue (QUEUE_LIMIT), never sent


class Target:
    def __init__(self, settings: TargetSettings, encoder: VersionEncoder, observation_domain: int = 0,
                 ctx: ExportContext | None = None) -> None:
        self.settings = settings
        self.encoder = encoder
        self.ctx = ctx or ExportContext()
        self.state = encoder.initial_state(observation_domain)
        self.clock = TemplateClock(settings.v9_template_refresh, settings.v9_template_timeout_ns)
        self.stats = TargetStats()
        self.max_size = MAX_PAYLOAD_V6 if settings.family_is_v6 else MAX_PAYLOAD_V4
        self.sock: socket.socket | None = None
        self.pace = Pace(settings.max_rate)
        # (batch number, records, how many of them were taken); records not yet encoded
        self.queue: collections.deque[tuple[int, np.ndarray, int]] = collections.deque()
        self.queued = 0
        # the slice being sent: its batch and the records it carries, its datagrams not yet sent
        self._slice: tuple[int, np.ndarray] | None = None
        self._out: collections.deque[bytes] = collections.deque()
        self._cost = 1.0  # records per datagram of the slice (what one datagram spends of the pace)

    @property
    def name(self) -> str:
        return self.settings.describe()

    def open(self) -> None:
        fam = socket.AF_INET6 if self.settings.family_is_v6 else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if self.settings.src_address:
                sock.bind((self.settings.src_address, 0))
            sock.setblocking(False)
            # connect(): the kernel reports ICMP port unreachable on the next send,
            # and the source port stays stable (collectors key templates on it).
            sock.connect((self.settings.dst_address, self.settings.port))
        except OSError as exc:
            # Unroutable now may be routable later: keep the socket, count, retry on send.
            self.stats.send_errors[_errname(exc)] += 1
        self.sock = sock

    def local_port(self) -> int | None:
        if self.sock is None:
            return None
        try:
            return int(self.sock.getsockname()[1])
        except OSError:
            return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def export(self, records: np.ndarray, clock: ExportClock, now_ns: int) -> np.ndarray:
        """Encode and send ``records`` at once; returns those it carried.  Never raises for network errors."""
        datagrams, carried = self.encode(records, clock, now_ns)
        for dgram in datagrams:
            self._send(dgram)
        return carried

    def encode(self, records: np.ndarray, clock: ExportClock, now_ns: int) -> tuple[list[bytes], np.ndarray]:
        """The datagrams that carry ``records`` (templates first when due), and the records carried.

        Records the target cannot carry are counted as not representable and
        left out: IPv6 for v1/v5, and NAT events (``nat_event`` != 0) unless
        the format has templates and ``nat-events`` is on.
        """
        if len(records):
            drop = np.zeros(len(records), dtype=bool)
            if not self.encoder.carries_ipv6:
                drop |= records["ip_version"] == 6
            if not (self.encoder.uses_templates and "nat-events" in self.ctx.fields):
                drop |= records["nat_event"] != 0
            dropped = int(np.count_nonzero(drop))
            if dropped:
                self.stats.not_representable += dropped
                records = records[~drop]
        templates = self.encoder.uses_templates and self.clock.due(now_ns)
        if len(records) == 0 and not templates:
            return [], records
        datagrams, self.state = self.encoder.encode(records, self.state, clock, templates, self.max_size,
                                                     self.ctx)
        self.stats.records += len(records)
        if self.encoder.uses_templates:
            self.clock.sent(now_ns, len(datagrams), templates)
            if templates and datagrams:
                self.stats.templates += 1
        return datagrams, records

    def enqueue(self, records: np.ndarray, batch: int) -> None:
        """Queue one sweep's records (batch numbers rise); what does not fit is counted and dropped."""
        room = QUEUE_LIMIT - self.queued
        if len(records) > room:
            self.stats.queue_dropped += len(records) - max(room, 0)
            records = records[:max(room, 0)]
        if len(records):
            self.queue.append((batch, records, 0))
            self.queued += len(records)

    def sent_through(self) -> int | None:
        """Every batch up to this number has left (None: all of them, nothing is waiting)."""
        if self._slice is not None:
            return self._slice[0] - 1
        return self.queue[0][0] - 1 if self.queue else None

    def discard(self) -> None:
        """Forget everything waiting (after an internal error: the agent counts it)."""
        self.queue.clear()
        self.queued = 0
        self._slice = None
        self._out.clear()

    @property
    def backlog(self) -> int:
        """Records waiting: queued, and in the datagrams of the slice not yet sent."""
        return self.queued + round(len(self._out) * self._cost)

    @property
    def waiting(self) -> bool:
        """Records or encoded datagrams wait to be sent."""
        return bool(self.queue) or self._slice is not None

    def _next_slice(self, clock: Callable[[], tuple[ExportClock, int]]) -> None:
        """Encode the next ENCODE_RECORDS queued records (sent datagram by datagram at the pace)."""
        batch, records, done = self.queue[0]
        n = min(len(records) - done, ENCODE_RECORDS)
        export_clock, now_ns = clock()
        datagrams, carried = self.encode(records[done:done + n], export_clock, now_ns)
        self.queued -= n
        if done + n == len(records):
            self.queue.popleft()
        else:
            self.queue[0] = (batch, records, done + n)
        self._out = collections.deque(datagrams)
        self._cost = n / max(1, len(datagrams))
        self._slice = (batch, carried)

    def pump(self, clock: Callable[[], tuple[ExportClock, int]],
             sent: Callable[[np.ndarray, int], None] | None = None, paced: bool = True) -> int | None:
        """Send what the pace allows now; when to call again (boot ns), or None: nothing waits.

        Records are encoded ENCODE_RECORDS at a time (``clock`` gives the
        export instant) and their datagrams sent a step's worth at a time;
        ``sent(records, boot_ns)`` hears of each slice once its last datagram
        is out (export lateness).
        """
        while self.waiting:
            if not self._out:
                if self._slice is not None:
                    if sent is not None:
                        sent(self._slice[1], clock()[1])
                    self._slice = None
                if self.queue:
                    self._next_slice(clock)
                continue
            if paced and self.pace.rate > 0:
                now_ns = clock()[1]
                # a step's worth at a time (what is left of the slice, at least one datagram)
                want = max(min(len(self._out) * self._cost, float(self.pace.step)), self._cost)
                if self.pace.allowance(now_ns, max(float(self.pace.step), self._cost)) < want:
                    return self.pace.next_ns(now_ns, want)
                while self._out and self.pace.tokens >= self._cost - 1e-9:
                    self._send(self._out.popleft())
                    self.pace.spend(self._cost)
            else:
                while self._out:
                    self._send(self._out.popleft())
        return None

    def _send(self, dgram: bytes) -> None:
        if self.sock is None:
            self.open()
        assert self.sock is not None
        for attempt in (1, 2):
            try:
                self.sock.send(dgram)
            except ConnectionRefusedError as exc:
                # An ICMP port unreachable for an EARLIER datagram; this one was not
                # sent. Count it, then try this one once more (the error is consumed).
                self.stats.send_errors[_errname(exc)] += 1
                if attempt == 1:
                    continue
                return
            except OSError as exc:
                if exc.errno == errno.EDESTADDRREQ and attempt == 1:  # connect() failed at open: retry it
                    try:
                        self.sock.connect((self.settings.dst_address, self.settings.port))
                    except OSError as exc2:
                        self.stats.send_errors[_errname(exc2)] += 1
                        return
                    continue
                self.stats.send_errors[_errname(exc)] += 1
                return
            self.stats.datagrams += 1
            self.stats.bytes += len(dgram)
            return


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "unknown").lower()
