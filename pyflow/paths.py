"""Where pyflow keeps things on the host: a foundation module (no pyflow imports)."""

from __future__ import annotations

import os


def default_socket() -> str:
    """``/run/pyflow/pyflow.sock`` in the host's network namespace; in another one (an agent
    under ``ip netns exec``), ``/run/pyflow/pyflow-net<inode>.sock``: /run is shared by every
    network namespace, so agents in different ones never collide, and ``pyflow status`` run
    in the same namespace as an agent finds it without being told where."""
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return "/run/pyflow/pyflow.sock"
    host: int | None
    try:
        host = os.stat("/proc/1/ns/net").st_ino
    except OSError:  # PID 1's namespace hidden (a sandbox): name the socket after ours, always
        host = None
    return "/run/pyflow/pyflow.sock" if mine == host else f"/run/pyflow/pyflow-net{mine}.sock"


#: the control socket of an agent in this network namespace (`pyflow run --control-socket`)
DEFAULT_SOCKET = default_socket()
