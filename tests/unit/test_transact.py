"""Starts and reloads are all or nothing: the transaction logic against a fake kernel.

``FakeXdp`` stands in for rtnetlink's XDP attach: one program per interface,
and a replace only happens when the expected program is the one attached (as
XDP_FLAGS_REPLACE does).  Real FlowMeter objects (no bcc: their program fds are
made up) do their take-overs, give-backs and detaches through it; the
integration tests (tests/integration/test_transact.py) run the same paths
against the kernel.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest

from pyflow import runner
from pyflow.config import SettingError, Settings, TargetSettings
from pyflow.errors import KernelError
from pyflow.kernel import netlink
from pyflow.kernel.loader import Attachment, FlowMeter, KernelSettings
from pyflow.metrics import Metrics


class FakeXdp:
    def __init__(self) -> None:
        self.attached: dict[int, int] = {}  # ifindex -> program fd
        self.fail_on: set[tuple[int, int]] = set()  # (ifindex, fd): that replace fails
        self.calls = 0

    def xdp_set(self, ifindex: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
        self.calls += 1
        if (ifindex, fd) in self.fail_on:
            raise netlink.NetlinkError(errno.ENOMEM, "injected")
        if expected_fd is not None and self.attached.get(ifindex) != expected_fd:
            raise netlink.NetlinkError(errno.EEXIST, "not the expected program")
        if fd < 0:
            self.attached.pop(ifindex, None)
        else:
            self.attached[ifindex] = fd


@pytest.fixture
def xdp(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeXdp]:
    fake = FakeXdp()
    monkeypatch.setattr(netlink, "xdp_set", fake.xdp_set)
    yield fake


def meter(fd: int, cache: int = 4096) -> FlowMeter:
    m = FlowMeter(KernelSettings(cache_entries=cache))
    m._prog_fds = {"xdp": fd}
    m.prog_fd = fd
    return m


def attach(m: FlowMeter, xdp: FakeXdp, *ifindexes: int) -> None:
    for i in ifindexes:
        xdp.attached[i] = m.load("xdp")
        m.attachments[(f"if{i}", "xdp")] = Attachment(ifname=f"if{i}", ifindex=i, hook="xdp", mode="generic")


def test_take_over_replaces_every_attachment(xdp: FakeXdp) -> None:
    old, new = meter(101), meter(201)
    attach(old, xdp, 1, 2, 3)
    new.take_over(old)
    assert xdp.attached == {1: 201, 2: 201, 3: 201}
    assert sorted(new.attachments) == [("if1", "xdp"), ("if2", "xdp"), ("if3", "xdp")]
    assert old.attachments == {}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_take_over_failing_at_the_kth_interface_puts_1_to_k_minus_1_back(xdp: FakeXdp, k: int) -> None:
    old, new = meter(101), meter(201)
    attach(old, xdp, 1, 2, 3)
    xdp.fail_on = {(k, 201)}
    with pytest.raises(KernelError, match=f"cannot put the new program in place on if{k}"):
        new.take_over(old)
    assert xdp.attached == {1: 101, 2: 101, 3: 101}  # the old program everywhere, as before
    assert sorted(old.attachments) == [("if1", "xdp"), ("if2", "xdp"), ("if3", "xdp")]
    assert new.attachments == {}


def test_take_over_skips_an_interface_that_went_away(xdp: FakeXdp, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = meter(101), meter(201)
    attach(old, xdp, 1, 2)
    real = xdp.xdp_set

    def gone(ifindex: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
        if ifindex == 2:
            raise netlink.NetlinkError(errno.ENODEV, "no such device")
        real(ifindex, fd, flags, expected_fd)

    monkeypatch.setattr(netlink, "xdp_set", gone)
    new.take_over(old)
    assert xdp.attached == {1: 201, 2: 101} and list(new.attachments) == [("if1", "xdp")]


def failed_start(xdp: FakeXdp, fresh_extra: tuple[int, ...] = ()) -> tuple[runner.KernelSide, FlowMeter, FlowMeter]:
    """Two older instances (other settings) on interfaces 1-2 and 3; a fresh meter takes both over,
    attaches ``fresh_extra`` anew, then the start fails."""
    logs: list[str] = []
    side = runner.KernelSide(logs.append)
    a, b, fresh = meter(101), meter(102), meter(201, cache=8192)
    attach(a, xdp, 1, 2)
    attach(b, xdp, 3)
    side.meters = [a, b, fresh]
    side.meter = side.fresh = fresh
    runner.take_over_older(fresh, [a, b], side, logs.append)
    assert xdp.attached == {1: 201, 2: 201, 3: 201}
    attach(fresh, xdp, *fresh_extra)
    return side, a, b


def test_a_failed_start_gives_every_interface_back_to_the_older_programs(xdp: FakeXdp) -> None:
    side, a, b = failed_start(xdp, fresh_extra=(4,))
    side.finish()  # no agent: the start failed (a mistyped interface, a missing AS file, ...)
    assert xdp.attached == {1: 101, 2: 101, 3: 102}  # as before the start; interface 4 (new) let go
    assert sorted(a.attachments) == [("if1", "xdp"), ("if2", "xdp")] and list(b.attachments) == [("if3", "xdp")]
    assert a._closed and b._closed  # released (pins and attachments stay for the next agent)


def test_a_take_over_failing_on_the_second_older_program_still_restores_the_first(xdp: FakeXdp) -> None:
    side = runner.KernelSide()
    a, b, fresh = meter(101), meter(102), meter(201, cache=8192)
    attach(a, xdp, 1, 2)
    attach(b, xdp, 3, 4)
    side.meters, side.meter, side.fresh = [a, b, fresh], fresh, fresh
    xdp.fail_on = {(4, 201)}
    with pytest.raises(KernelError):
        runner.take_over_older(fresh, [a, b], side, lambda _m: None)
    side.finish()
    assert xdp.attached == {1: 101, 2: 101, 3: 102, 4: 102}


def test_a_give_back_that_fails_leaves_the_new_program_attached_not_nothing(xdp: FakeXdp) -> None:
    side, _a, _b = failed_start(xdp)
    xdp.fail_on = {(3, 102)}  # interface 3 cannot get its old program back
    side.finish()
    assert xdp.attached == {1: 101, 2: 101, 3: 201}  # metered still, by the new one (left pinned)


def test_a_failed_start_on_a_taken_over_instance_detaches_only_what_it_attached(xdp: FakeXdp) -> None:
    side = runner.KernelSide()
    current = meter(101)
    attach(current, xdp, 1)
    side.meters, side.meter, side.before = [current], current, set(current.attachments)
    attach(current, xdp, 2)  # ifs.start attached a new one, then something failed
    side.finish()
    assert xdp.attached == {1: 101}


# -- reloads ---------------------------------------------------------------------------


class FakeInterfaces:
    def __init__(self, fail_with: Settings | None = None) -> None:
        self.applied: list[Settings] = []
        self.fail_with = fail_with
        self.meter: FlowMeter | None = None

    def names(self) -> tuple[tuple[int, str], ...]:
        return ((1, "if1"),)

    def apply(self, settings: Settings, meter: FlowMeter) -> None:
        self.applied.append(settings)
        if settings is self.fail_with:
            raise KernelError("if9 already has an XDP program attached")

    def use(self, meter: FlowMeter) -> None:
        self.meter = meter


class FakeAgent:
    def __init__(self, settings: Settings, m: FlowMeter, hand_over_fails: bool = False) -> None:
        self.settings = settings
        self.meter = m
        self.lock = threading.Lock()
        self.targets: list[Any] = []
        self.rules = None
        self.hand_over_fails = hand_over_fails

    def hand_over(self, new: FlowMeter) -> np.ndarray:
        if self.hand_over_fails:
            raise KernelError("reading the old cache: Cannot allocate memory")
        self.meter = new
        return np.zeros(0)


def settings(cache: int, port: int = 2055, *more: int) -> Settings:
    return Settings(interfaces=("if1",), cache_entries=cache,
                    targets=tuple(TargetSettings("127.0.0.1", port=p) for p in (port, *more)))


def reload(agent: FakeAgent, ifs: FakeInterfaces, new: Settings | Exception, new_meter: Any,
           metrics: Metrics) -> tuple[bool, list[str]]:
    logs: list[str] = []

    def load() -> Settings:
        if isinstance(new, Exception):
            raise new
        return new

    with ExitStack() as stack:
        ok = runner.reload_settings(agent, ifs, [], stack, logs.append, load, new_meter=new_meter)  # type: ignore[arg-type]
    metrics.reloaded(ok)
    return ok, logs


def metric(m: Metrics, name: str) -> float | None:
    return m.registry.get_sample_value(name)


def test_a_failed_compile_keeps_the_old_program_and_settings_and_counts(xdp: FakeXdp) -> None:
    old_meter = meter(101)
    attach(old_meter, xdp, 1)
    agent, ifs, m = FakeAgent(settings(4096), old_meter), FakeInterfaces(), Metrics(process=False)
    before = agent.settings

    def compile_fails(ks: KernelSettings) -> FlowMeter:
        raise KernelError("the kernel verifier rejected pyflow_xdp: Permission denied")

    ok, logs = reload(agent, ifs, settings(8192), compile_fails, m)
    assert not ok and agent.settings is before and agent.meter is old_meter
    assert xdp.attached == {1: 101}
    assert any("reload failed: the kernel verifier rejected" in ln and "the running settings stay" in ln
               for ln in logs), logs
    assert metric(m, "pyflow_reload_failures_total") == 1 and metric(m, "pyflow_config_last_reload_successful") == 0
    assert ifs.applied == []  # nothing touched: the compile comes first


def test_a_hand_over_that_fails_puts_the_old_program_back(xdp: FakeXdp) -> None:
    old_meter = meter(101)
    attach(old_meter, xdp, 1, 2)
    agent = FakeAgent(settings(4096), old_meter, hand_over_fails=True)
    ifs, m = FakeInterfaces(), Metrics(process=False)
    new_meter = meter(201, cache=8192)
    new = settings(8192, 2055, 2056)
    ok, _ = reload(agent, ifs, new, lambda ks: new_meter, m)
    assert not ok and agent.meter is old_meter and agent.settings.cache_entries == 4096
    assert xdp.attached == {1: 101, 2: 101} and new_meter._closed and not new_meter.attachments
    assert ifs.applied[-1] is agent.settings  # the interfaces back as the old settings have them
    assert metric(m, "pyflow_reload_failures_total") == 1


def test_interfaces_that_fail_to_attach_undo_the_reload(xdp: FakeXdp) -> None:
    old_meter = meter(101)
    attach(old_meter, xdp, 1)
    new = settings(8192)
    agent, ifs, m = FakeAgent(settings(4096), old_meter), FakeInterfaces(fail_with=new), Metrics(process=False)
    new_meter = meter(201, cache=8192)
    ok, logs = reload(agent, ifs, new, lambda ks: new_meter, m)
    assert not ok and agent.settings.cache_entries == 4096 and xdp.attached == {1: 101}
    assert ifs.applied == [new, agent.settings] and new_meter._closed
    assert any("if9 already has an XDP program" in ln for ln in logs)


def test_bad_settings_count_as_a_failed_reload(xdp: FakeXdp) -> None:
    agent, ifs, m = FakeAgent(settings(4096), meter(101)), FakeInterfaces(), Metrics(process=False)
    ok, logs = reload(agent, ifs, SettingError("cache-entries", "cache-entries 'lots' is not a size"), None, m)
    assert not ok and any("cache-entries" in ln for ln in logs)
    assert metric(m, "pyflow_reload_failures_total") == 1


def test_a_good_reload_switches_and_sets_the_gauge(xdp: FakeXdp, monkeypatch: pytest.MonkeyPatch) -> None:
    excluded: list[tuple[FlowMeter, Any]] = []
    monkeypatch.setattr(runner, "exclude_own_exports", lambda mt, t: excluded.append((mt, t)))
    old_meter = meter(101)
    attach(old_meter, xdp, 1, 2)
    agent, ifs, m = FakeAgent(settings(4096), old_meter), FakeInterfaces(), Metrics(process=False)
    m.reloaded(False)
    new_meter = meter(201, cache=8192)
    new = settings(8192)
    ok, logs = reload(agent, ifs, new, lambda ks: new_meter, m)
    assert ok, logs
    assert agent.settings is new and agent.meter is new_meter and ifs.meter is new_meter
    assert xdp.attached == {1: 201, 2: 201} and old_meter._closed
    assert metric(m, "pyflow_config_last_reload_successful") == 1 and metric(m, "pyflow_reload_failures_total") == 1
    assert [mt for mt, _ in excluded] == [new_meter]  # the new program skips the target's datagrams
