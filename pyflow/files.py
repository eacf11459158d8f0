"""Settings files read safely: regular files only, never more than a cap, never blocking.

A config file, a RouterOS script or a prefix-to-AS file named on the command
line could be ``/dev/zero`` (endless), a FIFO nobody writes to (blocks for
ever), a terminal, or a file of gigabytes.  Each is opened with ``O_NONBLOCK``
(a FIFO opens at once), checked with ``fstat`` (anything but a regular file is
refused) and read up to its cap plus one byte (more is refused): a
``ConfigError`` naming the file says which.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from pyflow.errors import ConfigError
from pyflow.units import format_size

MAX_CONFIG_BYTES = 1 << 20  # a TOML config file: 1M
MAX_SCRIPT_BYTES = 4 << 20  # a RouterOS script: 4M (parsing takes ~50 bytes of memory a byte of script)
MAX_AS_FILE_BYTES = 64 << 20  # a prefix-to-AS file: 64M (a full BGP table, ~1.2M prefixes, is ~25M)

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _too_big(path: str | Path, what: str, cap: int) -> ConfigError:
    return ConfigError(f"{path}: larger than {format_size(cap)} ({cap} bytes), the most pyflow reads of {what}")


def open_regular(path: str | Path, what: str, cap: int) -> BinaryIO:
    """``path`` opened for reading if it is a regular file of at most ``cap`` bytes; else ``ConfigError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
            raise ConfigError(f"{path}: not a regular file ({kind}): {what} must be one")
        if st.st_size > cap:
            raise _too_big(path, what, cap)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _decode(data: bytes, path: str | Path) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte order mark (Windows editors) is not part of the text
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_text(path: str | Path, what: str, cap: int) -> str:
    """The whole of a regular file of at most ``cap`` bytes, as UTF-8 text."""
    with open_regular(path, what, cap) as f:
        try:
            data = f.read(cap + 1)  # it may have grown since fstat
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise _too_big(path, what, cap)
    return _decode(data, path)


def read_stream(stream: TextIO, name: str, what: str, cap: int) -> str:
    """Standard input (or another stream) read up to ``cap`` characters; more is refused."""
    text = stream.read(cap + 1)
    if len(text) > cap:
        raise _too_big(name, what, cap)
    return text


def read_lines(path: str | Path, what: str, cap: int) -> Iterator[str]:
    """The lines of a regular file of at most ``cap`` bytes, read one at a time (a big file is never
    held whole); a line that is not UTF-8 is a ``ConfigError`` naming FILE:LINE."""
    with open_regular(path, what, cap) as f:
        total = 0
        n = 0
        while True:
            raw = f.readline(cap - total + 1)
            if not raw:
                return
            n += 1
            total += len(raw)
            if total > cap:
                raise _too_big(path, what, cap)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not UTF-8 text ({exc.reason} at byte {exc.start} of the "
                                  "line)") from None
            yield line
