"""The control channel: a running agent answers ``pyflow status``, ``flows`` and ``top``.

``ControlServer(agent, path)`` listens on a Unix stream socket (default
:data:`DEFAULT_SOCKET`, mode 0600, so only root -- the agent's user -- may
ask) in a daemon thread.  The protocol is one JSON object per line each way:

* ``{"cmd": "status"}`` -> the agent's effective settings (RouterOS names),
  cache use at the last sweep, per-target counters and when each target last
  sent, the agent's own counters and uptime;
* ``{"cmd": "flows", "sort": "bytes"|"packets"|"age", "limit": N}`` -> the
  kernel flow cache now, sorted, the first N flows (no limit: DEFAULT_FLOWS;
  0 or more than MAX_FLOWS: MAX_FLOWS), each with its cumulative counters and
  what is not exported yet, plus the total count;
* ``{"cmd": "flows", "by": "src"|"dst"|"port"|"proto", "sort": "bytes"|"packets"|"flows",
  "limit": N}`` -> the same cache grouped by source address, destination address,
  (protocol, service port) or protocol: per group its flows, packets and bytes (totals
  since each entry was created), the first N groups (``pyflow top``'s views).

Every answer has ``"ok"``: true, or false with ``"error"``.  A bad request
gets an error answer; nothing a client sends can stop the server.  A client
may send any number of requests on one connection.

Watching never slows the agent down: ``status`` takes no lock and reads no
cache (counters, and ``agent.observed``: what the last sweep saw); ``flows``
holds ``agent.lock`` only to take the meter's maps (``FlowMeter.scan``: fds
and buffers of its own) and the baseline, then reads the cache without it,
keeping the top N of each chunk, and streams its answer in pieces.  A grouped
answer sums each chunk into at most GROUP_ROWS groups (the largest of
each column are kept past that: the answer says ``"trimmed": true``).

Per client: at most MAX_CLIENTS connections (a new one pushes out the one idle
the longest), each request line at most MAX_REQUEST bytes and whole within
IDLE_SECONDS of the last answer (or of connecting), and every answer taken
within WRITE_SECONDS of writing time; otherwise the connection is closed.
At most SCANS flows answers read the cache at once; so memory stays at about
SCANS x (one scan chunk + 2 x MAX_FLOWS rows) + MAX_CLIENTS x (MAX_FLOWS rows +
one piece) (2.5 MB each for 10,000 rows); a grouped read holds at most 5 x GROUP_ROWS
sums (4 MB).

"Last sent" per target: ``TargetStats`` has no timestamp, so the server
samples every target's datagram counter (every :data:`SAMPLE_SECONDS`, and
before each status answer) and remembers when it last changed.  The time is
therefore exact to within that sampling period.

``ControlClient(path)`` is the other end (``status()``, ``flows()``); it
turns "nobody listening" into :class:`AgentNotRunning`, whose message says so
and names the socket.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pyflow import __version__
from pyflow.analytics import GROUPS, CacheGroups
from pyflow.errors import PyflowError
from pyflow.paths import DEFAULT_SOCKET
from pyflow.records import addr_from_16
from pyflow.units import format_duration

if TYPE_CHECKING:

    from pyflow.agent import AgentView, CacheMap
    from pyflow.sweep import Baseline


SORTS = ("bytes", "packets", "age")
GROUP_SORTS = ("bytes", "packets", "flows")  # a group has no age
MAX_REQUEST = 4096  # bytes in one request line
MAX_CLIENTS = 16  # connections at once; a new one pushes out the one idle the longest
IDLE_SECONDS = 5.0  # the next whole request line must arrive within this, or the connection is closed
WRITE_SECONDS = 5.0  # a client must take an answer within this much writing time, or it is dropped
DEFAULT_FLOWS = 100  # flows in an answer to a request without a limit
MAX_FLOWS = 10_000  # flows in an answer at most (limit 0 or larger: this many)
SCAN_CHUNK = 8192  # entries per read of the cache for a flows answer
SCANS = 2  # flows answers reading the cache at once (the others wait their turn)
GROUP_ROWS = 16384  # groups a grouped answer sums exactly (past that the largest are kept: "trimmed")
PIECE_FLOWS = 256  # flows per write of a flows answer
SAMPLE_SECONDS = 0.25  # how often the targets' datagram counters are sampled ("last sent")
DIRECTIONS = {0: "ingress", 1: "egress"}
MAX_PATH = 107  # bytes in a Unix socket path (sun_path is 108, NUL included)
_TMP_NAMES = itertools.count()


class ControlError(PyflowError):
    """The control channel failed: socket in use, agent gone, bad answer."""

    exit_code = 1


class AgentNotRunning(ControlError):
    """Nobody listens on the control socket."""

    def __init__(self, path: str, detail: str = "") -> None:
        why = f" ({detail})" if detail else ""
        super().__init__(f"no pyflow agent is listening on {path}: is `pyflow run` running? (see --socket){why}")
        self.path = path


@dataclass
class _Conn:
    """A client connection's state: since when it is idle, or busy answering."""

    since: float
    busy: bool = False


class BadRequest(Exception):
    """A request the server cannot answer; its message goes back to the client."""


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


def check_socket_path(path: str) -> None:
    """Make ``path`` ready for a control socket, or say why it cannot be one (``ControlError``).

    Creates its directory (0755), removes a stale socket file (one nobody
    answers on: its agent is gone), and refuses a path a live agent answers
    on, a file that is not a socket, or a path too long for a Unix socket.
    ``ControlServer.start`` does the same; a runner may call this earlier,
    before anything is attached, to fail fast.
    """
    if len(os.fsencode(path)) > MAX_PATH:
        raise ControlError(f"control socket path {path} is too long for a Unix socket "
                           f"({len(os.fsencode(path))} bytes, at most {MAX_PATH})")
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise ControlError(f"control socket {path}: cannot create {directory}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"control socket {path} exists and is not a socket: remove it or choose "
                           "another path (--control-socket)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an agent that is gone
        return
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise ControlError(f"another pyflow agent is listening on {path}: stop it, or give this one "
                       "another control socket (--control-socket PATH)")


class ControlServer:
    """Serve ``agent``'s state on the Unix socket ``path`` (see the module docstring).

    ``start()`` binds (replacing a stale socket file left by a dead agent,
    refusing one a live agent still answers on) and starts the thread;
    ``close()`` stops it and removes the socket file.  Both are idempotent,
    and the server is a context manager.
    """

    def __init__(self, agent: AgentView, path: str = DEFAULT_SOCKET, *,
                 wall: Callable[[], float] = time.time,
                 links: Callable[[], list[dict[str, object]]] | None = None,
                 started: float | None = None) -> None:
        self.agent = agent
        self._links = links  # every link, metered or skipped and why (InterfaceSet.listing)
        self.path = str(path)
        self._wall = wall
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._inode: tuple[int, int] | None = None
        self._clients: dict[socket.socket, _Conn] = {}
        self._clients_lock = threading.Lock()
        self._scans = threading.BoundedSemaphore(SCANS)
        self._started_at = wall() if started is None else started  # the agent's start (uptime)
        # id(target) -> (datagrams at the last change, wall time of that change or None)
        self._sent: dict[int, tuple[int, float | None]] = {}
        self._sent_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._closed:
            raise ControlError("a closed control server cannot be started again")
        if self._listener is not None:
            return
        check_socket_path(self.path)
        directory = os.path.dirname(self.path) or "."
        # Bind under a temporary name, make it 0600, then rename it into place: the final
        # name never exists with wider permissions, and nobody can connect before listen().
        tmp = os.path.join(directory, f".pyflow-{os.getpid()}-{next(_TMP_NAMES)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(4 * MAX_CLIENTS)  # room for a burst while the thread accepts
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        self._listener = sock
        self._sample_targets()
        self._thread = threading.Thread(target=self._serve, name="pyflow-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._clients_lock:
            clients = list(self._clients)
        for conn in clients:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self._inode is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:  # still ours, not a newer agent's
                    os.unlink(self.path)
            except OSError:
                pass
            self._inode = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- serving ---------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                ready, _, _ = select.select([listener], [], [], SAMPLE_SECONDS)
            except (OSError, ValueError):
                return  # closed under us
            self._sample_targets()
            if not ready:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if not self._admit(conn):
                with contextlib.suppress(OSError):
                    conn.sendall(_encode({"ok": False, "error": f"too many clients busy (at most {MAX_CLIENTS})"}))
                conn.close()
                continue
            threading.Thread(target=self._client, args=(conn,), name="pyflow-control-client", daemon=True).start()

    def _admit(self, conn: socket.socket) -> bool:
        """Count ``conn`` in; when MAX_CLIENTS are connected, push out the one idle the longest
        (False: every one is busy answering)."""
        with self._clients_lock:
            if len(self._clients) >= MAX_CLIENTS:
                idle = [(c.since, sock) for sock, c in self._clients.items() if not c.busy]
                if not idle:
                    return False
                _, oldest = min(idle, key=lambda x: x[0])
                del self._clients[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # its thread sees the end and closes it
            self._clients[conn] = _Conn(time.monotonic())
        return True

    def _client(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                line, buf = self._request_line(conn, buf)
                if line is None:
                    return
                if not line.strip():
                    continue
                with self._clients_lock:
                    state = self._clients.get(conn)
                    if state is None:  # pushed out meanwhile
                        return
                    state.busy = True
                self._write(conn, self.answer_line(line))
                with self._clients_lock:
                    state.busy, state.since = False, time.monotonic()
        except OSError:
            pass  # the client went away, was too slow, or was pushed out
        finally:
            with self._clients_lock:
                self._clients.pop(conn, None)
            conn.close()

    def _request_line(self, conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
        """The next request line (None: the client ended, took too long or sent too much)."""
        deadline = time.monotonic() + IDLE_SECONDS
        while b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                conn.settimeout(WRITE_SECONDS)
                conn.sendall(_encode({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}))
                _linger(conn)
                return None, b""
            left = deadline - time.monotonic()
            if left <= 0:
                return None, b""
            conn.settimeout(left)
            try:
                chunk = conn.recv(MAX_REQUEST + 1 - len(buf))
            except TimeoutError:
                return None, b""
            if not chunk:
                return None, b""
            buf += chunk
        line, rest = buf.split(b"\n", 1)
        return line, rest

    @staticmethod
    def _write(conn: socket.socket, pieces: Iterator[bytes]) -> None:
        """Send an answer piece by piece within WRITE_SECONDS of writing time in all (TimeoutError:
        the client does not read fast enough; the connection is dropped)."""
        budget = WRITE_SECONDS
        for piece in pieces:
            if budget <= 0:
                raise TimeoutError("the client does not take its answer")
            conn.settimeout(budget)
            t0 = time.monotonic()
            conn.sendall(piece)
            budget -= time.monotonic() - t0

    def answer_line(self, line: bytes) -> Iterator[bytes]:
        """One request line -> its answer line, in pieces (never raises before the first piece)."""
        try:
            answer = self._handle_line(line)
            if isinstance(answer, dict):
                yield _encode(answer)
                return
            first = next(answer)  # the flows are read, sorted and the first piece made: errors come here
        except BadRequest as exc:
            yield _encode({"ok": False, "error": str(exc)})
            return
        except Exception as exc:  # a bug must not end the server: the client hears about it
            yield _encode({"ok": False, "error": f"internal error: {exc!r}"})
            return
        yield first
        yield from answer  # an error from here on ends the connection (half an answer sent)

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """One request line -> its answer as one object (never raises)."""
        return json.loads(b"".join(self.answer_line(line)))

    def _handle_line(self, line: bytes) -> dict[str, Any] | Iterator[bytes]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"not JSON: {exc}") from None
        return self.handle(request)

    def handle(self, request: object) -> dict[str, Any] | Iterator[bytes]:
        if not isinstance(request, dict):
            raise BadRequest('a request is a JSON object such as {"cmd": "status"}')
        cmd = request.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "flows":
            by = request.get("by")
            if by is not None and by not in GROUPS:
                raise BadRequest(f"by {by!r} is not one of {', '.join(GROUPS)}")
            sort = request.get("sort", "bytes")
            sorts = SORTS if by is None else GROUP_SORTS
            if sort not in sorts:
                raise BadRequest(f"sort {sort!r} is not one of {', '.join(sorts)}"
                                 + ("" if by is None else f" (grouped by {by})"))
            limit = request.get("limit")
            if limit is not None and (type(limit) is not int or limit < 0):
                raise BadRequest(f"limit {limit!r} is not a whole number >= 0 (0: as many as allowed, "
                                 f"{MAX_FLOWS})")
            return self.flows_stream(sort, limit) if by is None else self.groups_stream(by, sort, limit)
        raise BadRequest(f"unknown cmd {cmd!r} (known: status, flows)")

    # -- status ----------------------------------------------------------------

    def _sample_targets(self) -> None:
        now = self._wall()
        with self._sent_lock:
            seen = set()
            for target in list(self.agent.targets):
                key = id(target)
                seen.add(key)
                n = int(target.stats.datagrams)
                last = self._sent.get(key)
                if last is None:
                    self._sent[key] = (n, now if n else None)  # sent before we looked: "now" is the best bound
                elif n != last[0]:
                    self._sent[key] = (n, now)
            for key in set(self._sent) - seen:
                del self._sent[key]

    def _last_sent(self, target: object) -> float | None:
        with self._sent_lock:
            entry = self._sent.get(id(target))
        return entry[1] if entry else None

    def status(self) -> dict[str, Any]:
        """Takes no lock and reads no cache: counters, references and what the last sweep saw."""
        agent = self.agent
        self._sample_targets()
        seen = agent.observed
        settings = agent.settings
        capacity = int(agent.meter.capacity(cast("CacheMap", _FLOWS)))
        targets = [self._target_view(i, t) for i, t in enumerate(list(agent.targets))]
        stats = agent.stats
        agent_stats = {
            "sweeps": int(stats.sweeps),
            "records": int(stats.records),
            "deleted": int(stats.deleted),
            "nat-events": int(stats.nat_events),
            "pending-sweeps": int(stats.pending_commits),
            "last-sweep-seconds": float(stats.last_sweep_seconds),
        }
        now = self._wall()
        started = self._started_at
        agent_stats |= {"started": started, "uptime": max(0.0, now - started), "pid": os.getpid()}
        for view in targets:
            last = view["last-sent"]
            view["last-sent-ago"] = None if last is None else max(0.0, now - last)
        counted = None if seen.meter is None else max(0.0, (self._boot_ns() - seen.boot_ns) / 1e9)
        return {
            "ok": True,
            "version": __version__,
            "time": now,
            "settings": _settings_view(settings),
            "cache": {"entries": int(seen.cached), "capacity": capacity, "counted-ago": counted},
            "targets": targets,
            "agent": agent_stats,
            "links": self._links() if self._links is not None else [],
        }

    def _boot_ns(self) -> int:
        return int(self.agent.clocks.boot_ns())

    def _target_view(self, index: int, target: Any) -> dict[str, Any]:
        ts = target.settings
        st = target.stats
        last = self._last_sent(target)
        # a copy made in one step (the agent's thread may add an errno meanwhile)
        errors = {str(k): int(v) for k, v in sorted(dict(st.send_errors).items()) if v}
        return {
            "index": index,
            "name": str(target.name),
            "dst-address": ts.dst_address,
            "port": int(ts.port),
            "version": ts.version,
            "src-address": ts.src_address or "",
            "v9-template-refresh": int(ts.v9_template_refresh),
            "v9-template-timeout": format_duration(int(ts.v9_template_timeout_ns)),
            "time": ts.time_mode,
            "max-rate": int(ts.max_rate),
            "datagrams": int(st.datagrams),
            "records": int(st.records),
            "bytes": int(st.bytes),
            "templates": int(st.templates),
            "not-representable": int(st.not_representable),
            "send-errors": sum(errors.values()),
            "send-errors-by-errno": errors,
            "last-sent": last,
        }

    # -- flows -----------------------------------------------------------------

    def flows_stream(self, sort: str = "bytes", limit: int | None = None) -> Iterator[bytes]:
        """The flows answer, one JSON line in pieces: the cache read (without the agent's lock) and
        its top ``limit`` kept chunk by chunk before the first piece; then PIECE_FLOWS flows a piece."""
        agent = self.agent
        with agent.lock:  # only to take the maps: the meter cannot be swapped or closed meanwhile
            scan = agent.meter.scan(SCAN_CHUNK)
            baseline = agent.baseline  # immutable: the sweep replaces it, never changes it
            capacity = int(agent.meter.capacity(cast("CacheMap", _FLOWS)))
            now_ns = self._boot_ns()
        n = DEFAULT_FLOWS if limit is None else MAX_FLOWS if limit == 0 else min(limit, MAX_FLOWS)
        with scan, self._scans:  # CPU and memory: SCANS reads at a time, whatever the clients
            keys, values, total = _top(scan, sort, n)
        head = {"ok": True, "time": self._wall(), "total": total, "capacity": capacity, "sort": sort,
                "limit": n, "max-limit": MAX_FLOWS}
        return _flow_pieces(head, keys, values, baseline, now_ns)

    def flows(self, sort: str = "bytes", limit: int | None = None) -> dict[str, Any]:
        """The flows answer as one object (what a client gets)."""
        return json.loads(b"".join(self.flows_stream(sort, limit)))

    def groups_stream(self, by: str, sort: str = "bytes", limit: int | None = None) -> Iterator[bytes]:
        """The cache grouped ``by`` source, destination, port or protocol: read as ``flows_stream``
        reads it (without the agent's lock, SCANS at a time, chunk by chunk into bounded groups)."""
        agent = self.agent
        with agent.lock:
            scan = agent.meter.scan(SCAN_CHUNK)
            capacity = int(agent.meter.capacity(cast("CacheMap", _FLOWS)))
        n = DEFAULT_FLOWS if limit is None else MAX_FLOWS if limit == 0 else min(limit, MAX_FLOWS)
        groups = CacheGroups(by, GROUP_ROWS)
        with scan, self._scans:
            for _which, keys, values in scan:  # the groups keep copies (sums, addresses), never the views
                groups.add(keys, values["packets"], values["bytes"])
        rows = groups.top(n, {"flows": 0, "packets": 1, "bytes": 2}[sort])  # CacheGroups' columns
        head = {"ok": True, "time": self._wall(), "total": groups.flows, "capacity": capacity, "by": by,
                "sort": sort, "limit": n, "max-limit": MAX_FLOWS, "trimmed": groups.trimmed}
        return _group_pieces(head, rows)


def _group_pieces(head: dict[str, Any], rows: list[dict[str, object]]) -> Iterator[bytes]:
    yield _encode(head)[:-2] + b',"groups":['
    for lo in range(0, len(rows), PIECE_FLOWS):
        yield (b"," if lo else b"") + b",".join(json.dumps(g, separators=(",", ":")).encode()
                                                for g in rows[lo:lo + PIECE_FLOWS])
    yield b"]}\n"


_FLOWS = 0  # kernel.abi.CacheMap.FLOWS, the map cache-entries sizes (no kernel import here: see _top)


def _order(values: np.ndarray, sort: str) -> np.ndarray:
    """Indices of ``values`` in answer order (ties: by flow id)."""
    if sort == "age":
        return np.lexsort((values["flow_id"], values["first_seen_ns"]))  # oldest first
    column = values["bytes" if sort == "bytes" else "packets"]
    return np.lexsort((values["flow_id"], ~column))  # largest first (~ on uint64 reverses)


def _top(scan: Iterable[tuple[Any, np.ndarray, np.ndarray]], sort: str, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The first ``n`` entries of the cache in answer order, and how many it holds: at most ``n``
    plus one chunk in memory, whatever its size."""
    from pyflow.kernel.abi import FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE  # here: `pyflow check` imports no kernel module

    best_k = np.zeros(0, FLOW_KEY_DTYPE)
    best_v = np.zeros(0, FLOW_VALUE_DTYPE)
    total = 0
    for _which, keys, values in scan:  # views of reused buffers: concatenate copies
        total += len(keys)
        k, v = np.concatenate([best_k, keys]), np.concatenate([best_v, values])
        if len(k) > n:
            keep = _order(v, sort)[:n]
            k, v = k[keep], v[keep]
        best_k, best_v = k, v
    order = _order(best_v, sort)
    return best_k[order], best_v[order], total


def _flow_pieces(head: dict[str, Any], keys: np.ndarray, values: np.ndarray, baseline: Baseline,
                 now_ns: int) -> Iterator[bytes]:
    has, pos = baseline.join(values["flow_id"])
    if len(baseline):
        base_pk = np.where(has, baseline.packets[pos], 0).astype(np.uint64)
        base_by = np.where(has, baseline.bytes[pos], 0).astype(np.uint64)
    else:
        base_pk = base_by = np.zeros(len(keys), dtype=np.uint64)
    yield _encode(head)[:-2] + b',"flows":['
    names = _IfNames()
    for lo in range(0, len(keys), PIECE_FLOWS):
        views = [_flow_view(keys[i], values[i], int(base_pk[i]), int(base_by[i]), now_ns, names)
                 for i in range(lo, min(lo + PIECE_FLOWS, len(keys)))]
        yield (b"," if lo else b"") + b",".join(json.dumps(f, separators=(",", ":")).encode() for f in views)
    yield b"]}\n"


def _flow_view(k: np.void, v: np.void, base_pk: int, base_by: int, now_ns: int, names: _IfNames) -> dict[str, Any]:
    ipv = int(k["ip_version"])
    ifindex = int(k["ifindex"])
    return {
        "src": str(addr_from_16(bytes(k["src_addr"]), ipv)),
        "dst": str(addr_from_16(bytes(k["dst_addr"]), ipv)),
        "sport": int(k["src_port"]),
        "dport": int(k["dst_port"]),
        "proto": int(k["protocol"]),
        "ip-version": ipv,
        "tos": int(k["tos"]),
        "ifindex": ifindex,
        "interface": names.get(ifindex),
        "direction": DIRECTIONS.get(int(k["direction"]), str(int(k["direction"]))),
        "packets": int(v["packets"]) - base_pk,
        "bytes": int(v["bytes"]) - base_by,
        "packets-total": int(v["packets"]),
        "bytes-total": int(v["bytes"]),
        "tcp-flags": int(v["tcp_flags"]) & 0xFF,
        "first-seen": max(0.0, (now_ns - int(v["first_seen_ns"])) / 1e9),
        "last-seen": max(0.0, (now_ns - int(v["last_seen_ns"])) / 1e9),
        "flow-id": int(v["flow_id"]),
    }


class _IfNames:
    """ifindex -> interface name in the agent's network namespace (None when unknown)."""

    def __init__(self) -> None:
        self._names: dict[int, str | None] = {}

    def get(self, ifindex: int) -> str | None:
        if ifindex not in self._names:
            try:
                self._names[ifindex] = socket.if_indextoname(ifindex)
            except OSError:
                self._names[ifindex] = None
        return self._names[ifindex]


def _linger(conn: socket.socket, limit: int = 1 << 20) -> None:
    """End the answer, then read (and drop) what the client still sends, up to ``limit`` bytes or 1 s:
    closing with unread data would reset the connection and lose the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        while limit > 0:
            chunk = conn.recv(65536)
            if not chunk:
                return
            limit -= len(chunk)
    except OSError:
        pass


def _settings_view(settings: Any) -> dict[str, Any]:
    from pyflow.routeros import settings_view  # the one view of settings (RouterOS's names)

    view = settings_view(settings)
    view["enabled"] = True  # the agent runs: RouterOS's enabled=yes, whatever a config file said
    return view


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


@dataclass
class ControlClient:
    """Requests to a running agent over its control socket; one connection, reused.

    A connection the agent closed (idle timeout, restart) is reopened once per
    request.  Every failure is a :class:`ControlError`; nobody listening is
    :class:`AgentNotRunning`.
    """

    path: str = DEFAULT_SOCKET
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self._sock: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = self._connect_once()
            if sock is not None:
                return sock
            if time.monotonic() >= deadline:
                raise ControlError(f"the agent on {self.path} accepted no connection within {self.timeout:g}s "
                                   "(its backlog is full)")
            time.sleep(0.05)

    def _connect_once(self) -> socket.socket | None:
        """A connected socket; None: the agent's backlog is full (try again)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BlockingIOError:
            sock.close()
            return None
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            stale = isinstance(exc, ConnectionRefusedError)
            raise AgentNotRunning(self.path, "its socket file is stale: the agent that made it is gone" if stale
                                  else "") from None
        except PermissionError:
            sock.close()
            raise ControlError(f"permission denied on {self.path}: the control socket is for root only "
                               "(mode 0600); run this as root (sudo)") from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENOTSOCK or exc.errno == errno.ENOTDIR:
                raise AgentNotRunning(self.path, exc.strerror or "") from None
            raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        return sock

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return its answer (``ok`` true); an error answer raises ControlError."""
        data = _encode(request)
        for attempt in (1, 2):
            fresh = self._sock is None
            if self._sock is None:
                self._sock = self._connect()
                self._buf = b""
            try:
                self._sock.sendall(data)
                line = self._read_line(self._sock)
                break
            except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
                self.close()
                if fresh or attempt == 2:
                    raise ControlError(f"the agent on {self.path} closed the connection ({exc or 'end of data'})"
                                       ) from None
            except TimeoutError:
                self.close()
                raise ControlError(f"the agent on {self.path} did not answer within {self.timeout:g}s") from None
            except OSError as exc:
                self.close()
                raise ControlError(f"control socket {self.path}: {exc.strerror or exc}") from None
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError(f"the agent on {self.path} sent something that is not JSON: {line[:80]!r}") from None
        if not isinstance(answer, dict):
            raise ControlError(f"the agent on {self.path} sent an answer that is not a JSON object")
        if not answer.get("ok"):
            raise ControlError(f"the agent says: {answer.get('error', 'error (no reason given)')}")
        return answer

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buf:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def status(self) -> dict[str, Any]:
        return self.request({"cmd": "status"})

    def flows(self, sort: str = "bytes", limit: int | None = None, by: str | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"cmd": "flows", "sort": sort, "limit": limit or 0}
        if by is not None:
            request["by"] = by
        return self.request(request)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
