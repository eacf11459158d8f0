"""Wires settings, kernel meter, targets and agent together for ``pyflow run``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack

from pyflow.agent import Agent
from pyflow.config import Settings
from pyflow.errors import ConfigError
from pyflow.export.registry import encoder_for
from pyflow.export.target import Target
from pyflow.interfaces import resolve_interfaces
from pyflow.kernel.loader import FlowMeter, KernelSettings


def kernel_settings(settings: Settings) -> KernelSettings:
    return KernelSettings(
        cache_entries=settings.cache_entries,
        inactive_timeout_ns=settings.inactive_flow_timeout_ns,
        end_idle_ns=settings.end_idle_ns,
    )


def run_meter(settings: Settings, stop: threading.Event, log: Callable[[str], None]) -> None:
    if not settings.targets:
        raise ConfigError("no target configured")
    targets = [Target(t, encoder_for(t.version)) for t in settings.targets]
    with ExitStack() as stack:
        meter = stack.enter_context(FlowMeter(kernel_settings(settings)))
        for t in targets:
            stack.callback(t.close)
        meter.load()
        names = resolve_interfaces(settings.interfaces)
        for name in names:
            att = meter.attach(name, settings.xdp_mode)
            log(f"metering {name} (ifindex {att.ifindex}) with XDP in {att.mode} mode")
        for t in targets:
            t.open()
            log(f"exporting to {t.name}")
        agent = Agent(settings, meter, targets, log=log)
        agent.run(stop)
        for t in targets:
            s = t.stats
            errs = ", ".join(f"{k}={v}" for k, v in sorted(s.send_errors.items())) or "none"
            log(f"{t.name}: {s.records} records in {s.datagrams} datagrams, send errors: {errs}")
        log(f"stopped after {agent.stats.sweeps} sweeps, {agent.stats.records} records")
