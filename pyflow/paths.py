"""Where pyflow keeps things on the host: a foundation module (no pyflow imports)."""

from __future__ import annotations

import os


def netns_id(whose: str = "thread-self") -> tuple[int, int]:
    """(device, inode) of a network namespace: the calling thread's, or that of ``/proc/<whose>``
    (``"1"``: PID 1's).  The one lookup of a namespace's identity in pyflow (the inode names the
    bpffs directory, the instance lock and the control socket; both compare namespaces).

    A namespace belongs to a thread: ``ip netns exec`` puts the whole process in one, but a
    thread may ``setns()`` alone, so the calling thread's namespace is the one asked by default."""
    st = os.stat(f"/proc/{whose}/ns/net")
    return st.st_dev, st.st_ino


def default_socket() -> str:
    """``/run/pyflow/pyflow.sock`` in the host's network namespace; in another one (an agent
    under ``ip netns exec``), ``/run/pyflow/pyflow-net<inode>.sock``: /run is shared by every
    network namespace, so agents in different ones never collide, and ``pyflow status`` run
    in the same namespace as an agent finds it without being told where."""
    try:
        mine = netns_id()[1]
    except OSError:
        return "/run/pyflow/pyflow.sock"
    host: int | None
    try:
        host = netns_id("1")[1]
    except OSError:  # PID 1's namespace hidden (a sandbox): name the socket after ours, always
        host = None
    return "/run/pyflow/pyflow.sock" if mine == host else f"/run/pyflow/pyflow-net{mine}.sock"


#: the control socket of an agent in this network namespace (`pyflow run --control-socket`)
DEFAULT_SOCKET = default_socket()
