"""Export formats by RouterOS version name, each adapted to what a Target needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pyflow.errors import ConfigError
from pyflow.export import ipfix, legacy, v9
from pyflow.export.context import ExportClock, ExportContext, VersionEncoder
from pyflow.export.templates import TemplateSchedule


@dataclass(frozen=True)
class IpfixEncoder:
    """IPFIX: templates (absolute or RouterOS times, per ``ctx.time_mode``), options, IPv4 and IPv6."""

    name: str = "ipfix"
    uses_templates: bool = True
    carries_ipv6: bool = True

    def initial_state(self, observation_domain: int) -> ipfix.IpfixState:
        return ipfix.IpfixState(sequence=0, observation_domain_id=observation_domain)

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool | TemplateSchedule,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        return ipfix.encode(records, state, clock, send_templates, max_size, ctx)

    def carries_templates(self, datagram: bytes) -> bool:
        return ipfix.carries_templates(datagram)

    def state_doc(self, state: ipfix.IpfixState) -> Any:
        return {"sequence": state.sequence}

    def state_from(self, doc: Any, observation_domain: int) -> ipfix.IpfixState:
        return ipfix.IpfixState(sequence=_u32(doc["sequence"]), observation_domain_id=observation_domain)


@dataclass(frozen=True)
class V9Encoder:
    """NetFlow v9: templates, options, IPv4 and IPv6; the observation domain is the Source ID."""

    name: str = "9"
    uses_templates: bool = True
    carries_ipv6: bool = True

    def initial_state(self, observation_domain: int) -> v9.V9State:
        return v9.V9State(sequence=0, source_id=observation_domain)

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool | TemplateSchedule,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        return v9.encode(records, state, clock, send_templates, max_size, ctx)

    def carries_templates(self, datagram: bytes) -> bool:
        return v9.carries_templates(datagram)

    def state_doc(self, state: v9.V9State) -> Any:
        return {"sequence": state.sequence}

    def state_from(self, doc: Any, observation_domain: int) -> v9.V9State:
        return v9.V9State(sequence=_u32(doc["sequence"]), source_id=observation_domain)


# --- NetFlow v1 / v5 -------------------------------------------------------

@dataclass(frozen=True)
class V5Encoder:
    """NetFlow v5: IPv4 only (the Target filters IPv6 out and counts it), no templates.

    v5 has no observation domain: the stream is named by ``ctx.engine_type`` /
    ``ctx.engine_id``, and the state keeps one flow sequence per engine.
    """

    name: str = "5"
    uses_templates: bool = False
    carries_ipv6: bool = False

    def initial_state(self, observation_domain: int) -> legacy.V5State:
        return legacy.V5State()

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool | TemplateSchedule,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        per_datagram = legacy.records_per_datagram(legacy.V5_VERSION, max_size)
        return legacy.encode_v5(records, state, clock, per_datagram, ctx.sampling, ctx.engine_type, ctx.engine_id)

    def carries_templates(self, datagram: bytes) -> bool:
        return False

    def state_doc(self, state: legacy.V5State) -> Any:
        return {"sequences": [[t, i, n] for (t, i), n in sorted(state.sequences.items())]}

    def state_from(self, doc: Any, observation_domain: int) -> legacy.V5State:
        return legacy.V5State({(_u8(t), _u8(i)): _u32(n) for t, i, n in doc["sequences"]})


@dataclass(frozen=True)
class V1Encoder:
    """NetFlow v1: IPv4 only, no templates, and no sequence, engine or sampling: nothing to carry."""

    name: str = "1"
    uses_templates: bool = False
    carries_ipv6: bool = False

    def initial_state(self, observation_domain: int) -> None:
        return None

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool | TemplateSchedule,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        per_datagram = legacy.records_per_datagram(legacy.V1_VERSION, max_size)
        return legacy.encode_v1(records, clock, per_datagram), state

    def carries_templates(self, datagram: bytes) -> bool:
        return False

    def state_doc(self, state: None) -> Any:
        return None

    def state_from(self, doc: Any, observation_domain: int) -> None:
        return None


def _u32(value: Any) -> int:
    """A sequence number from a kept session: a whole number below 2^32 (ValueError otherwise)."""
    if type(value) is not int or not 0 <= value < 1 << 32:
        raise ValueError(f"{value!r} is not a 32-bit sequence number")
    return value


def _u8(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 256:
        raise ValueError(f"{value!r} is not an engine number")
    return value


ENCODERS: dict[str, VersionEncoder] = {"1": V1Encoder(), "5": V5Encoder(), "9": V9Encoder(), "ipfix": IpfixEncoder()}


def encoder_for(version: str) -> VersionEncoder:
    try:
        return ENCODERS[version]
    except KeyError:
        raise ConfigError(
            f"export version {version} is not implemented yet (available: {', '.join(sorted(ENCODERS))})"
        ) from None
