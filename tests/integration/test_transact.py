"""Starts and reloads are all or nothing: a failure never leaves an interface unmetered.

* A start that takes over a pinned instance built with other settings, then
  fails (a mistyped interface name): the old program still meters every
  interface it had, and a later good start exports every packet it counted.
* A SIGHUP whose apply fails (the compile child fails, as on a verifier
  error; injected with a sitecustomize that only the child reads): the agent
  keeps running on its old program and settings, and says so in a log line and
  in pyflow_reload_failures_total; the next good reload applies.
* A take-over that fails at the k-th interface (an rtnetlink error injected
  there) puts interfaces 1..k-1 back to the old program.
* A pinned generation this pyflow cannot read is left in place, with a message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from pyflow.errors import KernelError
from pyflow.kernel import bpfsys, netlink, pin
from pyflow.kernel.loader import FlowMeter, KernelSettings
from tests.integration.collect import Tap
from tests.integration.netns import Pair, ip, udp_socket_in
from tests.integration.procs import PYFLOW, REPO, Proc, agent_config
from tests.integration.reliability import wait_until
from tests.integration.test_lifecycle import xdp_prog_id


def send(pair: Pair, sport: int, n: int, tmp: Path) -> None:
    e = Ether(src=pair.macs["a"], dst=pair.macs["b"])
    path = tmp / f"{sport}-{n}.pcap"
    wrpcap(str(path), [e / IP(src=pair.a_v4, dst=pair.b_v4) / UDP(sport=sport, dport=9) / (b"t" * 72)] * n)
    res = pair.run(pair.a, sys.executable, "-m", "tests.integration.sendpkts", pair.a_if, str(path),
                   cwd=str(REPO), timeout=60)
    assert res.returncode == 0, res.stderr


def packets_of(tap: Tap, sport: int) -> int:
    return sum(int(r["IN_PKTS"]) for r in tap.records() if r.get("L4_SRC_PORT") == sport)


def wait_packets(tap: Tap, sport: int, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while packets_of(tap, sport) < n and time.monotonic() < deadline:
        tap.drain(0.2)
    assert packets_of(tap, sport) == n, tap.records()


def pins_dir(ns: str) -> Path:
    return pin.BPFFS_ROOT / "pyflow" / f"netns-{os.stat(f'/run/netns/{ns}').st_ino}"


@pytest.fixture
def two_links(pair: Pair) -> Iterator[tuple[Pair, str]]:
    """b's veth and another interface in b (a veth with both ends there: this kernel may have no
    dummy driver); b's pins in the host's bpffs removed afterwards."""
    dummy = "pftx0"
    ip("-n", pair.b, "link", "add", dummy, "type", "veth", "peer", "name", "pftx1")
    for n in (dummy, "pftx1"):
        ip("-n", pair.b, "link", "set", n, "up")
    yield pair, dummy
    shutil.rmtree(pins_dir(pair.b), ignore_errors=True)


def agent(pair: Pair, *args: str) -> Proc:
    """An agent in b's network namespace and the host's mount namespace: pins outlive it."""
    return Proc(["nsenter", f"--net=/run/netns/{pair.b}", PYFLOW, "run", "--metrics-address", "",
                 "--control-socket", "", "--sweep-interval", "250ms", "--inactive-flow-timeout", "1s", *args])


def test_a_failed_start_after_a_take_over_leaves_every_interface_metered(two_links: tuple[Pair, str],
                                                                          tmp_path: Path) -> None:
    pair, dummy = two_links
    tap = Tap(udp_socket_in(pair.b))
    ifaces = ("--interface", pair.b_if, "--interface", dummy)
    target = ("--target", f"127.0.0.1:{tap.port}/ipfix")
    procs = []
    try:
        first = agent(pair, *ifaces, *target, "--cache-entries", "4k")
        procs.append(first)
        first.wait_for_line("exporting to", timeout=60)
        before = {i: xdp_prog_id(pair.b, i) for i in (pair.b_if, dummy)}
        assert None not in before.values(), first.output()
        first.stop(signal.SIGKILL)  # its program stays attached and counting, pinned
        send(pair, 44001, 10, tmp_path)

        # other settings (a new program to compile and switch to), and one name mistyped
        failed = agent(pair, *ifaces, "--interface", "pftx-typo", *target, "--cache-entries", "8k")
        procs.append(failed)
        failed.p.wait(120)
        assert failed.stop() == 3, failed.output()  # a kernel-side error
        assert "no such interface: pftx-typo" in failed.output(), failed.output()
        assert {i: xdp_prog_id(pair.b, i) for i in (pair.b_if, dummy)} == before, failed.output()

        send(pair, 44001, 7, tmp_path)  # still counted by the first agent's program
        third = agent(pair, *ifaces, *target, "--cache-entries", "4k")
        procs.append(third)
        third.wait_for_line("exporting to", timeout=60)
        assert "taking over the kernel program pinned at" in third.output(), third.output()
        assert third.stop() == 0, third.output()
        wait_packets(tap, 44001, 17)
    finally:
        for p in procs:
            p.stop(signal.SIGKILL)
        tap.close()


FAIL_COMPILE = """\
import os, sys
flag = os.environ.get("PYFLOW_TEST_FAIL_COMPILE", "")
if flag and os.path.exists(flag):
    with open("/proc/self/cmdline", "rb") as f:
        if b"pyflow.kernel.child" in f.read():  # only the compile child fails
            print('PYFLOW-PIN-RESULT {"ok": false, "error": "the kernel verifier rejected pyflow_xdp '
                  '(injected by the test)"}', flush=True)
            sys.exit(3)
"""

def config(pair: Pair, cache: str, port: int, metrics: int) -> str:
    body = f'sweep-interval = "250ms"\nmetrics-address = "127.0.0.1:{metrics}"\ncontrol-socket = ""\n'
    return agent_config(pair.b_if, [port], cache, pyflow=body)


def scrape(pair: Pair, port: int) -> dict[str, float]:
    res = pair.run(pair.b, "curl", "-sf", f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert res.returncode == 0, res.stderr
    out = {}
    for line in res.stdout.splitlines():
        if line.startswith(("pyflow_reload_failures_total ", "pyflow_config_last_reload_successful ")):
            name, value = line.split()
            out[name] = float(value)
    return out


def wait_reload_metrics(pair: Pair, port: int, failures: float, last_ok: float) -> None:
    """Until the scrape shows these values: the gauges are set once the reload is done, a moment
    after the log line that the test waited for."""
    want = {"pyflow_reload_failures_total": failures, "pyflow_config_last_reload_successful": last_ok}
    wait_until(f"the reload metrics to read {want}", lambda: scrape(pair, port) == want, timeout=20)


def test_a_reload_that_fails_to_apply_keeps_the_agent_on_its_old_settings(pair: Pair, tmp_path: Path) -> None:
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(FAIL_COMPILE)
    flag = tmp_path / "fail-compile"
    tap = Tap(udp_socket_in(pair.b))
    conf = tmp_path / "pyflow.toml"
    metrics = 20799
    conf.write_text(config(pair, "4k", tap.port, metrics))
    env = [f"PYTHONPATH={fault}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", f"PYFLOW_TEST_FAIL_COMPILE={flag}"]
    proc = Proc(["ip", "netns", "exec", pair.b, "env", *env, PYFLOW, "run", "--config", str(conf)])
    try:
        proc.wait_for_line("exporting to", timeout=60)
        prog = xdp_prog_id(pair.b, pair.b_if)
        wait_reload_metrics(pair, metrics, 0.0, 1.0)
        send(pair, 44002, 5, tmp_path)
        flag.touch()
        conf.write_text(config(pair, "8k", tap.port, metrics))
        proc.p.send_signal(signal.SIGHUP)
        line = proc.wait_for_line("reload failed", timeout=60)
        assert "the kernel verifier rejected pyflow_xdp (injected by the test)" in line, proc.output()
        assert "the running settings stay" in line
        assert proc.p.poll() is None, proc.output()  # still running
        assert xdp_prog_id(pair.b, pair.b_if) == prog  # the old program, still attached
        wait_reload_metrics(pair, metrics, 1.0, 0.0)
        send(pair, 44002, 4, tmp_path)
        wait_packets(tap, 44002, 9)  # metered and exported on the old settings

        flag.unlink()  # the same reload again, now it compiles
        proc.p.send_signal(signal.SIGHUP)
        proc.wait_for_line("reload: new kernel program in place (cache-entries=8192)", timeout=60)
        assert xdp_prog_id(pair.b, pair.b_if) != prog
        wait_reload_metrics(pair, metrics, 1.0, 1.0)
        send(pair, 44003, 3, tmp_path)
        assert proc.stop() == 0, proc.output()
        wait_packets(tap, 44003, 3)
    finally:
        proc.stop(signal.SIGKILL)
        tap.close()


@pytest.fixture
def dummies() -> Iterator[list[str]]:
    """Four interfaces in the test's own namespace: two veth pairs."""
    names = [f"pftk{i}" for i in range(4)]
    for n in names:
        ip("link", "del", n, check=False)
    for i in (0, 2):
        ip("link", "add", names[i], "type", "veth", "peer", "name", names[i + 1])
    for n in names:
        ip("link", "set", n, "up")
    yield names
    for n in names:
        ip("link", "del", n, check=False)


@pytest.mark.parametrize("k", [2, 4])
def test_a_take_over_failing_at_the_kth_interface_restores_the_others(dummies: list[str], k: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with FlowMeter(KernelSettings(cache_entries=256)) as old, FlowMeter(KernelSettings(cache_entries=512)) as new:
        for n in dummies:
            old.attach(n, "generic")
        old_id, new_fd = old.prog_id("xdp"), new.load("xdp")
        real, replaced = netlink.xdp_set, []

        def fails_at_k(ifindex: int, fd: int, flags: int, expected_fd: int | None = None) -> None:
            if fd == new_fd:  # a replace by the new program (putting the old one back is not counted)
                replaced.append(ifindex)
                if len(replaced) == k:
                    raise netlink.NetlinkError(12, "Cannot allocate memory (injected)")
            real(ifindex, fd, flags, expected_fd)

        monkeypatch.setattr(netlink, "xdp_set", fails_at_k)
        with pytest.raises(KernelError, match=f"cannot put the new program in place on {dummies[k - 1]}"):
            new.take_over(old)
        monkeypatch.undo()
        assert [xdp_prog_id(None, n) for n in dummies] == [old_id] * len(dummies)
        assert len(old.attachments) == len(dummies) and not new.attachments
        new.take_over(old)  # and a take-over that goes through still works after it
        assert [xdp_prog_id(None, n) for n in dummies] == [new.prog_id("xdp")] * len(dummies)
    assert [xdp_prog_id(None, n) for n in dummies] == [None] * len(dummies)


def test_a_pinned_instance_this_pyflow_cannot_read_is_left_alone(two_links: tuple[Pair, str]) -> None:
    pair, _ = two_links
    gen = pins_dir(pair.b) / "gen-00000000000000000001"
    gen.mkdir(parents=True, mode=0o700)
    fd = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY, 4, pin.MANIFEST_SIZE, 1, pin.MANIFEST)
    try:
        pin.write_manifest(fd, {"format": 99, "source": "0123456789abcdef", "created_ns": time.time_ns()})
        pin.obj_pin(fd, gen / pin.MANIFEST)
    finally:
        os.close(fd)
    tap = Tap(udp_socket_in(pair.b))
    proc = agent(pair, "--interface", pair.b_if, "--target", f"127.0.0.1:{tap.port}/ipfix")
    try:
        line = proc.wait_for_line("leaving the pinned", timeout=60)
        assert str(gen) in line and "manifest format 99 (this pyflow reads 1)" in line, line
        assert f"rm -r {gen}" in line and "ip link set dev IFACE xdp off" in line, line
        proc.wait_for_line("exporting to", timeout=60)
        assert proc.stop() == 0, proc.output()
    finally:
        proc.stop(signal.SIGKILL)
        tap.close()
    assert (gen / pin.MANIFEST).exists()  # still there, for whoever made it
    mfd = pin.obj_get(gen / pin.MANIFEST)
    try:
        assert pin.read_manifest(mfd)["format"] == 99
    finally:
        os.close(mfd)
    assert json.dumps(sorted(os.listdir(gen))) == json.dumps([pin.MANIFEST])
