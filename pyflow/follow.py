"""Interfaces that follow the host: attach to new ones, let go of removed ones, keep renamed ones.

``interfaces=all`` means every interface that is up and carries packets into
IP, now and later (pyflow.links decides: not loopback, not bridge ports or
bond slaves, not a VLAN whose parent is metered, ...): a link event
(rtnetlink RTMGRP_LINK, read with pyroute2: pyflow/host/rtevents.py) wakes a
thread that reconciles the attachments within a fraction of a second, so a
port that joins a bridge stops being metered and is metered again when it
leaves.  A named list is checked at
start (a missing name is an error there); a named interface that disappears
later is a warning, and it is metered again if it comes back.

Flows are keyed by ifindex, so a renamed interface keeps its cached flows and
only its name changes (in the options data and the metrics).  The cached
flows of a removed interface stay in the cache and leave by the usual
timeouts: nothing is lost.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyflow.config import Settings
from pyflow.errors import KernelError
from pyflow.host._netns import WakePipe, stop_reader
from pyflow.host.rtevents import RtnlEvents
from pyflow.interfaces import list_links, rx_packets
from pyflow.kernel.loader import Attachment, FlowMeter
from pyflow.links import AGGREGATE_KINDS, BRIDGE_KINDS, Decision, Link, double_counts, plan

RTMGRP_LINK = 0x1
HOOK_WORDS = {"xdp": "with XDP", "tc_ingress": "with TC on ingress", "tc_egress": "with TC on egress"}


def attach_interface(meter: FlowMeter, settings: Settings, name: str,
                     log: Callable[[str], None], prefer_tc: str = "") -> list[Attachment]:
    """Attach what the interface's options ask for; hook auto takes TC ingress where XDP cannot attach,
    and where ``prefer_tc`` says why TC is better (:func:`tc_reason`)."""
    opts = settings.options_for(name)
    out = []
    if opts.ingress:
        if opts.hook == "auto" and prefer_tc:
            log(f"{name}: {prefer_tc}: metering its ingress with TC (hook=xdp forces XDP)")
            out.append(meter.attach(name, hook="tc_ingress"))
        elif opts.hook == "tc":
            out.append(meter.attach(name, hook="tc_ingress"))
        elif opts.hook == "xdp":
            out.append(meter.attach(name, settings.xdp_mode, hook="xdp"))
        else:
            try:
                out.append(meter.attach(name, settings.xdp_mode, hook="xdp"))
            except KernelError as exc:
                if "no such interface" in str(exc):
                    raise
                log(f"{name}: XDP not possible ({exc}); metering its ingress with TC instead")
                out.append(meter.attach(name, hook="tc_ingress"))
    if opts.egress:
        out.append(meter.attach(name, hook="tc_egress"))
    return out


def tc_reason(link: Link, links: dict[int, Link]) -> str:
    """Why hook auto should meter ``link`` with TC rather than XDP ("" = no reason)."""
    if link.kind in BRIDGE_KINDS | AGGREGATE_KINDS or any(o.master == link.ifindex for o in links.values()):
        # XDP there runs in generic mode anyway, and while it is attached the kernel refuses any
        # XDP change on the ports (attach or detach): a port that joins later could never be let go
        return f"a {link.kind or 'master'} device (XDP on it would lock XDP on its ports)"
    if not link.ethernet:
        return "no Ethernet header (an L3 link: XDP there is generic anyway)"
    if any(o.kind == "vlan" and o.lower == link.ifindex for o in links.values()):
        return "it carries VLANs (TC reads their tags from the skb whatever the NIC offloads)"
    return ""


@dataclass
class Metered:
    name: str
    attachments: list[Attachment] = field(default_factory=list)


class InterfaceSet:
    """The interfaces being metered, reconciled with the host's links on demand."""

    def __init__(self, meter: FlowMeter, settings: Settings, log: Callable[[str], None],
                 on_change: Callable[[InterfaceSet], None] | None = None) -> None:
        self.meter = meter
        self.settings = settings
        self.log = log
        self.on_change = on_change
        self.follow_all = tuple(settings.interfaces) == ("all",)
        self.metered: dict[int, Metered] = {}  # ifindex -> name and attachments
        self.rx_at_attach: dict[int, int] = {}  # the gap metric's zero point per ingress-metered ifindex
        self.decisions: dict[int, Decision] = {}  # every link's decision at the last reconcile
        self.links: dict[int, Link] = {}
        self.lock = threading.Lock()

    # -- views for the exporters and the metrics ---------------------------------------

    def names(self) -> tuple[tuple[int, str], ...]:
        """(ifindex, name) of every metered interface: the interface-name options data."""
        return tuple((idx, m.name) for idx, m in sorted(self.metered.items()))

    def attached(self) -> list[tuple[str, int, str, str]]:
        """(name, ifindex, hook, mode) of every attachment: the program-info metric."""
        return [(m.name, idx, a.hook, a.mode) for idx, m in sorted(self.metered.items()) for a in m.attachments]

    # -- reconciling -----------------------------------------------------------------

    def wanted(self, links: list[Link]) -> dict[int, str]:
        """ifindex -> name of the links to meter now; keeps every link's decision for the listings."""
        self.decisions = plan(links, self.settings.interfaces)
        self.links = {link.ifindex: link for link in links}
        return {link.ifindex: link.name for link in links if self.decisions[link.ifindex].metered}

    def listing(self) -> list[dict[str, object]]:
        """Every link: metered (its hooks and modes) or skipped (why), for `pyflow status`."""
        with self.lock:
            out: list[dict[str, object]] = []
            for idx, link in sorted(self.links.items()):
                d = self.decisions.get(idx)
                m = self.metered.get(idx)
                row: dict[str, object] = {"name": link.name, "ifindex": idx, "metered": m is not None,
                                          "reason": d.reason if d else ""}
                if m is not None:
                    row["hooks"] = [f"{a.hook} {a.mode}" for a in m.attachments]
                elif d is not None and d.metered:
                    row["reason"] = "not attached (see the log)"
                out.append(row)
            return out

    def check(self) -> list[Link]:
        """Every named interface must exist; ``all`` must find one.  The host's links."""
        links = list_links()
        wanted = self.wanted(links)
        if self.follow_all and not wanted:
            raise KernelError("interfaces=all but no non-loopback interface is up")
        missing = sorted(set(self.settings.interfaces) - set(wanted.values())) if not self.follow_all else []
        if missing:
            raise KernelError(f"no such interface: {', '.join(missing)} (see `ip link`)")
        return links

    def start(self) -> None:
        """The first reconcile, after ``check``; a named list that counts a frame twice is warned of."""
        links = self.check()
        if not self.follow_all:
            for warning in double_counts(links, self.settings.interfaces):
                self.log(f"warning: {warning}")
        self.reconcile(links)

    def apply(self, settings: Settings, meter: FlowMeter) -> None:
        """New settings (a reload) and/or a new program: re-read the attachments from ``meter``,
        let go of interfaces no longer wanted or whose direction/hook changed, then reconcile."""
        with self.lock:
            old = self.settings
            self.settings = settings
            self.meter = meter
            self.follow_all = tuple(settings.interfaces) == ("all",)
            wanted = self.wanted(list_links())
            for idx in list(self.metered):
                m = self.metered[idx]
                if idx not in wanted or old.options_for(m.name) != settings.options_for(m.name):
                    self._let_go(idx, "no longer metered as before (settings reloaded)")
                else:
                    m.attachments = [a for (name, _), a in meter.attachments.items() if name == m.name]
        self.reconcile()

    def use(self, meter: FlowMeter) -> None:
        """``meter`` took the old program's place on every attachment (a reload): go on with it."""
        with self.lock:
            self.meter = meter
            for m in self.metered.values():
                m.attachments = [a for (name, _), a in meter.attachments.items() if name == m.name]

    def _let_go(self, idx: int, why: str) -> None:
        m = self.metered.pop(idx)
        self.meter.detach(m.name)
        self.rx_at_attach.pop(idx, None)
        self.log(f"{m.name} (ifindex {idx}): {why}; its cached flows leave by the usual timeouts")

    def reconcile(self, links: list[Link] | None = None) -> bool:
        """Attach new interfaces, let go of removed and no longer wanted ones, rename renamed ones;
        True if anything changed."""
        with self.lock:
            links = list_links() if links is None else links
            present = {link.ifindex: link.name for link in links}
            wanted = self.wanted(links)
            changed = self._forget_gone(present)
            # a metered link that goes down keeps its program (no churn when a link flaps)
            for idx in [i for i in self.metered if i not in wanted and self.decisions[i].reason != "down"]:
                self._let_go(idx, f"no longer metered ({self.decisions[idx].reason})")
                changed = True
            changed = self._rename(present) or changed
            for idx, name in sorted(wanted.items()):
                if idx not in self.metered:
                    changed = self._attach(idx, name) or changed
        if changed and self.on_change is not None:
            self.on_change(self)
        return changed

    def _forget_gone(self, present: dict[int, str]) -> bool:
        gone = [i for i in self.metered if i not in present]
        for idx in gone:
            m = self.metered.pop(idx)
            self.meter.forget(m.name)
            self.rx_at_attach.pop(idx, None)
            self.log(f"{m.name} (ifindex {idx}) is gone: no longer metered; its cached flows leave by "
                     "the usual timeouts" + ("" if self.follow_all else " (a warning: it is in the interface "
                                             "list, and will be metered again if it comes back)"))
        return bool(gone)

    def _rename(self, present: dict[int, str]) -> bool:
        changed = False
        for idx, m in self.metered.items():
            if present[idx] != m.name:
                self.log(f"{m.name} (ifindex {idx}) is now called {present[idx]}: its flows carry on")
                self.meter.rename(m.name, present[idx])
                m.name = present[idx]
                changed = True
        return changed

    def _attach(self, idx: int, name: str) -> bool:
        try:
            link = self.links.get(idx)
            why = tc_reason(link, self.links) if link is not None else ""
            atts = attach_interface(self.meter, self.settings, name, self.log, why)
        except KernelError as exc:
            if "no such interface" in str(exc):  # gone again meanwhile
                return False
            raise
        self.metered[idx] = Metered(name, atts)
        if self.settings.options_for(name).ingress:
            self.rx_at_attach.update(rx_packets([idx]))
        for a in atts:
            self.log(f"metering {name} (ifindex {a.ifindex}) {HOOK_WORDS[a.hook]} in {a.mode} mode")
        return True


class LinkWatcher:
    """Calls ``callback`` (from its own thread) soon after any link is added, removed, renamed,
    or goes up or down; ``close()`` stops it at once.

    It also calls ``callback`` once as it starts: a change made between the caller's first
    dump of the links and the subscription made here sends no event this socket can see.
    """

    def __init__(self, callback: Callable[[], object], log: Callable[[str], None],
                 debounce: float = 0.05) -> None:
        self.callback = callback
        self.log = log
        self.debounce = debounce
        self.errors = 0
        self._events = RtnlEvents(RTMGRP_LINK)
        self._wake = WakePipe()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pyflow-links", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        got = self._events.drain(1000)
        if got.error is not None:
            self.log(f"link events: {got.error}")
        elif got.lost:
            self.log("link events: some were lost (ENOBUFS: the socket buffer was full); the reconcile that "
                     "follows catches up")

    def _run(self) -> None:
        fd = self._events.fileno()
        self._call()  # catch up with what changed before the subscription
        while not self._closed:
            ready, _, _ = select.select([fd, self._wake.fd], [], [])
            if self._wake.fd in ready or self._closed:
                return
            self._drain()
            # coalesce a burst (a veth pair, an interface with its addresses) into one reconcile
            ready, _, _ = select.select([self._wake.fd], [], [], self.debounce)
            if ready:
                return
            self._drain()
            self._call()

    def _call(self) -> None:
        try:
            self.callback()
        except Exception as exc:  # keep following; the next event retries
            self.errors += 1
            self.log(f"following interfaces: {exc}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop_reader(self._thread, self._wake)
        self._events.close()
