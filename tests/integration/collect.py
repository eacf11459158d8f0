"""A test-owned IPFIX/v9 listener: datagrams decoded by scapy's NetFlow layers."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Any

from scapy.layers.netflow import NetflowDataflowsetV9, NetflowHeader, netflowv9_defragment


class Tap:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.datagrams: list[bytes] = []

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def drain(self, timeout: float = 0.0) -> None:
        while True:
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                return
            self.datagrams.append(self.sock.recv(65535))
            timeout = 0.0

    def records(self) -> list[dict[str, Any]]:
        pkts = netflowv9_defragment([NetflowHeader(d) for d in self.datagrams])
        out: list[dict[str, Any]] = []
        for p in pkts:
            layer = p.getlayer(NetflowDataflowsetV9)
            while layer is not None:
                out.extend(dict(r.fields) for r in layer.records)
                layer = layer.payload.getlayer(NetflowDataflowsetV9) if layer.payload else None
        return out

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain(0.2)
            for r in self.records():
                if pred(r):
                    return r
        raise AssertionError(f"no matching record within {timeout}s; got {self.records()}")

    def close(self) -> None:
        self.sock.close()
