"""Wires settings, kernel meter, targets and agent together for ``pyflow run``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack

from pyflow.agent import Agent
from pyflow.config import Settings
from pyflow.errors import ConfigError
from pyflow.export.registry import encoder_for
from pyflow.export.target import ExportContext, Target
from pyflow.interfaces import resolve_interfaces, rx_packets
from pyflow.kernel.loader import FlowMeter, KernelSettings
from pyflow.metrics import Metrics, serve


def kernel_settings(settings: Settings) -> KernelSettings:
    return KernelSettings(
        cache_entries=settings.cache_entries,
        inactive_timeout_ns=settings.inactive_flow_timeout_ns,
        end_idle_ns=settings.end_idle_ns,
    )


def run_meter(settings: Settings, stop: threading.Event, log: Callable[[str], None]) -> None:
    if not settings.targets:
        raise ConfigError("no target configured")
    with ExitStack() as stack:
        for ts in settings.targets:
            encoder_for(ts.version)  # an unknown version fails before anything is loaded
        metrics = Metrics()
        if settings.metrics_address:  # a taken port fails before anything is attached
            server = serve(metrics, settings.metrics_address)
            stack.callback(server.shutdown)
            log(f"metrics on http://{settings.metrics_address}/metrics")
        meter = stack.enter_context(FlowMeter(kernel_settings(settings)))
        meter.load()
        names = resolve_interfaces(settings.interfaces)
        interfaces = []
        rx_at_attach: dict[int, int] = {}
        for name in names:
            att = meter.attach(name, settings.xdp_mode)
            # the interface's own counter right after the attach: the gap metric's zero point
            rx_at_attach.update(rx_packets([att.ifindex]))
            interfaces.append((att.ifindex, name))
            log(f"metering {name} (ifindex {att.ifindex}) with XDP in {att.mode} mode")
        targets = [
            Target(ts, encoder_for(ts.version), ctx=ExportContext(interfaces=tuple(interfaces), time_mode=ts.time_mode))
            for ts in settings.targets
        ]
        for t in targets:
            stack.callback(t.close)
            t.open()
            log(f"exporting to {t.name}")
        agent = Agent(settings, meter, targets, log=log, metrics=metrics)
        attached = [(name, idx, "xdp", meter.attachments[name].mode) for idx, name in interfaces]
        metrics.attach(
            agent,
            interfaces=lambda: attached,
            rx_packets=lambda: {i: n - rx_at_attach.get(i, 0) for i, n in rx_packets(list(rx_at_attach)).items()},
        )
        agent.run(stop)
        for t in targets:
            s = t.stats
            errs = ", ".join(f"{k}={v}" for k, v in sorted(s.send_errors.items())) or "none"
            log(f"{t.name}: {s.records} records in {s.datagrams} datagrams, {s.not_representable} not representable, "
                f"send errors: {errs}")
        log(f"stopped after {agent.stats.sweeps} sweeps, {agent.stats.records} records")
