"""Export formats by RouterOS version name, each adapted to what a Target needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pyflow.errors import ConfigError
from pyflow.export import ipfix
from pyflow.export.target import ExportClock, ExportContext, VersionEncoder


@dataclass(frozen=True)
class IpfixEncoder:
    name: str = "ipfix"
    uses_templates: bool = True
    carries_ipv6: bool = True

    def initial_state(self, observation_domain: int) -> ipfix.IpfixState:
        return ipfix.IpfixState(sequence=0, observation_domain_id=observation_domain)

    def encode(self, records: np.ndarray, state: Any, clock: ExportClock, send_templates: bool,
               max_size: int, ctx: ExportContext) -> tuple[list[bytes], Any]:
        return ipfix.encode(records, state, clock.unix_s, send_templates, max_size)


ENCODERS: dict[str, VersionEncoder] = {"ipfix": IpfixEncoder()}


def encoder_for(version: str) -> VersionEncoder:
    try:
        return ENCODERS[version]
    except KeyError:
        raise ConfigError(
            f"export version {version} is not implemented yet (available: {', '.join(sorted(ENCODERS))})"
        ) from None
