"""The export session: what collectors key an exporter's stream on, kept from one agent to the next.

A collector sees one exporter per (address, Source ID / Observation Domain)
and checks that its sequence numbers follow on; some also key it on the
source port, and derive the exporter's boot time from every header.  So an
agent that takes over a pinned instance (after a kill -9, a crash, or any
way out but a clean stop) goes on with the session the earlier agent left:
per target its sequence state, template clock and source port, and the one
boot instant all headers derive sysUptime from.

The session is a small JSON document this module builds and reads; the
kernel layer keeps it as opaque bytes next to the pinned maps
(``FlowMeter.save_session``), rewritten after every encode and before the
datagrams leave (write ahead: a kill between the two costs collectors a
gap in the sequence, never a number sent twice).  A fresh start (no pinned
instance) starts a new session at sequence 0; so does a clean stop, which
removes the pins, as a router's reboot would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyflow.config import TargetSettings
from pyflow.errors import PyflowError
from pyflow.export.target import Target

FORMAT = 1


def target_key(ts: TargetSettings) -> str:
    """A target's identity in the session: collector endpoint, version and source address."""
    return f"{ts.describe()} from {ts.src_address or '*'}"


@dataclass
class Kept:
    """A session read back: its boot instant (None: none kept) and each target's part, by key."""

    boot_unix_ms: int | None = None
    targets: dict[str, Any] = field(default_factory=dict)


def read_session(blob: bytes) -> Kept:
    """The session in ``blob``; an empty or unreadable one is no session (a new one starts)."""
    try:
        doc = json.loads(blob) if blob else None
    except ValueError:
        return Kept()
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return Kept()
    boot, targets = doc.get("boot_unix_ms"), doc.get("targets")
    if type(boot) is not int or not isinstance(targets, dict):
        return Kept()
    return Kept(boot, targets)


class Session:
    """The running session: ``save`` writes it where the next agent finds it (``store``)."""

    def __init__(self, boot_unix_ms: int, targets: Sequence[Target], store: Callable[[bytes], object],
                 log: Callable[[str], None]) -> None:
        self.boot_unix_ms = boot_unix_ms
        self.targets = targets  # the runner's list: targets a reload adds or removes are in it
        self.store = store
        self.log = log
        self.failed = False

    def blob(self) -> bytes:
        doc = {"format": FORMAT, "boot_unix_ms": self.boot_unix_ms,
               "targets": {target_key(t.settings): t.session_doc() for t in self.targets}}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def attach(self, target: Target) -> None:
        target.on_encoded = lambda _t: self.save()

    def save(self) -> None:
        try:
            self.store(self.blob())
        except (PyflowError, OSError) as exc:
            if not self.failed:  # once: it would fail the same way after every encode
                self.log(f"the export session cannot be kept for the next agent ({exc}); a take-over would "
                         "start the targets at sequence 0 again")
            self.failed = True

    def resume(self, kept: Kept) -> list[str]:
        """Each target goes on with its part of ``kept``; what was resumed, for the log."""
        out = []
        for t in self.targets:
            doc = kept.targets.get(target_key(t.settings))
            if doc is None:
                continue
            try:
                t.resume(doc)
            except ValueError as exc:
                self.log(f"{exc}; it starts a new session")
                continue
            port = f" from port {t.bind_port}" if t.bind_port else ""
            out.append(f"{t.name}{port}")
        return out
