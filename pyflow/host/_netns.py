"""The network namespace a host source was created in, usable from any thread.

A network namespace belongs to a thread: ``ip netns exec`` puts the whole
process in one, but a caller (or a test) can also ``setns()`` a single thread.
Host sources remember the namespace of the thread that created them and read
the kernel (routes, conntrack, sysctls) in that namespace, whichever thread
asks later.  Threads a thread starts inherit its namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from pyflow.paths import netns_id

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class Netns:
    """A handle on the calling thread's network namespace (an open fd)."""

    def __init__(self) -> None:
        self._id = netns_id()
        self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def is_current(self) -> bool:
        """Is the calling thread in this namespace?"""
        return netns_id() == self._id

    def enter(self) -> None:
        """Move the calling thread into this namespace (a no-op if it is there already)."""
        if self.is_current():
            return
        if _libc.setns(self._fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace {self._id[1]} failed: {os.strerror(err)}")

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in this namespace: directly if the caller is in it, else in a short-lived thread."""
        if self.is_current():
            return fn()
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                self.enter()
                result.append(fn())
            except BaseException as exc:  # handed to the caller below
                error.append(exc)

        t = threading.Thread(target=body, name="pyflow-netns", daemon=True)
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class WakePipe:
    """A pipe a reader thread selects on next to its socket, so ``close()`` can stop it at once."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    def close(self) -> None:
        for fd in (self.fd, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def wait_until(cv: threading.Condition, holds: Callable[[], bool], closed: Callable[[], bool],
               timeout: float) -> bool:
    """Until ``holds()`` (True) or ``timeout`` seconds pass or the reader closes (then: ``holds()``)."""
    deadline = time.monotonic() + timeout
    with cv:
        while not holds():
            left = deadline - time.monotonic()
            if left <= 0 or closed():
                return holds()
            cv.wait(left)
        return True


def stop_reader(thread: threading.Thread, wake: WakePipe, cv: threading.Condition | None = None) -> None:
    """Stop a reader thread: wake it, wait for it, release its waiters, close the pipe."""
    wake.wake()
    thread.join(5)
    if cv is not None:
        with cv:
            cv.notify_all()
    wake.close()
