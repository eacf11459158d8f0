"""The live views: ``pyflow status``, ``flows``, ``top`` (a running agent, over its control socket)
and ``collect`` (a small NetFlow/IPFIX collector for debugging a setup).

``add_commands(subparsers)`` registers the four subcommands on the ``pyflow``
parser (``pyflow.cli``); each sets ``func`` to its implementation, which
returns the exit status.  ``python -m pyflow.commands ...`` runs them alone.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import select
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from pyflow.analytics import GROUPS
from pyflow.collect import TemplateCache, decode, format_record, protocol_name, record_json
from pyflow.control import DEFAULT_SOCKET, GROUP_SORTS, SORTS, ControlClient
from pyflow.errors import ConfigError, PyflowError
from pyflow.text import visible
from pyflow.units import format_duration, format_size, parse_duration_ns

RAW = argparse.RawDescriptionHelpFormatter

# --------------------------------------------------------------------------
# Help texts
# --------------------------------------------------------------------------

SOCKET_HELP = f"the agent's control socket (default: {DEFAULT_SOCKET}; `pyflow run --control-socket`)"

STATUS_DESCRIPTION = f"""\
Show what the running agent (`pyflow run`) is doing, asked over its control
socket ({DEFAULT_SOCKET} unless `pyflow run --control-socket` chose another):

  * its effective settings, printed the way RouterOS prints
    `/ip traffic-flow print`: enabled, interfaces, cache-entries, the flow
    timeouts, packet sampling, and pyflow's own (sweep-interval, the
    /ip traffic-flow ipfix fields that differ from RouterOS's defaults, ...);
  * cache use: flow entries in the kernel cache at the last sweep, of
    cache-entries (status never reads the cache: it cannot slow the agent);
  * the agent's counters: uptime, sweeps, flow records exported;
  * one line per target, as `/ip traffic-flow target print` numbers them:
    datagrams, flow records and bytes sent, send errors, and when it last
    sent a datagram (the agent samples each target's counter every 0.25 s,
    so "last sent" is exact to within that).

The control socket is root's only (mode 0600): run it as root, like the agent.
"""
STATUS_EPILOG = """\
examples:
  sudo pyflow status
  sudo pyflow status --socket /run/pyflow/lab.sock
  sudo pyflow status --json | jq '.targets[] | {name, datagrams, "send-errors"}'

exit status: 0 when the agent answered; 1 when no agent listens on the socket
(the message names the socket) or the agent could not answer; 2 for a bad option.
"""

FLOWS_DESCRIPTION = """\
Print the flows in the kernel flow cache now, top talkers first, as an aligned
table: addresses, ports (ICMP: type/code), protocol, interface, direction, the
flow's packets and bytes since it entered the cache (PACKETS, BYTES), what the
next record of it will carry (UNSENT-PKTS, UNSENT-BYTES: less than the totals
once the active-flow-timeout has cut a record), how long ago its first packet
(AGE) and last packet (IDLE) were seen.  Bytes are IP bytes, as NetFlow counts
them, in binary units (KiB, MiB, ...; exact with --json).

A flow appears here until the sweep expires it (inactive-flow-timeout, or
2 s after TCP FIN/RST); what has been exported already is not in the cache.
The agent sends at most 10,000 flows per answer (the top ones in the chosen
order; the first line gives the total in the cache); it reads the cache
without holding up its sweeps.

With --by, the same cache summed per source address (src), destination address
(dst), protocol and service port (port: TCP, UDP, SCTP; the lower of the two
ports) or protocol (proto): FLOWS, PACKETS and BYTES per group, sorted by bytes,
packets or flows.
"""
FLOWS_EPILOG = """\
sort orders (--sort):
  bytes     most bytes first (default)
  packets   most packets first
  age       longest-lived first
  flows     most flows first (--by only; age is not a group's order)

examples:
  sudo pyflow flows
  sudo pyflow flows --by src --limit 10      # the top talkers in the cache now
  sudo pyflow flows --sort packets --limit 50
  sudo pyflow flows --limit 0 --json | jq '.flows[] | select(.proto == 6)'   # the top 10,000

exit status: 0 when the agent answered; 1 when no agent listens on the socket
or it could not answer; 2 for a bad option.
"""

TOP_DESCRIPTION = """\
The flows of `pyflow flows`, live: the table is redrawn every --interval, with
a header line giving the time, the agent's uptime, cache use (entries of
cache-entries), the export rate (flow records per second, from the agent's
record counter between two refreshes) and the targets' send errors.

keys:
  q         quit (Ctrl-C quits too); the terminal is restored as it was
  b, p, a   sort by bytes, packets, age (a: flows in a grouped view)
  f         sort by flows
  v         next view: flows, by source, by destination, by port, by protocol

When standard output is not a terminal, each refresh is printed after the
previous one, without screen control; --iterations stops after that many.
"""
TOP_EPILOG = """\
examples:
  sudo pyflow top
  sudo pyflow top --sort packets --interval 500ms
  sudo pyflow top --by dst
  sudo pyflow top --iterations 1 > snapshot.txt

exit status: 0 after q, Ctrl-C or --iterations; 1 when no agent listens on the
socket or it stopped answering; 2 for a bad option.
"""

COLLECT_DESCRIPTION = """\
Listen for NetFlow v1, v5, v9 and IPFIX datagrams on UDP and print every
record, one line each:

  TIME VERSION SRC:SPORT -> DST:DPORT PROTO packets=N bytes=N NAME=VALUE ... exporter=ADDR:PORT

TIME is when the flow ended (its last packet), local time, when the record says
so (v1/v5/v9: sysUptime fields and the header's clock; IPFIX: 152/153, 150/151,
or 21/22 with 160), else when the datagram was sent.  Every field besides the
ones in front follows as IANA-name=value (times in local time, ISO 8601).
Options records (interface names, sampling) are printed as
`VERSION options template=ID scope(...) NAME=VALUE ...`.

v9 and IPFIX templates and options templates are learnt per (exporter address,
version, observation domain / source id); IPFIX variable-length fields,
enterprise elements and set padding are understood.  A data set that arrives
before its template is held (at most 64 sets and 1M per stream, 4M in all) and
printed when the template arrives.  A datagram that cannot be decoded -- unknown
version, truncated, data before its template -- is reported on standard error
with the reason and the exporter, and collecting goes on.

What senders can make it keep is bounded: 256 exporter streams (address,
version, domain) and 1024 templates in all, the least recently used evicted
first; templates of at most 256 fields; at most 16384 records and 100 problems
from one datagram.  Each eviction or drop is reported with a running count.
Strings from the wire are printed with control characters escaped (\\x1b, \\n).

This is a tool for looking at a setup (`pyflow run --target 127.0.0.1:2055/ipfix`
and `pyflow collect` side by side), not a collector to store flows with.
"""
COLLECT_EPILOG = """\
examples:
  pyflow collect --listen 127.0.0.1:2055
  pyflow collect --listen '[::]:4739' -v
  pyflow collect --listen 0.0.0.0:2055 --count 10 --json | jq .packets
  pyflow collect --listen 127.0.0.1:2055 --count 1 --timeout 30s   # in a script

exit status: 0 after --count flow records, Ctrl-C, or --timeout when no
--count is given; 1 when --timeout passes before --count records arrived, or
the address cannot be listened on; 2 for a bad option.
"""

# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    """Binary units, one decimal: 512 B, 1.2 KiB, 3.4 MiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """``0.4s``, ``12.0s``, ``1m5s``, ``2h3m``: short, RouterOS-like."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole >= 3600:
        whole -= whole % 60  # hours: minutes are enough
    return format_duration(whole * 10**9)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Aligned columns, two spaces apart; columns in ``right`` aligned right."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


FLOW_HEADERS = ("SRC", "SPORT", "DST", "DPORT", "PROTO", "IF", "DIR", "PACKETS", "BYTES", "UNSENT-PKTS",
                "UNSENT-BYTES", "AGE", "IDLE")
_FLOW_RIGHT = frozenset({1, 3, 7, 8, 9, 10, 11, 12})


def flow_rows(flows: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for f in flows:
        icmp = f["proto"] in (1, 58)
        rows.append([
            f["src"], "" if icmp else str(f["sport"]), f["dst"],
            f"{f['dport'] >> 8}/{f['dport'] & 0xFF}" if icmp else str(f["dport"]),
            protocol_name(f["proto"]), visible(f.get("interface") or str(f["ifindex"])), f["direction"],
            str(f["packets-total"]), human_bytes(f["bytes-total"]), str(f["packets"]), human_bytes(f["bytes"]),
            human_age(f["first-seen"]), human_age(f["last-seen"]),
        ])
    return rows


def flows_lines(answer: dict[str, Any]) -> list[str]:
    shown = len(answer["flows"])
    total = answer["total"]
    head = f"{total} flow{'s' if total != 1 else ''} in the cache (of {format_size(answer['capacity'])})"
    if shown < total:
        head += f", the top {shown} by {answer['sort']}"
    return [head, *table(FLOW_HEADERS, flow_rows(answer["flows"]), _FLOW_RIGHT)]


def status_lines(answer: dict[str, Any]) -> list[str]:
    """``/ip traffic-flow print`` style: right-aligned names, then the targets table."""
    from pyflow.routeros import pyflow_items, traffic_flow_items  # the one rendering of settings

    s = answer["settings"]
    cache = answer["cache"]
    pct = 100.0 * cache["entries"] / cache["capacity"] if cache["capacity"] else 0.0
    items: list[tuple[str, str]] = []
    for name, value in traffic_flow_items(s):
        if name == "cache-entries":
            value += f"   (in use: {cache['entries']}, {pct:.1f}%)"
        items.append((name, value))
        if name == "interfaces" and "interfaces-expanded" in s:
            items.append(("  (metered)", ",".join(s["interfaces-expanded"])))
    changed = ",".join(f"{k}={v}" for k, v in s.get("ipfix", {}).items())
    items.append(("ipfix", changed or "(RouterOS defaults)"))
    items += pyflow_items(s)
    for opt in s.get("interface-options", ()):
        items.append(("interface", opt))
    a = answer["agent"]
    items += [("uptime", human_age(a["uptime"])), ("sweeps", str(a["sweeps"])),
              ("flow-records", str(a["records"])), ("pid", str(a.get("pid", "")))]
    width = max(len(k) for k, _ in items)
    lines = [f"{k.rjust(width)}: {visible(v)}" for k, v in items]  # host interface names may hold anything
    lines.append("")
    rows = []
    for t in answer["targets"]:
        last = t["last-sent-ago"]
        rows.append([str(t["index"]), t["src-address"], t["dst-address"], str(t["port"]), t["version"],
                     str(t["datagrams"]), str(t["records"]), human_bytes(t["bytes"]), str(t["send-errors"]),
                     "never" if last is None else f"{human_age(last)} ago"])
    headers = ("#", "SRC-ADDRESS", "DST-ADDRESS", "PORT", "VERSION", "DATAGRAMS", "RECORDS", "BYTES", "ERRORS",
               "LAST-SENT")
    lines += table(headers, rows, frozenset({0, 3, 5, 6, 7, 8}))
    lines += link_lines(answer.get("links", []))
    for t in answer["targets"]:
        if t["send-errors-by-errno"]:
            detail = ", ".join(f"{k}={v}" for k, v in t["send-errors-by-errno"].items())
            lines.append(f"  target {t['index']} send errors: {detail}")
        if t.get("not-representable"):
            lines.append(f"  target {t['index']}: {t['not-representable']} records it cannot carry "
                         "(IPv6 or NAT events for v1/v5)")
    return lines


def link_lines(links: list[dict[str, Any]]) -> list[str]:
    """The links table of `pyflow status`: every link, metered (hooks) or skipped (why)."""
    if not links:
        return []
    rows = [[str(x["ifindex"]), visible(str(x["name"])), "yes" if x["metered"] else "no",
             ", ".join(x.get("hooks", ())) if x["metered"] else visible(str(x.get("reason", "")))] for x in links]
    return ["", *table(("IFINDEX", "INTERFACE", "METERED", "HOOKS / WHY NOT"), rows, frozenset({0}))]


# --------------------------------------------------------------------------
# status, flows
# --------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def cmd_status(args: argparse.Namespace) -> int:
    with ControlClient(args.socket) as client:
        answer = client.status()
    if args.json:
        _print_json(answer)
    else:
        print("\n".join(status_lines(answer)))
    return 0


GROUP_HEADS = {"src": ("SRC",), "dst": ("DST",), "port": ("PROTO", "PORT"), "proto": ("PROTO",)}


def group_lines(answer: dict[str, Any]) -> list[str]:
    """A grouped answer (``--by``) as a heading and a table."""
    by, groups, total = answer["by"], answer["groups"], answer["total"]
    head = (f"{total} flow{'s' if total != 1 else ''} in the cache (of {format_size(answer['capacity'])}) "
            f"by {VIEW_NAMES[by]}: the top {len(groups)} by {answer['sort']}")
    if answer.get("trimmed"):
        head += " (more groups than the agent sums exactly: small ones may be missing)"
    rows = []
    for g in groups:
        if by in ("src", "dst"):
            cells = [g["address"]]
        elif by == "port":
            cells = [protocol_name(g["proto"]), str(g["port"])]
        else:
            cells = [protocol_name(g["proto"])]
        rows.append([*cells, str(g["flows"]), str(g["packets"]), human_bytes(g["bytes"])])
    heads = (*GROUP_HEADS[by], "FLOWS", "PACKETS", "BYTES")
    return [head, *table(heads, rows, frozenset(range(len(heads) - 3 - (by == "port"), len(heads))))]


def _sort_for(view: str, sort: str) -> str:
    """The order a view is asked for: the flows' orders (SORTS) or a group's (GROUP_SORTS)."""
    if view == "flows":
        return sort if sort in SORTS else "bytes"
    return sort if sort in GROUP_SORTS else "flows"


def cmd_flows(args: argparse.Namespace) -> int:
    by = args.by
    if by is None and args.sort == "flows":
        raise ConfigError("--sort flows needs --by (src, dst, port or proto): a single flow has no flow count")
    if by is not None and args.sort == "age":
        raise ConfigError(f"--sort age does not go with --by {by}: a group has no age (bytes, packets or flows)")
    with ControlClient(args.socket) as client:
        answer = client.flows(_sort_for(by or "flows", args.sort), args.limit, by)
    if args.json:
        _print_json(answer)
    else:
        print("\n".join(flows_lines(answer) if by is None else group_lines(answer)))
    return 0


# --------------------------------------------------------------------------
# top
# --------------------------------------------------------------------------

ALT_SCREEN_ON, ALT_SCREEN_OFF = "\x1b[?1049h", "\x1b[?1049l"
CURSOR_OFF, CURSOR_ON = "\x1b[?25l", "\x1b[?25h"
HOME, CLEAR_EOL, CLEAR_EOS = "\x1b[H", "\x1b[K", "\x1b[J"
TOP_KEYS = {"b": "bytes", "p": "packets", "a": "age", "f": "flows"}
VIEWS = ("flows", *GROUPS)  # key v cycles through them
VIEW_NAMES = {"flows": "flow", "src": "source", "dst": "destination", "port": "port", "proto": "protocol"}
TOP_HEADER_LINES = 3


def top_frame(status: dict[str, Any], flows: dict[str, Any], rate: float | None, sort: str,
              view: str = "flows") -> list[str]:
    cache = status["cache"]
    pct = 100.0 * cache["entries"] / cache["capacity"] if cache["capacity"] else 0.0
    errors = sum(t["send-errors"] for t in status["targets"])
    n = len(status["targets"])
    rate_text = "-" if rate is None else f"{rate:.1f}"
    head = (f"pyflow top  {time.strftime('%H:%M:%S')}  up {human_age(status['agent']['uptime'])}  "
            f"cache {cache['entries']}/{format_size(cache['capacity'])} ({pct:.1f}%)  "
            f"export {rate_text} records/s  {n} target{'s' if n != 1 else ''} ({errors} send errors)")
    keys = (f"view: {VIEW_NAMES[view]}   sort: {sort}   keys: v next view, b bytes, p packets, "
            f"{'a age' if view == 'flows' else 'f flows'}, q quit")
    return [head, keys, *(flows_lines(flows) if view == "flows" else group_lines(flows))]


class _Keys:
    """Single key presses from a terminal (cbreak: no echo, no line buffering, Ctrl-C still signals)."""

    def __init__(self, stream: IO[str]) -> None:
        self.fd: int | None = None
        self._saved: Any = None
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            return
        if os.isatty(fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            self.fd = fd

    def wait(self, seconds: float) -> str | None:
        """A key pressed within ``seconds``, or None."""
        if self.fd is None:
            time.sleep(max(0.0, seconds))
            return None
        ready, _, _ = select.select([self.fd], [], [], max(0.0, seconds))
        if not ready:
            return None
        data = os.read(self.fd, 32)
        if not data:  # the terminal went away: no more keys
            self.restore()
            return None
        return data.decode(errors="replace")[-1:]

    def restore(self) -> None:
        if self.fd is not None:
            import termios

            with contextlib.suppress(OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self.fd = None


def cmd_top(args: argparse.Namespace) -> int:
    out = sys.stdout
    screen = out.isatty()
    sort, view = args.sort, args.by or "flows"
    client = ControlClient(args.socket)
    client.status()  # no agent: fail before touching the terminal
    keys = _Keys(sys.stdin)
    prev: tuple[float, int] | None = None
    frames = 0
    try:
        if screen:
            out.write(ALT_SCREEN_ON + CURSOR_OFF)
        while True:
            status = client.status()
            rows = shutil.get_terminal_size((120, 40)).lines
            limit = args.limit or (max(1, rows - TOP_HEADER_LINES - 1) if screen else 20)
            shown = _sort_for(view, sort)
            flows = client.flows(shown, limit, None if view == "flows" else view)
            now, records = float(status["time"]), int(status["agent"]["records"])
            rate = None
            if prev is not None and now > prev[0]:
                rate = (records - prev[1]) / (now - prev[0])
            prev = (now, records)
            lines = top_frame(status, flows, rate, shown, view)
            if screen:
                cols = shutil.get_terminal_size((120, 40)).columns
                out.write(HOME + "".join(ln[:cols] + CLEAR_EOL + "\n" for ln in lines[:rows - 1]) + CLEAR_EOS)
            else:
                out.write("\n".join(lines) + "\n\n")
            out.flush()
            frames += 1
            if args.iterations and frames >= args.iterations:
                return 0
            deadline = time.monotonic() + args.interval
            while (left := deadline - time.monotonic()) > 0:
                key = keys.wait(left)
                if key in ("q", "Q"):
                    return 0
                if key is not None and key in TOP_KEYS:
                    sort = TOP_KEYS[key] if view == "flows" or key != "a" else "flows"
                    break
                if key in ("v", "V"):
                    view = VIEWS[(VIEWS.index(view) + 1) % len(VIEWS)]
                    break
    except KeyboardInterrupt:
        return 0
    finally:
        keys.restore()
        if screen:
            out.write(CURSOR_ON + ALT_SCREEN_OFF)
            out.flush()
        client.close()


# --------------------------------------------------------------------------
# collect
# --------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` (all IPv4 addresses) -> (address, port)."""
    t = text.strip()
    host, port = "", t
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"--listen {text!r}: write an IPv6 address as [ADDRESS]:PORT")
        port = rest[1:]
    elif ":" in t:
        host, _, port = t.rpartition(":")
        if ":" in host:
            raise ConfigError(f"--listen {text!r}: write an IPv6 address as [ADDRESS]:PORT")
    try:
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--listen {text!r}: port {port!r} is not a number in 1..65535") from None
    host = host or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            host = str(socket.getaddrinfo(host, number, type=socket.SOCK_DGRAM)[0][4][0])
        except OSError:
            raise ConfigError(f"--listen {text!r}: {host!r} is not an address or a known host name") from None
    return host, number


def _err(msg: str) -> None:
    print(f"pyflow collect: {msg}", file=sys.stderr, flush=True)


def cmd_collect(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    v6 = ipaddress.ip_address(host).version == 6
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if v6 and ipaddress.ip_address(host).is_unspecified:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 exporters too
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PyflowError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
        shown = f"[{host}]:{port}" if v6 else f"{host}:{port}"
        _err(f"listening on {shown} (udp) for NetFlow v1/v5/v9 and IPFIX")
        return _collect_loop(sock, args)
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()


def _collect_loop(sock: socket.socket, args: argparse.Namespace) -> int:
    cache = TemplateCache()
    emit: Callable[[str], None] = lambda line: print(line, flush=True)  # noqa: E731
    count = args.count or 0
    seen = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            ready, _, _ = select.select([sock], [], [], wait)
            if not ready:
                continue
            data, peer = sock.recvfrom(65535)
            result = decode(data, (peer[0], peer[1]), cache)
            exporter = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
            if args.verbose:
                for template in result.templates:
                    _err(f"{exporter}: {template.describe()}")
            for problem in result.problems:
                _err(f"{exporter}: {problem}")
            for record in result.records:
                emit(json.dumps(record_json(record)) if args.json else format_record(record))
                if not record.options:
                    seen += 1
                    if count and seen >= count:
                        return 0
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- keep the interpreter quiet at exit
        return 0
    if count:
        _err(f"timeout: {seen} of {count} flow records arrived within {args.timeout:g}s")
        return 1
    return 0


# --------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------


def _duration_seconds(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            ns = parse_duration_ns(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{name}: {exc}") from None
        if ns <= 0:
            raise argparse.ArgumentTypeError(f"{name}: must be more than 0")
        return ns / 1e9

    return parse


def _count(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
            if n < 0:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a whole number >= 0") from None
        return n

    return parse


def _agent_options(p: argparse.ArgumentParser, json: bool) -> None:
    """What every view of a running agent takes: where its socket is, and (not top) JSON output."""
    p.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH", help=SOCKET_HELP)
    if json:
        p.add_argument("--json", action="store_true", help="print the agent's answer as JSON (exact numbers)")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``status``, ``flows``, ``top`` and ``collect`` on the ``pyflow`` parser's subparsers."""
    status = subparsers.add_parser(
        "status", help="show the running agent's settings, cache use and per-target counters",
        description=STATUS_DESCRIPTION, epilog=STATUS_EPILOG, formatter_class=RAW)
    _agent_options(status, json=True)
    status.set_defaults(func=cmd_status)

    flows = subparsers.add_parser(
        "flows", help="print the flows in the kernel cache now, top talkers first",
        description=FLOWS_DESCRIPTION, epilog=FLOWS_EPILOG, formatter_class=RAW)
    _agent_options(flows, json=True)
    flows.add_argument("--sort", choices=(*SORTS, "flows"), default="bytes",
                       help="order of the flows or groups (default: bytes)")
    flows.add_argument("--by", choices=GROUPS, default=None,
                       help="sum the flows per source, destination, port or protocol")
    flows.add_argument("--limit", type=_count("--limit"), default=20, metavar="N",
                       help="show at most N flows; 0: as many as the agent sends, 10,000 (default: 20)")
    flows.set_defaults(func=cmd_flows)

    top = subparsers.add_parser(
        "top", help="the flows of the kernel cache, live, refreshed in the terminal",
        description=TOP_DESCRIPTION, epilog=TOP_EPILOG, formatter_class=RAW)
    _agent_options(top, json=False)
    top.add_argument("--sort", choices=(*SORTS, "flows"), default="bytes",
                     help="initial order of the flows or groups (default: bytes)")
    top.add_argument("--by", choices=GROUPS, default=None,
                     help="start in the view per source, destination, port or protocol (key v cycles)")
    top.add_argument("--interval", type=_duration_seconds("--interval"), default=1.0, metavar="DURATION",
                     help="time between refreshes, RouterOS style: 500ms, 1s, 5s (default: 1s)")
    top.add_argument("--limit", type=_count("--limit"), default=0, metavar="N",
                     help="show at most N flows (default: as many as the terminal has lines for)")
    top.add_argument("-n", "--iterations", type=_count("--iterations"), default=0, metavar="N",
                     help="stop after N refreshes (default: run until q or Ctrl-C)")
    top.set_defaults(func=cmd_top)

    collect = subparsers.add_parser(
        "collect", help="receive NetFlow/IPFIX datagrams and print every record (for debugging)",
        description=COLLECT_DESCRIPTION, epilog=COLLECT_EPILOG, formatter_class=RAW)
    collect.add_argument("-l", "--listen", default="0.0.0.0:2055", metavar="ADDR:PORT",
                         help="UDP address to listen on: 127.0.0.1:2055, [::]:4739 (IPv4 too), or a port alone "
                              "(default: 0.0.0.0:2055, RouterOS's target port)")
    collect.add_argument("-c", "--count", type=_count("--count"), default=0, metavar="N",
                         help="exit after N flow records (options records are printed, not counted)")
    collect.add_argument("--timeout", type=_duration_seconds("--timeout"), default=None, metavar="DURATION",
                         help="stop after this long (with --count: exit status 1 if fewer records came)")
    collect.add_argument("--json", action="store_true",
                         help="one JSON object per record (every field by IANA name, times as Unix ms)")
    collect.add_argument("-v", "--verbose", action="store_true",
                         help="also print each template as it is learnt (on standard error)")
    collect.set_defaults(func=cmd_collect)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyflow.commands COMMAND ...``: these commands without the rest of ``pyflow``."""
    parser = argparse.ArgumentParser(prog="pyflow", description="pyflow's live views and debugging collector")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PyflowError as exc:
        print(f"pyflow: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
