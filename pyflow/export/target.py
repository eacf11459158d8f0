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
import hashlib
import json
import math
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyflow.config import TargetSettings
from pyflow.export.context import (
    MAX_PAYLOAD_V4,
    MAX_PAYLOAD_V6,
    ExportClock,
    ExportContext,
    TemplateSchedule,
    VersionEncoder,
)


@dataclass
class TemplateClock:
    """RouterOS's rules: re-send templates every ``refresh`` export packets and every ``timeout``.

    ``refresh`` R: a packet with templates, then at most R packets without,
    counted datagram by datagram, also within one large export (``schedule``).
    """

    refresh_packets: int
    timeout_ns: int
    last_sent_ns: int | None = None
    packets_since: int = 0

    def due(self, now_ns: int) -> bool:
        if self.last_sent_ns is None:
            return True
        return self.packets_since >= self.refresh_packets or now_ns - self.last_sent_ns >= self.timeout_ns

    def schedule(self, now_ns: int) -> TemplateSchedule:
        """Which datagrams of an export now must begin with templates."""
        every = self.refresh_packets + 1
        if self.due(now_ns):
            return TemplateSchedule(0, every)
        return TemplateSchedule(self.refresh_packets - self.packets_since, every)

    def sent(self, now_ns: int, datagrams: int, with_templates: bool) -> None:
        self.sent_datagrams(now_ns, [with_templates] + [False] * max(0, datagrams - 1))

    def sent_datagrams(self, now_ns: int, carried: Sequence[bool]) -> None:
        """Datagrams went out; ``carried[i]``: the i-th began with templates."""
        last = max((i for i, c in enumerate(carried) if c), default=None)
        if last is None:
            self.packets_since += len(carried)
        else:
            self.last_sent_ns = now_ns
            self.packets_since = len(carried) - 1 - last


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
        self.observation_domain = observation_domain
        # called after every encode that changed the state, before its datagrams leave (the runner
        # keeps the session with the pinned instance there: write ahead of the send)
        self.on_encoded: Callable[[Target], None] | None = None
        self.bind_port: int | None = None  # the source port to bind again (a resumed session's)
        self.rebind_error: str | None = None  # why that port could not be had again (a new one was taken)

    @property
    def name(self) -> str:
        return self.settings.describe()

    # -- the session: what a collector keys the exporter's stream on --------------------------

    def template_fingerprint(self) -> str:
        """What the templates and options records this target sends depend on (stable across processes)."""
        c = self.ctx
        doc = [self.encoder.name, c.time_mode, sorted(c.fields.enabled), c.engine_type, c.engine_id, c.sequence,
               None if c.sampling is None else [c.sampling.interval, c.sampling.space],
               [list(i) for i in c.interfaces]]
        return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]

    def session_doc(self) -> dict[str, Any]:
        """Sequence state, template clock and source port: what the next agent goes on with."""
        return {"port": self.local_port() or self.bind_port, "state": self.encoder.state_doc(self.state),
                "templates": self.template_fingerprint(), "last_sent_ns": self.clock.last_sent_ns,
                "packets_since": self.clock.packets_since}

    def resume(self, doc: Any) -> None:
        """Go on with an earlier agent's session of this target (before ``open``): its sequence
        numbers, its source port, and its template clock if the templates are the same.
        ValueError for a document this version cannot read (nothing is changed then)."""
        try:
            state = self.encoder.state_from(doc["state"], self.observation_domain)
            port, last, since = doc.get("port"), doc.get("last_sent_ns"), doc.get("packets_since")
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ValueError(f"unreadable session of {self.name}: {exc!r}") from None
        self.state = state
        if type(port) is int and 0 < port < 65536:
            self.bind_port = port
        if doc.get("templates") == self.template_fingerprint() and type(last) is int and type(since) is int:
            self.clock.last_sent_ns, self.clock.packets_since = last, max(0, since)

    def open(self) -> None:
        fam = socket.AF_INET6 if self.settings.family_is_v6 else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            self._bind(sock)
            sock.setblocking(False)
            # connect(): the kernel reports ICMP port unreachable on the next send,
            # and the source port stays stable (collectors key templates on it).
            sock.connect((self.settings.dst_address, self.settings.port))
        except OSError as exc:
            # Unroutable now may be routable later: keep the socket, count, retry on send.
            self.stats.send_errors[_errname(exc)] += 1
        self.sock = sock

    def _bind(self, sock: socket.socket) -> None:
        """The source address, and the resumed session's source port when there is one (collectors
        that key an exporter on its port see the same one); a port taken meanwhile is noted and
        another one used."""
        host = self.settings.src_address or ("::" if self.settings.family_is_v6 else "0.0.0.0")
        if self.bind_port:
            try:
                sock.bind((host, self.bind_port))
                return
            except OSError as exc:
                self.rebind_error = f"source port {self.bind_port} not available again ({_errname(exc)})"
        if self.settings.src_address:
            sock.bind((host, 0))

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
        schedule = self.clock.schedule(now_ns) if self.encoder.uses_templates else TemplateSchedule()
        if len(records) == 0 and schedule.first != 0:
            return [], records
        datagrams, self.state = self.encoder.encode(records, self.state, clock, schedule, self.max_size,
                                                     self.ctx)
        self.stats.records += len(records)
        if self.encoder.uses_templates:
            carried = [self.encoder.carries_templates(d) for d in datagrams]
            self.clock.sent_datagrams(now_ns, carried)
            self.stats.templates += sum(carried)
        if datagrams and self.on_encoded is not None:
            self.on_encoded(self)
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
