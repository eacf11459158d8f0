"""The one logging hook: every message pyflow writes for its operator goes through ``log``.

By default a message goes to stderr as ``pyflow: MESSAGE``, control characters escaped and long
ones cut (pyflow.text); ``pyflow run`` on a terminal points the hook at its status line, which
keeps its live line below the messages.  Code that is handed a ``log`` callable (the runner, the
agent, the interface set) is handed this hook's current target.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from pyflow.text import visible

MAX_MESSAGE = 1500  # characters of one message on the terminal, at most


def message(text: str) -> str:
    """A message for the terminal: control characters escaped, at most MAX_MESSAGE characters."""
    text = visible(text)
    return text if len(text) <= MAX_MESSAGE else f"{text[:MAX_MESSAGE - 300]} ... {text[-250:]}"


def to_stderr(msg: str) -> None:
    print(f"pyflow: {message(msg)}", file=sys.stderr, flush=True)


_hook: Callable[[str], None] = to_stderr


def log(msg: str) -> None:
    """Write ``msg`` for the operator, wherever the hook points."""
    _hook(msg)


def set_hook(hook: Callable[[str], None] | None) -> Callable[[str], None]:
    """Point the hook at ``hook`` (None: stderr again); the previous target."""
    global _hook
    previous, _hook = _hook, hook or to_stderr
    return previous
