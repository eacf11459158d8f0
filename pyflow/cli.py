"""The ``pyflow`` command: ``run``, ``check``, ``import-routeros``.

Settings come from up to three layers, each overriding the one before:
RouterOS's defaults (``pyflow.config.Settings``), a config file
(``--config FILE``, TOML) or a RouterOS script (``--routeros FILE``), and
the command-line flags the user actually gave (every settings flag defaults
to None, so a flag left out never overrides the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from pyflow import __version__
from pyflow.commands import add_commands, table
from pyflow.config import (
    Settings,
    count,
    duration,
    size,
    yes_no,
)
from pyflow.configfile import Layer, dump_toml, load_toml, read_document
from pyflow.errors import ConfigError, PyflowError
from pyflow.fields import TOGGLES
from pyflow.files import MAX_SCRIPT_BYTES, read_stream
from pyflow.layering import build_settings
from pyflow.links import Link, double_counts, plan
from pyflow.log import log, message, set_hook, to_stderr
from pyflow.text import visible
from pyflow.units import format_duration, format_size

DESCRIPTION = """\
pyflow meters the packets of chosen interfaces in the kernel with eBPF (XDP)
and exports flow records as NetFlow v1, v5, v9 or IPFIX over UDP, following
MikroTik RouterOS "IP Traffic Flow": the same settings, names and defaults.
`pyflow COMMAND --help` describes each command and its options.
"""

MAIN_EPILOG = """\
settings come from RouterOS's defaults, then a config file (--config FILE,
TOML) or a RouterOS script (--routeros FILE), then the flags given: a flag
overrides the file, a flag left out never does.

examples:
  sudo pyflow run --interface eth0 --target 192.0.2.50:2055/ipfix
  sudo pyflow run --config /etc/pyflow.toml
  pyflow check --routeros router.rsc --map-interface ether1=eth0
  pyflow import-routeros router.rsc > /etc/pyflow.toml

exit status: 0 success, 2 bad settings (the message names the setting, and
the file and line it is on), 3 the kernel side cannot be set up, 1 otherwise.
"""

_TOGGLE_LINES = textwrap.fill(" ".join(TOGGLES), width=88, initial_indent=" " * 27, subsequent_indent=" " * 27,
                              break_on_hyphens=False)

SETTINGS_HELP = f"""\
settings (RouterOS name: flag; config file key):
  enabled                  --enabled yes|no; [traffic-flow] enabled
                           RouterOS's default is no: with a config file or script,
                           run needs enabled=yes there (or --enabled yes); with
                           flags alone, running pyflow is the switch
  interfaces               --interface IF (repeat it), or 'all' (default); a name may be
                           an interface list ([interface-list], /interface list).
                           all: each packet counted once, where it enters IP (bridge
                           ports, bond slaves and VLANs of a metered parent are left
                           to the bridge, bond or parent); `pyflow check` lists why
                           per interface: --interface eth1,direction=both,hook=tc
                           direction: ingress (what the interface receives, as RouterOS
                           meters; XDP), egress (what it sends; TC clsact egress) or both;
                           --direction / --hook set the default for every interface
  cache-entries            --cache-entries 64k   flow cache size (k = 1024, M = 1024k);
                           as it fills, the flows idle the longest leave early (lack of
                           resources), and what finds no room is counted (cache_full)
  active-flow-timeout      --active-flow-timeout 30m
                           a flow open this long exports what it has and goes on
  inactive-flow-timeout    --inactive-flow-timeout 15s
                           a flow idle this long exports and leaves the cache
  packet-sampling          --packet-sampling yes|no (default no)
  sampling-interval        --sampling-interval N: N packets sampled (N >= 1 with
                           packet-sampling=yes) ...
  sampling-space           --sampling-space M: ... then M packets skipped; M = 0: one
                           packet in N. With packet-sampling=no both are kept, printed by
                           check and not applied (a warning says so), as in RouterOS
  target dst-address/port/version
                           --target HOST[:PORT][/VERSION], repeat for several targets;
                           IPv6 as [2001:db8::1]:2055/ipfix; PORT defaults to 2055,
                           VERSION to --version (9, as in RouterOS); per-target options
                           follow after commas, with RouterOS's names:
                           ,src-address=IP ,v9-template-refresh=N ,v9-template-timeout=30m
                           ,time=routeros (IPFIX: flowStart/EndSysUpTime + systemInitTime,
                           as RouterOS sends; default time=absolute: flowStart/EndMilliseconds)
                           ,max-rate=N (pyflow's: flow records a second at most, paced in
                           2 ms steps so a burst of expiring flows does not overrun the
                           collector's socket buffer; default 100000, 0 = unpaced)
                           ,interface-names=yes (v9/IPFIX: interface-name options records;
                           default no) ,sequence=rfc (IPFIX with options records: count
                           them in the sequence as RFC 7011 and Wireshark do; default
                           flows, as nfdump counts);
                           --target replaces the file's targets
  target v9-template-refresh / v9-template-timeout
                           --v9-template-refresh 20 --v9-template-timeout 30m
                           (for every target, the file's too)
  ipfix (/ip traffic-flow ipfix field toggles)
                           --ipfix NAME=yes|no[,NAME=yes|no...] (repeat it; a later value
                           wins, and wins over the file): the fields v9 and IPFIX records
                           carry. RouterOS's names and pyflow's as (BGP AS numbers) and
                           vlan-id:
{_TOGGLE_LINES}
                           all yes except nat-events=no (as in RouterOS), e.g.
                           --ipfix nat-events=yes,ttl=no
  pyflow's own             --sweep-interval 10s --metrics-address 127.0.0.1:9796
                           --xdp-mode auto --direction ingress --hook auto --as-file FILE;
                           in the file's [pyflow] table, same names
  analytics                --analytics yes|no (default yes) --analytics-window 1m
                           --analytics-top 10 --analytics-threshold SIGNAL=SCORE[,...]
                           --analytics-floor SIGNAL=VALUE[,...]; in the file's [analytics]
                           table: enabled, window, top, SIGNAL-threshold, SIGNAL-floor
                           (signals: flow-rate, many-sources-low-bytes, single-source-rate,
                           icmp-flows, short-flows-many-destinations; README, "Traffic
                           analytics")

durations are written as RouterOS does: 500ms, 15s, 30m, 1h30m, 1d, 00:30:00;
sizes as 4096, 16k, 1M; switches as yes or no.

limits (beyond one: exit 2 naming the key, and the file and line): numbers of at
most 18 digits; interface names of 1-15 printable ASCII characters, no '/', ':',
',' or spaces; config file at most 1M (nesting 8 deep, keys of 8 dotted parts);
RouterOS script at most 4M (include= chains 16 lists deep); AS file at most
64M. Files must be regular files: a FIFO or a device is refused, never read.
"""

CONFIG_FILE_HELP = """\
config file (--config FILE, TOML; RouterOS's names, `pyflow check` prints the result):
  [traffic-flow]                       # /ip traffic-flow
  enabled = "yes"
  interfaces = ["eth0", "eth1"]        # or "all", "eth0,eth1", an interface list name
  cache-entries = "64k"
  active-flow-timeout = "30m"
  inactive-flow-timeout = "15s"
  packet-sampling = "no"               # sampling-interval = N, sampling-space = M
  [[target]]                           # /ip traffic-flow target, one table each
  dst-address = "192.0.2.50"
  port = 2055
  version = "ipfix"                    # 1, 5, 9 or ipfix; also src-address,
                                       # v9-template-refresh, v9-template-timeout,
                                       # time, max-rate, interface-names,
                                       # sequence, comment, disabled
  [ipfix]                              # /ip traffic-flow ipfix
  nat-events = "yes"
  [interface-list]                     # /interface list (+ member)
  lan = ["eth1", "eth2"]
  [[interface]]                        # pyflow: how one interface is metered
  name = "eth1"
  direction = "both"                   # ingress, egress, both; hook = auto, xdp, tc
  [pyflow]                             # sweep-interval, metrics-address, xdp-mode,
  sweep-interval = "10s"               # direction, hook, as-file, control-socket,
  user = "pyflow"                      # the user it becomes after its start
  [analytics]                          # enabled, window, top, SIGNAL-threshold,
  enabled = "no"                       # SIGNAL-floor (e.g. flow-rate-floor = 500)
  Unknown keys, wrong types and bad values are errors naming the key and line.
  A full example: examples/pyflow.toml.
"""

ROUTEROS_HELP = """\
RouterOS script (--routeros FILE): what /export prints for /ip traffic-flow,
its target and ipfix menus, and /interface list (+ member); context lines,
\\ continuations, # comments and quoting as RouterOS writes them. Other
commands are errors (--ignore-other skips them with a warning); RouterOS
interface names are mapped with --map-interface ROUTEROS=LINUX (repeatable).
"""

RUN_EPILOG = f"""\
{SETTINGS_HELP}
{CONFIG_FILE_HELP}
{ROUTEROS_HELP}
examples:
  meter every interface, IPFIX to a local nfcapd:
    sudo pyflow run --interface all --target 127.0.0.1:2055/ipfix
  two interfaces, short timeouts, two collectors:
    sudo pyflow run --interface eth0 --interface eth1 \\
        --active-flow-timeout 1m --inactive-flow-timeout 15s \\
        --target 192.0.2.50:2055/ipfix --target 192.0.2.51:9995/ipfix
  from a config file, one setting overridden:
    sudo pyflow run --config /etc/pyflow.toml --inactive-flow-timeout 5s
  straight from a RouterOS export:
    sudo pyflow run --routeros router.rsc --map-interface ether1=eth0

SIGHUP re-reads the config file or script (the same flags still override it)
and applies it without losing a count; if the new settings are bad, disabled
or without a target, the log says why and the running settings stay.

exit status: 0 after SIGINT/SIGTERM (everything cached is exported first),
2 for a bad setting (nothing is loaded or attached: every setting is checked
first), including enabled=no and no target; 3 when the kernel side cannot be
set up (not root, no such interface, missing kernel headers, verifier
rejection), 1 otherwise.
"""

CHECK_EPILOG = f"""\
check reads the settings exactly as `pyflow run` would (same options, same
layers), validates them, and prints them the way RouterOS prints them:
/ip traffic-flow print (aligned name: value lines), /ip traffic-flow target
print (a numbered table), /ip traffic-flow ipfix print, the interface lists,
then pyflow's own settings and what is metered how. It needs no root and
touches nothing in the kernel. Warnings (on stderr) say what would stop or
surprise `pyflow run`: enabled=no, no target, an interface this host does not
have.

{SETTINGS_HELP}
{CONFIG_FILE_HELP}
{ROUTEROS_HELP}
examples:
  pyflow check --config examples/pyflow.toml
  pyflow check --routeros examples/routeros/complete.rsc
  pyflow check --config /etc/pyflow.toml --cache-entries 16k
  pyflow check --interface eth0 --target 192.0.2.50/ipfix --ipfix ttl=no

exit status: 0 when the settings are valid, 2 with a message naming the bad
setting (and its file and line) otherwise.
"""

IMPORT_EPILOG = f"""\
The script is what a MikroTik user pastes from `/export` (or writes by hand):

  /interface list
  add name=flow-interfaces
  /interface list member
  add list=flow-interfaces interface=ether1
  /ip traffic-flow
  set enabled=yes interfaces=flow-interfaces cache-entries=16k \\
      active-flow-timeout=30m inactive-flow-timeout=15s
  /ip traffic-flow target
  add dst-address=192.0.2.50 port=2055 version=ipfix
  /ip traffic-flow ipfix
  set nat-events=yes

Read: /ip traffic-flow set, /ip traffic-flow target add (also RouterOS 6's
address=IP:PORT), /ip traffic-flow ipfix set, /interface list add (name,
include, exclude, comment) and /interface list member add (list, interface,
disabled). Menu context lines, relative menus (`target add` after
/ip traffic-flow), /ip/traffic-flow/target paths, \\ continuations, ';', '#'
comments and "quoted" values with RouterOS escapes are understood; print and
export commands change nothing and are skipped. Anything else is an error
with its line number, never silently dropped; with --ignore-other, commands
of other menus (/ip firewall ..., /system ...) are skipped with a warning
each (the warnings also go into the output as comments).

Interface names are RouterOS's: give the Linux name of each that differs
with --map-interface ether1=eth0 (repeatable, or comma-separated). A name
that is not a valid Linux interface name needs a mapping; a mapping for a
name the script does not use is an error.

The TOML goes to stdout; the settings are fully checked first, as
`pyflow check` would. Run it with `pyflow run --config FILE`, or skip the
file: `pyflow run --routeros SCRIPT` reads the script directly.

{CONFIG_FILE_HELP}
examples:
  pyflow import-routeros router.rsc > /etc/pyflow.toml
  pyflow import-routeros --map-interface ether1=eth0,bridge=br0 router.rsc
  ssh admin@router /export | pyflow import-routeros --ignore-other - > pyflow.toml

exit status: 0 when the script maps to valid settings, 2 with a message
naming the line otherwise.
"""


# --------------------------------------------------------------------------
# Flag value types: argparse reports their errors with exit status 2.
# --------------------------------------------------------------------------


def _arg(conv: Callable[[str, str], Any], name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return conv(name, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _duration_arg(name: str) -> Callable[[str], int]:
    return _arg(duration, name)


def _size_arg(text: str) -> int:
    value: int = _arg(size, "cache-entries")(text)
    return value


def _add_settings_options(p: argparse.ArgumentParser) -> None:
    """The settings flags ``run`` and ``check`` share. Every default is None: unset never overrides."""
    for add in (_add_source_options, _add_traffic_flow_options, _add_target_options, _add_own_options,
                _add_analytics_options):
        add(p)


def _add_source_options(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("where the settings come from")
    one = src.add_mutually_exclusive_group()
    one.add_argument("-c", "--config", metavar="FILE",
                     help="read settings from this TOML file (format below; flags override it)")
    one.add_argument("--routeros", metavar="SCRIPT",
                     help="read settings from a RouterOS script, as /export prints it ('-' = stdin)")
    src.add_argument("--map-interface", action="append", metavar="ROUTEROS=LINUX",
                     help="with --routeros: the Linux name of a RouterOS interface, e.g. ether1=eth0 "
                          "(repeatable, or comma-separated)")
    src.add_argument("--ignore-other", action="store_true",
                     help="with --routeros: skip commands of other menus (/ip firewall ...) with a warning, "
                          "instead of failing")


def _add_traffic_flow_options(p: argparse.ArgumentParser) -> None:
    tf = p.add_argument_group("/ip traffic-flow")
    tf.add_argument("--enabled", type=_arg(yes_no, "enabled"), metavar="yes|no",
                    help="RouterOS's master switch (default: yes with flags alone, else the file's, "
                         "RouterOS's default no)")
    tf.add_argument("-i", "--interface", action="append", metavar="IF[,OPTION=VALUE...]",
                    help="interface or interface list to meter (repeatable); 'all' = every interface that "
                         "carries packets into IP, each packet counted once (default: all); options: "
                         "direction=ingress|egress|both, hook=auto|xdp|tc")
    tf.add_argument("--cache-entries", type=_size_arg, metavar="N", help="flow cache size (default: 64k)")
    tf.add_argument("--active-flow-timeout", type=_duration_arg("active-flow-timeout"), metavar="DURATION",
                    help="default: 30m")
    tf.add_argument("--inactive-flow-timeout", type=_duration_arg("inactive-flow-timeout"), metavar="DURATION",
                    help="default: 15s")
    tf.add_argument("--packet-sampling", type=_arg(yes_no, "packet-sampling"), metavar="yes|no",
                    help="sample packets (default: no)")
    tf.add_argument("--sampling-interval", type=_arg(count, "sampling-interval"), metavar="N",
                    help="packets sampled in a row (default: 0; at least 1 with --packet-sampling yes)")
    tf.add_argument("--sampling-space", type=_arg(count, "sampling-space"), metavar="M",
                    help="packets skipped after them (default: 0 = one packet in N)")


def _add_target_options(p: argparse.ArgumentParser) -> None:
    tg = p.add_argument_group("/ip traffic-flow target")
    tg.add_argument("-t", "--target", action="append", metavar="HOST[:PORT][/VERSION][,OPTION=VALUE...]",
                    help="collector to export to (repeatable; replaces the file's targets); run needs one")
    tg.add_argument("--version", dest="default_version", metavar="VERSION",
                    help="export format of --target values that name none: 1, 5, 9 or ipfix (default: 9)")
    tg.add_argument("--v9-template-refresh", type=_arg(count, "v9-template-refresh"), metavar="PACKETS",
                    help="re-send templates every PACKETS export packets, for every target (default: 20)")
    tg.add_argument("--v9-template-timeout", type=_duration_arg("v9-template-timeout"), metavar="DURATION",
                    help="re-send templates at least this often, for every target (default: 30m)")

    ix = p.add_argument_group("/ip traffic-flow ipfix")
    ix.add_argument("--ipfix", action="append", metavar="NAME=yes|no[,...]",
                    help="turn v9/IPFIX record fields on or off (repeatable, a later value wins; "
                         "default: all yes but nat-events)")


def _add_own_options(p: argparse.ArgumentParser) -> None:
    own = p.add_argument_group("pyflow's own")
    own.add_argument("--direction", choices=("ingress", "egress", "both"),
                     help="what to meter on every interface: what it receives (RouterOS's way), what it "
                          "sends (TC egress), or both (default: ingress)")
    own.add_argument("--hook", choices=("auto", "xdp", "tc"),
                     help="receive-side hook: XDP, TC clsact ingress, or auto = XDP where it attaches, "
                          "else TC; TC on bridges, bonds, parents of VLANs and links with no Ethernet "
                          "header (default: auto)")
    own.add_argument("--sweep-interval", type=_duration_arg("sweep-interval"), metavar="DURATION",
                     help="the longest time between two sweeps; they run when the earliest cached flow "
                          "falls due, and never later than its timeout allows: an inactive timeout after "
                          "the last sweep, or end-idle (2s) after a new FIN/RST (default: 10s)")
    own.add_argument("--xdp-mode", choices=("auto", "native", "generic"),
                     help="XDP attach mode; auto tries native, then generic (default: auto)")
    own.add_argument("--as-file", metavar="FILE",
                     help="prefix-to-AS file ('PREFIX AS' per line, '#' comments) for the src/dst AS fields; "
                          "without it they are 0, as RouterOS sends when it runs no BGP")
    own.add_argument("--metrics-address", metavar="HOST:PORT",
                     help="serve Prometheus metrics here; '' turns it off (default: 127.0.0.1:9796)")
    own.add_argument("--control-socket", metavar="PATH",
                     help="Unix socket `pyflow status/flows/top` ask the running agent on; '' turns it off "
                          "(default: /run/pyflow/pyflow.sock, or pyflow-net<inode>.sock in another network "
                          "namespace)")
    own.add_argument("--user", metavar="NAME",
                     help="after its privileged start, run as this unprivileged user (`make setup` creates "
                          "'pyflow') with only CAP_BPF and CAP_NET_ADMIN; '' stays uid 0 (default: '')")


def _add_analytics_options(p: argparse.ArgumentParser) -> None:
    an = p.add_argument_group("traffic analytics (metrics endpoint; README, \"Traffic analytics\")")
    an.add_argument("--analytics", type=_arg(yes_no, "analytics"), metavar="yes|no",
                    help="top talkers, traffic mix and anomaly signals as metrics (default: yes; no: none of "
                         "them, e.g. where addresses in metrics are sensitive)")
    an.add_argument("--analytics-window", type=_duration_arg("analytics window"), metavar="DURATION",
                    help="the sliding window of the top talkers, top ports and unique counts (10s..5m; default 1m)")
    an.add_argument("--analytics-top", type=_arg(count, "analytics top"), metavar="N",
                    help="how many talkers per direction and ports get a series (1..100; default 10)")
    an.add_argument("--analytics-threshold", action="append", metavar="SIGNAL=SCORE[,...]",
                    help="a signal's score threshold (default 6 for each)")
    an.add_argument("--analytics-floor", action="append", metavar="SIGNAL=VALUE[,...]",
                    help="a signal's floor: below this value it never fires (defaults: README)")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="pyflow", description=DESCRIPTION, epilog=MAIN_EPILOG, formatter_class=raw)
    p.add_argument("-V", "--pyflow-version", action="version", version=f"pyflow {__version__}")
    sub = p.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", help="meter interfaces and export flows until SIGINT/SIGTERM (root)", formatter_class=raw,
        description="Meter the chosen interfaces in the kernel and export flow records to every target\n"
                    "until SIGINT or SIGTERM, then export everything still cached and exit. Needs root.\n"
                    "Every setting is checked before anything is loaded into the kernel.",
        epilog=RUN_EPILOG,
    )
    _add_settings_options(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check", help="validate settings and print them as RouterOS does (no root)", formatter_class=raw,
        description="Validate settings (a config file, a RouterOS script, flags, or a file and flags,\n"
                    "as `pyflow run` takes them) and print them the way RouterOS prints them.",
        epilog=CHECK_EPILOG,
    )
    _add_settings_options(check)
    check.set_defaults(func=cmd_check)

    imp = sub.add_parser(
        "import-routeros", help="turn a RouterOS /ip traffic-flow script into a pyflow config file",
        formatter_class=raw,
        description="Read a RouterOS script (/ip traffic-flow, its target and ipfix menus, /interface\n"
                    "list) and print the equivalent pyflow TOML config file.",
        epilog=IMPORT_EPILOG,
    )
    imp.add_argument("script", metavar="SCRIPT", help="the RouterOS script ('-' = stdin)")
    imp.add_argument("--map-interface", action="append", metavar="ROUTEROS=LINUX",
                     help="the Linux name of a RouterOS interface, e.g. ether1=eth0 (repeatable, or "
                          "comma-separated)")
    imp.add_argument("--ignore-other", action="store_true",
                     help="skip commands of other menus with a warning instead of failing")
    imp.set_defaults(func=cmd_import_routeros)
    add_commands(sub)  # status, flows, top, collect
    return p


# --------------------------------------------------------------------------
# Settings from the layers.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    settings: Settings
    source: str | None  # the config file or script, if any
    warnings: list[str]


def _script_layer(path: str, maps: list[str] | None, ignore_other: bool) -> tuple[Layer, list[str], Any]:
    from pyflow.routeros import load_script, parse_interface_map, parse_script

    interface_map = parse_interface_map(maps or [])
    if path == "-":
        text = read_stream(sys.stdin, "<stdin>", "the RouterOS script", MAX_SCRIPT_BYTES)
        imported = parse_script(text, "<stdin>", interface_map, ignore_other)
    else:
        imported = load_script(path, interface_map, ignore_other)
    return read_document(imported.doc, imported.locator), imported.warnings, imported


def _file_layer(args: argparse.Namespace) -> tuple[Layer | None, list[str]]:
    if getattr(args, "routeros", None):
        layer, warnings, _ = _script_layer(args.routeros, args.map_interface, args.ignore_other)
        return layer, warnings
    if args.map_interface or args.ignore_other:
        raise ConfigError("--map-interface and --ignore-other go with --routeros SCRIPT")
    if args.config:
        return load_toml(args.config), []
    return None, []


def load_settings(args: argparse.Namespace) -> Loaded:
    """The settings ``run`` and ``check`` work with, and the warnings reading them gave."""
    base, warnings = _file_layer(args)
    source = getattr(args, "routeros", None) or getattr(args, "config", None)
    settings = build_settings(base, args)
    return Loaded(settings, source, [*warnings, *settings.warnings()])


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(args).settings


def run_blockers(loaded: Loaded) -> list[str]:
    """Why `pyflow run` would refuse these (valid) settings: enabled=no, no target."""
    s = loaded.settings
    out = []
    if not s.enabled:
        how = ("with --enabled no" if loaded.source is None else
               f"{loaded.source} does not set enabled=yes (RouterOS's default is no)")
        out.append(f"traffic-flow is disabled: {how}; set enabled=yes in [traffic-flow] (a RouterOS script: "
                   "/ip traffic-flow set enabled=yes), or pass --enabled yes")
    if not s.targets:
        where = "" if loaded.source is None else f" in {loaded.source} ([[target]] tables) or"
        extra = f" ({len(s.disabled_targets)} disabled)" if s.disabled_targets else ""
        out.append(f"no target{extra}: add one{where} with --target HOST[:PORT][/VERSION]")
    return out


# --------------------------------------------------------------------------
# Commands.
# --------------------------------------------------------------------------


def runnable_settings(args: argparse.Namespace) -> Loaded:
    """The settings ``run`` starts (or reloads) with: valid, enabled, with a target."""
    loaded = load_settings(args)
    for w in loaded.warnings:
        log(f"warning: {w}")
    blockers = run_blockers(loaded)
    if blockers:
        raise ConfigError("; ".join(blockers))
    return loaded


def cmd_run(args: argparse.Namespace) -> int:
    loaded = runnable_settings(args)
    settings = loaded.settings
    # Imported only now: nothing below runs before every setting is known good.
    from pyflow.runner import run_meter

    stop = threading.Event()
    reload = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, _frame: FrameType | None) -> None:
        reload.set()

    def reread() -> Settings:
        """SIGHUP: the same sources again (the file or script re-read, the same flags over it)."""
        log(f"reload: reading {loaded.source or 'the command line'}")
        return runnable_settings(args).settings

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    if loaded.source:
        log(f"settings from {loaded.source}")
    sampling = (f" packet-sampling=yes sampling-interval={settings.sampling_interval} "
                f"sampling-space={settings.sampling_space}" if settings.packet_sampling else "")
    log(f"cache-entries={format_size(settings.cache_entries)} "
        f"active-flow-timeout={format_duration(settings.active_flow_timeout_ns)} "
        f"inactive-flow-timeout={format_duration(settings.inactive_flow_timeout_ns)}{sampling}")
    line = StatusLine(sys.stderr) if sys.stderr.isatty() else None
    previous = set_hook(line.log if line else None)  # every message above the live line
    try:
        run_meter(settings, stop, log, reload=reload, load_settings=reread, status=line.show if line else None)
    finally:
        set_hook(previous)
        if line:
            line.clear()
    return 0


class StatusLine:
    """On a terminal, ``pyflow run`` keeps one live line at the bottom (cache, export rate,
    targets); log lines are printed above it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.text = ""

    def clear(self) -> None:
        if self.text:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def show(self, text: str) -> None:
        self.text = text
        self.stream.write(f"\r\x1b[K{text}")
        self.stream.flush()

    def log(self, msg: str) -> None:
        self.clear()
        to_stderr(msg)
        if self.text:
            self.show(self.text)


def check_as_file(path: str) -> int:
    """Load the prefix-to-AS file as ``run`` would: its prefix count, or ConfigError naming it and the line."""
    from pyflow.host.asn import AsTable

    try:
        return len(AsTable.from_file(path))
    except ConfigError as exc:
        raise ConfigError(f"as-file: {exc}") from None


def cmd_check(args: argparse.Namespace) -> int:
    from pyflow.routeros import host_interfaces, print_settings

    loaded = load_settings(args)
    s = loaded.settings
    prefixes = check_as_file(s.as_file) if s.as_file else None
    warnings = list(loaded.warnings) + [f"pyflow run would refuse these settings: {b}" for b in run_blockers(loaded)]
    present = host_interfaces()
    if present is not None and s.interfaces != ("all",):
        missing = [n for n in s.interfaces if n not in present]
        if missing:
            warnings.append(f"this host has no interface {', '.join(missing)} (fine if the settings are for "
                            "another host; --map-interface maps RouterOS names)")
    sys.stdout.write(print_settings(s, prefixes))
    links = host_links()
    if links is not None:
        sys.stdout.write("\n".join(check_link_lines(s, links)) + "\n")
        if s.interfaces != ("all",):
            warnings += double_counts(links, s.interfaces)
    sys.stdout.flush()
    for w in warnings:
        log(f"warning: {w}")
    return 0


def host_links() -> list[Link] | None:
    """This host's links (rtnetlink, no root needed), or None where they cannot be read."""
    from pyflow.interfaces import list_links

    try:
        return list_links()
    except OSError:
        return None


def check_link_lines(s: Settings, links: list[Link]) -> list[str]:
    """Every link of this host: would it be metered with these settings, and how, or why not."""
    decisions = plan(links, s.interfaces)
    rows = []
    for link in sorted(links, key=lambda item: item.ifindex):
        d = decisions[link.ifindex]
        if d.metered:
            o = s.options_for(link.name)
            sides = "+".join(side for side, on in (("ingress", o.ingress), ("egress", o.egress)) if on)
            how = f"hook {o.hook}, {sides}" + (f" ({d.reason})" if d.reason and d.reason != "named" else "")
        else:
            how = d.reason
        rows.append([str(link.ifindex), visible(link.name), "yes" if d.metered else "no", visible(how)])
    return ["", "this host's links (what `pyflow run` would meter here):",
            *table(("IFINDEX", "INTERFACE", "METERED", "HOW / WHY NOT"), rows, frozenset({0}))]


def cmd_import_routeros(args: argparse.Namespace) -> int:
    layer, warnings, imported = _script_layer(args.script, args.map_interface, args.ignore_other)
    settings = build_settings(layer, argparse.Namespace())  # every setting checked, as check and run would
    name = "<stdin>" if args.script == "-" else Path(args.script).name
    header = [f"pyflow settings from the RouterOS script {name} (pyflow import-routeros).",
              "Check: pyflow check --config FILE; run: pyflow run --config FILE"]
    if not settings.enabled:
        header.append("The script does not set enabled=yes (RouterOS's default is no): pyflow run will not start "
                      "until enabled = \"yes\" is added to [traffic-flow].")
    header += [f"warning: {w}" for w in warnings]
    sys.stdout.write(dump_toml(imported.doc, "\n".join(header), imported.notes))
    sys.stdout.flush()
    for w in warnings:
        log(f"warning: {w}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a flag argparse refused (it printed why)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except PyflowError as exc:
        print(f"pyflow: error: {message(str(exc))}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
