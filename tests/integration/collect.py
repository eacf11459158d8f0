"""A test-owned IPFIX/v9 listener: datagrams decoded by scapy's NetFlow layers."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from scapy.layers.netflow import NetflowDataflowsetV9, NetflowHeader, netflowv9_defragment

OPTIONS_TEMPLATE_IDS = range(260, 300)


def without_ipfix_options(msg: bytes) -> bytes:
    """The IPFIX message minus its options template and options data sets.

    scapy's NetflowOptionsFlowset10 miscomputes its padding and reads past the
    end of Set 3, which breaks the whole decode; the tap only needs flow records.
    """
    if len(msg) < 16 or struct.unpack_from("!H", msg)[0] != 10:
        return msg
    body, off = [], 16
    while off + 4 <= len(msg):
        set_id, length = struct.unpack_from("!HH", msg, off)
        if length < 4:
            break
        if set_id != 3 and set_id not in OPTIONS_TEMPLATE_IDS:
            body.append(msg[off:off + length])
        off += length
    out = b"".join(body)
    return msg[:2] + struct.pack("!H", 16 + len(out)) + msg[4:16] + out


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
        pkts = netflowv9_defragment([NetflowHeader(without_ipfix_options(d)) for d in self.datagrams])
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
