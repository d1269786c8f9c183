"""systemd glue: sd_notify messages (sent, and received where vcpud plays the service manager for
its own daemon: `vcpud demo`) and journald logging with structured fields."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# Fields vcpud attaches to log records (logging's extra=) that become journal fields.
FIELDS = ("VM", "VM_PID", "TID", "ROLE", "CPUS", "POLICY")


class Notifier:
    """sd_notify(3); does nothing outside a Type=notify service.

    Sent here rather than through libsystemd: its sd_notify() sends on a blocking socket, and a
    service manager that stops reading (its queue is net.unix.max_dgram_qlen datagrams deep)
    would stall the event loop. A message that does not fit is dropped and said once."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET", "")
        # "@name" is the abstract namespace; a path is absolute. Anything else (vsock:...) is not for us.
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr if addr.startswith("/") else None
        self.enabled = self.address is not None
        if addr and not self.enabled:
            log.warning("NOTIFY_SOCKET=%s: not a unix socket; no sd_notify", addr)
        self._sock: socket.socket | None = None
        self._dropping = False
        usec = os.environ.get("WATCHDOG_USEC", "")
        wpid = os.environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for (not us if we were forked).
        self.watchdog_interval = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())) else None
        )

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._sock = socket.socket(socket.AF_UNIX, kind)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except BlockingIOError:
            if not self._dropping:
                log.warning("sd_notify: the service manager's queue is full; dropping messages until it reads")
            self._dropping = True
            return
        except OSError as e:
            log.warning("sd_notify failed: %s", e)
            return
        self._dropping = False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) wants the reload's start time on CLOCK_MONOTONIC.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def under_journald() -> bool:
    """Whether stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    js = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = js.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(js) and dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def send_fields(MESSAGE: str, **fields: object) -> None:  # noqa: N803 (systemd.journal.send's signature)
    """systemd.journal.send, but a tuple value is a field given once per value (a record about
    several threads: TID=, ROLE=): journald keeps them all, and ``journalctl TID=N`` matches."""
    from systemd import journal

    args: list[str | bytes] = ["MESSAGE=" + MESSAGE]
    for key, value in fields.items():
        if isinstance(value, tuple) and key in FIELDS:
            args.extend(f"{key}={v}" for v in value)
        elif isinstance(value, bytes):
            args.append(key.encode() + b"=" + value)
        else:
            args.append(f"{key}={value}")
    journal.sendv(*args)


def setup_logging(level: str, journal: bool | None = None) -> str:
    """Log to the journal with structured fields under systemd, else to stderr. Returns which."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(getattr(logging, level.upper()))
    use_journal = under_journald() if journal is None else journal
    if use_journal:
        try:
            from systemd.journal import JournalHandler

            handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="vcpud", sender_function=send_fields)
            handler.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(handler)
            return "journal"
        except ImportError:
            pass
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vcpud: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    return "stderr"


class NotifyListener:
    """The service manager's side of sd_notify(3): a datagram socket at ``path`` (give it to the
    daemon as NOTIFY_SOCKET) whose messages a thread collects, as systemd does, all the time:
    the daemon sends STATUS= after every rescan, and once the socket's queue is full what it
    sends next is dropped (:class:`Notifier`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []  # each KEY=VALUE datagram, in order
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="sd_notify", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            lines = data.decode(errors="replace").splitlines()
            msg = dict(line.split("=", 1) for line in lines if "=" in line)
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, str]], bool], timeout: float = 10.0, start: int = 0,
                 alive: Callable[[], bool] = lambda: True) -> dict[str, str] | None:
        """The first message from index ``start`` on for which ``pred`` holds; None when none
        came within ``timeout`` or ``alive()`` turned false."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages[start:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or not alive():
                    return None
                self._cond.wait(min(left, 0.05))

    @property
    def status(self) -> str:
        """The last STATUS= the daemon sent."""
        with self._cond:
            return next((m["STATUS"] for m in reversed(self.messages) if "STATUS" in m), "")

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=2)
        self.sock.close()
