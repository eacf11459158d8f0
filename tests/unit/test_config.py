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


def test_cli_requires_a_target() -> None:
    args = build_parser().parse_args(["run"])
    with pytest.raises(ConfigError, match="no target"):
        settings_from_args(args)


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
