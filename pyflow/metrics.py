"""Every Prometheus metric pyflow exports, declared in one place.

Two kinds:

* event metrics the agent updates as things happen (histograms of sweep
  duration and export lateness), held by ``Metrics``;
* state read at scrape time by ``PyflowCollector``: the kernel's per-CPU
  counters as they are now, per-target stats, and what the last sweep saw of
  the cache (``Agent.observed``: cache use, the accounting gap's books).

A scrape never takes the agent's lock and never reads the flow cache: however
often it comes, it cannot delay a sweep or an export.

The registry is injectable (tests use their own); ``serve()`` starts the
HTTP endpoint.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pyflow import __version__
from pyflow.analytics import PROTOCOL_LABELS, Analytics
from pyflow.errors import PyflowError
from pyflow.kernel import abi

if TYPE_CHECKING:
    from pyflow.agent import AgentView


def _bcc_version() -> str:
    """bcc's version, read from its version.py: importing bcc would map libbcc and LLVM
    (~90 MB resident) into the agent, which never compiles (pyflow/kernel/pin.py)."""
    import importlib.util
    import re
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return "missing"
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else "unknown"


BCC_VERSION = _bcc_version()
SWEEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The registry and the metrics the agent observes as events."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self.sweep_duration = Histogram(
            "pyflow_sweep_duration_seconds", "Time one sweep of the flow cache took (read, expire, export).",
            buckets=SWEEP_BUCKETS, registry=self.registry)
        self.export_lateness = ArrayHistogram(
            "pyflow_export_lateness_seconds",
            "How long after its timeout (inactive or active) a flow record left for the target, measured "
            "when it is sent.", LATENESS_BUCKETS)
        self.registry.register(self.export_lateness)
        self.reload_failures = Counter(
            "pyflow_reload_failures", "SIGHUP reloads that failed (bad settings, or a compile, verifier, attach or "
            "memory error while applying them): the agent went on with the settings it had.",
            registry=self.registry)
        self.last_reload_ok = Gauge(
            "pyflow_config_last_reload_successful", "1 if the last SIGHUP reload was applied (or none was asked "
            "for), 0 if it failed and the running settings stayed.", registry=self.registry)
        self.last_reload_ok.set(1)
        self.start_time = time.time()

    def reloaded(self, ok: bool) -> None:
        """A reload was applied (``ok``), or failed and changed nothing."""
        if not ok:
            self.reload_failures.inc()
        self.last_reload_ok.set(1 if ok else 0)

    # -- the agent's SweepObserver -------------------------------------------------------

    def sweep_took(self, seconds: float) -> None:
        self.sweep_duration.observe(seconds)

    def records_left(self, lateness_seconds: np.ndarray, target: str) -> None:
        """Records that just left for ``target``, each this late (seconds after they fell due)."""
        self.export_lateness.observe_many(lateness_seconds, target)

    def attach(self, agent: AgentView, interfaces: Callable[[], Iterable[tuple[str, int, str, str]]],
               rx_packets: Callable[[], dict[int, int]]) -> None:
        """Read the agent's (and its meter's and targets') state at every scrape."""
        self.registry.register(PyflowCollector(agent, self.start_time, interfaces, rx_packets))
        self._agent = agent
        self.registry.register(AnalyticsCollector(self))

    # -- traffic analytics ([analytics], pyflow.analytics) ----------------------------------

    analytics: Analytics | None = None
    _agent: AgentView | None = None

    def analyse(self, batch: Sequence[np.ndarray], new: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
        """A sweep's records, and the cache entries it saw first, into the traffic analytics (the
        agent calls this once per sweep).
        Built on first use from the agent's settings, and again when a reload changed them."""
        agent = self._agent
        if agent is None:
            return
        wanted = agent.settings.analytics
        if not wanted.enabled:
            self.analytics = None
            return
        now = agent.clocks.boot_ns() / 1e9
        if self.analytics is None or self.analytics.settings != wanted:
            old = self.analytics
            self.analytics = Analytics(wanted, clock=lambda: agent.clocks.boot_ns() / 1e9)
            if old is not None:
                self.analytics.totals = old.totals  # counters never go back
        self.analytics.feed(batch, now, new)


class ArrayHistogram(Collector):
    """A histogram with one label, fed whole numpy arrays at once (half a million records leave
    in one sweep: one ``Histogram.observe`` call each would cost the agent about a second)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], label: str = "target") -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._series: dict[str, tuple[np.ndarray, list[float]]] = {}  # value -> (counts, [sum])
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray, label: str) -> None:
        if not len(values):
            return
        idx = np.searchsorted(self.bounds, values, side="left")  # "le": a value on a bound counts in it
        add = np.bincount(idx, minlength=len(self.bounds) + 1)  # the last one: above every bound
        with self._lock:
            counts, total = self._series.setdefault(label, (np.zeros(len(self.bounds) + 1, dtype=np.int64), [0.0]))
            counts += add
            total[0] += float(values.sum())

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            series = [(k, np.cumsum(c).tolist(), t[0]) for k, (c, t) in sorted(self._series.items())]
        for label, cum, total in series:
            buckets = [(repr(float(b)), c) for b, c in zip(self.bounds.tolist(), cum[:-1], strict=True)]
            buckets.append(("+Inf", cum[-1]))
            fam.add_metric([label], buckets, total)
        yield fam


class PyflowCollector(Collector):
    """Scrape-time metrics: kernel counters, cache, targets, the accounting gap."""

    def __init__(self, agent: AgentView, start_time: float,
                 interfaces: Callable[[], Iterable[tuple[str, int, str, str]]],
                 rx_packets: Callable[[], dict[int, int]]) -> None:
        self.agent = agent
        self.start_time = start_time
        self.interfaces = interfaces  # (name, ifindex, hook, mode)
        self.rx_packets = rx_packets  # ifindex -> the interface's own received-packets counter

    def describe(self) -> list[Metric]:
        return []  # metrics are dynamic; do not collect at registration

    def collect(self) -> Iterator[Metric]:
        meter = self.agent.meter
        names = {ifindex: name for name, ifindex, _, _ in self.interfaces()}

        def label(ifindex: int) -> str:
            return names.get(ifindex, str(ifindex))

        info = InfoMetricFamily("pyflow_build", "pyflow, bcc, kernel and Python versions.")
        info.add_metric([], {"version": __version__, "bcc": BCC_VERSION, "kernel": platform.release(),
                             "python": platform.python_version()})
        yield info
        yield GaugeMetricFamily("pyflow_start_time_seconds", "When the agent started, Unix time.",
                                value=self.start_time)
        prog = GaugeMetricFamily("pyflow_program_info", "An attached meter program (1 per interface and hook).",
                                 labels=["interface", "hook", "mode"])
        for name, _ifindex, hook_name, mode in self.interfaces():
            prog.add_metric([name, hook_name, mode], 1)
        yield prog

        seen = CounterMetricFamily("pyflow_packets_seen", "Packets the meter program ran on.",
                                   labels=["interface", "hook"])
        metered = CounterMetricFamily("pyflow_packets_metered",
                                      "Packets added to a flow entry (the flow cache or the resume map).",
                                      labels=["interface", "hook"])
        resumed = CounterMetricFamily("pyflow_packets_resumed",
                                      "Of the metered packets, those added to an entry of the resume map (a flow "
                                      "that went on while its expired entry waited to be exported).",
                                      labels=["interface", "hook"])
        metered_bytes = CounterMetricFamily("pyflow_bytes_metered", "IP bytes (total length) of metered packets.",
                                            labels=["interface", "hook"])
        not_metered = CounterMetricFamily(
            "pyflow_packets_not_metered", "Packets in no flow, by reason (counted in the kernel).",
            labels=["interface", "hook", "reason"])
        stats = meter.read_iface_stats()
        for (ifindex, hook), st in sorted(stats.items()):
            lbl = [label(ifindex) if ifindex else "overflow", abi.HOOK_LABELS[abi.Hook(hook)]]
            c = st["counters"]
            seen.add_metric(lbl, float(c[abi.Counter.PACKETS_SEEN]))
            metered.add_metric(lbl, float(sum(int(c[m]) for m in abi.METERED_COUNTERS)))
            resumed.add_metric(lbl, float(c[abi.Counter.RESUMED]))
            metered_bytes.add_metric(lbl, float(st["metered_bytes"]))
            for cid, reason in abi.NOT_METERED_REASONS.items():
                not_metered.add_metric([*lbl, reason], float(c[cid]))
        yield from (seen, metered, resumed, metered_bytes, not_metered)

        yield from self._cache(meter)
        yield from self._targets()
        yield from self._gap(stats, label)

    def _cache(self, meter: Any) -> Iterator[Metric]:
        """Cache use (as the last sweep counted it), flows created and expired, records, NAT events."""
        a = self.agent.stats
        swept = self.agent.observed
        yield GaugeMetricFamily("pyflow_flows_cached", "Flow entries in the kernel cache at the last sweep "
                                "(both maps, not counting those leaving early).", value=swept.cached)
        yield GaugeMetricFamily("pyflow_flows_cached_resumed", "Of the cached flow entries, those in the resume "
                                "map (flows that went on past their inactive timeout before the sweep).",
                                value=swept.cached_resumed)
        yield GaugeMetricFamily("pyflow_cache_capacity_flows", "Size of the kernel flow cache (cache-entries).",
                                value=meter.settings.cache_entries)
        yield CounterMetricFamily("pyflow_flows_created", "Flow entries the kernel created.",
                                  value=meter.flows_created())
        expired = CounterMetricFamily("pyflow_flow_records", "Flow records exported, by end reason.",
                                      labels=["reason"])
        for reason, n in sorted(dict(a.records_by_reason).items()):  # one-step copy: the sweep adds to it
            expired.add_metric([reason], n)
        yield expired
        yield CounterMetricFamily("pyflow_flows_expired", "Flow entries removed from the kernel cache.",
                                  value=a.deleted)
        yield CounterMetricFamily("pyflow_fill_sweeps", "Sweeps brought forward because the entries created "
                                  "since the last one may have filled the flows map to 90 %.", value=a.fill_sweeps)
        yield GaugeMetricFamily("pyflow_pending_sweeps", "Sweeps whose records some target has not sent yet "
                                "(their entries are deleted from the cache once every target has).",
                                value=a.pending_commits)
        yield CounterMetricFamily("pyflow_nat_event_records", "NAT event records (nat-events=yes) exported, "
                                  "from conntrack's NAT44 session create/delete events.", value=a.nat_events)

    def _targets(self) -> Iterator[Metric]:
        labels = ["target", "version"]
        fams = {
            "records": CounterMetricFamily("pyflow_export_records", "Flow records encoded for this target.",
                                           labels=labels),
            "datagrams": CounterMetricFamily("pyflow_export_datagrams", "UDP datagrams sent.", labels=labels),
            "bytes": CounterMetricFamily("pyflow_export_bytes", "UDP payload bytes sent.", labels=labels),
            "templates": CounterMetricFamily("pyflow_export_template_datagrams",
                                             "Template rounds sent (templates and options templates, "
                                             "at start, on refresh by count and by time).", labels=labels),
            "not_representable": CounterMetricFamily(
                "pyflow_export_not_representable_records",
                "Records the format cannot carry (IPv6 or NAT events to NetFlow v1/v5), not sent.", labels=labels),
            "queue_dropped": CounterMetricFamily(
                "pyflow_export_queue_dropped_records",
                "Records that did not fit in the target's send queue, never sent.", labels=labels),
        }
        queued = GaugeMetricFamily("pyflow_export_queued_records", "Records waiting in the target's send queue "
                                   "(paced by max-rate).", labels=labels)
        errors = CounterMetricFamily("pyflow_export_send_errors", "Failed sends, by errno.",
                                     labels=[*labels, "error"])
        for t in self.agent.targets:
            lbl = [t.name, t.settings.version]
            s = t.stats
            for key, fam in fams.items():
                fam.add_metric(lbl, float(getattr(s, key)))
            for err, n in sorted(dict(s.send_errors).items()):
                errors.add_metric([*lbl, err], float(n))
            queued.add_metric(lbl, float(t.backlog))
        yield from fams.values()
        yield errors
        yield queued

    def _gap(self, stats: dict[tuple[int, int], Any], label: Callable[[int], str]) -> Iterator[Metric]:
        """Interface's own received packets minus what pyflow accounted for them.

        Two parts (docs/metrics.md, "Accounting gap"): now, received - not metered
        - metered (kernel counters, read at this scrape); and as of the last sweep,
        metered - accounted, where accounted = packets in records + in the cache in
        no record yet (``Agent.observed``: the scrape never reads the cache).  No
        series until the current meter's first sweep.
        """
        gap = GaugeMetricFamily(
            "pyflow_accounting_gap_packets",
            "Packets the interface received since pyflow attached minus packets pyflow accounted for "
            "(the part inside pyflow as of the last sweep).", labels=["interface"])
        seen = self.agent.observed
        if seen.meter is not self.agent.meter or seen.accounted is None or seen.metered is None:
            yield gap
            return
        rx = self.rx_packets()
        for ifindex, received in sorted(rx.items()):
            # what it received is metered by XDP or by TC ingress (never both)
            counters = [st["counters"] for hook in (abi.Hook.XDP, abi.Hook.TC_INGRESS)
                        if (st := stats.get((ifindex, int(hook)))) is not None]
            not_metered = sum(int(c[cid]) for c in counters for cid in abi.NOT_METERED_REASONS)
            metered = sum(int(c[cid]) for c in counters for cid in abi.METERED_COUNTERS)
            inside = seen.metered.get(ifindex, 0) - seen.accounted.get(ifindex, 0)
            gap.add_metric([label(ifindex)], float(received - not_metered - metered + inside))
        yield gap


def serve(metrics: Metrics, address: str) -> Any:
    """Start the HTTP endpoint on ``HOST:PORT`` (IPv6 as ``[::1]:9796``); returns the server."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        server, _thread = start_http_server(int(port), addr=host, registry=metrics.registry)
    except OSError as exc:
        raise PyflowError(f"cannot serve metrics on {address}: {exc.strerror or exc} "
                          "(another process on that port? choose --metrics-address, or '' to turn it off)") from exc
    return server


class AnalyticsCollector(Collector):
    """The traffic analytics' metrics (docs/metrics.md, "Traffic analytics"): what the last ended
    interval made (``Analytics.view``) and the per-protocol counters; no series while analytics
    are off.  Label values are bounded: N talkers per direction, N ports, 9 protocols, 5 signals."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        a = self.metrics.analytics
        if a is None:
            return
        a.advance()  # intervals that ended since the last sweep are closed and scored now
        flows, packets, nbytes = a.totals
        for name, what, values in (("flows", "Flow records", flows), ("packets", "Packets", packets),
                                   ("bytes", "Bytes (IP)", nbytes)):
            counter = CounterMetricFamily(f"pyflow_traffic_{name}",
                                          f"{what} in the exported flow records, by protocol.", labels=["protocol"])
            for label, n in zip(PROTOCOL_LABELS, values, strict=True):
                counter.add_metric([label], float(n))
            yield counter
        v = a.view
        talkers = GaugeMetricFamily("pyflow_top_talker_bytes", "Bytes of the top N source and destination addresses "
                                    "by bytes and of the top N by flows, over the analytics window (only they have "
                                    "a series: at most 2N per direction).",
                                    labels=["direction", "address"])
        for direction, rows in v.talkers.items():
            for address, value in rows:
                talkers.add_metric([direction, address], value)
        yield talkers
        ports = GaugeMetricFamily("pyflow_top_port_bytes", "Bytes of the top N (protocol, service port) pairs over "
                                  "the analytics window (TCP, UDP, SCTP; the lower of the two ports).",
                                  labels=["protocol", "port"])
        for proto, port, value in v.ports:
            ports.add_metric([proto, str(port)], value)
        yield ports
        yield GaugeMetricFamily("pyflow_unique_sources", "Distinct source addresses over the analytics window "
                                "(HyperLogLog estimate, standard error 1.6 %).", value=v.unique_sources)
        yield GaugeMetricFamily("pyflow_unique_destinations", "Distinct destination addresses over the analytics "
                                "window (HyperLogLog estimate, standard error 1.6 %).", value=v.unique_destinations)
        fams = {
            "value": GaugeMetricFamily("pyflow_anomaly_value", "The signal over the last 5 s interval, in its floor's "
                                       "unit (flows/s, sources/s, bytes/s, destinations/s).", labels=["signal"]),
            "baseline": GaugeMetricFamily("pyflow_anomaly_baseline", "The signal's learned mean.", labels=["signal"]),
            "score": GaugeMetricFamily("pyflow_anomaly_score", "(value - baseline) / spread (README, \"Traffic "
                                       "analytics\"); 0 during the warm-up.", labels=["signal"]),
            "active": GaugeMetricFamily("pyflow_anomaly_active", "1 when the score is at least the signal's threshold "
                                        "and the value at least its floor.", labels=["signal"]),
        }
        for name, sig in v.signals.items():
            for attr, fam in fams.items():
                fam.add_metric([name], float(getattr(sig, attr)))
        yield from fams.values()
        yield GaugeMetricFamily("pyflow_analytics_warm", "1 once the anomaly signals have learnt their warm-up "
                                "(30 s of records).", value=1.0 if v.warm else 0.0)

