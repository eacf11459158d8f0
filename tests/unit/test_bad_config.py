"""Malformed config files, RouterOS scripts and flags, each through the real CLI entry point.

Every case must exit 2 from both ``pyflow run`` and ``pyflow check`` with a
message that names the key (and the file and line, where there is one), and
``run`` must not get anywhere near the kernel: the meter, the FlowMeter and
the kernel settings are replaced by traps that fail the test if reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pyflow import cli
from pyflow.config import SettingError, Settings
from pyflow.errors import KernelError


@dataclass(frozen=True)
class Bad:
    id: str
    text: str
    line: int | None  # the line the message must name (None: the file as a whole)
    words: tuple[str, ...]  # what the message must contain: the key, the value, ...
    kind: str = "toml"  # "toml" (--config) or "rsc" (--routeros)


TF = "[traffic-flow]\n"
T1 = '[[target]]\ndst-address = "192.0.2.1"\n'

CASES = [
    # --- unknown keys and tables -------------------------------------------------------
    Bad("unknown-key", TF + 'enabled = "yes"\ncolour = "red"\n', 3, ("unknown key 'colour'", "[traffic-flow]")),
    Bad("unknown-table", TF + "\n[flows]\nx = 1\n", 3, ("unknown table 'flows'",)),
    Bad("top-level-key", 'cache-entries = "64k"\n', 1, ("'cache-entries'", "put it in [traffic-flow]")),
    Bad("key-in-wrong-table", TF + 'sweep-interval = "1s"\n', 2, ("'sweep-interval'", "belongs in [pyflow]")),
    Bad("unknown-target-key", T1 + 'colour = "red"\n', 3, ("unknown key 'colour'", "[target]")),
    Bad("unknown-interface-key", '[[interface]]\nname = "eth0"\nspeed = 10\n', 3, ("unknown key 'speed'",)),
    Bad("unknown-pyflow-key", '[pyflow]\nthreads = 4\n', 2, ("unknown key 'threads'", "[pyflow]")),
    Bad("table-not-table", 'traffic-flow = "yes"\n', 1, ("traffic-flow must be a table",)),
    Bad("single-target-table", '[target]\ndst-address = "192.0.2.1"\n', 1, ("[target] must be written [[target]]",)),
    # --- sizes and durations -------------------------------------------------------------
    Bad("size-unit", TF + 'cache-entries = "64q"\n', 2, ("cache-entries", "'64q' is not a size")),
    Bad("size-code-injection", TF + 'cache-entries = "1; system(\\"id\\")"\n', 2, ("cache-entries", "not a size")),
    Bad("size-too-small", TF + "cache-entries = 8\n", 2, ("cache-entries 8 is outside 16..64M",)),
    Bad("size-too-big", TF + 'cache-entries = "128M"\n', 2, ("cache-entries 128M is outside",)),
    Bad("size-negative", TF + "cache-entries = -5\n", 2, ("cache-entries", "negative")),
    Bad("size-float", TF + "cache-entries = 1.5\n", 2, ("cache-entries", "1.5 is not a size")),
    Bad("size-array", TF + "cache-entries = [64]\n", 2, ("cache-entries", "not a size")),
    Bad("duration-unit", TF + 'active-flow-timeout = "30x"\n', 2, ("active-flow-timeout", "'30x' is not a duration")),
    Bad("duration-huge", TF + 'active-flow-timeout = "99999w"\n', 2, ("active-flow-timeout 99999w is too long",)),
    Bad("duration-too-short", TF + 'inactive-flow-timeout = "50ms"\n', 2,
        ("inactive-flow-timeout 50ms is too short",)),
    Bad("duration-negative", TF + 'inactive-flow-timeout = "-5s"\n', 2, ("inactive-flow-timeout", "'-5s'")),
    Bad("duration-float", TF + "active-flow-timeout = 1.5\n", 2, ("active-flow-timeout", "1.5 is not a duration")),
    Bad("duration-clock", TF + 'active-flow-timeout = "00:61:00"\n', 2, ("active-flow-timeout", "'00:61:00'")),
    Bad("sweep-too-long", '[pyflow]\nsweep-interval = "2h"\n', 2, ("sweep-interval 2h is too long",)),
    # --- yes/no -------------------------------------------------------------------------
    Bad("bool-word", TF + 'enabled = "maybe"\n', 2, ("enabled", "'maybe' is not yes or no")),
    Bad("bool-int", TF + "enabled = 1\n", 2, ("enabled", "1 is not yes or no")),
    # --- sampling -----------------------------------------------------------------------
    Bad("sampling-no-interval", TF + 'packet-sampling = "yes"\n', 2, ("packet-sampling=yes needs sampling-interval",)),
    Bad("sampling-space-alone", TF + 'packet-sampling = "yes"\nsampling-space = 5\n', 3,
        ("sampling-space=5 needs a sampling-interval",)),
    # (sampling-interval/-space with packet-sampling=no are kept, not applied: test_config.py)
    Bad("sampling-huge", TF + 'packet-sampling = "yes"\nsampling-interval = 4294967296\n', 3,
        ("sampling-interval 4294967296 is outside 0..2147483647",)),
    Bad("sampling-negative", TF + "sampling-interval = -1\n", 2, ("sampling-interval", "-1 is negative")),
    Bad("sampling-text", TF + 'sampling-interval = "ten"\n', 2, ("sampling-interval", "'ten' is not a whole number")),
    # --- targets ------------------------------------------------------------------------
    Bad("duplicate-target", T1 + T1.replace('"\n', '"\nport = 2055\n'), 3,
        ("target 192.0.2.1:2055 is given twice",)),
    Bad("duplicate-target-v6", '[[target]]\ndst-address = "2001:db8::1"\n[[target]]\ndst-address = "2001:0db8::01"\n',
        3, ("target [2001:db8::1]:2055 is given twice",)),
    Bad("bad-address", '[[target]]\ndst-address = "192.0.2.300"\n', 2,
        ("dst-address '192.0.2.300' is not an IPv4 or IPv6 address",)),
    Bad("hostname-address", '[[target]]\ndst-address = "collector.example"\n', 2, ("dst-address 'collector.example'",)),
    Bad("placeholder-address", '[[target]]\ndst-address = "<ntopng-ip>"\n', 2, ("dst-address", "placeholder")),
    Bad("unspecified-address", '[[target]]\ndst-address = "0.0.0.0"\n', 2, ("dst-address 0.0.0.0",)),
    Bad("no-address", "[[target]]\nport = 2055\n", 1, ("no dst-address",)),
    Bad("address-int", "[[target]]\ndst-address = 10\n", 2, ("dst-address", "not text")),
    Bad("port-high", T1 + "port = 70000\n", 3, ("port 70000 is not between 1 and 65535",)),
    Bad("port-zero", T1 + "port = 0\n", 3, ("port 0",)),
    Bad("port-text", T1 + 'port = "abc"\n', 3, ("port", "'abc' is not a whole number")),
    Bad("version-7", T1 + "version = 7\n", 3, ("version 7 is not one of 1, 5, 9, ipfix",)),
    Bad("version-word", T1 + 'version = "sflow"\n', 3, ("version 'sflow'",)),
    Bad("version-bool", T1 + "version = true\n", 3, ("version", "true")),
    Bad("src-family", T1 + 'src-address = "2001:db8::1"\n', 3, ("src-address", "different IP versions")),
    Bad("src-bad", T1 + 'src-address = "nope"\n', 3, ("src-address 'nope'",)),
    Bad("refresh-zero", T1 + "v9-template-refresh = 0\n", 3, ("v9-template-refresh 0 is outside 1..",)),
    Bad("refresh-huge", T1 + "v9-template-refresh = 1099511627776\n", 3, ("v9-template-refresh 1099511627776",)),
    Bad("template-timeout-zero", T1 + 'v9-template-timeout = "0s"\n', 3, ("v9-template-timeout 0s is too short",)),
    Bad("time-mode", T1 + 'time = "local"\n', 3, ("time mode 'local'",)),
    Bad("disabled-word", T1 + 'disabled = "perhaps"\n', 3, ("disabled", "'perhaps' is not yes or no")),
    # --- ipfix toggles ------------------------------------------------------------------
    Bad("toggle-name", '[ipfix]\nttl = "no"\ntll = "no"\n', 3, ("unknown ipfix field 'tll'",)),
    Bad("toggle-value", '[ipfix]\nttl = "maybe"\n', 2, ("ipfix field ttl", "'maybe' is not yes or no")),
    Bad("toggle-int", "[ipfix]\nttl = 2\n", 2, ("ipfix field ttl", "2 is not yes or no")),
    Bad("toggle-always", '[ipfix]\nflow-end-reason = "no"\n', 2, ("'flow-end-reason' is always sent",)),
    # --- interfaces ---------------------------------------------------------------------
    Bad("interfaces-int", TF + "interfaces = 5\n", 2, ("interfaces", "5 is not a name or a list of names")),
    Bad("interfaces-slash", TF + 'interfaces = ["eth0/1"]\n', 2, ("interfaces", "'eth0/1' is not a Linux interface")),
    Bad("interfaces-long", TF + 'interfaces = "a-very-long-interface-name"\n', 2, ("interfaces", "not a Linux")),
    Bad("interfaces-empty-name", TF + 'interfaces = "eth0,,eth1"\n', 2, ("interfaces", "empty name")),
    Bad("interfaces-all-and-more", TF + 'interfaces = "all,eth0"\n', 2, ("interfaces: all cannot be combined",)),
    Bad("interfaces-builtin", TF + 'interfaces = "dynamic"\n', 2, ("interfaces", "built-in list 'dynamic'")),
    Bad("list-empty", TF + 'interfaces = "lan"\n[interface-list]\nlan = []\n', 2,
        ("interfaces: interface list lan has no members",)),
    Bad("list-bad-member", '[interface-list]\nlan = ["eth0", "eth 1"]\n', 2, ("interface list lan: member 'eth 1'",)),
    Bad("list-twice-member", '[interface-list]\nlan = ["eth0", "eth0"]\n', 2, ("interface list lan", "given twice")),
    Bad("list-builtin-name", '[interface-list]\nall = ["eth0"]\n', 2, ("interface list name 'all'", "built-in")),
    Bad("interface-no-name", '[[interface]]\ndirection = "both"\n', 1, ("[[interface]] 0: no name",)),
    Bad("interface-direction", '[[interface]]\nname = "eth0"\ndirection = "sideways"\n', 3,
        ("direction 'sideways'",)),
    Bad("interface-hook", '[[interface]]\nname = "eth0"\nhook = "ebpf"\n', 3, ("hook 'ebpf'",)),
    Bad("interface-not-metered", TF + 'interfaces = "eth0"\n[[interface]]\nname = "eth1"\n', 3,
        ("interface eth1 has options but is not metered",)),
    Bad("interface-twice", '[[interface]]\nname = "eth0"\n[[interface]]\nname = "eth0"\n', 3,
        ("interface eth0 has two [[interface]] tables",)),
    # --- pyflow's own ---------------------------------------------------------------------
    Bad("xdp-mode", '[pyflow]\nxdp-mode = "turbo"\n', 2, ("xdp-mode 'turbo'",)),
    Bad("metrics-host", '[pyflow]\nmetrics-address = "localhost"\n', 2, ("metrics-address 'localhost'",)),
    Bad("metrics-int", "[pyflow]\nmetrics-address = 9796\n", 2, ("metrics-address", "not text")),
    Bad("default-direction", '[pyflow]\ndirection = "up"\n', 2, ("direction 'up'",)),
    # --- TOML syntax --------------------------------------------------------------------
    Bad("toml-unterminated-string", TF + 'cache-entries = "64k\n', 2, ("TOML syntax error",)),
    Bad("toml-bad-header", "[traffic-flow\n", 1, ("TOML syntax error",)),
    Bad("toml-duplicate-key", TF + 'enabled = "yes"\nenabled = "no"\n', 3, ("TOML syntax error",)),
    Bad("toml-bare-yes", TF + "enabled = yes\n", 2, ("TOML syntax error",)),
    # --- RouterOS scripts -----------------------------------------------------------------
    Bad("ros-other-menu", "/ip traffic-flow\nset enabled=yes\n/ip firewall filter\nadd chain=input action=drop\n",
        4, ("/ip firewall filter add is not a traffic-flow setting", "--ignore-other"), "rsc"),
    Bad("ros-scripting", ':local x 5\n', 1, (":local", "not a traffic-flow setting"), "rsc"),
    Bad("ros-unterminated-quote", '/ip traffic-flow target\nadd dst-address=192.0.2.1 comment="open\n', 2,
        ("unterminated quote",), "rsc"),
    Bad("ros-bad-escape", '/ip traffic-flow target add dst-address=192.0.2.1 comment="a\\qb"\n', 1,
        ("unknown escape \\q",), "rsc"),
    Bad("ros-unknown-property", "/ip traffic-flow\nset enabled=yes colour=red\n", 2, ("unknown property 'colour'",),
        "rsc"),
    Bad("ros-property-twice", "/ip traffic-flow set enabled=yes enabled=no\n", 1, ("enabled is given twice",), "rsc"),
    Bad("ros-continued-bad-size", "/ip traffic-flow\nset enabled=yes \\\n    cache-entries=64q\n", 3,
        ("cache-entries", "'64q' is not a size"), "rsc"),
    Bad("ros-bad-duration", "/ip traffic-flow set active-flow-timeout=30x\n", 1, ("active-flow-timeout", "'30x'"),
        "rsc"),
    Bad("ros-bad-bool", "/ip traffic-flow set enabled=maybe\n", 1, ("enabled", "'maybe'"), "rsc"),
    Bad("ros-sampling-space", "/ip traffic-flow set packet-sampling=yes sampling-space=4\n", 1,
        ("sampling-space=4 needs a sampling-interval",), "rsc"),
    Bad("ros-sampling-negative", "/ip traffic-flow set sampling-interval=-1\n", 1,
        ("sampling-interval", "'-1' is not a whole number"), "rsc"),
    Bad("ros-version", "/ip traffic-flow target\nadd dst-address=192.0.2.1 version=7\n", 2, ("version 7",), "rsc"),
    Bad("ros-duplicate-target", "/ip traffic-flow target\nadd dst-address=192.0.2.1\n"
        "add dst-address=192.0.2.1 port=2055 version=ipfix\n", 3, ("target 192.0.2.1:2055 is given twice",), "rsc"),
    Bad("ros-placeholder", "/ip traffic-flow target\nadd dst-address=<ntopng-ip> port=2055\n", 2,
        ("dst-address '<ntopng-ip>'", "placeholder"), "rsc"),
    Bad("ros-no-dst", "/ip traffic-flow target\nadd port=2055\n", 2, ("no dst-address",), "rsc"),
    Bad("ros-address-and-dst", "/ip traffic-flow target add address=192.0.2.1:2055 dst-address=192.0.2.1\n", 1,
        ("address= and dst-address= both given",), "rsc"),
    Bad("ros-bad-port", "/ip traffic-flow target add dst-address=192.0.2.1 port=99999\n", 1, ("port 99999",), "rsc"),
    Bad("ros-target-set", "/ip traffic-flow target\nset 0 disabled=yes\n", 2,
        ("/ip traffic-flow target set cannot be mapped",), "rsc"),
    Bad("ros-menu-typo", "/ip traffic-flow targets\nadd dst-address=192.0.2.1\n", 2, ("no such menu",), "rsc"),
    Bad("ros-command-typo", "/ip traffic-flow sett enabled=yes\n", 1, ("expected a command",), "rsc"),
    Bad("ros-bare-word", "/ip traffic-flow set enabled\n", 1, ("unexpected 'enabled'", "name=value"), "rsc"),
    Bad("ros-toggle", "/ip traffic-flow ipfix set tll=no\n", 1, ("unknown property 'tll'",), "rsc"),
    Bad("ros-toggle-value", "/ip traffic-flow ipfix set ttl=perhaps\n", 1, ("ipfix field ttl", "'perhaps'"), "rsc"),
    Bad("ros-undefined-list", "/interface list member add list=lan interface=ether1\n", 1,
        ("list lan is not added in this script",), "rsc"),
    Bad("ros-builtin-list", "/interface list add name=all\n", 1, ("all is one of RouterOS's built-in lists",), "rsc"),
    Bad("ros-include-unknown", "/interface list add name=lan include=dynamic\n", 1,
        ("include=dynamic cannot be mapped",), "rsc"),
    Bad("ros-interface-spaces", '/ip traffic-flow set interfaces="ether1 - WAN"\n', 1,
        ("'ether1 - WAN' is not a Linux interface name", "--map-interface"), "rsc"),
    Bad("ros-empty-list", "/interface list add name=lan\n/ip traffic-flow set interfaces=lan\n", 2,
        ("interface list lan has no members",), "rsc"),
]


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.kind == "rsc" for c in CASES) >= 20


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Traps on everything past the settings: the meter, the FlowMeter, the kernel settings."""
    import pyflow.kernel.loader
    import pyflow.runner

    reached: list[str] = []

    def trap(name: str):  # type: ignore[no-untyped-def]
        def fail(*_args: object, **_kwargs: object) -> None:
            reached.append(name)
            raise AssertionError(f"{name} reached with bad settings")

        return fail

    monkeypatch.setattr(pyflow.runner, "run_meter", trap("run_meter"))
    monkeypatch.setattr(pyflow.runner, "FlowMeter", trap("runner.FlowMeter"))
    monkeypatch.setattr(pyflow.runner, "kernel_settings", trap("kernel_settings"))
    monkeypatch.setattr(pyflow.kernel.loader, "FlowMeter", trap("loader.FlowMeter"))
    monkeypatch.setattr("signal.signal", lambda *_a: None)
    return reached


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("command", ["run", "check"])
def test_bad_input_exits_2_naming_the_key(case: Bad, command: str, tmp_path: Path, no_kernel: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"bad.{case.kind}"
    path.write_text(case.text, encoding="utf-8")
    option = "--config" if case.kind == "toml" else "--routeros"
    rc = cli.main([command, option, str(path)])
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert no_kernel == []
    assert out == ""  # check prints nothing when the settings are bad
    assert err.startswith("pyflow: error: ") and err.count("\n") == 1, err
    place = f"{path}:{case.line}: " if case.line is not None else f"{path}: "
    assert place in err, err
    for word in case.words:
        assert word in err, err


def test_unreadable_and_missing_files(tmp_path: Path, no_kernel: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[traffic-flow]\ninterfaces = "caf\xe9"\n')
    for option, path, message in (("--config", latin1, "not UTF-8"),
                                  ("--config", tmp_path / "missing.toml", "cannot read the config file"),
                                  ("--routeros", tmp_path / "missing.rsc", "cannot read the RouterOS script")):
        for command in ("run", "check"):
            assert cli.main([command, option, str(path)]) == 2
            err = capsys.readouterr().err
            assert f"pyflow: error: {path}: {message}" in err, err
    assert no_kernel == []


FLAG_CASES = [
    (["--target", "127.0.0.1", "--packet-sampling", "yes", "--sampling-space", "5"],
     "--sampling-space: sampling-space=5 needs a sampling"),
    (["--target", "127.0.0.1", "--packet-sampling", "yes"], "--packet-sampling: packet-sampling=yes needs"),
    (["--target", "127.0.0.1", "--target", "127.0.0.1:2055/ipfix"], "--target '127.0.0.1:2055/ipfix': target "
                                                                     "127.0.0.1:2055 is given twice"),
    (["--target", "127.0.0.1", "--interface", "eth0", "--interface", "all"], "--interface: interfaces: all cannot"),
    (["--target", "127.0.0.1", "--cache-entries", "8"], "--cache-entries: cache-entries 8 is outside 16..64M"),
    (["--target", "127.0.0.1", "--enabled", "no"], "traffic-flow is disabled: with --enabled no"),
    (["--target", "127.0.0.1", "--version", "7"], "version '7' is not one of"),
    (["--version", "5"], "--version sets the version of --target values"),
    (["--target", "127.0.0.1", "--ipfix", "tll=no"], "--ipfix: unknown ipfix field 'tll'"),
    (["--target", "127.0.0.1", "--map-interface", "ether1=eth0"], "--map-interface and --ignore-other go with"),
]


@pytest.mark.parametrize(("flags", "message"), FLAG_CASES)
def test_bad_flags_exit_2(flags: list[str], message: str, no_kernel: list[str],
                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["run", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert no_kernel == []
    if "disabled" not in message:  # check accepts a disabled setup, with a warning
        assert cli.main(["check", *flags]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--cache-entries", "64q"), ("--sampling-interval", "-1"),
                                             ("--active-flow-timeout", "30x"), ("--enabled", "maybe"),
                                             ("--packet-sampling", "2"), ("--v9-template-refresh", "x")])
def test_flag_values_argparse_refuses(flag: str, value: str, no_kernel: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--target", "127.0.0.1", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and flag.lstrip("-") in err.split(f"argument {flag}")[1]
    assert no_kernel == []


def test_only_integers_reach_the_compiler() -> None:
    """A string for cache-entries never becomes a -D flag: refused by the settings tree and by KernelSettings."""
    from pyflow.kernel.loader import KernelSettings

    evil = '1; system("touch /tmp/pwned")'
    with pytest.raises(SettingError, match=r"cache-entries .* is not a whole number"):
        Settings(cache_entries=evil)  # type: ignore[arg-type]
    with pytest.raises(SettingError, match=r"sampling-interval .* is not a whole number"):
        Settings(packet_sampling=True, sampling_interval="4 + x")  # type: ignore[arg-type]
    with pytest.raises(KernelError, match="cache_entries"):
        KernelSettings(cache_entries=evil)  # type: ignore[arg-type]
    with pytest.raises(KernelError, match="sampling_interval"):
        KernelSettings(sampling_interval="1)")  # type: ignore[arg-type]
    with pytest.raises(KernelError):
        KernelSettings(cache_entries=True)
    flags = KernelSettings(cache_entries=4096).cflags()
    assert "-DCACHE_ENTRIES=4096" in flags and all(";" not in f and "(" not in f for f in flags)
