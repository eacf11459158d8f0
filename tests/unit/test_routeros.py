"""RouterOS scripts in (pyflow.routeros), through the real CLI; every guide example imports, checks and runs."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyflow import cli
from pyflow.config import Settings
from pyflow.configfile import read_toml_text
from pyflow.errors import ConfigError
from pyflow.routeros import parse_interface_map, parse_script, print_settings, split_commands

S = 10**9
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "routeros"
GUIDE = Path("/work/shared/reference/routeros-traffic-flow-guide.txt")


def settings_of(script: str, maps: dict[str, str] | None = None, ignore_other: bool = False) -> Settings:
    imported = parse_script(script, "test.rsc", maps, ignore_other)
    from pyflow.configfile import read_document

    layer = read_document(imported.doc, imported.locator)
    return cli.build_settings(layer, cli.build_parser().parse_args(["check"]))


# --------------------------------------------------------------------------
# Words and commands: continuations, comments, quoting.
# --------------------------------------------------------------------------


def test_words_lines_continuations_and_comments() -> None:
    text = ("# 2025-11-25 by RouterOS 7.15.3\n"
            "/ip traffic-flow\n"
            "set enabled=yes \\\n"
            "    cache-entries=16k   # not a comment: '#' only starts one at a word\n"
            "/ip traffic-flow target; add dst-address=192.0.2.1\n")
    cmds = split_commands(text.replace("   # not a comment: '#' only starts one at a word", ""), "t")
    assert [[w.text for w in c.words] for c in cmds] == [
        ["/ip", "traffic-flow"], ["set", "enabled=yes", "cache-entries=16k"],
        ["/ip", "traffic-flow", "target"], ["add", "dst-address=192.0.2.1"]]
    assert [c.line for c in cmds] == [2, 3, 5, 5]
    assert [w.line for w in cmds[1].words] == [3, 3, 4]  # a continued word keeps its own line
    # a comment after the words of a command
    cmds = split_commands("set enabled=yes # turn it on\n", "t")
    assert [w.text for w in cmds[0].words] == ["set", "enabled=yes"]


def test_quoted_values_and_escapes() -> None:
    cmds = split_commands('add comment="a \\"b\\" c\\_d\\\\e\\41" name=x\n', "t")
    words = cmds[0].words
    assert words[1].name == "comment" and words[1].value == 'a "b" c d\\eA'
    assert words[2].name == "name" and words[2].value == "x"
    # a quoted value continued on the next line
    cmds = split_commands('add comment="first \\\n    second"\n', "t")
    assert cmds[0].words[1].value == "first second"
    # ';' and '#' inside quotes are text
    cmds = split_commands('add comment="a;b #c"\n', "t")
    assert cmds[0].words[1].value == "a;b #c"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [('add comment="open\nset x=1\n', 1, "unterminated quote"),
     ('\n\nadd comment="open', 3, "unterminated quote"),
     ('add comment="bad \\q escape"\n', 1, "unknown escape \\q")],
)
def test_bad_quoting_names_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"t:{line}: {message}")):
        split_commands(text, "t")


# --------------------------------------------------------------------------
# Menus and properties.
# --------------------------------------------------------------------------


def test_all_menus_context_lines_and_relative_paths() -> None:
    s = settings_of(
        "/interface list\n"
        "add name=wan comment=\"uplinks\"\n"
        "add name=lan\n"
        "add name=both include=wan,lan exclude=dmz\n"
        "add name=dmz\n"
        "/interface list member\n"
        "add list=wan interface=ether1\n"
        "add interface=ether2 list=lan\n"
        "add interface=ether3 list=lan\n"
        "add interface=ether3 list=dmz\n"
        "/ip traffic-flow\n"
        "set enabled=yes interfaces=both,ether9 cache-entries=4k active-flow-timeout=1h30m \\\n"
        "    inactive-flow-timeout=00:00:20 packet-sampling=yes sampling-interval=2 sampling-space=8\n"
        "target add dst-address=192.0.2.1 version=IPFIX v9-template-refresh=5 v9-template-timeout=10m\n"
        "target\n"
        "add dst-address=2001:db8::2 port=9995 src-address=2001:db8::1 version=5 disabled=no\n"
        "add dst-address=192.0.2.3 disabled=yes comment=\"spare\"\n"
        "/ip/traffic-flow/ipfix set nat-events=yes ttl=no\n"
        "/ip traffic-flow ipfix print\n"
        "/ip traffic-flow print detail\n",
        maps={"ether9": "eth9"},
    )
    assert s.enabled
    assert s.interface_spec == ("both", "eth9")
    assert s.interfaces == ("ether1", "ether2", "eth9")  # both = wan + lan - dmz (ether3)
    assert (s.cache_entries, s.active_flow_timeout_ns, s.inactive_flow_timeout_ns) == (4096, 5400 * S, 20 * S)
    assert (s.packet_sampling, s.sampling_interval, s.sampling_space, s.sampling) == (True, 2, 8, (2, 8))
    assert [t.describe() for t in s.targets] == ["192.0.2.1:2055/ipfix", "[2001:db8::2]:9995/5"]
    assert (s.targets[0].v9_template_refresh, s.targets[0].v9_template_timeout_ns) == (5, 600 * S)
    assert s.targets[1].src_address == "2001:db8::1"
    assert [(t.dst_address, t.comment) for t in s.disabled_targets] == [("192.0.2.3", "spare")]
    assert "nat-events" in s.ipfix and "ttl" not in s.ipfix and "tos" in s.ipfix


def test_routeros6_address_syntax() -> None:
    s = settings_of("/ip traffic-flow target\nadd address=192.0.2.1:9996 version=9\n"
                    "add address=[2001:db8::1]:4739 version=ipfix\nadd address=192.0.2.5\n")
    assert [t.describe() for t in s.targets] == ["192.0.2.1:9996/9", "[2001:db8::1]:4739/ipfix", "192.0.2.5:2055/9"]


def test_later_set_wins_and_print_commands_change_nothing() -> None:
    s = settings_of("/ip traffic-flow set cache-entries=4k\n/ip traffic-flow print\n"
                    "/ip traffic-flow set cache-entries=8k enabled=yes\n/ip traffic-flow export\n")
    assert s.cache_entries == 8192 and s.enabled


def test_other_menus_are_errors_unless_ignored() -> None:
    script = "/ip firewall filter\nadd chain=input action=accept\n/ip traffic-flow set enabled=yes\n"
    with pytest.raises(ConfigError, match=r"test.rsc:2: /ip firewall filter add is not a traffic-flow setting"):
        parse_script(script, "test.rsc")
    imported = parse_script(script, "test.rsc", ignore_other=True)
    assert imported.warnings == ["test.rsc:2: skipped: /ip firewall filter add is not a traffic-flow setting"]
    assert imported.doc == {"traffic-flow": {"enabled": "yes"}}
    # typos in pyflow's own menus are errors even with ignore_other
    with pytest.raises(ConfigError, match=r"test.rsc:1: /ip traffic-flow targets: no such menu"):
        parse_script("/ip traffic-flow targets add dst-address=192.0.2.1\n", "test.rsc", ignore_other=True)


def test_interface_mapping() -> None:
    s = settings_of("/ip traffic-flow set interfaces=ether1,sfp-sfpplus1\n",
                    maps=parse_interface_map(["ether1=eth0", "sfp-sfpplus1=ens1f0"]))
    assert s.interfaces == ("eth0", "ens1f0")
    with pytest.raises(ConfigError, match="--map-interface ether7: no such interface in the script"):
        settings_of("/ip traffic-flow set interfaces=ether1\n", maps={"ether7": "eth0"})
    with pytest.raises(ConfigError, match=r"test.rsc:1: interface 'ether1 - WAN' is not a Linux interface name.*"
                                          r"--map-interface 'ether1 - WAN=LINUX-NAME'"):
        settings_of('/ip traffic-flow set interfaces="ether1 - WAN"\n')
    assert settings_of('/ip traffic-flow set interfaces="ether1 - WAN"\n',
                       maps={"ether1 - WAN": "eth0"}).interfaces == ("eth0",)
    with pytest.raises(ConfigError, match="expected ROUTEROS-NAME=LINUX-NAME"):
        parse_interface_map(["ether1"])
    with pytest.raises(ConfigError, match="not a Linux interface name"):
        parse_interface_map(["ether1=a/b"])


# --------------------------------------------------------------------------
# Every configuration example of the RouterOS guide.
# --------------------------------------------------------------------------


def _commands(text: str) -> list[str]:
    """Command lines of a script, continuations joined, white space collapsed, comments dropped."""
    out: list[str] = []
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(" ".join(line.split()))
    return out


def guide_examples() -> list[list[str]]:
    """The configuration blocks of the guide ("Terminal window" then RouterOS lines)."""
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != "Terminal window":
            continue
        block: list[str] = []
        for nxt in lines[i + 1:]:
            if not (nxt.startswith(("/", "add ", "set ", "#")) or (block and block[-1].endswith("\\"))):
                break
            block.append(nxt)
        commands = _commands("\n".join(block))
        if any(not c.endswith(" print") for c in commands):  # a block of print commands only configures nothing
            blocks.append(commands)
    return blocks


def test_every_guide_example_is_in_examples() -> None:
    """Each configuration block of the guide is, command for command, in one examples/routeros/*.rsc
    (a <placeholder> address stands for any address there)."""
    examples = {p.name: _commands(p.read_text()) for p in sorted(EXAMPLES.glob("*.rsc"))}
    blocks = guide_examples()
    assert len(blocks) == 11
    for block in blocks:
        patterns = [re.compile(r"\S+".join(re.escape(part) for part in re.split(r"<[a-z-]+>", c)) + r"\Z")
                    for c in block]
        found = [name for name, cmds in examples.items()
                 if any(all(p.match(c) for p, c in zip(patterns, cmds[k:k + len(block)], strict=False))
                        and len(cmds[k:k + len(block)]) == len(block) for k in range(len(cmds)))]
        assert found, f"the guide's example {block} is in no examples/routeros/*.rsc"


EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.glob("*.rsc"))
MAPS = {"interface-list.rsc": ["--map-interface", "ether1=eth0,bridge=br0"],
        "export-v7.rsc": ["--map-interface", "ether1=eth0", "--map-interface", "ether2=eth1,ether5=eth5"]}


def test_examples_cover_the_guide() -> None:
    assert {"step1-enable.rsc", "step2-target.rsc", "multiple-targets.rsc", "step3-ipfix-fields.rsc", "ntopng.rsc",
            "elastiflow.rsc", "nfdump.rsc", "pmacct.rsc", "elk.rsc", "interface-list.rsc",
            "complete.rsc"} <= set(EXAMPLE_FILES)


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_imports_checks_and_round_trips(name: str, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    """import-routeros prints TOML; check --config of it prints exactly what check --routeros prints."""
    script = str(EXAMPLES / name)
    maps = MAPS.get(name, [])
    assert cli.main(["import-routeros", script, *maps]) == 0
    toml_text = capsys.readouterr().out
    assert toml_text.startswith("# pyflow settings from the RouterOS script")
    toml_file = tmp_path / "imported.toml"
    toml_file.write_text(toml_text)
    assert cli.main(["check", "--routeros", script, *maps]) == 0
    from_script = capsys.readouterr().out
    assert cli.main(["check", "--config", str(toml_file)]) == 0
    assert capsys.readouterr().out == from_script
    assert from_script.startswith("/ip traffic-flow print\n")
    # and the two settings trees are equal
    direct = cli.load_settings(cli.build_parser().parse_args(["check", "--routeros", script, *maps])).settings
    assert read_toml_text(toml_text, "imported.toml") and direct == cli.settings_from_args(
        cli.build_parser().parse_args(["check", "--config", str(toml_file)]))


@pytest.fixture
def fake_meter(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """pyflow.runner.run_meter replaced: records the settings run would meter with; no kernel."""
    import pyflow.runner

    seen: list[Settings] = []

    def run_meter(settings: Settings, stop: threading.Event, log: Callable[[str], None],
                  reload: threading.Event | None = None,
                  load_settings: Callable[[], Settings] | None = None,
                  status: Callable[[str], None] | None = None) -> None:
        seen.append(settings)
        assert reload is not None and load_settings is not None  # SIGHUP re-reads the script

    monkeypatch.setattr(pyflow.runner, "run_meter", run_meter)
    monkeypatch.setattr("signal.signal", lambda *_a: None)
    return seen


GUIDE_RUNS: dict[str, tuple[list[str], dict[str, Any]]] = {
    # example: (flags a snippet needs to run, what run_meter gets)
    "step1-enable.rsc": (["--target", "127.0.0.1"], {"interfaces": ("all",), "targets": ["127.0.0.1:2055/9"]}),
    "step2-target.rsc": (["--enabled", "yes"], {"targets": ["192.0.2.50:2055/ipfix"]}),
    "multiple-targets.rsc": (["--enabled", "yes"], {"targets": ["192.0.2.60:2055/ipfix", "192.0.2.70:9995/9"]}),
    "step3-ipfix-fields.rsc": (["--enabled", "yes", "--target", "127.0.0.1/ipfix"], {"nat-events": True}),
    "ntopng.rsc": (["--enabled", "yes"], {"targets": ["192.0.2.10:2055/ipfix"]}),
    "elastiflow.rsc": (["--enabled", "yes"], {"targets": ["192.0.2.11:2055/ipfix"]}),
    "nfdump.rsc": (["--enabled", "yes"], {"targets": ["192.0.2.12:9995/5"]}),
    "pmacct.rsc": (["--enabled", "yes"], {"targets": ["192.0.2.13:2055/ipfix"]}),
    "elk.rsc": ([], {"cache_entries": 4096, "active_flow_timeout_ns": 60 * S, "targets": ["192.0.2.14:2055/ipfix"]}),
    "interface-list.rsc": (["--target", "127.0.0.1", "--map-interface", "ether1=eth0,bridge=br0"],
                           {"interfaces": ("eth0", "br0"), "interface_spec": ("flow-interfaces",)}),
    "complete.rsc": ([], {"cache_entries": 16384, "targets": ["192.0.2.50:2055/ipfix", "192.0.2.51:9995/5"]}),
    "routeros6.rsc": ([], {"active_flow_timeout_ns": 5400 * S, "targets": ["192.0.2.50:2055/9"]}),
}


@pytest.mark.parametrize("name", sorted(GUIDE_RUNS))
def test_example_runs(name: str, fake_meter: list[Settings]) -> None:
    """pyflow run --routeros EXAMPLE reaches the meter with the example's settings."""
    flags, expected = GUIDE_RUNS[name]
    assert cli.main(["run", "--routeros", str(EXAMPLES / name), "--metrics-address", "", *flags]) == 0
    (s,) = fake_meter
    assert s.enabled
    for key, value in expected.items():
        if key == "targets":
            assert [t.describe() for t in s.targets] == value
        elif key == "nat-events":
            assert ("nat-events" in s.ipfix) is value
        else:
            assert getattr(s, key) == value, key


def test_snippets_without_enabled_or_target_do_not_run(fake_meter: list[Settings],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--routeros", str(EXAMPLES / "step2-target.rsc")]) == 2
    err = capsys.readouterr().err
    assert "traffic-flow is disabled" in err and "enabled=yes" in err and "--enabled yes" in err
    assert cli.main(["run", "--routeros", str(EXAMPLES / "step1-enable.rsc")]) == 2
    assert "no target" in capsys.readouterr().err
    assert fake_meter == []


def test_stdin_script(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("/ip traffic-flow set enabled=yes\n/system identity set name=x\n"))
    assert cli.main(["import-routeros", "--ignore-other", "-"]) == 0
    out, err = capsys.readouterr()
    assert '[traffic-flow]  # /ip traffic-flow\nenabled = "yes"\n' in out
    assert "# warning: <stdin>:2: skipped: /system identity set" in out
    assert "<stdin>:2: skipped" in err


# --------------------------------------------------------------------------
# Printing as RouterOS does.
# --------------------------------------------------------------------------


def test_print_like_routeros() -> None:
    s = settings_of("/interface list add name=up\n/interface list member add list=up interface=eth1\n"
                    "/ip traffic-flow set enabled=yes interfaces=up cache-entries=16k\n"
                    "/ip traffic-flow target\nadd dst-address=192.0.2.1 version=ipfix comment=main\n"
                    "add dst-address=192.0.2.2 port=9995 version=5 disabled=yes\n"
                    "/ip traffic-flow ipfix set ttl=no\n")
    text = print_settings(s)
    assert text.startswith(
        "/ip traffic-flow print\n"
        "              enabled: yes\n"
        "           interfaces: up\n"
        "        cache-entries: 16k\n"
        "  active-flow-timeout: 30m\n"
        "inactive-flow-timeout: 15s\n"
        "      packet-sampling: no\n"
        "    sampling-interval: 0\n"
        "       sampling-space: 0\n"
        "\n"
        "/ip traffic-flow target print\n"
        "Flags: X - DISABLED\n"
        "Columns: SRC-ADDRESS, DST-ADDRESS, PORT, VERSION, V9-TEMPLATE-REFRESH, V9-TEMPLATE-TIMEOUT, TIME, "
        "MAX-RATE, INTERFACE-NAMES, SEQUENCE\n"
        "#   SRC-ADDRESS  DST-ADDRESS  PORT  VERSION  V9-TEMPLATE-REFRESH  V9-TEMPLATE-TIMEOUT  TIME      MAX-RATE  "
        "INTERFACE-NAMES  SEQUENCE\n"
        "  ;;; main\n"
        "0   0.0.0.0      192.0.2.1    2055  IPFIX    20                   30m                  absolute  100000    "
        "no               flows\n"
        "1 X 0.0.0.0      192.0.2.2    9995  5        20                   30m                  absolute  100000    "
        "no               flows\n"
        "\n"
        "/ip traffic-flow ipfix print\n")
    assert "\n             ttl: no\n" in text and "\n      nat-events: no\n" in text
    assert "/interface list member print\nColumns: LIST, INTERFACE\n# LIST  INTERFACE\n0 up    eth1\n" in text
    assert text.endswith("# INTERFACE  DIRECTION  HOOK\n0 eth1       ingress    auto\n")
