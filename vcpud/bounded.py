"""Bounded reads: only regular files, never more than a stated size.

A FIFO, a device such as /dev/zero, a directory or a file past its limit is a `ReadError`
(an OSError) saying so, never a hang or a GiB in memory. sysfs and procfs attributes are
regular files, so the same reader serves config files, the state file and --sysroot dumps.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# Limits for what vcpud reads; each caller names the one it uses.
CONFIG_LIMIT = 1 << 20        # one configuration file (or include)
STATE_LIMIT = 16 << 20        # the state file
SYSFS_LIMIT = 64 << 10        # one sysfs/procfs attribute


class ReadError(OSError):
    """The path cannot be read as a bounded regular file; str() says why."""


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole content of the regular file at ``path``, at most ``limit`` bytes.

    Raises ReadError for anything else (not regular, too large) and OSError as open() does.
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ReadError(errno.EINVAL, f"{path}: {kind}")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ReadError(errno.EFBIG, f"{path}: larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | Path, limit: int) -> str:
    """UTF-8 text of a bounded regular file (undecodable bytes raise UnicodeDecodeError)."""
    return read_bytes(path, limit).decode("utf-8")
