from __future__ import annotations

import pytest

from pyflow.cli import build_parser, settings_from_args
from pyflow.config import Settings, TargetSettings, parse_target
from pyflow.errors import ConfigError
from pyflow.units import format_duration, format_size, parse_bool, parse_duration_ns, parse_size

S = 10**9


@pytest.mark.parametrize(
    ("text", "ns"),
    [("15s", 15 * S), ("30m", 1800 * S), ("1h", 3600 * S), ("1h30m", 5400 * S), ("1d", 86400 * S),
     ("1w2d", 9 * 86400 * S), ("500ms", S // 2), ("00:30:00", 1800 * S), ("1d00:00:10", 86410 * S),
     ("90", 90 * S), (15, 15 * S)],
)
def test_durations_routeros_style(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("bad", ["", "15x", "m15", "1h 30m", "-5s", "00:61:00", True])
def test_bad_durations_are_named(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ns(bad)  # type: ignore[arg-type]


def test_formats_round_trip() -> None:
    for text in ("15s", "30m", "1h30m", "1d", "500ms"):
        assert format_duration(parse_duration_ns(text)) == text
    assert parse_size("64k") == 65536 and parse_size("1M") == 1 << 20 and parse_size("4096") == 4096
    assert format_size(65536) == "64k" and format_size(1000) == "1000"
    assert parse_bool("yes") and not parse_bool("no")
    with pytest.raises(ValueError, match="not a size"):
        parse_size("64q")


def test_routeros_defaults() -> None:
    s = Settings()
    assert s.interfaces == ("all",)
    assert s.cache_entries == 65536
    assert s.active_flow_timeout_ns == 1800 * S
    assert s.inactive_flow_timeout_ns == 15 * S
    t = TargetSettings("192.0.2.50")
    assert (t.port, t.version, t.v9_template_refresh, t.v9_template_timeout_ns) == (2055, "9", 20, 1800 * S)


@pytest.mark.parametrize(
    ("spec", "host", "port", "version"),
    [("192.0.2.50", "192.0.2.50", 2055, "9"), ("192.0.2.50:9995/5", "192.0.2.50", 9995, "5"),
     ("[2001:db8::1]:4739/ipfix", "2001:db8::1", 4739, "ipfix"), ("2001:db8::1", "2001:db8::1", 2055, "9"),
     ("127.0.0.1/10", "127.0.0.1", 2055, "ipfix")],
)
def test_target_specs(spec: str, host: str, port: int, version: str) -> None:
    t = parse_target(spec)
    assert (t.dst_address, t.port, t.version) == (host, port, version)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("collector.example:2055", "not an IPv4 or IPv6 address"), ("192.0.2.1:99999", "port 99999"),
     ("192.0.2.1/7", "version '7'"), ("192.0.2.1:abc", "port 'abc'"), ("[2001:db8::1:2055", "missing ']'")],
)
def test_bad_targets_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_target(spec)


def test_cli_flags_build_settings() -> None:
    args = build_parser().parse_args([
        "run", "--interface", "eth0", "--interface", "eth1", "--target", "192.0.2.1:9995/ipfix",
        "--target", "192.0.2.2", "--version", "5", "--active-flow-timeout", "1m",
        "--inactive-flow-timeout", "10s", "--cache-entries", "16k",
    ])
    s = settings_from_args(args)
    assert s.interfaces == ("eth0", "eth1")
    assert [t.describe() for t in s.targets] == ["192.0.2.1:9995/ipfix", "192.0.2.2:2055/5"]
    assert (s.active_flow_timeout_ns, s.inactive_flow_timeout_ns, s.cache_entries) == (60 * S, 10 * S, 16384)


def test_cli_bad_duration_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "--target", "127.0.0.1", "--active-flow-timeout", "30x"])
    assert exc.value.code == 2
    assert "active-flow-timeout" in capsys.readouterr().err


def test_cli_requires_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    """Settings without a target are valid (RouterOS allows them), but run refuses them: exit 2."""
    from pyflow import cli

    assert settings_from_args(build_parser().parse_args(["run"])).targets == ()
    assert cli.main(["run"]) == 2
    assert "no target" in capsys.readouterr().err


def test_target_options_use_routeros_names() -> None:
    t = parse_target("192.0.2.9:4739/ipfix,time=routeros,v9-template-refresh=5,v9-template-timeout=1m,"
                     "src-address=192.0.2.1")
    assert (t.time_mode, t.v9_template_refresh, t.v9_template_timeout_ns, t.src_address) == (
        "routeros", 5, 60 * S, "192.0.2.1")
    with pytest.raises(ConfigError, match="unknown option 'colour=red'"):
        parse_target("192.0.2.9,colour=red")
    with pytest.raises(ConfigError, match="time mode 'local'"):
        parse_target("192.0.2.9,time=local")
    with pytest.raises(ConfigError, match="different IP versions"):
        parse_target("192.0.2.9,src-address=2001:db8::1")


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The real CLI path as an unprivileged user: exit 3 and a message that says what to do.

    (In-process with the effective uid faked: running the venv as another user
    depends on the clone's directory permissions, which a test cannot rely on.)
    """
    from pyflow import cli

    monkeypatch.setattr("os.geteuid", lambda: 65534)
    rc = cli.main(["run", "--interface", "lo", "--target", "127.0.0.1/ipfix", "--metrics-address", ""])
    assert rc == 3
    assert "pyflow needs root" in capsys.readouterr().err


# --------------------------------------------------------------------------
# The settings tree: sampling, interface lists, bounds and types.
# --------------------------------------------------------------------------


def test_routeros_defaults_of_the_new_settings() -> None:
    s = Settings()
    assert (s.enabled, s.packet_sampling, s.sampling_interval, s.sampling_space) == (False, False, 0, 0)
    assert s.sampling == (0, 0) and s.interface_spec == ("all",) and s.disabled_targets == ()


@pytest.mark.parametrize(
    ("kwargs", "key", "message"),
    [({"packet_sampling": True}, "packet-sampling", "needs sampling-interval"),
     ({"packet_sampling": True, "sampling_interval": 0, "sampling_space": 3}, "sampling-space", "needs a sampling"),
     ({"packet_sampling": True, "sampling_interval": 2**31}, "sampling-interval", "outside 0..2147483647"),
     ({"packet_sampling": True, "sampling_interval": 1, "sampling_space": -1}, "sampling-space", "outside"),
     ({"packet_sampling": "yes"}, "packet-sampling", "is not yes or no"),
     ({"packet_sampling": True, "sampling_interval": True}, "sampling-interval", "not a whole number")],
)
def test_sampling_rules(kwargs: dict[str, object], key: str, message: str) -> None:
    from pyflow.config import SettingError

    with pytest.raises(SettingError, match=message) as exc:
        Settings(**kwargs)  # type: ignore[arg-type]
    assert exc.value.key == key


def test_sampling_as_routeros_means_it() -> None:
    s = Settings(packet_sampling=True, sampling_interval=10, sampling_space=90)
    assert s.sampling == (10, 90)
    assert Settings(packet_sampling=True, sampling_interval=100).sampling == (100, 0)  # one packet in 100


def test_interface_lists_expand_and_keep_what_was_written() -> None:
    from dataclasses import replace

    from pyflow.config import InterfaceList, SettingError

    lan = InterfaceList("lan", ("eth1", "eth2"))
    s = Settings(interfaces=("eth0", "lan", "eth1"), interface_lists=(lan,))
    assert s.interfaces == ("eth0", "eth1", "eth2") and s.interface_spec == ("eth0", "lan", "eth1")
    assert replace(s, cache_entries=4096).interface_spec == ("eth0", "lan", "eth1")  # same interfaces: same spec
    assert replace(s, interfaces=("eth9",)).interface_spec == ("eth9",)  # new interfaces: new spec
    assert Settings(interfaces=["eth0"]).interfaces == ("eth0",)  # a list is taken as a tuple
    with pytest.raises(SettingError, match="interface list lan is defined twice"):
        Settings(interface_lists=(lan, lan))
    with pytest.raises(SettingError, match="'none' has no meaning"):
        Settings(interfaces=("none",))
    with pytest.raises(SettingError, match="interfaces is empty"):
        Settings(interfaces=())
    with pytest.raises(SettingError, match="not a list of names"):
        Settings(interfaces="eth0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"cache_entries": 8}, "cache-entries 8 is outside 16..64M"),
     ({"cache_entries": 1 << 27}, "cache-entries 128M is outside"),
     ({"active_flow_timeout_ns": 400 * 86400 * S}, "active-flow-timeout 57w1d is too long"),
     ({"inactive_flow_timeout_ns": 5 * 10**7}, "inactive-flow-timeout 50ms is too short"),
     ({"sweep_interval_ns": 2 * 3600 * S}, "sweep-interval 2h is too long"),
     ({"sweep_interval_ns": 1.5}, "sweep-interval 1.5 is not a duration"),
     ({"enabled": 1}, "enabled 1 is not yes or no"),
     ({"xdp_mode": "turbo"}, "xdp-mode 'turbo'"),
     ({"as_file": ""}, "as-file '' is not a file name"),
     ({"targets": ("192.0.2.1",)}, "not a list of TargetSettings")],
)
def test_bounds_and_types(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_duplicate_targets_count_disabled_ones_and_address_spellings() -> None:
    with pytest.raises(ConfigError, match=r"target \[2001:db8::1\]:2055 is given twice \(targets 0 and 1\)"):
        Settings(targets=(TargetSettings("2001:db8::1"), TargetSettings("2001:0db8:0::1")))
    with pytest.raises(ConfigError, match="given twice"):
        Settings(targets=(TargetSettings("192.0.2.1"),), disabled_targets=(TargetSettings("192.0.2.1", 2055, "5"),))
    assert len(Settings(targets=(TargetSettings("192.0.2.1"), TargetSettings("192.0.2.1", 2056))).targets) == 2


def test_count_units() -> None:
    from pyflow.units import parse_count

    assert parse_count("20") == 20 and parse_count(0) == 0
    for bad in ("-1", "1.5", "2e3", "٣", True, 1.0, -1):
        with pytest.raises(ValueError):
            parse_count(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a size"):
        parse_size("\uff16\uff14k")  # full-width digits
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_ns([30])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not yes or no"):
        parse_bool(1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Help: a man page per command.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "sections"),
    [([], ["usage: pyflow", "commands:", "run ", "check ", "import-routeros ", "examples:", "exit status:"]),
     (["run"], ["usage: pyflow run", "--config FILE", "--routeros SCRIPT", "--packet-sampling yes|no",
                "--sampling-interval N", "--sampling-space M", "--map-interface", "config file (--config FILE",
                "[[target]]", "RouterOS script (--routeros FILE)", "examples:", "exit status:"]),
     (["check"], ["usage: pyflow check", "--config FILE", "/ip traffic-flow target", "needs no root",
                  "examples:", "exit status:"]),
     (["import-routeros"], ["usage: pyflow import-routeros", "SCRIPT", "--map-interface", "--ignore-other",
                            "address=IP:PORT", "never silently dropped", "examples:", "exit status:"])],
)
def test_help_reads_like_a_man_page(argv: list[str], sections: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from pyflow import cli

    assert cli.main([*argv, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for section in sections:
        assert " ".join(section.split()) in text, section


def test_every_settings_flag_is_documented_in_the_help() -> None:
    from pyflow.cli import RUN_EPILOG

    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {opt for action in run._actions for opt in action.option_strings if opt.startswith("--")}
    documented = {f for f in flags if f in run.format_help()}
    assert documented == flags
    for name in ("enabled", "interfaces", "cache-entries", "active-flow-timeout", "inactive-flow-timeout",
                 "packet-sampling", "sampling-interval", "sampling-space", "v9-template-refresh",
                 "v9-template-timeout", "sweep-interval", "metrics-address", "xdp-mode", "as-file"):
        assert name in RUN_EPILOG, name
