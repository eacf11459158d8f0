"""Loader lifecycle: attach, then detach on every exit path, exactly once."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from pyflow.errors import KernelError
from pyflow.kernel.loader import FlowMeter, KernelSettings
from tests.integration.netns import Pair, ip
from tests.integration.procs import PYFLOW, Proc


def xdp_prog_id(ns: str | None, ifname: str) -> int | None:
    args = (["-n", ns] if ns else []) + ["-j", "-d", "link", "show", ifname]
    link = json.loads(ip(*args).stdout)[0]
    xdp = link.get("xdp")
    return int(xdp["prog"]["id"]) if xdp and "prog" in xdp else None


@pytest.fixture
def veth_root() -> str:
    name = "pflc0"
    ip("link", "del", name, check=False)
    ip("link", "add", name, "type", "veth", "peer", "name", "pflc1")
    ip("link", "set", name, "up")
    ip("link", "set", "pflc1", "up")
    yield name
    ip("link", "del", name, check=False)


def test_context_manager_detaches_on_exception(veth_root: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), FlowMeter(KernelSettings(cache_entries=256)) as meter:
        att = meter.attach(veth_root)
        assert att.mode in ("native", "generic")
        assert xdp_prog_id(None, veth_root) is not None
        raise RuntimeError("boom")
    assert xdp_prog_id(None, veth_root) is None
    meter.close()  # idempotent
    meter.detach(veth_root)


def test_attach_refuses_someone_elses_program(veth_root: str) -> None:
    with FlowMeter(KernelSettings(cache_entries=256)) as first:
        first.attach(veth_root)
        with FlowMeter(KernelSettings(cache_entries=256)) as second, pytest.raises(KernelError, match="already has"):
            second.attach(veth_root, mode=first.attachments[(veth_root, "xdp")].mode)
        assert xdp_prog_id(None, veth_root) is not None  # the first one's program is untouched
    assert xdp_prog_id(None, veth_root) is None


def tc_state(dev: str) -> tuple[bool, str]:
    """(has a clsact qdisc, `tc filter show` of both clsact sides)."""
    qdisc = subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout
    filters = "".join(subprocess.run(["tc", "filter", "show", "dev", dev, side], capture_output=True,
                                     text=True).stdout for side in ("ingress", "egress"))
    return "clsact" in qdisc, filters


def test_tc_attach_and_detach_leave_the_interface_as_found(veth_root: str) -> None:
    with FlowMeter(KernelSettings(cache_entries=256)) as meter:
        meter.attach(veth_root, hook="tc_ingress")
        meter.attach(veth_root, hook="tc_egress")
        has_clsact, filters = tc_state(veth_root)
        assert has_clsact
        assert "pyflow_tc_ingress" in filters and "pyflow_tc_egress" in filters and "direct-action" in filters
        meter.detach(veth_root, "tc_egress")
        assert "pyflow_tc_egress" not in tc_state(veth_root)[1]
    assert tc_state(veth_root) == (False, "")  # our clsact qdisc is gone with our filters


def test_tc_keeps_a_clsact_qdisc_it_did_not_create(veth_root: str) -> None:
    subprocess.run(["tc", "qdisc", "add", "dev", veth_root, "clsact"], check=True)
    with FlowMeter(KernelSettings(cache_entries=256)) as meter:
        meter.attach(veth_root, hook="tc_egress")
        assert "pyflow_tc_egress" in tc_state(veth_root)[1]
    assert tc_state(veth_root) == (True, "")  # someone else's qdisc stays, our filter does not


def test_tc_refuses_to_replace_a_filter_in_its_slot(veth_root: str) -> None:
    with FlowMeter(KernelSettings(cache_entries=256)) as first:
        first.attach(veth_root, hook="tc_egress")
        with (FlowMeter(KernelSettings(cache_entries=256)) as second,
              pytest.raises(KernelError, match="already has a TC")):
            second.attach(veth_root, hook="tc_egress")
        assert "pyflow_tc_egress" in tc_state(veth_root)[1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_exits_zero_and_detaches(pair: Pair, sig: int) -> None:
    proc = Proc(["ip", "netns", "exec", pair.b, PYFLOW, "run", "--interface", pair.b_if,
                 "--target", "127.0.0.1:2055/ipfix"])
    try:
        proc.wait_for_line("exporting to")
        assert xdp_prog_id(pair.b, pair.b_if) is not None
    finally:
        rc = proc.stop(sig)
    assert rc == 0, proc.output()
    assert "stopped after" in proc.output()
    assert xdp_prog_id(pair.b, pair.b_if) is None


def test_metrics_port_taken_fails_before_attaching(pair: Pair) -> None:
    import socket

    from tests.integration.netns import in_netns

    def occupy() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 19797))
        s.listen()
        return s

    holder = in_netns(pair.b, occupy)
    try:
        res = subprocess.run(["ip", "netns", "exec", pair.b, PYFLOW, "run", "--interface", pair.b_if,
                              "--target", "127.0.0.1/ipfix", "--metrics-address", "127.0.0.1:19797"],
                             capture_output=True, text=True, timeout=60)
    finally:
        holder.close()
    assert res.returncode == 1
    assert "cannot serve metrics on 127.0.0.1:19797" in res.stderr
    assert "metering" not in res.stderr
    assert xdp_prog_id(pair.b, pair.b_if) is None
