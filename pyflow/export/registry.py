"""Export formats by RouterOS version name, each adapted to what a Target needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pyflow.errors import ConfigError
from pyflow.export import ipfix, legacy, v9
from pyflow.export.target import ExportClock, ExportContext, VersionEncoder


@dataclass(frozen=True)
class IpfixEncoder:
    """IPFIX: templates (absolute or RouterOS times, per ``ctx.time_mode``), options, IPv4 and IPv6."""

    name: str = "ipfix"
    uses_templates: bool = True
    carries_ipv6: bool = True

    def initial_state(self, observation_domain: int) -> ipfix.IpfixState:
        return ipfix.IpfixState(sequence=0, observation_domain_id=observation_domain)

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        return ipfix.encode(records, state, clock, send_templates, max_size, ctx)


@dataclass(frozen=True)
class V9Encoder:
    """NetFlow v9: templates, options, IPv4 and IPv6; the observation domain is the Source ID."""

    name: str = "9"
    uses_templates: bool = True
    carries_ipv6: bool = True

    def initial_state(self, observation_domain: int) -> v9.V9State:
        return v9.V9State(sequence=0, source_id=observation_domain)

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        return v9.encode(records, state, clock, send_templates, max_size, ctx)


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

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        per_datagram = legacy.records_per_datagram(legacy.V5_VERSION, max_size)
        return legacy.encode_v5(records, state, clock, per_datagram, ctx.sampling, ctx.engine_type, ctx.engine_id)


@dataclass(frozen=True)
class V1Encoder:
    """NetFlow v1: IPv4 only, no templates, and no sequence, engine or sampling: nothing to carry."""

    name: str = "1"
    uses_templates: bool = False
    carries_ipv6: bool = False

    def initial_state(self, observation_domain: int) -> None:
        return None

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        per_datagram = legacy.records_per_datagram(legacy.V1_VERSION, max_size)
        return legacy.encode_v1(records, clock, per_datagram), state


ENCODERS: dict[str, VersionEncoder] = {"1": V1Encoder(), "5": V5Encoder(), "9": V9Encoder(), "ipfix": IpfixEncoder()}


def encoder_for(version: str) -> VersionEncoder:
    try:
        return ENCODERS[version]
    except KeyError:
        raise ConfigError(
            f"export version {version} is not implemented yet (available: {', '.join(sorted(ENCODERS))})"
        ) from None
