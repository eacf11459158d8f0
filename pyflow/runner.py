"""Wires settings, kernel meter, targets and agent together for ``pyflow run``."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from pyflow.agent import Agent
from pyflow.config import Settings, TargetSettings
from pyflow.control import ControlServer, check_socket_path
from pyflow.enrich import Enricher
from pyflow.errors import ConfigError, PyflowError
from pyflow.export.context import ExportContext, Sampling
from pyflow.export.registry import encoder_for
from pyflow.export.session import Session, read_session
from pyflow.export.target import Target
from pyflow.follow import InterfaceSet, LinkWatcher
from pyflow.host.conntrack import NatEventListener
from pyflow.interfaces import rx_packets
from pyflow.kernel import caps, pin
from pyflow.kernel.build import check_root
from pyflow.kernel.loader import PROGRAMS, FlowMeter, KernelSettings
from pyflow.metrics import Metrics, serve
from pyflow.sweep import SweepRules


def kernel_settings(settings: Settings) -> KernelSettings:
    """The -D flags: timeouts, cache size, and the per-flow detail the field set needs.

    A field that is off costs nothing per packet: min/max TTL and length are
    only kept when ``ttl`` / ``ip-total-length`` are on, and the fib lookup on
    a new flow only runs when ``out-interface`` or ``gateway`` is (v1/v5
    targets carry both, so they keep it on).
    """
    fields = settings.ipfix
    legacy = any(t.version in ("1", "5") for t in settings.targets)
    return KernelSettings(
        cache_entries=settings.cache_entries,
        inactive_timeout_ns=settings.inactive_flow_timeout_ns,
        end_idle_ns=settings.end_idle_ns,
        ttl="ttl" in fields,
        length="ip-total-length" in fields,
        fib=legacy or "out-interface" in fields or "gateway" in fields,
        sampling_interval=settings.sampling[0],
        sampling_space=settings.sampling[1],
    )


def export_context(settings: Settings, ts: TargetSettings, interfaces: tuple[tuple[int, str], ...]) -> ExportContext:
    """What one target's encoder needs: interface names (when it asks for them), time mode, fields,
    the sampling it announces (when sampling is on), what its IPFIX sequence numbers count."""
    sampling = Sampling(*settings.sampling) if settings.packet_sampling else None
    return ExportContext(sampling=sampling, interfaces=interfaces if ts.interface_names else (),
                         time_mode=ts.time_mode, fields=settings.ipfix, sequence=ts.sequence)


def exclude_own_exports(meter: FlowMeter, target: Target) -> None:
    """Tell the kernel the 4-tuple of ``target``'s datagrams: they are never metered.

    A target whose connect() failed at start (no route yet) has no 4-tuple; the
    runner calls this again before every sweep, so it is registered once it has one.
    """
    if target.sock is None:
        return
    try:
        src, sport = target.sock.getsockname()[:2]
        dst, dport = target.sock.getpeername()[:2]
    except OSError:  # not connected (yet)
        return
    meter.exclude_own_export(str(src).split("%")[0], int(sport), str(dst).split("%")[0], int(dport))


def open_target(t: Target, meter: FlowMeter, stack: ExitStack, log: Callable[[str], None]) -> None:
    stack.callback(t.close)
    t.open()
    exclude_own_exports(meter, t)
    if t.rebind_error:
        log(f"{t.name}: {t.rebind_error}: collectors that key exporters on the port see a new one")
    log(f"exporting to {t.name}")


def in_process_meter(ks: KernelSettings) -> FlowMeter:
    """A meter compiled and loaded by bcc in this process (every entry point loaded)."""
    meter = FlowMeter(ks)
    try:
        for hook in PROGRAMS:
            meter.load(hook)
    except BaseException:
        meter.close()
        raise
    return meter


def apply_settings(new: Settings, agent: Agent, ifs: InterfaceSet, targets: list[Target], stack: ExitStack,
                   log: Callable[[str], None], new_meter: Callable[[KernelSettings], FlowMeter] | None = None,
                   session: Session | None = None) -> None:
    """SIGHUP: apply re-read settings without losing a count (called with the agent's lock held).

    What the kernel program is compiled with (cache size, inactive timeout, the
    per-flow detail the fields need, sampling) takes a new program: it is
    compiled and loaded (``new_meter``: by default in this process; ``pyflow run``
    compiles in a child and pins it), put in the old one's place on every
    interface atomically, and the old maps are exported to the end
    (``Agent.hand_over``), then unpinned.
    Everything else applies at once: targets added, removed or kept (a kept
    target keeps its socket, sequence numbers and template clock), field
    toggles (templates are re-sent at once), timeouts, interfaces.

    All or nothing: every step that may fail (the compile, new targets' sockets,
    attaching newly named interfaces, the switch itself) runs before anything is
    committed; when one fails, what was done is undone (the old program back on
    every interface, attachments as they were, new sockets closed) and the error
    is raised: the agent goes on with the settings it had.
    """
    old = agent.settings
    if new.metrics_address != old.metrics_address:
        log("reload: metrics-address changes need a restart; the endpoint stays where it is")
    for ts in new.targets:
        encoder_for(ts.version)
    old_kernel, new_kernel = kernel_settings(old), kernel_settings(new)
    meter = (new_meter or in_process_meter)(new_kernel) if new_kernel != old_kernel else None
    kept = {t.settings: t for t in targets}
    added: list[Target] = []
    try:
        new_targets = _open_targets(new, kept, added, ifs)
        _apply_interfaces(ifs, old, new, agent.meter, log)
        if meter is not None:
            try:
                done = switch_program(agent, meter)
            except BaseException:
                _restore_interfaces(ifs, old, agent.meter, log)
                raise
    except BaseException:
        for t in added:
            t.close()
        if meter is not None:
            (meter.release if meter.attachments else meter.close)()  # a failed give-back: leave it metering
        raise
    # committed: nothing below fails
    if meter is not None:
        ifs.use(meter)
        log(f"reload: new kernel program in place (cache-entries={new.cache_entries}); "
            f"{len(done)} records exported from the old cache")
        if session is not None:
            session.save()  # the export session goes on in the new program's maps
    _swap_targets(new, agent, ifs, targets, new_targets, added, list(kept.values()), stack, log)
    if session is not None:
        for t in added:
            session.attach(t)
    agent.settings = new
    agent.rules = SweepRules(active_ns=new.active_flow_timeout_ns, inactive_ns=new.inactive_flow_timeout_ns,
                             end_idle_ns=new.end_idle_ns)
    log("reload: settings applied")


def _open_targets(new: Settings, kept: dict[TargetSettings, Target], added: list[Target],
                  ifs: InterfaceSet) -> list[Target]:
    """The reload's targets: the kept ones (popped from ``kept``) and new ones, opened (in ``added``)."""
    out = []
    for ts in new.targets:
        t = kept.pop(ts, None)
        if t is None:
            t = Target(ts, encoder_for(ts.version), ctx=export_context(new, ts, ifs.names()))
            added.append(t)
            t.open()
        out.append(t)
    return out


def _swap_targets(new: Settings, agent: Agent, ifs: InterfaceSet, targets: list[Target], new_targets: list[Target],
                  added: list[Target], removed: list[Target], stack: ExitStack, log: Callable[[str], None]) -> None:
    """The committed reload's targets go live, the removed ones are closed (nothing here fails)."""
    for t in added:
        stack.callback(t.close)
        log(f"exporting to {t.name}")
    for t in new_targets:
        try:
            exclude_own_exports(agent.meter, t)
        except OSError as exc:  # tried again before every sweep
            log(f"reload: {t.name}: its datagrams are not excluded from metering yet: {exc}")
    for t in removed:
        log(f"reload: {t.name} removed")
        t.close()
    for t in new_targets:
        ctx = export_context(new, t.settings, ifs.names())
        if ctx != t.ctx:
            t.ctx = ctx
            t.clock.last_sent_ns = None  # new templates / options go out with the next export
    targets[:] = new_targets
    agent.targets = targets


def _apply_interfaces(ifs: InterfaceSet, old: Settings, new: Settings, meter: FlowMeter,
                      log: Callable[[str], None]) -> None:
    """The interface part of a reload, on the running program; undone (old settings again) if it fails."""
    try:
        ifs.apply(new, meter)
    except BaseException:
        _restore_interfaces(ifs, old, meter, log)
        raise


def _restore_interfaces(ifs: InterfaceSet, old: Settings, meter: FlowMeter, log: Callable[[str], None]) -> None:
    try:
        ifs.apply(old, meter)
    except Exception as exc:  # the first error is the one to report
        log(f"reload: putting the interfaces back as they were failed too: {exc}")


def switch_program(agent: Agent, meter: FlowMeter) -> np.ndarray:
    """``meter`` in the running program's place on every interface, the old cache exported, the old
    program closed.  If anything fails, the old program is back where it was (and the error raised)."""
    previous = agent.meter
    meter.take_over(previous)  # all or nothing
    try:
        done = agent.hand_over(meter)
    except BaseException:
        if agent.meter is previous:
            previous.take_over(meter)
        raise
    previous.close()  # its programs are no longer attached anywhere: only the maps go (and their pins)
    return done


def reload_settings(agent: Agent, ifs: InterfaceSet, targets: list[Target], stack: ExitStack,
                    log: Callable[[str], None], load_settings: Callable[[], Settings],
                    new_meter: Callable[[KernelSettings], FlowMeter] | None = None,
                    session: Session | None = None) -> bool:
    """SIGHUP: read the settings again and apply them; False (and the error logged) if either
    failed, in which case the agent goes on, unchanged, with the settings it had."""
    try:
        new = load_settings()
        with agent.lock:
            apply_settings(new, agent, ifs, targets, stack, log, new_meter=new_meter, session=session)
    except PyflowError as exc:
        log(f"reload failed: {exc}; the running settings stay")
        return False
    except Exception as exc:  # a reload never stops the agent: whatever it was, it was undone
        log(f"reload failed: {type(exc).__name__}: {exc}; the running settings stay")
        return False
    return True


class RateTracker:
    """Records exported per second between two looks."""

    def __init__(self) -> None:
        self.last: tuple[float, int] | None = None

    def per_second(self, records: int) -> float:
        now = time.monotonic()
        prev, self.last = self.last, (now, records)
        if prev is None or now <= prev[0]:
            return 0.0
        return (records - prev[1]) / (now - prev[0])


def status_line(agent: Agent, targets: list[Target], rate: RateTracker) -> str:
    """The one-line live status of ``pyflow run`` on a terminal."""
    s = agent.stats
    cap = agent.meter.settings.cache_entries
    failing = [t.name for t in targets if t.sock is None or t.stats.send_errors]
    health = f"targets: {len(targets) - len(failing)}/{len(targets)} ok" + (
        f" (errors: {', '.join(failing)})" if failing else "")
    return (f"pyflow: {s.cached:,} flows cached ({100 * s.cached / cap:.0f}% of {cap:,}), "
            f"{rate.per_second(s.records):,.0f} records/s exported, {health}")


ROUTE_FIELDS = ("src-address-mask", "dst-address-mask", "gateway", "out-interface")
NAT_FIELDS = ("nat-src-address", "nat-dst-address", "nat-src-port", "nat-dst-port")


def host_sources(settings: Settings, stack: ExitStack,
                 log: Callable[[str], None]) -> tuple[Enricher, NatEventListener | None]:
    """What the host adds to the records, for the fields some target sends.

    Routes (masks, gateways) when a v9/IPFIX field or a v1/v5 target needs them;
    conntrack's NAT table when a nat-* field is on; its events when nat-events=yes;
    the AS file when one is given.  Each source is closed with ``stack``.
    """
    from pyflow.host.asn import AsTable
    from pyflow.host.conntrack import NatTable
    from pyflow.host.routes import RouteWatcher

    fields = settings.ipfix
    templated = any(t.version in ("9", "ipfix") for t in settings.targets)
    legacy = any(t.version in ("1", "5") for t in settings.targets)
    routes = nat = asn = events = None
    if legacy or (templated and any(f in fields for f in ROUTE_FIELDS)):
        routes = RouteWatcher()
        stack.callback(routes.close)
    if templated and any(f in fields for f in NAT_FIELDS):
        nat = NatTable()
        stack.callback(nat.close)
    if templated and "nat-events" in fields:
        events = NatEventListener()
        stack.callback(events.close)
        log("nat-events: NAT44 session create/delete records from conntrack events")
    if settings.as_file:
        asn = AsTable.from_file(settings.as_file)
        log(f"AS numbers from {settings.as_file}")
    return Enricher(routes=routes, nat=nat, asn=asn), events


def pick_instance(found: list[pin.Instance], wanted: KernelSettings,
                  source: str) -> tuple[pin.Instance | None, list[pin.Instance]]:
    """The instance to go on with (built from these sources with these settings, with all its
    programs; the newest such), and the others (to be replaced and exported)."""

    same = [i for i in found if i.complete and i.built_with(wanted, source)]
    current = same[-1] if same else None
    return current, [i for i in found if i is not current]


class KernelSide:
    """What becomes of the kernel side when ``run_meter`` ends.

    After a clean stop (everything exported) the meter is closed: detached and
    unpinned.  Any other way out leaves what was taken over, or has counted
    since, pinned and attached, exactly as a killed agent would, for the next
    agent to take over.

    A start that fails before the agent runs (``agent`` is None) is undone:
    every attachment taken over from an older program is given back to it
    (atomic replace again), what this run attached anew is detached, and only
    then is a meter this run compiled closed.  No interface metered before the
    start is left unmetered.
    """

    def __init__(self, log: Callable[[str], None] = lambda _msg: None) -> None:
        self.log = log
        self.meters: list[FlowMeter] = []  # every meter opened, the one metering last
        self.instances: list[pin.Instance] = []  # found, not (yet) wrapped in a meter
        self.agent: Agent | None = None
        self.fresh: FlowMeter | None = None  # compiled by this run
        self.meter: FlowMeter | None = None  # the one this run goes on with
        self.before: set[tuple[str, str]] = set()  # its attachments when it was opened
        self.taken: list[tuple[FlowMeter, set[tuple[str, str]]]] = []  # older meters and what was taken from them
        self.clean = False

    def roll_back(self) -> None:
        """A failed start: the older programs back where they were, this run's attachments gone."""
        meter = self.meter
        if meter is None:
            return
        for old, keys in reversed(self.taken):
            back = [k for k in keys if k in meter.attachments]
            if not back:
                continue
            try:
                old.take_over(meter, back)
            except Exception as exc:  # the rest still goes back
                self.log(f"start failed, and putting the earlier program back failed too: {exc}")
                continue
            self.log(f"start failed: the earlier program (pinned at {old.pinned_at}) is back on "
                     f"{len(back)} attachment(s), counting as before")
        taken = {k for _, keys in self.taken for k in keys}  # not given back: they stay, with this meter
        for name, hook in [k for k in meter.attachments if k not in self.before and k not in taken]:
            meter.detach(name, hook)

    def finish(self) -> None:
        if not self.clean and self.agent is None:
            self.roll_back()
        current = self.agent.meter if self.agent is not None else None
        for meter in self.meters:
            # a meter this run compiled and never used goes, unless it still meters something
            # (a give-back that failed): then it stays for the next agent, like the others
            unused = meter is self.fresh and self.agent is None and not meter.attachments
            if self.clean or unused:
                meter.close()
            else:
                meter.release()
        if current is not None and current not in self.meters:
            (current.close if self.clean else current.release)()
        for inst in self.instances:
            inst.close()


def start_kernel_side(settings: Settings, pins: pin.NetnsPins, found: list[pin.Instance], side: KernelSide,
                      log: Callable[[str], None]) -> tuple[FlowMeter, list[FlowMeter]]:
    """The meter to run with (taken over, or compiled in a child) and the older ones it is to
    replace (opened, still attached: ``take_over_older`` puts the meter in their place)."""
    wanted = kernel_settings(settings)
    current, old = pick_instance(found, wanted, pin.source_hash())
    t0 = time.monotonic()
    if current is None:
        meter = FlowMeter.from_instance(pins.compile(wanted))
        side.fresh = meter
        log(f"kernel program compiled and loaded in a child process in {time.monotonic() - t0:.2f} s, "
            f"pinned at {meter.pinned_at}")
    else:
        side.instances.remove(current)
        meter = FlowMeter.from_instance(current)
        how = "" if current.found_by == "pins" else " (found attached)"
        log(f"taking over the kernel program pinned at {meter.pinned_at}{how}, left by an agent that is gone: "
            f"its {len(meter.read_flows()[0]):,} cached flows and counters carry on, "
            f"{len(meter.attachments)} attachment(s) still in place")
    side.meters.append(meter)
    side.meter = meter
    side.before = set(meter.attachments)
    olds = []
    for inst in old:
        side.instances.remove(inst)
        o = FlowMeter.from_instance(inst)
        side.meters.insert(0, o)
        olds.append(o)
    return meter, olds


def take_over_older(meter: FlowMeter, olds: list[FlowMeter], side: KernelSide, log: Callable[[str], None]) -> None:
    """The switch: ``meter``'s programs where the older ones' are (each take-over all or nothing;
    a later failure of the start gives them back, see ``KernelSide.roll_back``)."""
    for o in olds:
        side.taken.append((o, set(o.attachments)))
        meter.take_over(o)  # its programs out, ours in, atomically, where it was attached
        log(f"the kernel program pinned at {o.pinned_at} was built with other settings or sources, or lost "
            "its unattached programs: "
            f"replaced it on {len(meter.attachments)} attachment(s); its cache is exported next")


def drop_privileges(settings: Settings, user: tuple[int, int] | None, pins: pin.NetnsPins,
                    found: list[pin.Instance], log: Callable[[str], None]) -> None:
    """After the privileged start: only the capabilities the agent uses, and (``user``) not uid 0."""
    pins.give_to(*(user or (0, 0)), [i.path for i in found if i.path is not None])
    eff = caps.drop(user=user)
    who = (f"running as user {settings.user} (uid {user[0]}, gid {user[1]})" if user is not None else
           "running as uid 0 (--user pyflow, made by `make setup`, gives up root as well)")
    log(f"{who}; capabilities: {' '.join(caps.names(eff)) or 'none'} effective (CAP_PERFMON permitted, for a "
        "reload's compile); every other one dropped")


@dataclass
class _Run:
    """What one `pyflow run` builds, phase by phase (run_meter)."""

    settings: Settings
    stack: ExitStack
    log: Callable[[str], None]
    pins: pin.NetnsPins = field(default_factory=pin.NetnsPins)
    side: KernelSide | None = None
    metrics: Metrics = field(default_factory=Metrics)
    targets: list[Target] = field(default_factory=list)
    agent: Agent | None = None


def run_meter(settings: Settings, stop: threading.Event, log: Callable[[str], None],
              reload: threading.Event | None = None, load_settings: Callable[[], Settings] | None = None,
              status: Callable[[str], None] | None = None) -> None:
    """Meter and export until ``stop``; when ``reload`` is set, re-read the settings with
    ``load_settings`` and apply them (see :func:`apply_settings`).

    The kernel side lives in bpffs (pyflow/kernel/pin.py): one agent per network
    namespace; what an earlier agent left (pinned, or attached) is taken over
    and goes on counting; a program built with other settings is replaced and
    its cache exported first.  After the privileged start the agent keeps only
    the capabilities it uses (pyflow/kernel/caps.py).
    """
    if not settings.targets:
        raise ConfigError("no target configured")
    with ExitStack() as stack:
        run = _Run(settings, stack, log)
        t_start = time.monotonic()
        side = _privileged_start(run)
        meter, olds = start_kernel_side(settings, run.pins, side.instances, side, log)
        # host sources before any attach (conntrack events of the first metered flows are not
        # missed) and, like every step that may fail, before the switch
        enricher, nat_events = host_sources(settings, stack, log)
        ifs = InterfaceSet(meter, settings, log, on_change=lambda ifs: _names_changed(run.targets, ifs))
        ifs.check()  # a missing interface fails before the switch
        take_over_older(meter, olds, side, log)
        ifs.start()
        log(f"started in {time.monotonic() - t_start:.2f} s (kernel program ready and attached)")
        session, boot_unix_ms = _open_targets_resumed(run, meter, olds, ifs)
        agent = Agent(settings, olds[0] if olds else meter, run.targets, log=log, metrics=run.metrics,
                      enricher=enricher, nat_events=nat_events)
        session.boot_unix_ms = agent.boot_unix_ms = boot_unix_ms or agent.boot_unix_ms
        run.agent = side.agent = agent  # committed: from here on, a way out leaves everything attached
        _go_on_with(run, side, meter, olds, ifs)
        session.save()  # in the maps the agent goes on with
        _serve(run, agent, ifs, stop)
        agent.run(stop, _between(run, agent, ifs, session, status, reload, load_settings))
        side.clean = True  # everything exported: detach (done) and unpin on the way out
        _report(run.targets, agent, log)


def _privileged_start(run: _Run) -> KernelSide:
    """Root's part: checks, the namespace's lock, what earlier agents left, the capability drop,
    the metrics endpoint; every step that may fail runs before anything is attached."""
    settings, stack, log = run.settings, run.stack, run.log
    for ts in settings.targets:
        encoder_for(ts.version)  # an unknown version fails before anything is loaded
    check_root()  # before anything is locked, mounted or looked for
    user = caps.lookup_user(settings.user) if settings.user else None  # a missing user: exit 2, here
    run.pins.open(log)  # one agent per network namespace: a second one stops here
    stack.callback(run.pins.close)
    side = run.side = KernelSide(log)
    stack.callback(side.finish)
    side.instances = run.pins.find(log)
    drop_privileges(settings, user, run.pins, side.instances, log)  # before any thread: capabilities are per thread
    if settings.metrics_address:  # a taken port fails before anything is attached
        server = serve(run.metrics, settings.metrics_address)
        stack.callback(server.shutdown)
        log(f"metrics on http://{settings.metrics_address}/metrics")
    if settings.control_socket:  # a live agent on the same socket fails before anything is attached
        check_socket_path(settings.control_socket)
    return side


def _names_changed(targets: list[Target], ifs: InterfaceSet) -> None:
    for t in targets:  # the interface-name options data follows the host
        if t.settings.interface_names:
            t.ctx = dataclasses.replace(t.ctx, interfaces=ifs.names())


def _open_targets_resumed(run: _Run, meter: FlowMeter, olds: list[FlowMeter],
                          ifs: InterfaceSet) -> tuple[Session, int | None]:
    """Every target opened, going on with the export session an earlier agent left (sequence numbers,
    template clock, source port); the session and its boot instant (0: a new session)."""
    settings, log = run.settings, run.log
    run.targets += [Target(ts, encoder_for(ts.version), ctx=export_context(settings, ts, ifs.names()))
                    for ts in settings.targets]
    kept = read_session(next((b for m in [meter, *reversed(olds)] if (b := m.load_session())), b""))
    session = Session(0, run.targets, lambda blob: _agent(run).meter.save_session(blob), log)
    resumed = session.resume(kept)
    if resumed:
        log(f"going on with the earlier agent's export session: {', '.join(resumed)}")
    for t in run.targets:
        open_target(t, meter, run.stack, log)
        session.attach(t)
    return session, kept.boot_unix_ms


def _agent(run: _Run) -> Agent:
    assert run.agent is not None, "the agent is made before the session is first saved"
    return run.agent


def _go_on_with(run: _Run, side: KernelSide, meter: FlowMeter, olds: list[FlowMeter], ifs: InterfaceSet) -> None:
    """Stray attachments of earlier agents detached; every older program's cache exported, in turn."""
    agent, log = _agent(run), run.log
    metered = {(a[0], a[2]) for a in ifs.attached()}
    for name, hook in [k for k in meter.attachments if k not in metered]:
        log(f"{name}: the earlier agent's {hook} attachment is not in these settings: detached")
        meter.detach(name, hook)
    for nxt in [*olds[1:], meter]:
        if agent.meter is nxt:
            continue
        previous = agent.meter
        with agent.lock:
            done = agent.hand_over(nxt)
        previous.close()
        side.meters.remove(previous)
        log(f"exported {len(done)} records from the replaced program's cache")


def _serve(run: _Run, agent: Agent, ifs: InterfaceSet, stop: threading.Event) -> None:
    """The metrics' view of the agent, the link watcher and the control socket."""
    run.metrics.attach(agent, interfaces=ifs.attached,
                       rx_packets=lambda: {i: n - ifs.rx_at_attach.get(i, 0)
                                           for i, n in rx_packets(list(ifs.rx_at_attach)).items()})

    def follow() -> None:
        with agent.lock:  # never in the middle of a sweep, never after the final flush began
            if not stop.is_set():
                ifs.reconcile()

    watcher = LinkWatcher(follow, run.log)
    run.stack.callback(watcher.close)
    if run.settings.control_socket:
        control = ControlServer(agent, run.settings.control_socket, links=ifs.listing,
                                started=run.metrics.start_time)
        control.start()
        run.stack.callback(control.close)


def _between(run: _Run, agent: Agent, ifs: InterfaceSet, session: Session, status: Callable[[str], None] | None,
             reload: threading.Event | None, load_settings: Callable[[], Settings] | None) -> Callable[[], None]:
    """What the loop does between sweeps: late targets' 4-tuples, the status line, a pending reload."""
    rate = RateTracker()
    targets, log = run.targets, run.log

    def between() -> None:
        for t in targets:  # a target that connects late gets its 4-tuple excluded then
            exclude_own_exports(agent.meter, t)
        if status is not None:
            status(status_line(agent, targets, rate))
        if reload is None or load_settings is None or not reload.is_set():
            return
        reload.clear()
        run.metrics.reloaded(reload_settings(agent, ifs, targets, run.stack, log, load_settings,
                                             new_meter=lambda ks: FlowMeter.from_instance(run.pins.compile(ks)),
                                             session=session))

    return between


def _report(targets: list[Target], agent: Agent, log: Callable[[str], None]) -> None:
    for t in targets:
        s = t.stats
        errs = ", ".join(f"{k}={v}" for k, v in sorted(s.send_errors.items())) or "none"
        log(f"{t.name}: {s.records} records in {s.datagrams} datagrams, {s.not_representable} not representable, "
            f"send errors: {errs}")
    log(f"stopped after {agent.stats.sweeps} sweeps, {agent.stats.records} records")
