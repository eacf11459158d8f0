"""Collector faults: targets that are down, refuse, or come back -- and one that never fails.

pyflow meters b's interface (inactive timeout 200 ms, sweep 100 ms) and
exports every flow to five targets at once, in b:

* ``steady``: IPFIX to an nfcapd that runs throughout -- it must get every
  packet of every flow, exactly, whatever the others do;
* ``returning_count``: NetFlow v9 with ``v9-template-refresh=5``, to an
  nfcapd that is down at first, then up, down, and up again on the same port;
* ``returning_time``: IPFIX with ``v9-template-refresh=1000`` and
  ``v9-template-timeout=1s``, on the same schedule (the time rule);
* ``down``: v9 to a port nobody ever listens on (ICMP port unreachable);
* ``refused``: IPFIX to a port an nftables rule rejects (admin prohibited).

Traffic comes in rounds (a few one-burst flows, then wait until every target
has been given their records); collectors only start or stop between rounds,
and tshark captures every datagram sent to the returning ports.  Then:

* each run of a returning collector decodes exactly the records of every
  datagram it received from the first one carrying templates on (tshark says
  which), and that first one comes within the refresh rules: templates go
  out again after 5 export packets (so at most the first 5 it receives are
  undecodable), or within the 1 s timeout;
* the failing targets' errors are counted (``pyflow_export_send_errors_total``
  by errno), and the agent kept metering: ``steady`` is exact.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tests.integration.netns import Pair, veth_pair
from tests.integration.procs import Capture, nfdump_records, pyflow_in, tshark_capture_in, wait_drained
from tests.integration.reliability import metric_sum, metrics_in, nfcapd, send_frames, wait_until

STEADY, RET_COUNT, RET_TIME, DOWN, REFUSED = 21301, 21302, 21303, 21304, 21305
TARGETS = {
    "steady": f"127.0.0.1:{STEADY}/ipfix",
    "returning_count": f"127.0.0.1:{RET_COUNT}/9,v9-template-refresh=5",
    "returning_time": f"127.0.0.1:{RET_TIME}/ipfix,v9-template-refresh=1000,v9-template-timeout=1s",
    "down": f"127.0.0.1:{DOWN}/9",
    "refused": f"127.0.0.1:{REFUSED}/ipfix",
}
NAMES = {name: spec.split(",")[0] for name, spec in TARGETS.items()}  # the metrics' target label
RETURNING = {"returning_count": RET_COUNT, "returning_time": RET_TIME}
FLOWS_PER_ROUND = 3
# one export datagram per round: a collector run sees more than one template cycle (6 datagrams)
DOWN_ROUNDS, UP_ROUNDS = 2, 8
# v9-template-timeout=1s: templates at most this long apart (the timeout, a 100 ms sweep, and slack
# for a busy machine; without the time rule they would never come again: refresh is 1000)
TIME_RULE_BOUND = 1.0 + 0.1 + 1.0

FlowKey = tuple[str, int]  # source address, source port


@pytest.fixture
def pair() -> Iterator[Pair]:
    with veth_pair("co") as p:
        yield p


class Traffic:
    """Rounds of new one-burst flows a -> b; what was sent, per flow."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.sent: dict[FlowKey, tuple[int, int]] = {}
        self._ports = itertools.count(30000)

    def round(self) -> None:
        e = Ether(src=self.pair.macs["a"], dst=self.pair.macs["b"])
        frames = []
        for _ in range(FLOWS_PER_ROUND):
            sport = next(self._ports)
            n = 1 + sport % 4
            frames += [bytes(e / IP(src="10.220.0.1", dst=self.pair.b_v4) / UDP(sport=sport, dport=9)
                             / (b"c" * (sport % 90)))] * n
            self.sent[("10.220.0.1", sport)] = (n, n * (28 + sport % 90))
        send_frames(self.pair.a, self.pair.a_if, frames)

    @property
    def flows(self) -> int:
        return len(self.sent)


def records_given(ns: str) -> dict[str, float]:
    samples = metrics_in(ns)
    return {name: metric_sum(samples, "pyflow_export_records_total", target=label) for name, label in NAMES.items()}


def settle(pair: Pair, traffic: Traffic, captures: dict[str, Capture]) -> None:
    """Until every target has been given every flow so far (each flow leaves as one record), and
    each returning port's capture holds every datagram pyflow sent it."""
    wait_until(f"{traffic.flows} records given to every target",
               lambda: set(records_given(pair.b).values()) == {float(traffic.flows)}, timeout=20)
    samples = metrics_in(pair.b)
    for name, cap in captures.items():
        sent = int(metric_sum(samples, "pyflow_export_datagrams_total", target=NAMES[name]))
        cap.wait_captured(sent)


def datagrams_sent(ns: str) -> dict[str, int]:
    """Datagrams pyflow has put on the wire to each returning port so far."""
    samples = metrics_in(ns)
    return {name: int(metric_sum(samples, "pyflow_export_datagrams_total", target=NAMES[name])) for name in RETURNING}


def decode(pcap: Path, port: int) -> list[tuple[float, bool, dict[FlowKey, tuple[int, int]]]]:
    """Every datagram to ``port``, in order: (time, carries templates?, records per flow)."""
    fields = ["frame.time_epoch", "cflow.template_id", "cflow.srcaddr", "cflow.srcport", "cflow.packets",
              "cflow.octets"]
    argv = ["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={port},cflow", "-Y", f"udp.dstport=={port}",
            "-T", "fields", "-E", "aggregator=;", "-E", "occurrence=a"]
    for f in fields:
        argv += ["-e", f]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        ts, tids, srcs, sports, pks, octs = (line.split("\t") + [""] * 6)[:6]
        recs: dict[FlowKey, tuple[int, int]] = {}
        if srcs:
            for s, sp, p, o in zip(srcs.split(";"), sports.split(";"), pks.split(";"), octs.split(";"), strict=True):
                old = recs.get((s, int(sp)), (0, 0))
                recs[(s, int(sp))] = (old[0] + int(p), old[1] + int(o))
        rows.append((float(ts), bool(tids), recs))
    return rows


def totals(rows: list[dict[str, str]]) -> dict[FlowKey, tuple[int, int]]:
    out: dict[FlowKey, tuple[int, int]] = {}
    for r in rows:
        if r["sa"] != "10.220.0.1":
            continue
        key = (r["sa"], int(r["sp"]))
        old = out.get(key, (0, 0))
        out[key] = (old[0] + int(r["ipkt"]), old[1] + int(r["ibyt"]))
    return out


def add(into: dict[FlowKey, tuple[int, int]], recs: dict[FlowKey, tuple[int, int]]) -> None:
    for k, (p, o) in recs.items():
        old = into.get(k, (0, 0))
        into[k] = (old[0] + p, old[1] + o)


def test_collectors_down_refusing_and_returning(pair: Pair, tmp_path: Path) -> None:
    subprocess.run(["ip", "netns", "exec", pair.b, "nft", "-f", "-"], check=True, text=True, input=(
        "table inet pyflow_test {\n"
        "  chain out { type filter hook output priority 0; "
        f"udp dport {REFUSED} reject with icmp type admin-prohibited; }}\n"
        "}\n"))
    traffic = Traffic(pair)
    pcaps = {name: tmp_path / f"{name}.pcap" for name in RETURNING}
    sessions: dict[str, list[tuple[int, int, float, Path]]] = {n: [] for n in RETURNING}  # (first, end, start, dir)
    args = [a for spec in TARGETS.values() for a in ("--target", spec)]
    with ExitStack() as stack:
        steady = stack.enter_context(nfcapd(pair.b, tmp_path, STEADY))
        captures = {name: stack.enter_context(tshark_capture_in(pair.b, pcaps[name], [port]))
                    for name, port in RETURNING.items()}
        with pyflow_in(pair.b, "--interface", pair.b_if, "--inactive-flow-timeout", "200ms",
                       "--sweep-interval", "100ms", "--control-socket", "", *args) as flow:
            flow.wait_for_line(f"metering {pair.b_if}")
            running = ExitStack()
            for phase in range(4):  # down, up, down, up
                for _ in range(DOWN_ROUNDS if phase % 2 == 0 else UP_ROUNDS):
                    traffic.round()
                    settle(pair, traffic, captures)
                if phase % 2 == 1:  # end a collector run: close it now that everything has arrived
                    wait_drained(pair.b, list(RETURNING.values()))
                    sent = datagrams_sent(pair.b)
                    for name in RETURNING:
                        first, _, started, flowdir = sessions[name][-1]
                        sessions[name][-1] = (first, sent[name], started, flowdir)
                    running.close()
                if phase in (0, 2):  # bring the returning collectors up, on the same ports
                    running = stack.enter_context(ExitStack())  # (closed on the way out if still open)
                    for name, port in RETURNING.items():
                        c = running.enter_context(nfcapd(pair.b, tmp_path, port, name=f"{name}-{phase}"))
                        # every datagram sent from now on reaches it (one sent just before, a
                        # timed template round, may too: it carries no records)
                        sessions[name].append((datagrams_sent(pair.b)[name], -1, time.time(), c.flowdir))
            samples = metrics_in(pair.b)
            assert flow.stop() == 0, flow.output()
        log = flow.output()
        wait_drained(pair.b, [STEADY])

    # the steady collector got everything, exactly, whatever happened to the others
    assert "Sequence Errors: 0, Bad Packets: 0" in steady.summary(), steady.proc.output()
    assert totals(nfdump_records(steady.flowdir)) == traffic.sent
    assert traffic.flows == 2 * (DOWN_ROUNDS + UP_ROUNDS) * FLOWS_PER_ROUND

    # failures are counted, by errno, per target; none on the steady one
    def errors(name: str) -> dict[str, float]:
        pre = 'pyflow_export_send_errors_total{error="'
        return {k[len(pre):].split('"')[0]: v for k, v in samples.items()
                if k.startswith(pre) and f'target="{NAMES[name]}"' in k}

    assert errors("steady") == {}, errors("steady")
    assert errors("down").get("econnrefused", 0) > 0, errors("down")
    assert errors("refused").get("eperm", 0) > 0, errors("refused")
    for name in RETURNING:
        assert errors(name).get("econnrefused", 0) > 0, (name, errors(name))
    assert "Traceback" not in log

    # each run of a returning collector: exactly the records from its first templates on
    for name, port in RETURNING.items():
        datagrams = decode(pcaps[name], port)
        for run, (first, end, started, flowdir) in enumerate(sessions[name]):
            received = datagrams[first:end]
            assert received, (name, run)
            lead = next(i for i, (_, has_templates, _) in enumerate(received) if has_templates)
            if name == "returning_count":
                # v9-template-refresh=5: templates again after 5 export packets, so at most the
                # first 5 it receives can be undecodable
                assert lead <= 5, (name, run, lead)
            else:
                # v9-template-timeout=1s: templates within a second (and a sweep) of the restart
                assert received[lead][0] - started <= TIME_RULE_BOUND, (name, run, received[lead][0] - started)
            want: dict[FlowKey, tuple[int, int]] = {}
            for _, _, recs in received[lead:]:
                add(want, recs)
            got = totals(nfdump_records(flowdir))
            assert got == want, (name, run, lead)
            assert want, (name, run)
        # between templates, the refresh rule holds all through the run
        gaps = [i for i, (_, t, _) in enumerate(datagrams) if t]
        if name == "returning_count":
            assert all(b - a <= 6 for a, b in itertools.pairwise(gaps)), gaps
        else:
            times = [datagrams[i][0] for i in gaps]
            assert all(b - a <= TIME_RULE_BOUND for a, b in itertools.pairwise(times)), times
