"""Least privilege: after its start the agent runs with only the capabilities it uses, and works.

pyflow meters b's interface from a config file (default metrics address:
loopback); /proc/<pid>/status of the running agent, and of every thread it
runs, shows CAP_BPF + CAP_NET_ADMIN effective and CAP_PERFMON only permitted
(for a reload's compile child), nothing in the bounding set beyond those, no
inheritable or ambient ones.  With that, a flow is metered and exported, a
SIGHUP that changes the kernel settings compiles and loads a new program in a
child and puts it in place, and SIGTERM detaches.  The agent's resident
memory stays under 64 MiB (bcc and LLVM live only in the compile child).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from pyflow.kernel import caps
from tests.integration.collect import Tap
from tests.integration.netns import Pair, udp_socket_in
from tests.integration.procs import PYFLOW, REPO, Proc, agent_config

ONE_INTERFACE = '\n[[interface]]\nname = "{iface}"\ndirection = "both"\n'


def config(pair: Pair, cache: str, port: int) -> str:
    return agent_config(pair.b_if, [port], cache, sections=ONE_INTERFACE.format(iface=pair.b_if))

EFFECTIVE = (1 << caps.CAP_BPF) | (1 << caps.CAP_NET_ADMIN)
PERMITTED = EFFECTIVE | (1 << caps.CAP_PERFMON)


def status(pid: int, task: str | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    return dict(line.split(":\t", 1) for line in Path(path).read_text().splitlines() if ":\t" in line)


def send(pair: Pair, sport: int, n: int, tmp: Path) -> None:
    e = Ether(src=pair.macs["a"], dst=pair.macs["b"])
    path = tmp / f"{sport}.pcap"
    wrpcap(str(path), [e / IP(src=pair.a_v4, dst=pair.b_v4) / UDP(sport=sport, dport=9) / (b"c" * 72)] * n)
    res = pair.run(pair.a, sys.executable, "-m", "tests.integration.sendpkts", pair.a_if, str(path),
                   cwd=str(REPO), timeout=60)
    assert res.returncode == 0, res.stderr


def xdp_attached(pair: Pair) -> bool:
    link = json.loads(subprocess.run(["ip", "-n", pair.b, "-j", "-d", "link", "show", pair.b_if],
                                     capture_output=True, text=True, check=True).stdout)[0]
    return "xdp" in link


def assert_least_privilege(pid: int) -> None:
    st = status(pid)
    assert int(st["CapEff"], 16) == EFFECTIVE, caps.names(int(st["CapEff"], 16))
    assert int(st["CapPrm"], 16) == PERMITTED, caps.names(int(st["CapPrm"], 16))
    assert int(st["CapBnd"], 16) == PERMITTED, caps.names(int(st["CapBnd"], 16))
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    for task in Path(f"/proc/{pid}/task").iterdir():  # capabilities are per thread: every one of them
        t = status(pid, task.name)
        assert int(t["CapEff"], 16) == EFFECTIVE, (t["Name"], caps.names(int(t["CapEff"], 16)))


def exported_across_a_compiling_reload(pair: Pair, tap: Tap, proc: Proc, conf: Path, reloaded: str, sport: int,
                                       tmp: Path) -> None:
    """5 packets exported; a reload to ``reloaded`` (cache-entries 8k: a new kernel program,
    compiled and loaded by a child of the agent); 3 more packets, on port ``sport`` + 1, exported."""
    send(pair, sport, 5, tmp)
    rec = tap.wait_for(lambda r: r.get("L4_SRC_PORT") == sport, timeout=30)
    assert (rec["IN_PKTS"], rec["IN_BYTES"]) == (5, 500)
    conf.write_text(reloaded)
    proc.p.send_signal(signal.SIGHUP)
    proc.wait_for_line("reload: settings applied", timeout=60)
    assert "reload: new kernel program in place (cache-entries=8192)" in proc.output(), proc.output()
    send(pair, sport + 1, 3, tmp)
    rec = tap.wait_for(lambda r: r.get("L4_SRC_PORT") == sport + 1, timeout=30)
    assert (rec["IN_PKTS"], rec["IN_BYTES"]) == (3, 300)


def test_agent_runs_with_only_the_capabilities_it_uses(pair: Pair, tmp_path: Path) -> None:
    tap = Tap(udp_socket_in(pair.b))
    conf = tmp_path / "pyflow.toml"
    conf.write_text(config(pair, "4k", tap.port))
    proc = Proc(["ip", "netns", "exec", pair.b, PYFLOW, "run", "--config", str(conf)])
    try:
        proc.wait_for_line("exporting to", timeout=60)
        out = proc.output()
        assert "metrics on http://127.0.0.1:9796/metrics" in out  # loopback unless told otherwise
        assert "with TC on egress" in out and "with XDP" in out  # both attached after the drop
        pid = proc.p.pid  # ip netns exec execs pyflow: the same process
        assert_least_privilege(pid)
        rss_kib = int(status(pid)["VmRSS"].split()[0])
        assert rss_kib <= 64 * 1024, f"agent VmRSS {rss_kib} KiB"
        print(f"agent VmRSS {rss_kib / 1024:.1f} MiB, {len(list(Path(f'/proc/{pid}/task').iterdir()))} threads")

        # a new kernel program, compiled and loaded by a child of the unprivileged agent
        exported_across_a_compiling_reload(pair, tap, proc, conf, config(pair, "8k", tap.port), 43001, tmp_path)
        assert_least_privilege(pid)
    finally:
        rc = proc.stop(signal.SIGTERM)
        tap.close()
    assert rc == 0, proc.output()
    assert not xdp_attached(pair)  # detached without CAP_SYS_ADMIN


PROBE = """\
import errno, os, signal, sys
target = os.environ.get("PYFLOW_TEST_PROBE", "")
with open("/proc/self/cmdline", "rb") as f:
    argv = f.read().split(b"\\0")
if target and b"run" in argv and not any(b"pyflow.kernel.child" in a for a in argv):

    def _try(what, fn):
        try:
            fn()
            result = "ALLOWED"
        except OSError as exc:
            result = f"refused ({errno.errorcode.get(exc.errno, exc.errno)})"
        print(f"probe: {what}: {result}", file=sys.stderr, flush=True)

    def _probe(signum, frame):  # runs in the agent's main thread, with the agent's credentials
        _try("open /etc/shadow for writing", lambda: os.close(os.open("/etc/shadow", os.O_WRONLY)))
        _try("read /etc/shadow", lambda: os.close(os.open("/etc/shadow", os.O_RDONLY)))
        _try("chmod a root-owned file", lambda: os.chmod(target, 0o666))
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        _try("create a file in /etc", lambda: os.close(os.open("/etc/pyflow-probe", flags)))

    signal.signal(signal.SIGUSR2, _probe)
"""


@pytest.fixture
def pyflow_user() -> tuple[int, int]:
    """The system user `make setup` (scripts/setup.sh) creates, created the same way if missing."""
    try:
        entry = pwd.getpwnam("pyflow")
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", "pyflow"], check=True)
        entry = pwd.getpwnam("pyflow")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def reachable_checkout() -> Iterator[None]:
    """The agent's user reads pyflow's files (its package, the venv, bpf/) as on any real install,
    where they are world-readable; a checkout cloned into a 0700 directory (mkdtemp) is not
    reachable.  For the test's duration, every directory above the checkout gets o+x (traverse
    only, no listing), and the modes are put back afterwards."""
    changed = []
    for parent in [*reversed(REPO.parents), REPO]:
        mode = parent.stat().st_mode & 0o7777
        if not mode & 0o001:
            parent.chmod(mode | 0o001)
            changed.append((parent, mode))
    try:
        yield
    finally:
        for parent, mode in reversed(changed):
            parent.chmod(mode)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the user can read (pytest's tmp_path is root's, 0700): the config, the probe."""
    path = Path(tempfile.mkdtemp(prefix="pyflow-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_with_user_the_running_agent_is_not_root(pair: Pair, tmp_path: Path, shared_dir: Path,
                                                 pyflow_user: tuple[int, int], reachable_checkout: None) -> None:
    uid, gid = pyflow_user
    tap = Tap(udp_socket_in(pair.b))
    conf = shared_dir / "pyflow.toml"
    ctl = f"/run/pyflow/test-user-{os.getpid()}.sock"  # made by the agent, as the user

    def user_config(cache: str) -> str:
        text = config(pair, cache, tap.port)
        return text.replace('control-socket = ""', f'control-socket = "{ctl}"') + 'user = "pyflow"\n'

    conf.write_text(user_config("4k"))
    conf.chmod(0o644)
    (shared_dir / "probe").mkdir(mode=0o755)
    (shared_dir / "probe" / "sitecustomize.py").write_text(PROBE)
    rootfile = shared_dir / "root-only"
    rootfile.write_text("root's\n")
    rootfile.chmod(0o600)
    env = [f"PYTHONPATH={shared_dir / 'probe'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           f"PYFLOW_TEST_PROBE={rootfile}"]
    proc = Proc(["ip", "netns", "exec", pair.b, "env", *env, PYFLOW, "run", "--config", str(conf)])
    try:
        proc.wait_for_line("exporting to", timeout=60)
        assert f"running as user pyflow (uid {uid}, gid {gid})" in proc.output(), proc.output()
        pid = proc.p.pid  # ip netns exec and env exec: the same process
        st = status(pid)
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(gid)] * 4, st
        assert st["Groups"].strip() == "", st["Groups"]
        assert_least_privilege(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():  # every thread: not root
            assert status(pid, task.name)["Uid"].split() == [str(uid)] * 4

        proc.p.send_signal(signal.SIGUSR2)
        proc.wait_for_line("probe: create a file in /etc", timeout=30)
        out = proc.output()
        assert "probe: open /etc/shadow for writing: refused (EACCES)" in out, out
        assert "probe: read /etc/shadow: refused (EACCES)" in out, out
        assert "probe: chmod a root-owned file: refused (EPERM)" in out, out
        assert "probe: create a file in /etc: refused (EACCES)" in out, out
        assert rootfile.stat().st_mode & 0o777 == 0o600 and not Path("/etc/pyflow-probe").exists()

        deadline = time.monotonic() + 30  # it listens right after the start line
        while not os.path.exists(ctl):
            assert time.monotonic() < deadline and proc.p.poll() is None, proc.output()
            time.sleep(0.05)
        sock = os.stat(ctl)  # the control socket: the user's, 0600; root may ask too
        assert (sock.st_uid, sock.st_mode & 0o777) == (uid, 0o600)
        res = subprocess.run([PYFLOW, "status", "--socket", ctl, "--json"], capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 0 and json.loads(res.stdout)["ok"], res.stderr

        # a reload that compiles: the child runs as the user, with the kept capabilities (ambient)
        exported_across_a_compiling_reload(pair, tap, proc, conf, user_config("8k"), 43011, tmp_path)
        assert_least_privilege(pid)
    finally:
        rc = proc.stop(signal.SIGTERM)
        tap.close()
    assert rc == 0, proc.output()
    assert not xdp_attached(pair)
