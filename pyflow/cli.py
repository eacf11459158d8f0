"""The ``pyflow`` command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from pyflow import __version__
from pyflow.config import (
    DEFAULT_VERSION,
    Settings,
    duration,
    normalize_version,
    parse_interface,
    parse_target,
    size,
)
from pyflow.errors import ConfigError, PyflowError
from pyflow.fields import parse_fields
from pyflow.units import format_duration, format_size

DESCRIPTION = """\
pyflow meters the packets of chosen interfaces in the kernel with eBPF (XDP)
and exports flow records as NetFlow v1, v5, v9 or IPFIX over UDP, following
MikroTik RouterOS "IP Traffic Flow": the same settings, names and defaults.
"""

RUN_EPILOG = """\
settings (RouterOS name -> flag):
  interfaces               --interface IF (repeat it), or 'all' (default)
                           per interface: --interface eth1,direction=both,hook=tc
                           direction: ingress (what the interface receives, as RouterOS
                           meters; XDP), egress (what it sends; TC clsact egress) or both;
                           --direction / --hook set the default for every interface
  cache-entries            --cache-entries 64k   flow cache size (k = 1024, M = 1024k)
  active-flow-timeout      --active-flow-timeout 30m
                           a flow open this long exports what it has and goes on
  inactive-flow-timeout    --inactive-flow-timeout 15s
                           a flow idle this long exports and leaves the cache
  target dst-address/port/version
                           --target HOST[:PORT][/VERSION], repeat for several targets;
                           IPv6 as [2001:db8::1]:2055/ipfix; PORT defaults to 2055,
                           VERSION to --version (9, as in RouterOS); per-target options
                           follow after commas, with RouterOS's names:
                           ,src-address=IP ,v9-template-refresh=N ,v9-template-timeout=30m
                           ,time=routeros (IPFIX: flowStart/EndSysUpTime + systemInitTime,
                           as RouterOS sends; default time=absolute: flowStart/EndMilliseconds)
  target v9-template-refresh / v9-template-timeout
                           --v9-template-refresh 20 --v9-template-timeout 30m
  ipfix (/ip traffic-flow ipfix field toggles)
                           --ipfix NAME=yes|no[,NAME=yes|no...] (repeat it; a later value
                           wins): the fields v9 and IPFIX records carry. RouterOS's names
                           bytes dst-address dst-address-mask dst-mac-address dst-port
                           first-forwarded gateway icmp-code icmp-type igmp-type
                           in-interface ip-header-length ip-total-length ipv6-flow-label
                           is-multicast last-forwarded nat-dst-address nat-dst-port
                           nat-events nat-src-address nat-src-port out-interface packets
                           protocol src-address src-address-mask src-mac-address src-port
                           sys-init-time tcp-ack-num tcp-flags tcp-seq-num tcp-window-size
                           tos ttl udp-length, and pyflow's as (BGP AS numbers) and vlan-id;
                           all yes except nat-events=no (as in RouterOS), e.g.
                           --ipfix nat-events=yes,ttl=no

durations are written as RouterOS does: 500ms, 15s, 30m, 1h30m, 1d, 00:30:00.

examples:
  meter every interface, IPFIX to a local nfcapd:
    sudo pyflow run --interface all --target 127.0.0.1:2055/ipfix
  two interfaces, short timeouts, two collectors:
    sudo pyflow run --interface eth0 --interface eth1 \\
        --active-flow-timeout 1m --inactive-flow-timeout 15s \\
        --target 192.0.2.50:2055/ipfix --target 192.0.2.51:9995/ipfix

exit status: 0 after SIGINT/SIGTERM (everything cached is exported first),
2 for a bad setting, 3 when the kernel side cannot be set up (not root,
no such interface, missing kernel headers, verifier rejection), 1 otherwise.
"""


def _duration_arg(name: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            return duration(name, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _size_arg(text: str) -> int:
    try:
        return size("cache-entries", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyflow", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-V", "--pyflow-version", action="version", version=f"pyflow {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="meter interfaces and export flows until SIGINT/SIGTERM",
        description="Meter the given interfaces and export flow records to every target.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("-i", "--interface", action="append", metavar="IF[,OPTION=VALUE...]",
                     help="interface to meter (repeatable); 'all' = every non-loopback interface that is up "
                          "(default: all); options: direction=ingress|egress|both, hook=auto|xdp|tc")
    run.add_argument("--direction", choices=("ingress", "egress", "both"), default="ingress",
                     help="what to meter on every interface: what it receives (RouterOS's way), what it sends "
                          "(TC egress), or both (default: ingress)")
    run.add_argument("--hook", choices=("auto", "xdp", "tc"), default="auto",
                     help="receive-side hook: XDP, TC clsact ingress, or auto = XDP where it attaches, "
                          "else TC (default: auto)")
    run.add_argument("-t", "--target", action="append", metavar="HOST[:PORT][/VERSION]",
                     help="collector to export to (repeatable); required")
    run.add_argument("--version", dest="default_version", default=DEFAULT_VERSION, metavar="VERSION",
                     help="export format for targets that do not name one: 1, 5, 9 or ipfix (default: 9)")
    run.add_argument("--active-flow-timeout", type=_duration_arg("active-flow-timeout"), default="30m",
                     metavar="DURATION", help="default: 30m")
    run.add_argument("--inactive-flow-timeout", type=_duration_arg("inactive-flow-timeout"), default="15s",
                     metavar="DURATION", help="default: 15s")
    run.add_argument("--cache-entries", type=_size_arg, default="64k", metavar="N", help="default: 64k")
    run.add_argument("--v9-template-refresh", type=int, default=20, metavar="PACKETS",
                     help="re-send templates every PACKETS export packets (default: 20)")
    run.add_argument("--v9-template-timeout", type=_duration_arg("v9-template-timeout"), default="30m",
                     metavar="DURATION", help="re-send templates at least this often (default: 30m)")
    run.add_argument("--sweep-interval", type=_duration_arg("sweep-interval"), default="1s",
                     metavar="DURATION", help="how often the cache is swept (default: 1s)")
    run.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto",
                     help="XDP attach mode; auto tries native, then generic (default: auto)")
    run.add_argument("--as-file", metavar="FILE",
                     help="prefix-to-AS file ('PREFIX AS' per line, '#' comments) for the src/dst AS fields; "
                          "without it they are 0, as RouterOS sends when it runs no BGP")
    run.add_argument("--metrics-address", default="127.0.0.1:9796", metavar="HOST:PORT",
                     help="serve Prometheus metrics here; '' turns it off (default: 127.0.0.1:9796)")
    run.add_argument("--ipfix", action="append", metavar="NAME=yes|no[,...]",
                     help="turn v9/IPFIX record fields on or off, RouterOS's /ip traffic-flow ipfix "
                          "(repeatable, a later value wins; default: all yes but nat-events)")
    run.set_defaults(func=cmd_run)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if not args.target:
        raise ConfigError("no target: give at least one --target HOST[:PORT][/VERSION]")
    default_version = normalize_version(args.default_version)
    targets = []
    for spec in args.target:
        targets.append(parse_target(spec, default_version, v9_template_refresh=args.v9_template_refresh,
                                    v9_template_timeout_ns=args.v9_template_timeout))
    names, options = [], []
    direction, hook = args.direction, args.hook
    for spec in args.interface or ["all"]:
        opt = parse_interface(spec, args.direction, args.hook)
        names.append(opt.name)
        if opt.name == "all":  # all,direction=both: the options of every interface
            direction, hook = opt.direction, opt.hook
        elif "," in spec:
            options.append(opt)
    if "all" in names and len(names) > 1:
        raise ConfigError("--interface all cannot be combined with named interfaces")
    return Settings(
        interfaces=tuple(names),
        direction=direction,
        hook=hook,
        interface_options=tuple(options),
        as_file=args.as_file,
        cache_entries=args.cache_entries,
        active_flow_timeout_ns=args.active_flow_timeout,
        inactive_flow_timeout_ns=args.inactive_flow_timeout,
        targets=tuple(targets),
        sweep_interval_ns=args.sweep_interval,
        xdp_mode=args.xdp_mode,
        metrics_address=args.metrics_address,
        ipfix=parse_fields(args.ipfix or ()),
    )


def cmd_run(args: argparse.Namespace) -> int:
    from pyflow.runner import run_meter

    settings = settings_from_args(args)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log(f"cache-entries={format_size(settings.cache_entries)} "
        f"active-flow-timeout={format_duration(settings.active_flow_timeout_ns)} "
        f"inactive-flow-timeout={format_duration(settings.inactive_flow_timeout_ns)}")
    run_meter(settings, stop, log)
    return 0


def log(msg: str) -> None:
    print(f"pyflow: {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PyflowError as exc:
        print(f"pyflow: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
