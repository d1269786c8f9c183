"""systemd glue: sd_notify messages and journald logging with structured fields."""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)

# Fields vcpud attaches to log records (logging's extra=) that become journal fields.
FIELDS = ("VM", "VM_PID", "TID", "ROLE", "CPUS", "POLICY")


class Notifier:
    """sd_notify(3) through systemd-python; does nothing outside a Type=notify service."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notify = None
        if self.enabled:
            from systemd import daemon  # systemd-python

            self._notify = daemon.notify
        usec = os.environ.get("WATCHDOG_USEC", "")
        wpid = os.environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for (not us if we were forked).
        self.watchdog_interval = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())) else None
        )

    def send(self, *lines: str) -> None:
        if self._notify is not None:
            try:
                self._notify("\n".join(lines))
            except OSError as e:
                log.warning("sd_notify failed: %s", e)

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
