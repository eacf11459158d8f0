"""rtnetlink notifications, read without blocking: pyroute2's select-compatible ``IPRSocket``.

The watchers (links in pyflow/follow.py, routes in pyflow/host/routes.py) only need to know *that*
something changed, soon, and to stop at once on close: they ``select()`` on ``fileno()`` next to a
wake-up pipe (pyflow/host/_netns.py) and ``drain()`` what is queued.  The socket is created (so
subscribed) in the calling thread's network namespace; any thread may read it.
"""

from __future__ import annotations

import errno
import socket
from typing import NamedTuple

from pyroute2 import IPRSocket


class Drained(NamedTuple):
    reads: int  # datagrams read (each one or more notifications)
    lost: bool  # the kernel dropped notifications (ENOBUFS): whatever they said changed
    error: OSError | None  # another read error; reading stopped there


class RtnlEvents:
    """A subscription to the rtnetlink multicast ``groups`` (RTMGRP_* bits)."""

    def __init__(self, groups: int, rcvbuf: int | None = None) -> None:
        self._sock = IPRSocket(groups=0)  # pyroute2's default groups would subscribe to more
        try:
            if rcvbuf:
                self._sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self._sock.bind(groups=groups)
            self._sock.socket.setblocking(False)
            self._fd = int(self._sock.fileno())
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._fd

    def drain(self, limit: int) -> Drained:
        """Read what is queued, at most ``limit`` datagrams (the caller returns to select, and close)."""
        reads, lost = 0, False
        for _ in range(limit):
            try:
                self._sock.get()  # pyroute2 reads and decodes one datagram
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    return Drained(reads, lost, exc)
                lost = True
                continue
            except Exception:  # a datagram pyroute2 cannot decode still says that something changed
                pass
            reads += 1
        return Drained(reads, lost, None)

    def close(self) -> None:
        self._sock.close()
