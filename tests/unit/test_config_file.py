"""The TOML config file (pyflow.configfile) and how flags layer over it, through the real CLI."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pyflow import cli
from pyflow.config import InterfaceList, InterfaceOptions, Settings, TargetSettings
from pyflow.configfile import dump_toml, read_toml_text, scan_toml_lines
from pyflow.fields import ROUTEROS_DEFAULTS

S = 10**9
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pyflow.toml"


def load(argv: list[str]) -> Settings:
    return cli.settings_from_args(cli.build_parser().parse_args(argv))


def write(tmp_path: Path, text: str, name: str = "pyflow.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_example_file_means_what_it_says() -> None:
    s = load(["run", "--config", str(EXAMPLE)])
    assert s.enabled
    assert s.interface_spec == ("eth0", "uplinks")
    assert s.interfaces == ("eth0", "eth1", "eth2")
    assert s.interface_lists == (InterfaceList("uplinks", ("eth1", "eth2")),)
    assert (s.cache_entries, s.active_flow_timeout_ns, s.inactive_flow_timeout_ns) == (65536, 1800 * S, 15 * S)
    assert (s.packet_sampling, s.sampling_interval, s.sampling_space) == (False, 0, 0)
    assert s.targets == (
        TargetSettings("192.0.2.50", 2055, "ipfix", comment="ntopng"),
        TargetSettings("2001:db8::51", 9995, "9", src_address="2001:db8::1"),
    )
    assert s.disabled_targets == (TargetSettings("192.0.2.52", 2055, "5"),)
    assert s.ipfix.changes() == {"nat-events": True, "tcp-ack-num": False, "tcp-seq-num": False}
    assert s.interface_options == (InterfaceOptions("eth1", "both", "tc"),)
    assert s.options_for("eth2") == InterfaceOptions("eth2", "ingress", "auto")
    assert (s.sweep_interval_ns, s.metrics_address, s.xdp_mode, s.as_file) == (10 * S, "127.0.0.1:9796", "auto",
                                                                                 None)


def test_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--config", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "           interfaces: eth0,uplinks\n" in out
    assert "2 X 0.0.0.0      192.0.2.52    2055  5 " in out
    assert "1 eth1       both       tc\n" in out
    # this host's links, as far as rtnetlink shows them without root: lo is never metered
    assert "this host's links (what `pyflow run` would meter here):" in out
    assert re.search(r"^\s*1\s+lo\s+no\s+not named$", out, re.M), out


def test_values_as_routeros_writes_them_or_as_toml_types(tmp_path: Path) -> None:
    routeros = write(tmp_path, '[traffic-flow]\nenabled = "yes"\ncache-entries = "1M"\nactive-flow-timeout = "1h30m"\n'
                               'inactive-flow-timeout = "00:00:20"\npacket-sampling = "yes"\nsampling-interval = "3"\n'
                               '[[target]]\ndst-address = "192.0.2.1"\nport = "9995"\nversion = "IPFIX"\n'
                               'v9-template-timeout = "1d"\n[ipfix]\nttl = "no"\n', "a.toml")
    native = write(tmp_path, "[traffic-flow]\nenabled = true\ncache-entries = 1048576\nactive-flow-timeout = 5400\n"
                             "inactive-flow-timeout = 20\npacket-sampling = true\nsampling-interval = 3\n"
                             '[[target]]\ndst-address = "192.0.2.1"\nport = 9995\nversion = "ipfix"\n'
                             "v9-template-timeout = 86400\n[ipfix]\nttl = false\n", "b.toml")
    a, b = load(["run", "--config", routeros]), load(["run", "--config", native])
    assert a == b
    assert (a.cache_entries, a.active_flow_timeout_ns, a.inactive_flow_timeout_ns) == (1 << 20, 5400 * S, 20 * S)
    assert a.sampling == (3, 0) and a.targets[0].describe() == "192.0.2.1:9995/ipfix"
    assert a.targets[0].v9_template_timeout_ns == 86400 * S and "ttl" not in a.ipfix


def test_an_empty_file_is_routeros_defaults(tmp_path: Path) -> None:
    s = load(["check", "--config", write(tmp_path, "# nothing\n")])
    assert s == Settings()
    assert not s.enabled and s.interfaces == ("all",) and s.ipfix == ROUTEROS_DEFAULTS


def test_flags_override_only_when_given(tmp_path: Path) -> None:
    path = write(tmp_path, '[traffic-flow]\nenabled = "no"\ncache-entries = "16k"\ninterfaces = ["eth0", "eth1"]\n'
                           '[[target]]\ndst-address = "192.0.2.1"\nv9-template-refresh = 7\n'
                           '[ipfix]\nttl = "no"\nnat-events = "yes"\n'
                           '[[interface]]\nname = "eth1"\ndirection = "both"\n'
                           '[pyflow]\nmetrics-address = "127.0.0.1:9000"\ndirection = "egress"\n')
    s = load(["run", "--config", path])
    assert (s.enabled, s.cache_entries, s.metrics_address, s.direction) == (False, 16384, "127.0.0.1:9000", "egress")
    assert s.targets[0].v9_template_refresh == 7
    s = load(["run", "--config", path, "--enabled", "yes", "--cache-entries", "32k", "--metrics-address", "",
              "--v9-template-refresh", "3", "--ipfix", "ttl=yes,tos=no", "--direction", "ingress"])
    assert (s.enabled, s.cache_entries, s.metrics_address, s.direction) == (True, 32768, "", "ingress")
    assert s.inactive_flow_timeout_ns == 15 * S  # neither file nor flag: RouterOS's default
    assert s.targets[0].v9_template_refresh == 3  # --v9-template-refresh is for every target
    assert s.ipfix.changes() == {"nat-events": True, "tos": False}  # toggle by toggle: file, then flags
    assert s.options_for("eth1").direction == "both"  # the file's per-interface options stay
    # --target replaces the file's targets; --interface its interfaces (and options of the ones gone)
    s = load(["run", "--config", path, "--target", "192.0.2.9/5", "--interface", "eth0"])
    assert [t.describe() for t in s.targets] == ["192.0.2.9:2055/5"]
    assert s.interfaces == ("eth0",) and s.interface_options == ()
    s = load(["run", "--config", path, "--interface", "eth1,hook=tc"])
    assert s.options_for("eth1") == InterfaceOptions("eth1", "egress", "tc")


def test_interface_list_from_the_file_usable_by_flag(tmp_path: Path) -> None:
    path = write(tmp_path, '[interface-list]\nlan = ["eth1", "eth2"]\n')
    s = load(["run", "--config", path, "--interface", "lan", "--interface", "eth3"])
    assert s.interfaces == ("eth1", "eth2", "eth3") and s.interface_spec == ("lan", "eth3")


def test_as_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path, '[pyflow]\nas-file = "asn.txt"\n', "etc/pyflow.toml")
    assert load(["run", "--config", path]).as_file == str(tmp_path / "etc" / "asn.txt")
    assert load(["run", "--config", path, "--as-file", "other.txt"]).as_file == "other.txt"


class FakeMeter(list[Settings]):
    """Stands in for pyflow.runner.run_meter: the settings it was started with, and its reload readers."""

    def __init__(self) -> None:
        super().__init__()
        self.rereads: list[Callable[[], Settings] | None] = []

    def __call__(self, settings: Settings, stop: threading.Event, log: Callable[[str], None],
                 reload: threading.Event | None = None, load_settings: Callable[[], Settings] | None = None,
                 status: Callable[[str], None] | None = None) -> None:
        self.append(settings)
        self.rereads.append(load_settings)


@pytest.fixture
def fake_meter(monkeypatch: pytest.MonkeyPatch) -> FakeMeter:
    import pyflow.runner

    meter = FakeMeter()
    monkeypatch.setattr(pyflow.runner, "run_meter", meter)
    monkeypatch.setattr("signal.signal", lambda *_a: None)
    return meter


def test_sighup_rereads_the_file_under_the_same_flags(tmp_path: Path, fake_meter: FakeMeter) -> None:
    """run hands the runner a reader of the same sources: the file again, the same flags over it."""
    from pyflow.errors import ConfigError

    body = '[[target]]\ndst-address = "127.0.0.1"\n[pyflow]\nmetrics-address = ""\n'
    path = write(tmp_path, '[traffic-flow]\nenabled = "yes"\ncache-entries = "16k"\n' + body)
    assert cli.main(["run", "--config", path, "--inactive-flow-timeout", "5s"]) == 0
    (reread,) = fake_meter.rereads
    assert reread is not None and fake_meter[0].cache_entries == 16384
    Path(path).write_text('[traffic-flow]\nenabled = "yes"\ncache-entries = "32k"\ninactive-flow-timeout = "1m"\n'
                          + body)
    new = reread()
    assert (new.cache_entries, new.inactive_flow_timeout_ns) == (32768, 5 * S)  # the flag still wins
    Path(path).write_text('[traffic-flow]\nenabled = "yes"\ncache-entries = "32q"\n' + body)
    with pytest.raises(ConfigError, match="cache-entries: '32q' is not a size"):
        reread()  # the runner logs it and keeps the running settings
    Path(path).write_text('[traffic-flow]\nenabled = "no"\n' + body)
    with pytest.raises(ConfigError, match="traffic-flow is disabled"):
        reread()


def test_enabled_no_refuses_to_run(tmp_path: Path, fake_meter: list[Settings],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    body = '[[target]]\ndst-address = "127.0.0.1"\n[pyflow]\nmetrics-address = ""\n'
    off = write(tmp_path, '[traffic-flow]\nenabled = "no"\n' + body, "off.toml")
    unset = write(tmp_path, body, "unset.toml")
    for path in (off, unset):
        assert cli.main(["run", "--config", path]) == 2
        err = capsys.readouterr().err
        assert f"traffic-flow is disabled: {path} does not set enabled=yes" in err and "--enabled yes" in err
    assert fake_meter == []
    assert cli.main(["run", "--config", off, "--enabled", "yes"]) == 0
    assert cli.main(["run", "--interface", "lo", "--target", "127.0.0.1", "--metrics-address", ""]) == 0
    assert [s.enabled for s in fake_meter] == [True, True]  # with flags alone, running pyflow is the switch
    # check is fine with a disabled setup, and says what run would do
    assert cli.main(["check", "--config", off]) == 0
    out, err = capsys.readouterr()
    assert "              enabled: no\n" in out and "pyflow run would refuse these settings" in err


def test_packet_sampling_reaches_the_kernel_and_the_collectors(
        tmp_path: Path, fake_meter: list[Settings], capsys: pytest.CaptureFixture[str]) -> None:
    """packet-sampling=yes compiles the pattern into the program and every target announces it."""
    from pyflow.export.context import Sampling
    from pyflow.runner import export_context, kernel_settings

    argv = ["run", "--interface", "lo", "--target", "127.0.0.1", "--metrics-address", "",
            "--packet-sampling", "yes", "--sampling-interval", "4", "--sampling-space", "12"]
    assert cli.main(argv) == 0
    settings = fake_meter[0]
    assert settings.sampling == (4, 12)
    assert "packet-sampling=yes sampling-interval=4 sampling-space=12" in capsys.readouterr().err
    ks = kernel_settings(settings)
    assert (ks.sampling_interval, ks.sampling_space) == (4, 12)
    assert "-DSAMPLING_INTERVAL=4" in ks.cflags() and "-DSAMPLING_SPACE=12" in ks.cflags()
    assert export_context(settings, settings.targets[0], ()).sampling == Sampling(4, 12)
    off = cli.main(["run", "--interface", "lo", "--target", "127.0.0.1", "--metrics-address", ""])
    assert off == 0 and kernel_settings(fake_meter[1]).sampling_interval == 0
    assert export_context(fake_meter[1], fake_meter[1].targets[0], ()).sampling is None


# --------------------------------------------------------------------------
# Lines of keys, and writing TOML.
# --------------------------------------------------------------------------


def test_scan_finds_the_line_of_every_key() -> None:
    text = ('# comment\n[traffic-flow]\ninterfaces = [\n  "eth0",\n  "eth1 = x",\n]\nenabled = "yes"  # on\n'
            '[[target]]\ndst-address = "192.0.2.1"\n[[target]]\n"port" = 1\nnote = """\nfake = 1\n"""\n'
            "[ipfix]\nttl.x = 1\n[interface-list]\n'my list' = []\n")
    lines = scan_toml_lines(text)
    assert lines[("traffic-flow",)] == 2
    assert lines[("traffic-flow", "interfaces")] == 3
    assert lines[("traffic-flow", "enabled")] == 7
    assert ("traffic-flow", "eth1") not in lines and ("target", 1, "fake") not in lines
    assert lines[("target", 0)] == 8 and lines[("target", 0, "dst-address")] == 9
    assert lines[("target", 1)] == 10 and lines[("target", 1, "port")] == 11
    assert lines[("ipfix", "ttl")] == 16 and lines[("ipfix", "ttl", "x")] == 16
    assert lines[("interface-list", "my list")] == 18


def test_dump_toml_round_trips() -> None:
    doc = {"traffic-flow": {"enabled": "yes", "interfaces": ["eth0", "lan"], "sampling-interval": 0},
           "target": [{"dst-address": "192.0.2.1", "port": 2055, "comment": 'a "quoted" \\ é'},
                      {"dst-address": "2001:db8::1", "version": "ipfix"}],
           "ipfix": {"ttl": "no"}, "interface-list": {"lan": ["eth1"], "my list": []}}
    text = dump_toml(doc, "header line")
    assert text.startswith("# header line\n\n[traffic-flow]  # /ip traffic-flow\n")
    import tomllib

    assert tomllib.loads(text) == doc
    layer = read_toml_text(text, "x.toml")
    assert layer.values["targets"][0].comment == 'a "quoted" \\ é'


def test_check_needs_no_kernel_module(tmp_path: Path) -> None:
    """pyflow check, in a fresh interpreter: no kernel or bcc module is even imported (pyroute2 is: an
    rtnetlink dump of the links, which any user may make, tells what `run` would meter here)."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom pyflow import cli\nrc = cli.main(['check', '--config', sys.argv[1]])\n"
            "bad = [m for m in sys.modules if m.startswith(('pyflow.runner', 'pyflow.kernel', 'bcc'))]\n"
            "print(rc, bad)\n")
    res = subprocess.run([sys.executable, "-c", code, str(EXAMPLE)], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.stdout.strip().splitlines()[-1] == "0 []", res.stderr


def test_windows_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A byte order mark and CRLF line ends, as Windows editors write them: lines still right."""
    toml_file = tmp_path / "win.toml"
    toml_file.write_bytes(b'\xef\xbb\xbf[traffic-flow]\r\nenabled = "yes"\r\ncolour = 1\r\n')
    script = tmp_path / "win.rsc"
    script.write_bytes(b"\xef\xbb\xbf/ip traffic-flow\r\nset enabled=yes \\\r\n    cache-entries=4q\r\n")
    assert cli.main(["check", "--config", str(toml_file)]) == 2
    assert f"{toml_file}:3: unknown key 'colour'" in capsys.readouterr().err
    assert cli.main(["check", "--routeros", str(script)]) == 2
    assert f"{script}:3: cache-entries: '4q' is not a size" in capsys.readouterr().err
    script.write_bytes(b"/ip traffic-flow\r\nset enabled=yes \\\r\n    cache-entries=4k\r\n")
    assert load(["check", "--routeros", str(script)]).cache_entries == 4096


def test_run_on_a_terminal_keeps_one_live_status_line() -> None:
    """Log lines go above the status line; the status line is redrawn after each, and cleared at the end."""
    import io

    from pyflow.cli import StatusLine

    out = io.StringIO()
    line = StatusLine(out)
    line.show("pyflow: 3 flows cached (0% of 65,536), 12 records/s exported, targets: 1/1 ok")
    line.clear()
    assert out.getvalue() == ("\r\x1b[Kpyflow: 3 flows cached (0% of 65,536), 12 records/s exported, "
                              "targets: 1/1 ok\r\x1b[K")


def test_status_line_text() -> None:
    from types import SimpleNamespace

    from pyflow.runner import RateTracker, status_line

    agent = SimpleNamespace(stats=SimpleNamespace(cached=1024, records=0),
                            meter=SimpleNamespace(settings=SimpleNamespace(cache_entries=4096)))
    ok = SimpleNamespace(name="127.0.0.1:2055/ipfix", sock=object(), stats=SimpleNamespace(send_errors={}))
    bad = SimpleNamespace(name="192.0.2.9:2055/9", sock=object(),
                          stats=SimpleNamespace(send_errors={"econnrefused": 2}))
    rate = RateTracker()
    assert status_line(agent, [ok, bad], rate) == (  # type: ignore[arg-type]
        "pyflow: 1,024 flows cached (25% of 4,096), 0 records/s exported, targets: 1/2 ok "
        "(errors: 192.0.2.9:2055/9)")
