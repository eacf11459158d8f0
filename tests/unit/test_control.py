"""The control channel (pyflow/control.py) against a fake agent: no root, no kernel.

The fake has what the server reads of an Agent: ``lock``, ``settings`` (a real Settings),
``targets`` (real Targets, never opened), ``stats``, ``observed`` (what the last sweep saw),
``baseline``, ``clocks`` and a meter whose ``scan()`` yields chunks of the kernel ABI's dtypes
in a reused buffer, as the real one does.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pyflow import control
from pyflow.agent import AgentStats, Clocks, Observed
from pyflow.config import Settings, TargetSettings
from pyflow.control import AgentNotRunning, ControlClient, ControlError, ControlServer, check_socket_path
from pyflow.export.registry import encoder_for
from pyflow.export.target import Target
from pyflow.kernel.abi import FLOW_KEY_DTYPE, FLOW_VALUE_DTYPE
from pyflow.records import addr_to_16
from pyflow.sweep import Baseline

BOOT_NOW = 500 * 10**9  # the fake CLOCK_BOOTTIME "now"
S = 10**9


class FakeMeter:
    def __init__(self, agent: FakeAgent, keys: np.ndarray, values: np.ndarray, capacity: int) -> None:
        self.agent = agent
        self.keys, self.values = keys, values
        self.settings = SimpleNamespace(cache_entries=capacity)
        self.reads = 0
        self.locked_reads = 0  # reads made while the agent's lock was held
        self.fail = False
        self.gate: threading.Event | None = None  # set: a read waits for it
        self.reading = threading.Event()

    def _read(self) -> None:
        self.reads += 1
        self.locked_reads += self.agent.lock.locked()
        if self.fail:
            raise RuntimeError("map gone")
        self.reading.set()
        if self.gate is not None:
            assert self.gate.wait(10), "a blocked cache read was never released"

    def read_flows(self) -> tuple[np.ndarray, np.ndarray]:  # what the server used before FlowMeter.scan
        self._read()
        return self.keys, self.values

    def scan(self, chunk: int = 8192) -> FakeScan:
        return FakeScan(self, chunk)

    def capacity(self, which: int) -> int:
        return int(self.settings.cache_entries)


class FakeScan:
    """FlowMeter.scan's face: chunks of both maps (here one) as views of one reused buffer."""

    def __init__(self, meter: FakeMeter, chunk: int) -> None:
        self.meter, self.chunk = meter, chunk
        self.keys = np.zeros(chunk, FLOW_KEY_DTYPE)
        self.values = np.zeros(chunk, FLOW_VALUE_DTYPE)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        self.meter._read()
        for lo in range(0, len(self.meter.keys), self.chunk):
            n = min(self.chunk, len(self.meter.keys) - lo)
            self.keys[:n] = self.meter.keys[lo:lo + n]
            self.values[:n] = self.meter.values[lo:lo + n]
            yield 0, self.keys[:n], self.values[:n]

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeScan:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def flow_arrays(flows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(flows), FLOW_KEY_DTYPE)
    values = np.zeros(len(flows), FLOW_VALUE_DTYPE)
    for i, f in enumerate(flows):
        keys[i]["src_addr"] = addr_to_16(f["src"])
        keys[i]["dst_addr"] = addr_to_16(f["dst"])
        keys[i]["ip_version"] = 6 if ":" in f["src"] else 4
        for k in ("src_port", "dst_port", "protocol", "ifindex", "direction"):
            keys[i][k] = f.get(k, 0)
        for k in ("packets", "bytes", "first_seen_ns", "last_seen_ns", "flow_id", "tcp_flags"):
            values[i][k] = f.get(k, 0)
    return keys, values


FLOWS = [
    # a UDP flow cut once by the active timeout: 4 packets / 400 bytes already exported
    {"src": "10.0.0.1", "dst": "10.0.0.2", "src_port": 40000, "dst_port": 53, "protocol": 17, "ifindex": 1,
     "packets": 10, "bytes": 1000, "first_seen_ns": BOOT_NOW - 30 * S, "last_seen_ns": BOOT_NOW - 1 * S,
     "flow_id": 7},
    # the biggest by bytes, the oldest
    {"src": "2001:db8::1", "dst": "2001:db8::2", "src_port": 443, "dst_port": 50000, "protocol": 6, "ifindex": 1,
     "packets": 5, "bytes": 5000, "first_seen_ns": BOOT_NOW - 60 * S, "last_seen_ns": BOOT_NOW - 2 * S,
     "flow_id": 3, "tcp_flags": 0x18, "direction": 1},
    # the most packets, the youngest; ICMP echo (type 8 code 0 in dst port)
    {"src": "10.0.0.3", "dst": "10.0.0.4", "src_port": 0, "dst_port": 8 * 256, "protocol": 1, "ifindex": 1,
     "packets": 20, "bytes": 1680, "first_seen_ns": BOOT_NOW - 5 * S, "last_seen_ns": BOOT_NOW, "flow_id": 9},
]


class FakeAgent:
    def __init__(self, flows: list[dict] = FLOWS, capacity: int = 4096) -> None:
        self.lock = threading.Lock()
        self.settings = Settings(
            interfaces=("eth0", "eth1"), cache_entries=capacity,
            targets=(TargetSettings("127.0.0.1", 2055, "ipfix"), TargetSettings("192.0.2.50", 9995, "5")),
            active_flow_timeout_ns=60 * S, inactive_flow_timeout_ns=15 * S,
        )
        self.targets = [Target(ts, encoder_for(ts.version)) for ts in self.settings.targets]
        self.stats = AgentStats(sweeps=12, records=34, deleted=5)
        # the last sweep, 2 s ago, counted every flow
        self.observed = Observed(meter=self, sweeps=12, cached=len(flows), boot_ns=BOOT_NOW - 2 * S)
        self.baseline = Baseline(np.array([7], np.uint64), np.array([4], np.uint64), np.array([400], np.uint64),
                                 np.array([BOOT_NOW - 10 * S], np.uint64))
        self.clocks = Clocks(boot_ns=lambda: BOOT_NOW)
        self.metrics = None
        keys, values = flow_arrays(flows)
        self.meter = FakeMeter(self, keys, values, capacity)


class Wall:
    """An injectable wall clock."""

    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "pyflow" / "pyflow.sock")  # the directories do not exist yet


@pytest.fixture
def served(sock_path: str) -> Iterator[tuple[FakeAgent, ControlServer, Wall]]:
    agent, wall = FakeAgent(), Wall()
    server = ControlServer(agent, sock_path, wall=wall)  # type: ignore[arg-type]
    server.start()
    try:
        yield agent, server, wall
    finally:
        server.close()


def raw_exchange(path: str, payload: bytes) -> list[dict]:
    """Send raw bytes, read every answer line until the server closes or answers all lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


# --------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------


def test_status(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    agent, _, wall = served
    agent.targets[1].stats.send_errors["econnrefused"] += 3
    with ControlClient(sock_path) as client:
        wall.t = 1_015.0
        st = client.status()
    s = st["settings"]
    assert s["enabled"] is True and s["interfaces"] == ["eth0", "eth1"]
    assert (s["cache-entries"], s["active-flow-timeout"], s["inactive-flow-timeout"]) == (4096, "1m", "15s")
    assert s["sweep-interval"] == "10s" and s["ipfix"] == {}
    assert st["cache"] == {"entries": 3, "capacity": 4096, "counted-ago": 2.0}
    assert st["agent"] | {"pid": 0} == {"sweeps": 12, "records": 34, "deleted": 5, "nat-events": 0,
                                        "pending-sweeps": 0, "last-sweep-seconds": 0.0, "started": 1_000.0,
                                        "uptime": 15.0, "pid": 0}
    t0, t1 = st["targets"]
    assert (t0["name"], t0["dst-address"], t0["port"], t0["version"]) == ("127.0.0.1:2055/ipfix", "127.0.0.1",
                                                                          2055, "ipfix")
    assert (t0["datagrams"], t0["records"], t0["bytes"], t0["send-errors"], t0["last-sent"]) == (0, 0, 0, 0, None)
    assert (t1["version"], t1["send-errors"], t1["send-errors-by-errno"]) == ("5", 3, {"econnrefused": 3})


def test_last_sent_is_when_the_datagram_count_last_changed(served: tuple[FakeAgent, ControlServer, Wall],
                                                           sock_path: str) -> None:
    agent, _, wall = served
    stats = agent.targets[0].stats
    with ControlClient(sock_path) as client:
        assert client.status()["targets"][0]["last-sent"] is None
        wall.t = 1_010.0
        stats.datagrams, stats.records, stats.bytes = 2, 50, 2900
        first = client.status()["targets"][0]
        wall.t = 1_016.5
        second = client.status()["targets"][0]
        wall.t = 1_020.0
        stats.datagrams += 1
        third = client.status()["targets"][0]
    assert (first["datagrams"], first["records"], first["bytes"]) == (2, 50, 2900)
    assert (first["last-sent"], first["last-sent-ago"]) == (1_010.0, 0.0)
    assert (second["last-sent"], second["last-sent-ago"]) == (1_010.0, 6.5)  # nothing sent since
    assert (third["last-sent"], third["last-sent-ago"]) == (1_020.0, 0.0)


# --------------------------------------------------------------------------
# flows
# --------------------------------------------------------------------------


def test_flows_sorted_with_deltas_and_totals(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    agent, _, _ = served
    with ControlClient(sock_path) as client:
        by_bytes = client.flows("bytes")
        by_packets = client.flows("packets")
        by_age = client.flows("age")
        top1 = client.flows("packets", limit=1)
    assert agent.meter.reads == 4 and agent.meter.locked_reads == 0
    assert [f["flow-id"] for f in by_bytes["flows"]] == [3, 9, 7]
    assert [f["flow-id"] for f in by_packets["flows"]] == [9, 7, 3]
    assert [f["flow-id"] for f in by_age["flows"]] == [3, 7, 9]
    assert (top1["total"], top1["capacity"], top1["limit"], len(top1["flows"])) == (3, 4096, 1, 1)
    assert top1["max-limit"] == control.MAX_FLOWS
    udp = next(f for f in by_bytes["flows"] if f["flow-id"] == 7)
    assert udp == {"src": "10.0.0.1", "dst": "10.0.0.2", "sport": 40000, "dport": 53, "proto": 17,
                   "ip-version": 4, "tos": 0, "ifindex": 1, "interface": socket.if_indextoname(1),
                   "direction": "ingress", "packets": 6, "bytes": 600, "packets-total": 10, "bytes-total": 1000,
                   "tcp-flags": 0, "first-seen": 30.0, "last-seen": 1.0, "flow-id": 7}
    tcp = by_bytes["flows"][0]
    assert (tcp["src"], tcp["direction"], tcp["packets"], tcp["packets-total"], tcp["tcp-flags"]) == (
        "2001:db8::1", "egress", 5, 5, 0x18)


def test_flows_are_read_in_chunks_of_a_reused_buffer(served: tuple[FakeAgent, ControlServer, Wall],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The meter reuses its read buffers: what the server keeps of a chunk must be its own copy."""
    _, server, _ = served
    monkeypatch.setattr(control, "SCAN_CHUNK", 1)
    assert [f["packets-total"] for f in server.flows("packets")["flows"]] == [20, 10, 5]
    assert [f["flow-id"] for f in server.flows("age", 2)["flows"]] == [3, 7]


def test_empty_cache(sock_path: str) -> None:
    with ControlServer(FakeAgent(flows=[]), sock_path) as _, ControlClient(sock_path) as client:  # type: ignore[arg-type]
        answer = client.flows("age", 5)
        assert (answer["total"], answer["flows"]) == (0, [])
        assert client.status()["cache"]["entries"] == 0


def test_flows_grouped_by_source_destination_port_and_protocol(served: tuple[FakeAgent, ControlServer, Wall],
                                                              sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyflow top's views: the cache summed per key, read in chunks (of one entry here) without the lock."""
    agent, _, _ = served
    monkeypatch.setattr(control, "SCAN_CHUNK", 1)
    with ControlClient(sock_path) as client:
        src = client.flows("bytes", by="src")
        dst = client.flows("packets", 1, by="dst")
        port = client.flows("flows", by="port")
        proto = client.flows("bytes", by="proto")
    assert agent.meter.reads == 4 and agent.meter.locked_reads == 0
    assert (src["by"], src["sort"], src["total"], src["capacity"], src["trimmed"]) == ("src", "bytes", 3, 4096, False)
    assert src["groups"] == [{"flows": 1, "packets": 5, "bytes": 5000, "address": "2001:db8::1"},
                             {"flows": 1, "packets": 20, "bytes": 1680, "address": "10.0.0.3"},
                             {"flows": 1, "packets": 10, "bytes": 1000, "address": "10.0.0.1"}]
    assert dst["groups"] == [{"flows": 1, "packets": 20, "bytes": 1680, "address": "10.0.0.4"}]
    # ICMP has no port; the service port is the lower of the two
    assert sorted((g["proto"], g["port"], g["bytes"]) for g in port["groups"]) == [(6, 443, 5000), (17, 53, 1000)]
    assert [(g["proto"], g["bytes"]) for g in proto["groups"]] == [(6, 5000), (1, 1680), (17, 1000)]


def test_grouped_answer_sums_many_flows_capped(sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """1000 flows from one source over 64-entry chunks: one group with exact sums; limits capped as for flows;
    more groups than GROUP_ROWS: the largest are kept and the answer says it was trimmed."""
    monkeypatch.setattr(control, "MAX_FLOWS", 50, raising=False)
    monkeypatch.setattr(control, "SCAN_CHUNK", 64, raising=False)
    agent = many_flows(1000)
    agent.meter.keys["dst_port"] = 65535  # the service port: the source port, 1000 distinct ones
    with ControlServer(agent, sock_path) as _, ControlClient(sock_path) as client:  # type: ignore[arg-type]
        [one] = client.flows("flows", 0, by="src")["groups"]
        ports = client.flows("bytes", 0, by="port")
        monkeypatch.setattr(control, "GROUP_ROWS", 16, raising=False)
        trimmed = client.flows("bytes", 5, by="port")
    assert one == {"flows": 1000, "packets": int(agent.meter.values["packets"].sum()),
                   "bytes": int(agent.meter.values["bytes"].sum()), "address": "10.0.0.1"}
    assert (ports["limit"], len(ports["groups"]), ports["trimmed"]) == (50, 50, False)
    by_bytes = np.sort(agent.meter.values["bytes"])[::-1]
    assert [g["bytes"] for g in ports["groups"]] == by_bytes[:50].tolist()
    assert trimmed["trimmed"] is True
    assert [g["bytes"] for g in trimmed["groups"]] == by_bytes[:5].tolist()  # the largest survive the cuts


def test_grouped_requests_checked(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    answers = raw_exchange(sock_path, b'{"cmd": "flows", "by": "mac"}\n{"cmd": "flows", "by": "src", "sort": "age"}\n'
                                      b'{"cmd": "flows", "sort": "flows"}\n')
    assert [a["ok"] for a in answers] == [False, False, False]
    assert "by 'mac' is not one of src, dst, port, proto" in answers[0]["error"]
    assert "sort 'age' is not one of bytes, packets, flows (grouped by src)" in answers[1]["error"]
    assert "sort 'flows' is not one of bytes, packets, age" in answers[2]["error"]


# --------------------------------------------------------------------------
# watching never holds the agent up (issue 15, finding 1)
# --------------------------------------------------------------------------


def test_status_does_not_wait_for_a_sweep(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    agent, _, _ = served
    with agent.lock, ControlClient(sock_path, timeout=3.0) as client:  # a long sweep
        st = client.status()
    assert st["cache"]["entries"] == 3 and agent.meter.reads == 0  # the last sweep's count: no cache read


def test_flows_reads_the_cache_without_the_lock(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    """A cache read that takes long (here: one that waits) does not keep a sweep waiting."""
    agent, _, _ = served
    agent.meter.gate = threading.Event()
    answers: list[dict] = []
    asker = threading.Thread(target=lambda: answers.append(ControlClient(sock_path).flows("bytes")))
    asker.start()
    assert agent.meter.reading.wait(5.0)
    swept = agent.lock.acquire(timeout=2.0)  # the sweep
    if swept:
        agent.lock.release()
    agent.meter.gate.set()
    asker.join(10.0)
    assert swept, "a flows request held the agent's lock while it read the cache"
    assert [f["flow-id"] for f in answers[0]["flows"]] == [3, 9, 7]


# --------------------------------------------------------------------------
# per-client limits, bounded answers (issue 15, finding 7)
# --------------------------------------------------------------------------


def wait_for(cond: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def many_flows(n: int) -> FakeAgent:
    """A fake agent whose cache holds ``n`` flows with distinct byte counts (built column-wise)."""
    agent = FakeAgent(flows=[])
    keys = np.zeros(n, FLOW_KEY_DTYPE)
    values = np.zeros(n, FLOW_VALUE_DTYPE)
    keys["src_addr"] = addr_to_16("10.0.0.1")
    keys["dst_addr"] = addr_to_16("10.0.0.2")
    keys["ip_version"], keys["protocol"], keys["ifindex"] = 4, 17, 1
    keys["src_port"] = np.arange(n) % 65536
    rng = np.random.default_rng(5)
    values["flow_id"] = np.arange(1, n + 1)
    values["bytes"] = rng.permutation(n) * 10 + 100
    values["packets"] = values["bytes"] // 100
    values["first_seen_ns"] = BOOT_NOW - rng.integers(1, 60 * S, n)
    values["last_seen_ns"] = BOOT_NOW
    agent.meter = FakeMeter(agent, keys, values, n)
    agent.observed = Observed(meter=agent.meter, cached=n, boot_ns=BOOT_NOW)
    return agent


def test_idle_clients_do_not_lock_others_out(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    idle = []
    try:
        for _ in range(control.MAX_CLIENTS + 4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock_path)
            idle.append(s)
        t0 = time.monotonic()
        with ControlClient(sock_path, timeout=control.IDLE_SECONDS) as client:
            assert client.status()["ok"] and client.flows("bytes", 1)["flows"]
        assert time.monotonic() - t0 < control.IDLE_SECONDS
    finally:
        for s in idle:
            s.close()


def test_an_idle_or_slow_connection_is_closed(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "IDLE_SECONDS", 0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        idle.settimeout(5.0)
        idle.connect(sock_path)
        slow.connect(sock_path)
        t0 = time.monotonic()
        assert idle.recv(100) == b""  # closed by the server
        assert time.monotonic() - t0 < 3.0
        t1 = time.monotonic()
        closed_after = None
        for byte in b'{"cmd": "status"}' * 2:  # a byte every 0.1 s for 3.4 s: never a whole line
            try:
                slow.sendall(bytes([byte]))
            except OSError:  # EPIPE, ECONNRESET: the server closed it
                closed_after = time.monotonic() - t1
                break
            time.sleep(0.1)
        assert closed_after is not None and closed_after < 2.0, "a slow request kept its connection open"


def test_limit_zero_and_no_limit_are_capped(sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "MAX_FLOWS", 50, raising=False)
    monkeypatch.setattr(control, "DEFAULT_FLOWS", 10, raising=False)
    monkeypatch.setattr(control, "SCAN_CHUNK", 64, raising=False)
    agent = many_flows(1000)
    by_bytes = np.sort(agent.meter.values["bytes"])[::-1]
    with ControlServer(agent, sock_path) as _, ControlClient(sock_path) as client:  # type: ignore[arg-type]
        every = client.flows("bytes", 0)
        [default] = raw_exchange(sock_path, b'{"cmd": "flows"}\n')
        more = client.flows("bytes", 5000)
        oldest = client.flows("age", 0)
    assert (every["total"], every["limit"], len(every["flows"])) == (1000, 50, 50)
    assert [f["bytes-total"] for f in every["flows"]] == by_bytes[:50].tolist()  # the top 50 of every chunk
    assert (default["limit"], len(default["flows"])) == (10, 10)
    assert (more["limit"], len(more["flows"])) == (50, 50)
    first = np.sort(agent.meter.values["first_seen_ns"])[:50]
    assert [f["first-seen"] for f in oldest["flows"]] == [(BOOT_NOW - int(t)) / 1e9 for t in first]


def test_slow_readers_are_dropped_and_memory_stays_bounded(sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 clients ask for every flow of a 100k-flow cache and never read: the server reads the cache
    SCANS at a time, holds one capped answer's rows and one piece per client, and drops them after
    WRITE_SECONDS of writing (before: 8 whole answers in memory, ~80 MB each at 200k flows, held
    for the 300 s idle timeout)."""
    monkeypatch.setattr(control, "WRITE_SECONDS", 1.0, raising=False)
    agent = many_flows(100_000)
    slow = []
    tracemalloc.start()
    try:
        with ControlServer(agent, sock_path) as server:  # type: ignore[arg-type]
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock_path)
                s.sendall(b'{"cmd": "flows", "limit": 0}\n')
                slow.append(s)
            wait_for(lambda: agent.meter.reads == 8, 60)
            wait_for(lambda: not server._clients, 60)  # every slow reader dropped
            peak = tracemalloc.get_traced_memory()[1] - base
            with ControlClient(sock_path) as client:  # and the server goes on
                assert client.status()["ok"]
    finally:
        tracemalloc.stop()
        for s in slow:
            s.close()
    assert peak < 40 << 20, f"{peak / 2**20:.0f} MiB for 8 slow readers (about 25 expected)"


# --------------------------------------------------------------------------
# bad requests never stop the server
# --------------------------------------------------------------------------


def test_bad_requests_get_errors(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    agent, _, _ = served
    lines = [b"not json", b"[1, 2]", b'{"cmd": "reboot"}', b'{"nocmd": 1}', b'{"cmd": "flows", "sort": "size"}',
             b'{"cmd": "flows", "limit": -1}', b'{"cmd": "flows", "limit": "10"}', b'{"cmd": "flows", "limit": true}',
             b"\xff\xfe", b'{"cmd": "status"}']
    answers = raw_exchange(sock_path, b"\n".join(lines) + b"\n")
    assert [a["ok"] for a in answers] == [False] * 9 + [True]
    errors = [a["error"] for a in answers[:9]]
    assert errors[0].startswith("not JSON")
    assert "JSON object" in errors[1]
    assert "unknown cmd 'reboot'" in errors[2] and "unknown cmd None" in errors[3]
    assert "sort 'size' is not one of bytes, packets, age" in errors[4]
    assert all("limit" in e for e in errors[5:8])
    agent.meter.fail = True
    [broken] = raw_exchange(sock_path, b'{"cmd": "flows"}\n')
    assert broken == {"ok": False, "error": "internal error: RuntimeError('map gone')"}
    agent.meter.fail = False
    [huge] = raw_exchange(sock_path, b"x" * (200 * 1024))  # no newline, too long: answered, then closed
    assert huge["ok"] is False and "longer than" in huge["error"]
    with ControlClient(sock_path) as client:  # and the server goes on
        assert client.status()["ok"] is True


def test_client_error_answer_raises(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    with ControlClient(sock_path) as client, pytest.raises(ControlError, match="sort 'size'"):
        client.flows("size")


# --------------------------------------------------------------------------
# the socket file
# --------------------------------------------------------------------------


def test_socket_mode_directory_and_close(sock_path: str) -> None:
    server = ControlServer(FakeAgent(), sock_path)  # type: ignore[arg-type]
    server.start()
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert os.listdir(os.path.dirname(sock_path)) == ["pyflow.sock"]  # no temporary name left behind
    server.close()
    assert not os.path.exists(sock_path)
    server.close()  # idempotent
    with pytest.raises(AgentNotRunning):
        ControlClient(sock_path).status()


def test_stale_socket_is_replaced(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)  # a dead agent's socket: the file stays, nobody listens
    dead.close()
    with pytest.raises(AgentNotRunning, match="stale"):
        ControlClient(sock_path).status()
    with ControlServer(FakeAgent(), sock_path) as _, ControlClient(sock_path) as client:  # type: ignore[arg-type]
        assert client.status()["cache"]["entries"] == 3


def test_live_socket_is_refused(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    second = ControlServer(FakeAgent(), sock_path)  # type: ignore[arg-type]
    with pytest.raises(ControlError, match=f"another pyflow agent is listening on {sock_path}"):
        second.start()
    second.close()
    with ControlClient(sock_path) as client:  # the first one is untouched
        assert client.status()["agent"]["sweeps"] == 12


def test_not_a_socket_is_refused(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    Path(sock_path).write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(FakeAgent(), sock_path).start()  # type: ignore[arg-type]
    assert Path(sock_path).read_text() == "precious"


def test_close_leaves_a_newer_agents_socket(sock_path: str) -> None:
    old = ControlServer(FakeAgent(), sock_path)  # type: ignore[arg-type]
    old.start()
    os.unlink(sock_path)  # e.g. removed by hand; a new agent starts on the same path
    with ControlServer(FakeAgent(), sock_path) as _:  # type: ignore[arg-type]
        old.close()
        assert os.path.exists(sock_path)
        with ControlClient(sock_path) as client:
            assert client.status()["ok"]


def test_no_agent_message(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    with pytest.raises(AgentNotRunning) as info:
        ControlClient(path).status()
    assert str(info.value) == f"no pyflow agent is listening on {path}: is `pyflow run` running? (see --socket)"
    assert info.value.exit_code == 1


def test_client_reconnects_after_agent_restart(sock_path: str) -> None:
    client = ControlClient(sock_path)
    with ControlServer(FakeAgent(), sock_path) as _:  # type: ignore[arg-type]
        assert client.status()["ok"]
    with ControlServer(FakeAgent(), sock_path) as _:  # type: ignore[arg-type]
        assert client.status()["ok"]  # the old connection is dead: one reconnect
    client.close()


def test_many_requests_on_one_connection(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str) -> None:
    answers = raw_exchange(sock_path, b'{"cmd": "status"}\n\n{"cmd": "flows", "limit": 2}\n' * 20)
    assert len(answers) == 40 and all(a["ok"] for a in answers)
    assert [len(a["flows"]) for a in answers[1::2]] == [2] * 20


def test_check_socket_path_fails_fast(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str,
                                      tmp_path: Path) -> None:
    """What a runner can call before attaching anything: the same refusals as start()."""
    with pytest.raises(ControlError, match="another pyflow agent is listening"):
        check_socket_path(sock_path)
    with pytest.raises(ControlError, match=r"too long for a Unix socket \(\d+ bytes, at most 107\)"):
        check_socket_path(str(tmp_path / ("x" * 120)))
    fresh = tmp_path / "new" / "dir" / "p.sock"
    check_socket_path(str(fresh))
    assert fresh.parent.is_dir() and not fresh.exists()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(fresh))
    dead.close()
    check_socket_path(str(fresh))
    assert not fresh.exists()  # the stale one is gone


def test_group_views_print_as_tables(served: tuple[FakeAgent, ControlServer, Wall], sock_path: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """pyflow flows --by / top's views: the grouped answer as a heading and an aligned table; --sort age
    with --by, or flows without it, is a settings error (exit 2)."""
    from pyflow.commands import group_lines, main

    with ControlClient(sock_path) as client:
        lines = group_lines(client.flows("bytes", by="port"))
        src = group_lines(client.flows("packets", 2, by="src"))
    assert lines[0] == "3 flows in the cache (of 4k) by port: the top 2 by bytes"
    assert lines[1].split() == ["PROTO", "PORT", "FLOWS", "PACKETS", "BYTES"]
    assert lines[2].split()[:4] == ["tcp", "443", "1", "5"] and lines[3].split()[:4] == ["udp", "53", "1", "10"]
    assert [ln.split()[0] for ln in src[2:]] == ["10.0.0.3", "10.0.0.1"]
    assert main(["flows", "--socket", sock_path, "--by", "proto", "--sort", "flows"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["PROTO", "FLOWS", "PACKETS", "BYTES"] and len(out) == 5
    assert main(["flows", "--socket", sock_path, "--by", "src", "--sort", "age"]) == 2
    assert "--sort age does not go with --by src" in capsys.readouterr().err
    assert main(["flows", "--socket", sock_path, "--sort", "flows"]) == 2
