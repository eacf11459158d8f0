"""Write IP packets into a tun device, as if they arrived on it (run inside a test namespace).

usage: python -m tests.integration.tunwrite TUN_NAME COUNT

The device must exist (``ip tuntap add mode tun``); each packet is a UDP datagram from 10.51.0.2
to 10.51.0.1 (the address on the device), IPv4 then the same count over IPv6 (fd51::2 -> fd51::1).
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def main() -> None:
    name, count = sys.argv[1], int(sys.argv[2])
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    v4 = bytes(IP(src="10.51.0.2", dst="10.51.0.1") / UDP(sport=5151, dport=5152) / (b"t" * 32))
    v6 = bytes(IPv6(src="fd51::2", dst="fd51::1") / UDP(sport=5151, dport=5152) / (b"t" * 32))
    for pkt in [v4] * count + [v6] * count:
        os.write(fd, pkt)
    os.close(fd)
    print(f"wrote {2 * count} packets", flush=True)


if __name__ == "__main__":
    main()
