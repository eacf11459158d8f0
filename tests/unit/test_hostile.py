"""Hostile input: every setting source (flags, TOML, RouterOS script, AS file) and the collector decoder.

Each settings row must exit 2 from ``pyflow check`` (and from ``pyflow run``, which must not get near
the kernel) with one error line that names the key and, where there is a file, FILE:LINE; never a
traceback, never a control character of the input on the terminal, never a hang (FIFOs, devices) or
unbounded reading (files are read with a size cap).  Each collector row feeds datagrams an attacker
could send and checks that the decoder's state stays within its caps, says so (a counted warning),
and never prints a control character.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tracemalloc
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflow import cli, collect
from pyflow.collect import TemplateCache, decode, format_record
from tests.unit.test_bad_config import no_kernel  # noqa: F401 -- the fixture: traps on the kernel side

BIG = "9" * 400  # a 400-digit number: float() gives inf, int(inf) raised OverflowError
HUGE = "9" * 5000  # more digits than int() converts (4300): ValueError
ESC = "\x1b[2J\x1b[31m"  # clear the screen, red


@dataclass(frozen=True)
class Row:
    id: str
    source: str  # "flags", "toml", "rsc", "as" (an --as-file), "stdin" (--routeros -)
    words: tuple[str, ...]  # what the message must name: the key, "{path}:LINE", ...
    text: str = ""  # the file's content
    flags: tuple[str, ...] = ()  # more flags ("{path}" is the file)
    run: bool = True  # also through `pyflow run` (the AS file is read by the runner, after the settings)


T = ("--target", "127.0.0.1")
TF = "[traffic-flow]\n"
T1 = '[[target]]\ndst-address = "192.0.2.1"\n'
RSC_TARGET = "/ip traffic-flow target\n"


def _include_chain(n: int) -> str:
    """n interface lists, each including the next: include depth n."""
    lines = ["/interface list member", "add list=l0 interface=eth0", "/interface list"]
    lines += [f"add name=l{i}" + (f" include=l{i + 1}" if i + 1 < n else "") for i in range(n)]
    return "\n".join(lines) + "\n"


ROWS = [
    # --- flags --------------------------------------------------------------------------------------
    Row("flag-duration-400-digits", "flags", ("active-flow-timeout", "digits"),
        flags=(*T, "--active-flow-timeout", BIG + "s")),
    Row("flag-duration-400-digit-seconds", "flags", ("inactive-flow-timeout", "digits"),
        flags=(*T, "--inactive-flow-timeout", BIG)),
    Row("flag-duration-400-digit-clock", "flags", ("sweep-interval", "digits"),
        flags=(*T, "--sweep-interval", f"{BIG}:00:00")),
    Row("flag-size-5000-digits", "flags", ("cache-entries", "digits"), flags=(*T, "--cache-entries", HUGE)),
    Row("flag-count-5000-digits", "flags", ("sampling-interval", "digits"),
        flags=(*T, "--sampling-interval", HUGE)),
    Row("flag-target-port-5000-digits", "flags", ("--target", "port", "digits"),
        flags=("--target", "127.0.0.1:" + HUGE)),
    Row("flag-target-option-5000-digits", "flags", ("--target", "v9-template-refresh", "digits"),
        flags=("--target", "127.0.0.1,v9-template-refresh=" + HUGE)),
    Row("flag-template-timeout-400-digits", "flags", ("v9-template-timeout", "digits"),
        flags=(*T, "--v9-template-timeout", BIG + "d")),
    Row("flag-interface-escape", "flags", ("--interface", "interface name", "\\x1b"),
        flags=(*T, "--interface", "e" + ESC)),
    Row("flag-interface-newline", "flags", ("--interface", "interface name", "\\n"),
        flags=(*T, "--interface", "eth0\nfake: line")),
    Row("flag-interface-del", "flags", ("--interface", "interface name"), flags=(*T, "--interface", "eth\x7f")),
    Row("flag-interface-c1", "flags", ("--interface", "interface name"), flags=(*T, "--interface", "eth\x9b31m")),
    Row("flag-interface-non-ascii", "flags", ("--interface", "printable ASCII"), flags=(*T, "--interface", "ethé")),
    Row("flag-interface-16-bytes", "flags", ("--interface", "1-15"), flags=(*T, "--interface", "a" * 16)),
    Row("flag-interface-colon", "flags", ("--interface", "':'"), flags=(*T, "--interface", "eth0:1")),
    Row("flag-map-interface-escape", "rsc", ("--map-interface", "\\x1b"),
        text=RSC_TARGET + "add dst-address=192.0.2.1\n", flags=("--map-interface", "ether1=e" + ESC)),
    Row("flag-config-dev-zero", "flags", ("/dev/zero", "not a regular file"), flags=("--config", "/dev/zero")),
    Row("flag-routeros-dev-zero", "flags", ("/dev/zero", "not a regular file"), flags=("--routeros", "/dev/zero")),
    Row("flag-config-directory", "flags", ("/", "not a regular file"), flags=("--config", "/")),
    # --- TOML -----------------------------------------------------------------------------------------
    Row("toml-duration-400-digits", "toml", ("{path}:2:", "active-flow-timeout", "digits"),
        TF + f'active-flow-timeout = "{BIG}s"\n'),
    Row("toml-duration-400-digit-fraction", "toml", ("{path}:2:", "inactive-flow-timeout", "digits"),
        TF + f'inactive-flow-timeout = "1.{BIG}s"\n'),
    Row("toml-integer-5000-digits", "toml", ("{path}:2:", "cache-entries", "digits"), TF + f"cache-entries = {HUGE}\n"),
    Row("toml-size-5000-digits", "toml", ("{path}:2:", "cache-entries", "digits"), TF + f'cache-entries = "{HUGE}"\n'),
    Row("toml-port-400-digits", "toml", ("{path}:3:", "port"), T1 + f"port = {BIG}\n"),
    Row("toml-arrays-5000-deep", "toml", ("{path}:2:", "cache-entries", "nested"),
        TF + "cache-entries = " + "[" * 5000 + "]" * 5000 + "\n"),
    Row("toml-inline-tables-5000-deep", "toml", ("{path}:2:", "interfaces", "nested"),
        TF + "interfaces = " + "{a=" * 5000 + "1" + "}" * 5000 + "\n"),
    Row("toml-dotted-key-10000-parts", "toml", ("{path}:1:", "key", "parts"), "a" + ".a" * 10000 + " = 1\n"),
    Row("toml-dotted-header-10000-parts", "toml", ("{path}:1:", "key", "parts"), "[" + "a." * 10000 + "a]\n"),
    Row("toml-too-big", "toml", ("{path}", "larger than", "1M"), TF + "# padding\n" * 110_000),
    Row("toml-interface-escape", "toml", ("{path}:2:", "interfaces", "\\x1b"),
        TF + 'interfaces = ["e\\u001b[2J"]\n'),
    Row("toml-interface-table-colon", "toml", ("{path}:2:", "name", "':'"), '[[interface]]\nname = "eth0:1"\n'),
    Row("toml-list-member-escape", "toml", ("{path}:2:", "interface list", "\\x1b"),
        '[interface-list]\nlan = ["eth0", "e\\u001b[2J"]\n'),
    Row("toml-list-name-escape", "toml", ("{path}:2:", "interface list name", "\\x1b"),
        '[interface-list]\n"l\\u001b[2J" = ["eth0"]\n'),
    Row("toml-unknown-key-escape", "toml", ("{path}:2:", "unknown key", "\\x1b"),
        TF + '"col\\u001b[2Jour" = 1\n'),
    # --- RouterOS script --------------------------------------------------------------------------------
    Row("rsc-port-5000-digits", "rsc", ("{path}:2:", "port", "digits"),
        RSC_TARGET + f"add dst-address=192.0.2.1 port={HUGE}\n"),
    Row("rsc-address-port-5000-digits", "rsc", ("{path}:2:", "port", "digits"),
        RSC_TARGET + f"add address=192.0.2.1:{HUGE}\n"),
    Row("rsc-sampling-5000-digits", "rsc", ("{path}:1:", "sampling-interval", "digits"),
        f"/ip traffic-flow set packet-sampling=yes sampling-interval={HUGE}\n"),
    Row("rsc-duration-400-digits", "rsc", ("{path}:1:", "active-flow-timeout", "digits"),
        f"/ip traffic-flow set active-flow-timeout={BIG}w\n"),
    Row("rsc-include-5000-deep", "rsc", ("include", "deep"), _include_chain(5000)),
    Row("rsc-interface-hex-escape", "rsc", ("{path}:1:", "interface", "\\x1b"),
        '/ip traffic-flow set interfaces="e\\1B[2J"\n'),
    Row("rsc-menu-escape", "rsc", ("{path}:1:", "\\x1b"), f"/ip{ESC} traffic-flow set enabled=yes\n"),
    Row("rsc-too-big", "rsc", ("{path}", "larger than", "4M"), "# padding " + "x" * 100 + "\n" * (4 << 20)),
    Row("stdin-too-big", "stdin", ("<stdin>", "larger than", "4M"), "#" * ((4 << 20) + 1)),
    # --- AS file ----------------------------------------------------------------------------------------
    Row("as-bad-line", "as", ("as-file", "{path}:2:", "expected 'PREFIX AS'"), "192.0.2.0/24 64500\nbad\n",
        run=False),
    Row("as-number-5000-digits", "as", ("as-file", "{path}:1:", "AS number", "digits"), f"192.0.2.0/24 {HUGE}\n",
        run=False),
    Row("as-escape", "as", ("as-file", "{path}:1:", "\\x1b"), f"192.0.2.0/24 AS{ESC}\n", run=False),
    Row("as-not-utf8", "as", ("as-file", "{path}", "not UTF-8"), "192.0.2.0/24 64500 # caf\udce9\n", run=False),
    Row("as-dev-zero", "flags", ("as-file", "/dev/zero", "not a regular file"), flags=(*T, "--as-file", "/dev/zero"),
        run=False),
    Row("as-missing", "flags", ("as-file", "/nonexistent/as.txt", "cannot read"),
        flags=(*T, "--as-file", "/nonexistent/as.txt"), run=False),
]


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


def _argv(row: Row, path: Path) -> list[str]:
    flags = [f.replace("{path}", str(path)) for f in row.flags]
    if row.source == "toml":
        return ["--config", str(path), *flags]
    if row.source == "rsc":
        return ["--routeros", str(path), *flags]
    if row.source == "stdin":
        return ["--routeros", "-", *flags]
    if row.source == "as":
        return [*T, "--as-file", str(path), *flags]
    return flags


def _control_characters(text: str) -> list[str]:
    """C0 (but the newline that ends a line), DEL and C1 characters in ``text``."""
    return [c for c in text if unicodedata.category(c) == "Cc" and c != "\n"]


def test_there_is_a_row_for_every_source() -> None:
    assert {r.source for r in ROWS} == {"flags", "toml", "rsc", "as", "stdin"}
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
@pytest.mark.parametrize("command", ["check", "run"])
def test_hostile_setting_exits_2_naming_the_key(row: Row, command: str, tmp_path: Path, no_kernel: list[str],  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if command == "run" and not row.run:
        pytest.skip("the AS file is read by the runner")
    path = tmp_path / {"toml": "bad.toml", "rsc": "bad.rsc", "as": "as.txt"}.get(row.source, "unused")
    if row.source in ("toml", "rsc", "as"):
        _write(path, row.text)
    if row.source == "stdin":
        monkeypatch.setattr(sys, "stdin", io.StringIO(row.text))
    rc = cli.main([command, *_argv(row, path)])
    out, err = capsys.readouterr()
    assert rc == 2, err[-2000:]
    assert no_kernel == []
    assert out == ""
    assert "Traceback" not in err
    assert _control_characters(err) == [], err
    # one error line; a flag value argparse refuses comes after argparse's usage lines, as always
    error = err.splitlines()[-1]
    ours = err.startswith("pyflow: error: ") and err.count("\n") == 1
    assert ours or error.startswith(f"pyflow {command}: error: "), err
    assert len(error) < 2000, f"{len(error)} characters: {error[:300]}"  # long values are cut, not echoed whole
    err = error
    for word in row.words:
        assert word.replace("{path}", str(path)) in err, err


def _cli(*argv: str, timeout: float = 60, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-m", "pyflow.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=stdin)


@pytest.mark.parametrize("option", ["--config", "--routeros", "--as-file"])
def test_a_fifo_is_refused_without_blocking(option: str, tmp_path: Path) -> None:
    """A FIFO nobody writes to: opened non-blocking, refused as not a regular file (a real process, so a
    hang fails the test by its timeout instead of stopping the test run)."""
    fifo = tmp_path / "settings"
    os.mkfifo(fifo)
    extra = ["--target", "127.0.0.1"] if option == "--as-file" else []
    done = _cli("check", option, str(fifo), *extra, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{fifo}: not a regular file" in done.stderr, done.stderr


def test_dev_zero_is_refused_quickly() -> None:
    done = _cli("check", "--config", "/dev/zero", timeout=30)
    assert done.returncode == 2 and "/dev/zero: not a regular file" in done.stderr, done.stderr


def test_a_file_just_over_the_cap_is_refused_and_one_at_it_is_read(tmp_path: Path) -> None:
    from pyflow import files

    ok = tmp_path / "ok.toml"
    text = TF + 'enabled = "yes"\n'
    ok.write_text(text + "#" * (files.MAX_CONFIG_BYTES - len(text) - 1) + "\n")
    assert ok.stat().st_size == files.MAX_CONFIG_BYTES
    assert files.read_text(ok, "the config file", files.MAX_CONFIG_BYTES).startswith(TF)
    with ok.open("a") as f:
        f.write("#")
    with pytest.raises(files.ConfigError, match=r"larger than 1M"):
        files.read_text(ok, "the config file", files.MAX_CONFIG_BYTES)


def test_check_loads_the_as_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "as.txt"
    good.write_text("192.0.2.0/24 64500\n2001:db8::/32 AS64501\n")
    assert cli.main(["check", *T, "--as-file", str(good)]) == 0
    assert f"as-file: {good} (2 prefixes)" in capsys.readouterr().out


def test_the_as_file_cap_is_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pyflow import files

    monkeypatch.setattr(files, "MAX_AS_FILE_BYTES", 1000)
    big = tmp_path / "as.txt"
    big.write_text("192.0.2.0/24 64500\n" * 100)
    assert cli.main(["check", *T, "--as-file", str(big)]) == 2
    err = capsys.readouterr().err
    assert "as-file" in err and f"{big}: larger than" in err, err


def test_control_characters_in_check_output_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Values that may hold anything (a target's comment, paths) are printed with control characters escaped."""
    path = tmp_path / "c.toml"
    path.write_text(T1 + 'comment = "a\\u001b[2J\\u001b[31mb\\nc"\n[pyflow]\ncontrol-socket = "/run/x\\u009b31m"\n')
    assert cli.main(["check", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert _control_characters(out) == [] and _control_characters(err) == []
    assert "a\\x1b[2J\\x1b[31mb\\nc" in out and "/run/x\\x9b31m" in out


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_duration_text_is_a_value_or_a_value_error(text: str) -> None:
    from pyflow.units import parse_count, parse_duration_ns, parse_size

    for parse in (parse_duration_ns, parse_size, parse_count):
        try:
            value = parse(text)
        except ValueError as exc:
            assert _control_characters(str(exc)) == []
        else:
            assert isinstance(value, int) and value >= 0


@given(st.integers(min_value=1, max_value=6000), st.sampled_from(["", "s", "ms", "w", ".5s", ":00:00"]))
@settings(max_examples=60, deadline=None)
def test_long_numbers_are_refused_before_conversion(digits: int, unit: str) -> None:
    from pyflow.units import MAX_DIGITS, parse_duration_ns

    text = "9" * digits + unit
    if digits > MAX_DIGITS:
        with pytest.raises(ValueError, match="digits"):
            parse_duration_ns(text)
    else:
        assert parse_duration_ns(text) > 0


# ----------------------------------------------------------------------------------------------------
# The collector's decoder
# ----------------------------------------------------------------------------------------------------

EXPORTER = ("192.0.2.9", 40000)


def ipfix_message(domain: int, *sets: bytes) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), 1_700_000_000, 0, domain) + body


def ipfix_set(set_id: int, body: bytes) -> bytes:
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def template_record(template_id: int, n_fields: int, length: int = 4) -> bytes:
    return struct.pack("!HH", template_id, n_fields) + struct.pack("!HH", 1, length) * n_fields


def big_template_datagram(domain: int) -> bytes:
    """~64 KB of templates: 63 templates of 256 fields (or, past the cap, one of 16,000)."""
    records = b"".join(template_record(256 + i, 256) for i in range(63))
    return ipfix_message(domain, ipfix_set(2, records))


@dataclass(frozen=True)
class CollectRow:
    id: str
    datagrams: Callable[[], list[tuple[bytes, tuple[str, int]]]]
    warning: str  # a problem that must be reported (counted)


def _many_domains() -> list[tuple[bytes, tuple[str, int]]]:
    return [(big_template_datagram(d), EXPORTER) for d in range(60)]


def _many_exporters() -> list[tuple[bytes, tuple[str, int]]]:
    one = ipfix_message(1, ipfix_set(2, template_record(256, 2)))
    return [(one, (f"10.{i >> 8 & 255}.{i & 255}.1", 4739)) for i in range(2000)]


def _fat_template() -> list[tuple[bytes, tuple[str, int]]]:
    return [(ipfix_message(1, ipfix_set(2, template_record(256, 16000))), EXPORTER)]


def _held_then_template() -> list[tuple[bytes, tuple[str, int]]]:
    """17 data sets of 64 KB held for template 256 (1-byte records), then the template: ~1M records."""
    data = ipfix_message(1, ipfix_set(256, b"\x01" * 65000))
    return [(data, EXPORTER)] * 17 + [(ipfix_message(1, ipfix_set(2, template_record(256, 1, 1))), EXPORTER)]


def _held_everywhere() -> list[tuple[bytes, tuple[str, int]]]:
    """Held data from many domains: the total held stays capped, not only each stream's."""
    return [(ipfix_message(d, ipfix_set(256 + i, b"\x00" * 60000)), EXPORTER) for d in range(40) for i in range(4)]


def _one_datagram_of_tiny_records() -> list[tuple[bytes, tuple[str, int]]]:
    template = ipfix_message(1, ipfix_set(2, template_record(256, 1, 1)))
    return [(template, EXPORTER), (ipfix_message(1, ipfix_set(256, b"\x01" * 65000)), EXPORTER)]


COLLECT_ROWS = [
    CollectRow("60-template-datagrams-new-domains", _many_domains, "evicted"),
    CollectRow("2000-exporters", _many_exporters, "evicted"),
    CollectRow("template-of-16000-fields", _fat_template, "fields"),
    CollectRow("17-held-sets-then-template", _held_then_template, "dropped"),
    CollectRow("held-data-in-many-domains", _held_everywhere, "dropped"),
    CollectRow("65000-records-in-one-datagram", _one_datagram_of_tiny_records, "records"),
]


def assert_within_caps(cache: TemplateCache) -> None:
    assert cache.template_count() <= collect.MAX_TEMPLATES
    assert cache.field_count() <= collect.MAX_TEMPLATES * collect.MAX_TEMPLATE_FIELDS
    assert all(len(t.fields) <= collect.MAX_TEMPLATE_FIELDS for t in cache.templates.values())
    assert cache.stream_count() <= collect.MAX_STREAMS
    assert cache.held_bytes() <= collect.MAX_HELD_BYTES_TOTAL
    assert all(len(q) <= collect.MAX_HELD_SETS for q in cache.held.values())


@pytest.mark.parametrize("row", COLLECT_ROWS, ids=[r.id for r in COLLECT_ROWS])
def test_hostile_datagrams_stay_within_the_caps(row: CollectRow) -> None:
    cache = TemplateCache()
    datagrams = row.datagrams()
    tracemalloc.start()
    try:
        problems: list[str] = []
        most_records = 0
        for data, exporter in datagrams:
            out = decode(data, exporter, cache)
            most_records = max(most_records, len(out.records))
            problems += out.problems
            assert_within_caps(cache)
            del out
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert most_records <= collect.MAX_RECORDS
    assert peak < 48 << 20, f"peak {peak >> 20} MiB"
    counted = [p for p in problems if row.warning in p]
    assert counted, problems[-5:]
    assert any(ch.isdigit() for ch in counted[-1])  # the warning says how many


def test_the_least_recently_used_template_goes_first() -> None:
    cache = TemplateCache()
    for i in range(collect.MAX_TEMPLATES):
        decode(ipfix_message(0, ipfix_set(2, template_record(256 + i, 1))), EXPORTER, cache)
    used = ipfix_message(0, ipfix_set(256, b"\x00\x00\x00\x07"))
    assert len(decode(used, EXPORTER, cache).records) == 1  # template 256 is now the most recently used
    out = decode(ipfix_message(0, ipfix_set(2, template_record(256 + collect.MAX_TEMPLATES, 1))), EXPORTER, cache)
    assert "evicted 1 least recently used template (at most 1024 templates in all; 1 evicted so far)" in out.problems
    assert len(decode(used, EXPORTER, cache).records) == 1  # still there
    gone = decode(ipfix_message(0, ipfix_set(257, b"\x00\x00\x00\x07")), EXPORTER, cache)
    assert gone.records == [] and any("held" in p for p in gone.problems)  # 257 went


def test_the_least_recently_used_stream_goes_first() -> None:
    cache = TemplateCache()
    for d in range(collect.MAX_STREAMS):
        decode(ipfix_message(d, ipfix_set(2, template_record(256, 1))), EXPORTER, cache)
    used = ipfix_message(0, ipfix_set(256, b"\x00\x00\x00\x07"))
    assert len(decode(used, EXPORTER, cache).records) == 1
    out = decode(ipfix_message(collect.MAX_STREAMS, ipfix_set(2, template_record(256, 1))), EXPORTER, cache)
    assert any(p.startswith("evicted 1 least recently used stream (at most 256 exporter streams") for p in out.problems)
    assert cache.stream_count() == collect.MAX_STREAMS and cache.template_count() == collect.MAX_STREAMS
    assert len(decode(used, EXPORTER, cache).records) == 1
    gone = decode(ipfix_message(1, ipfix_set(256, b"\x00\x00\x00\x07")), EXPORTER, cache)
    assert gone.records == []  # domain 1 went, its template with it


def test_strings_from_the_wire_are_printed_escaped() -> None:
    """An interface name in an options record carries terminal escapes and a newline: shown escaped."""
    hostile = ("e" + ESC + "\nfake 10.0.0.1:1 -> 10.0.0.2:2\x7f\x85\x9b").encode()
    template = struct.pack("!HHH", 300, 2, 1) + struct.pack("!HH", 10, 4) + struct.pack("!HH", 82, 0xFFFF)
    record = struct.pack("!I", 3) + bytes([len(hostile)]) + hostile
    cache = TemplateCache()
    out = decode(ipfix_message(1, ipfix_set(3, template), ipfix_set(300, record)), EXPORTER, cache)
    [rec] = out.records
    line = format_record(rec)
    assert _control_characters(line) == [] and "\n" not in line, repr(line)
    assert "\\x1b[2J\\x1b[31m" in line and "\\n" in line and "\\x7f" in line and "\\x9b" in line


@st.composite
def hostile_streams(draw: st.DrawFn) -> list[tuple[bytes, tuple[str, int]]]:
    """Datagrams from a few exporters and domains: templates with many fields, data sets, garbage."""
    out = []
    for _ in range(draw(st.integers(1, 12))):
        domain = draw(st.integers(0, 3))
        exporter = (f"10.0.0.{draw(st.integers(1, 3))}", 4739)
        kind = draw(st.sampled_from(["template", "data", "raw"]))
        if kind == "template":
            tid = draw(st.integers(256, 260))
            n = draw(st.integers(1, 600))
            body = template_record(tid, n, draw(st.sampled_from([1, 2, 4, 0xFFFF])))
            out.append((ipfix_message(domain, ipfix_set(2, body)), exporter))
        elif kind == "data":
            tid = draw(st.integers(256, 260))
            out.append((ipfix_message(domain, ipfix_set(tid, draw(st.binary(max_size=3000)))), exporter))
        else:
            out.append((draw(st.binary(max_size=200)), exporter))
    return out


@given(hostile_streams())
@settings(max_examples=150, deadline=None)
def test_any_datagrams_keep_the_decoder_within_its_caps(stream: list[tuple[bytes, tuple[str, int]]]) -> None:
    cache = TemplateCache()
    for data, exporter in stream:
        out = decode(data, exporter, cache)  # never raises
        assert len(out.records) <= collect.MAX_RECORDS
        for rec in out.records:
            assert _control_characters(format_record(rec)) == []
        assert_within_caps(cache)


@given(st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_raise_and_stay_within_caps(data: bytes) -> None:
    cache = TemplateCache()
    for version in (b"\x00\x09", b"\x00\x0a", b""):
        out = decode(version + data, EXPORTER, cache)
        for rec in out.records:
            assert _control_characters(format_record(rec)) == []
    assert_within_caps(cache)


def test_include_depth_is_limited_whatever_the_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Lists added deepest first are resolved without recursion, and the chain is still refused."""
    from pyflow.routeros import MAX_INCLUDE_DEPTH

    def chain(n: int) -> str:
        lines = ["/interface list"] + [f"add name=l{i}" + (f" include=l{i + 1}" if i + 1 < n else "")
                                       for i in reversed(range(n))]
        return "\n".join([*lines, "/interface list member", "add list=l0 interface=eth0",
                          "/ip traffic-flow set interfaces=l0"]) + "\n"

    path = tmp_path / "lists.rsc"
    path.write_text(chain(MAX_INCLUDE_DEPTH + 1))
    assert cli.main(["check", "--routeros", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    path.write_text(chain(MAX_INCLUDE_DEPTH + 2))
    assert cli.main(["check", "--routeros", str(path)]) == 2
    err = capsys.readouterr().err
    last = MAX_INCLUDE_DEPTH + 3  # l0's line: the last list added
    assert f"{path}:{last}: /interface list add: include=l1: lists include lists more than 16 deep" in err, err


def test_import_routeros_writes_no_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Comments and values with RouterOS hex escapes become TOML escapes and escaped comments: the TOML on
    stdout reads back to the same values, and holds no control character."""
    import tomllib

    script = tmp_path / "r.rsc"
    script.write_text('/interface list add name=lan comment="a\\1B[2Jb"\n'
                      '/interface list member add list=lan interface=eth0 comment="c\\7Fd"\n'
                      '/ip traffic-flow target add dst-address=192.0.2.1 comment="e\\1B]0;x\\07f"\n')
    assert cli.main(["import-routeros", str(script)]) == 0
    out = capsys.readouterr().out
    assert _control_characters(out) == [], out
    assert tomllib.loads(out)["target"][0]["comment"] == "e\x1b]0;x\x07f"
    assert "a\\x1b[2Jb" in out and "c\\x7fd" in out


# Any text from any source: a value, or a ConfigError naming where -- never another exception.

_TOML_PIECES = st.sampled_from(["[", "]", "{", "}", "[[", "]]", ".", "=", ",", '"', "'", '"""', "#", "\n", " ",
                                "a", "traffic-flow", "cache-entries", "interfaces", "target", "9" * 50, "1.5",
                                "\\u001b", "\x1b", "\\", "-", "inf", "nan", "true"])
_RSC_PIECES = st.sampled_from(["/ip traffic-flow", " set ", " target add ", "/interface list add name=l",
                               " include=l", "member add list=l interface=", "port=", "9" * 30, '"', "\\", "\\1B",
                               "\n", ";", "=", " ", "#", "eth0", "address=1.2.3.4:", "sampling-interval=", "x"])


@given(st.one_of(st.text(max_size=300), st.lists(_TOML_PIECES, max_size=80).map("".join)))
@settings(max_examples=400, deadline=None)
def test_any_toml_text_is_settings_or_a_config_error(text: str) -> None:
    from pyflow.configfile import read_toml_text
    from pyflow.errors import ConfigError

    try:
        read_toml_text(text, "any.toml")
    except ConfigError as exc:
        assert str(exc).startswith("any.toml")


@given(st.one_of(st.text(max_size=300), st.lists(_RSC_PIECES, max_size=80).map("".join)))
@settings(max_examples=400, deadline=None)
def test_any_routeros_script_is_settings_or_a_config_error(text: str) -> None:
    from pyflow.configfile import read_document
    from pyflow.errors import ConfigError
    from pyflow.routeros import parse_script

    try:
        imported = parse_script(text, "any.rsc", ignore_other=True)
        read_document(imported.doc, imported.locator)
    except ConfigError as exc:
        assert str(exc).startswith("any.rsc")


@given(st.lists(st.one_of(st.text(max_size=40), st.sampled_from(["192.0.2.0/24 64500", "::/0 AS1", "9" * 5000])),
                max_size=20))
@settings(max_examples=300, deadline=None)
def test_any_as_file_text_is_a_table_or_a_config_error(lines: list[str]) -> None:
    from pyflow.errors import ConfigError
    from pyflow.host.asn import parse_lines

    try:
        nets, asns = parse_lines(lines, "any.txt")
    except ConfigError as exc:
        assert str(exc).startswith("any.txt:") and len(str(exc)) < 400
    else:
        assert len(nets) == len(asns)


def test_host_interface_names_are_shown_escaped_by_flows_and_status() -> None:
    """The kernel allows any byte but '/', ':' and white space in a name, so `all` may meter an interface
    whose name holds a terminal escape: `pyflow flows`, `top` and `status` show it escaped."""
    from pyflow.commands import flow_rows, status_lines

    flow = {"src": "10.0.0.1", "sport": 1, "dst": "10.0.0.2", "dport": 2, "proto": 6, "interface": "e\x1b[2J",
            "ifindex": 3, "direction": "ingress", "packets-total": 1, "bytes-total": 1, "packets": 0, "bytes": 0,
            "first-seen": 1.0, "last-seen": 1.0}
    [row] = flow_rows([flow])
    assert "e\\x1b[2J" in row and all(_control_characters(cell) == [] for cell in row)
    answer = {"settings": {"interfaces": ["all"], "interfaces-expanded": ["eth0", "e\x1b[2J"], "cache-entries": 16,
                           "active-flow-timeout": "30m", "inactive-flow-timeout": "15s"},
              "cache": {"entries": 0, "capacity": 16}, "agent": {"uptime": 1.0, "sweeps": 0, "records": 0},
              "targets": []}
    lines = status_lines(answer)
    assert any("eth0,e\\x1b[2J" in line for line in lines)
    assert all(_control_characters(line) == [] for line in lines)
