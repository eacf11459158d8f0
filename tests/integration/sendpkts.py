"""Send the frames of a pcap file out of one interface (run inside a test namespace).

usage: python -m tests.integration.sendpkts IFACE FILE.pcap [GAP_SECONDS]
"""

from __future__ import annotations

import socket
import sys
import time

from scapy.utils import rdpcap


def main() -> None:
    iface, path = sys.argv[1], sys.argv[2]
    gap = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    frames = [bytes(p) for p in rdpcap(path)]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        for i, frame in enumerate(frames):
            if i and gap:
                time.sleep(gap)
            s.send(frame)
    print(f"sent {len(frames)} frames", flush=True)


if __name__ == "__main__":
    main()
