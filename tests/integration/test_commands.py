"""The live views against a real agent: `pyflow status`, `flows` and `top` (in a pseudo-terminal)
over the control socket of `pyflow run`, and `pyflow collect` receiving pyflow's own export.

Host a sends known flows to host b; `pyflow run` meters b's interface inside b.  The control
socket lives on the (shared) file system, so the commands run outside the namespace.

Until `pyflow run` has `--control-socket` (runner.py starting ``ControlServer(agent, path)``),
the agent is started through a shim that does exactly that wiring (``SHIM``); until pyflow.cli
calls ``add_commands``, the commands run as ``python -m pyflow.commands``.  Both switch to the
real `pyflow` by themselves once it has them.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP

from pyflow.control import ControlClient
from tests.integration.collect import Tap
from tests.integration.netns import Pair, udp_socket_in
from tests.integration.procs import PYFLOW, REPO, Proc
from tests.integration.test_end_to_end import eth, send

SHIM = """\
import sys
from pyflow import agent
from pyflow.control import ControlServer
_run = agent.Agent.run
def run(self, *args, **kwargs):
    with ControlServer(self, sys.argv[1]):
        return _run(self, *args, **kwargs)
agent.Agent.run = run
from pyflow.cli import main
sys.exit(main(sys.argv[2:]))
"""

# The known flow: 7 UDP packets of 100 payload bytes, 128 IP bytes each.
KNOWN_SPORT, KNOWN_DPORT, KNOWN_PACKETS, KNOWN_BYTES = 41000, 5300, 7, 7 * 128


@functools.cache
def run_has_control_socket() -> bool:
    out = subprocess.run([PYFLOW, "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    return "--control-socket" in out


@functools.cache
def cli_has_commands() -> bool:
    return subprocess.run([PYFLOW, "status", "--help"], capture_output=True, timeout=60).returncode == 0


def pyflow_cmd(*args: str) -> list[str]:
    """argv of a live-view command: the real `pyflow`, or pyflow.commands alone until cli.py has them."""
    if cli_has_commands():
        return [PYFLOW, *args]
    return [sys.executable, "-m", "pyflow.commands", *args]


@contextmanager
def agent_in(ns: str, sock: str, *args: str) -> Iterator[Proc]:
    """`pyflow run ARGS` inside ``ns`` with its control socket at ``sock``."""
    if run_has_control_socket():
        argv = ["ip", "netns", "exec", ns, PYFLOW, "run", "--control-socket", sock, *args]
    else:
        argv = ["ip", "netns", "exec", ns, sys.executable, "-c", SHIM, sock, "run", *args]
    proc = Proc(argv)
    try:
        proc.wait_for_line("exporting to", timeout=60)
        wait_for(lambda: os.path.exists(sock), f"control socket {sock}", proc)
        yield proc
    finally:
        rc = proc.stop()
        assert rc == 0, proc.output()
    assert not os.path.exists(sock), "the control socket is removed when the agent stops"


def wait_for(cond: Any, what: str, proc: Proc | None = None, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s" + (f"; agent output:\n{proc.output()}" if proc else ""))
        time.sleep(0.1)


def run_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyflow_cmd(*args), capture_output=True, text=True, timeout=60, cwd=str(REPO))


def known_flow(answer: dict[str, Any], pair: Pair) -> dict[str, Any] | None:
    for f in answer["flows"]:
        if (f["src"], f["sport"], f["dst"], f["dport"], f["proto"]) == (
                pair.a_v4, KNOWN_SPORT, pair.b_v4, KNOWN_DPORT, 17):
            return f
    return None


# --------------------------------------------------------------------------
# status, flows, top
# --------------------------------------------------------------------------


def test_status_flows_and_top(pair: Pair, tmp_path: Path) -> None:
    sock = str(tmp_path / "pyflow.sock")
    e = eth(pair)
    v4 = {"src": pair.a_v4, "dst": pair.b_v4}
    frames = ([e / IP(**v4) / UDP(sport=KNOWN_SPORT, dport=KNOWN_DPORT) / (b"k" * 100)] * KNOWN_PACKETS
              + [e / IP(**v4) / TCP(sport=41001, dport=80, flags="S")] * 2)  # a smaller flow: 2 x 40 bytes
    tap = Tap(udp_socket_in(pair.b))
    try:
        with agent_in(pair.b, sock, "--interface", pair.b_if, "--cache-entries", "4k",
                      "--inactive-flow-timeout", "10m", "--sweep-interval", "200ms", "--metrics-address", "",
                      "--target", f"127.0.0.1:{tap.port}/ipfix") as agent:
            send(pair, frames, tmp_path, "known")
            with ControlClient(sock) as client:
                flow = wait_for(lambda: (f := known_flow(client.flows(limit=0), pair)) and
                                f["packets-total"] == KNOWN_PACKETS and f, "known flow in the cache", agent)
            assert (flow["packets"], flow["bytes"], flow["bytes-total"]) == (KNOWN_PACKETS, KNOWN_BYTES, KNOWN_BYTES)
            assert (flow["interface"], flow["direction"]) == (pair.b_if, "ingress")

            # pyflow flows: the table, top talker first; --json: exact
            res = run_cmd("flows", "--socket", sock)
            assert res.returncode == 0, res.stderr
            lines = res.stdout.splitlines()
            assert re.fullmatch(r"\d+ flows? in the cache \(of 4k\)", lines[0])
            assert lines[1].split()[:4] == ["SRC", "SPORT", "DST", "DPORT"]
            row = rf"{re.escape(pair.a_v4)}\s+{KNOWN_SPORT}\s+{re.escape(pair.b_v4)}\s+{KNOWN_DPORT}\s+udp\s+" \
                  rf"{pair.b_if}\s+ingress\s+{KNOWN_PACKETS}\s+896 B\s+{KNOWN_PACKETS}\s+896 B\s"
            assert re.match(row, lines[2]), res.stdout  # the most bytes: first
            tcp = next(ln for ln in lines if " 41001 " in ln)
            assert re.search(r"\stcp\s.*\singress\s+2\s+80 B\s+2\s+80 B\s", tcp), tcp
            res = run_cmd("flows", "--socket", sock, "--sort", "packets", "--limit", "1", "--json")
            answer = json.loads(res.stdout)
            assert (answer["limit"], len(answer["flows"]), answer["capacity"]) == (1, 1, 4096)
            assert answer["flows"][0]["sport"] == KNOWN_SPORT and answer["total"] >= 2
            # --by: the cache summed per source (the known UDP flow and the TCP one)
            res = run_cmd("flows", "--socket", sock, "--by", "src", "--json")
            assert res.returncode == 0, res.stderr
            src = next(g for g in json.loads(res.stdout)["groups"] if g["address"] == pair.a_v4)
            assert (src["flows"], src["packets"], src["bytes"]) == (2, KNOWN_PACKETS + 2, KNOWN_BYTES + 80)

            # pyflow status: settings, cache use, the target's counters = what the collector got
            tap.drain(0.5)
            res = run_cmd("status", "--socket", sock, "--json")
            assert res.returncode == 0, res.stderr
            st = json.loads(res.stdout)
            assert st["settings"]["interfaces"] == [pair.b_if]
            assert (st["settings"]["cache-entries"], st["settings"]["inactive-flow-timeout"]) == (4096, "10m")
            # counted by the last sweep (every 200 ms here), not by reading the cache
            assert (st["cache"]["entries"], st["cache"]["capacity"]) == (answer["total"], 4096)
            assert 0 <= st["cache"]["counted-ago"] < 5
            [target] = st["targets"]
            assert (target["name"], target["records"]) == (f"127.0.0.1:{tap.port}/ipfix", 0)  # nothing expired yet
            assert target["datagrams"] == len(tap.datagrams) >= 1  # the templates, sent at start
            assert target["bytes"] == sum(len(d) for d in tap.datagrams)
            assert target["last-sent"] is not None and target["send-errors"] == 0
            assert st["agent"]["sweeps"] >= 1 and st["agent"]["uptime"] > 0
            # every link of the namespace: metered with its hooks, or skipped and why
            links = {x["name"]: x for x in st["links"]}
            assert (links["lo"]["metered"], links["lo"]["reason"]) == (False, "not named")
            assert links[pair.b_if]["metered"] and links[pair.b_if]["hooks"], links
            text = run_cmd("status", "--socket", sock).stdout
            assert re.search(r"^\s*1\s+lo\s+no\s+not named$", text, re.M), text
            assert re.search(r"^\s*cache-entries: 4k\s+\(in use: \d+, ", text, re.M), text
            assert re.search(r"^\s*inactive-flow-timeout: 10m$", text, re.M), text
            assert re.search(rf"^0\s+127\.0\.0\.1\s+{tap.port}\s+ipfix\s+{target['datagrams']}\s+0\s+.*\sago$",
                             text, re.M), text

            top_in_pty(sock, pair, quit_key=b"q")
            top_in_pty(sock, pair, quit_key=b"\x03")  # Ctrl-C
        # the agent stopped: everything cached left as a forced end, the known flow exact
        tap.drain(1.0)
        got = [r for r in tap.records() if r.get("L4_SRC_PORT") == KNOWN_SPORT]
        assert [(r["IN_PKTS"], r["IN_BYTES"]) for r in got] == [(KNOWN_PACKETS, KNOWN_BYTES)]
    finally:
        tap.close()
    res = run_cmd("status", "--socket", sock)
    assert res.returncode == 1
    assert f"no pyflow agent is listening on {sock}: is `pyflow run` running? (see --socket)" in res.stderr


def top_in_pty(sock: str, pair: Pair, quit_key: bytes) -> None:
    """`pyflow top` in a pseudo-terminal: it shows the known flow, quits on ``quit_key`` with exit
    status 0, and leaves the terminal as it found it (termios modes, main screen, cursor shown)."""
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 160, 0, 0))
        before = termios.tcgetattr(slave)
        # setsid -c: a session whose controlling terminal is the pty, so Ctrl-C is a SIGINT
        proc = subprocess.Popen(["setsid", "-c", *pyflow_cmd("top", "--socket", sock, "--interval", "300ms")],
                                stdin=slave, stdout=slave, stderr=slave, cwd=str(REPO))
        screen = b""

        def read_until(pattern: bytes, timeout: float = 30.0) -> re.Match[bytes]:
            nonlocal screen
            deadline = time.monotonic() + timeout
            while not (m := re.search(pattern, screen)):
                left = deadline - time.monotonic()
                ready, _, _ = select.select([master], [], [], max(0.0, left))
                if not ready:
                    proc.kill()
                    raise AssertionError(f"top never showed {pattern!r}; screen:\n{screen[-3000:]!r}")
                screen += os.read(master, 65536)
            return m

        try:
            read_until(rb"\x1b\[\?1049h")  # the alternate screen
            read_until(rf"{re.escape(pair.a_v4)}\s+{KNOWN_SPORT}\s+{re.escape(pair.b_v4)}\s+{KNOWN_DPORT}\s+udp\s+"
                       rf"{pair.b_if}\s+ingress\s+{KNOWN_PACKETS}\s+896 B".encode())
            read_until(rb"export [0-9.]+ records/s")  # the second frame has a rate
            assert termios.tcgetattr(slave) != before, "top reads keys in cbreak mode"
            read_until(rb"sort: bytes")
            os.write(master, b"p")
            read_until(rb"sort: packets")
            os.write(master, b"v")  # the view per source: the known flow and the TCP one
            src_row = rf"{re.escape(pair.a_v4)}\s+2\s+{KNOWN_PACKETS + 2}\s"
            read_until(rf"(?s)view: source\s+sort: packets.*{src_row}".encode())
            os.write(master, quit_key)
            rc = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            screen += chunk
        assert rc == 0, screen[-2000:]
        assert screen.rstrip(b"\r\n").endswith(b"\x1b[?25h\x1b[?1049l"), screen[-200:]
        assert termios.tcgetattr(slave) == before
        assert b"Traceback" not in screen
    finally:
        os.close(master)
        os.close(slave)


# --------------------------------------------------------------------------
# collect
# --------------------------------------------------------------------------

COLLECT_PORTS = {"ipfix": 29401, "9": 29402, "5": 29403}


def test_collect_prints_pyflows_export(pair: Pair, tmp_path: Path) -> None:
    e = eth(pair)
    v4 = {"src": pair.a_v4, "dst": pair.b_v4}
    frames = ([e / IP(**v4) / UDP(sport=42001, dport=53) / (b"a" * 50)] * 4  # 78 IP bytes each
              + [e / IP(**v4) / UDP(sport=42002, dport=53) / (b"b" * 10)] * 2  # 38
              + [e / IP(**v4) / ICMP(type=8, code=0, id=5) / (b"c" * 56)] * 3)  # 84
    expected = {("42001", "53", "udp"): (4, 312), ("42002", "53", "udp"): (2, 76), ("0", "2048", "icmp"): (3, 252)}
    collectors = {
        version: Proc(["ip", "netns", "exec", pair.b, *pyflow_cmd(
            "collect", "--listen", f"127.0.0.1:{port}", "--count", "3", "--timeout", "60s",
            *(["--json"] if version == "9" else []))])
        for version, port in COLLECT_PORTS.items()
    }
    try:
        for version, proc in collectors.items():
            proc.wait_for_line(f"listening on 127.0.0.1:{COLLECT_PORTS[version]} ", timeout=30)
        # interface names as options data: asked for (interface-names=yes) where the format has options
        names = {"9": ",interface-names=yes", "ipfix": ",interface-names=yes"}
        targets = [a for v, port in COLLECT_PORTS.items()
                   for a in ("--target", f"127.0.0.1:{port}/{v}{names.get(v, '')}")]
        with agent_in(pair.b, str(tmp_path / "pyflow.sock"), "--interface", pair.b_if, "--inactive-flow-timeout",
                      "1s", "--sweep-interval", "200ms", "--metrics-address", "", *targets) as agent:
            send(pair, frames, tmp_path, "collect")
            for version, proc in collectors.items():
                try:
                    rc = proc.p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"collect ({version}) did not get 3 records:\n{proc.output()}\n"
                                         f"agent:\n{agent.output()}") from None
                assert rc == 0, proc.output()
    finally:
        for proc in collectors.values():
            proc.stop(signal.SIGINT)
    name = {"ipfix": "ipfix", "9": "v9", "5": "v5"}
    line_re = re.compile(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} (\S+) {re.escape(pair.a_v4)}:(\d+) -> "
                         rf"{re.escape(pair.b_v4)}:(\d+) (\S+) packets=(\d+) bytes=(\d+) .*exporter=127\.0\.0\.1:\d+$")
    b_ifindex = ifindex(pair)
    for version, proc in collectors.items():
        got = {}
        for line in proc.lines:
            if line.startswith("pyflow collect: "):
                assert "listening on" in line, f"collect ({version}) reported a problem: {line}"
                continue
            if version == "9":  # --json: one object per record
                r = json.loads(line)
                assert r["version"] == "v9", r
                if r["options"]:
                    assert r["scope"] == {"scopeInterface": b_ifindex}, r
                    assert r["fields"] == {"ingressInterface": b_ifindex, "interfaceDescription": pair.b_if}, r
                    continue
                assert (r["src"], r["dst"]) == (pair.a_v4, pair.b_v4), r
                assert (r["fields"]["ingressInterface"], r["fields"]["flowDirection"]) == (b_ifindex, 0), r
                got[(str(r["sport"]), str(r["dport"]), {1: "icmp", 17: "udp"}[r["proto"]])] = (
                    r["packets"], r["bytes"])
                continue
            if " options template=" in line:
                continue  # interface names (IPFIX)
            m = line_re.match(line)
            assert m, f"collect ({version}): unexpected line {line!r}"
            assert m.group(1) == name[version]
            got[(m.group(2), m.group(3), m.group(4))] = (int(m.group(5)), int(m.group(6)))
        assert got == expected, proc.output()
        if version == "ipfix":
            assert any(f"options template=260 scope(ingressInterface={b_ifindex}) ingressInterface={b_ifindex} "
                       f"interfaceDescription={pair.b_if} " in ln for ln in proc.lines), proc.output()


def ifindex(pair: Pair) -> int:
    return int(json.loads(subprocess.run(["ip", "-n", pair.b, "-j", "link", "show", pair.b_if],
                                         capture_output=True, text=True, check=True).stdout)[0]["ifindex"])
