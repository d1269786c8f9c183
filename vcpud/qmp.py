"""A minimal QMP (QEMU Machine Protocol) client: `vcpud demo` hot-plugs a vCPU with it, the
tests and benchmarks add vCPUs and IO threads to their guests."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(RuntimeError):
    """QMP said no, or the connection failed."""


class Qmp:
    """A QMP client over qemu's unix socket: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # qemu creates the socket while it starts
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
                break
            except OSError as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"cannot connect to QMP at {path}: {e}") from None
                time.sleep(0.02)
        sock.settimeout(timeout)
        self.sock = sock
        self.buf = b""
        self._message()  # the greeting
        self.cmd("qmp_capabilities")

    def _message(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise QmpError("qemu closed the QMP connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise QmpError(f"not a QMP message: {line[:200]!r}")
        return msg

    def cmd(self, command: str, **arguments: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            msg = self._message()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"]
                raise QmpError(f"QMP {command}: {err.get('desc', err) if isinstance(err, dict) else err}")
            # an asynchronous event: not what we wait for

    def close(self) -> None:
        self.sock.close()
