"""Run `vcpud run` as a real subprocess with a real NOTIFY_SOCKET; QMP for real guests (vcpud.qmp)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO
from vcpud.qmp import Qmp  # noqa: F401 (the tests and benchmarks take it from here)
from vcpud.sdnotify import NotifyListener


class NotifySocket(NotifyListener):
    """vcpud.sdnotify.NotifyListener whose wait_for() fails the test when no such message comes."""

    def wait_for(self, pred, timeout: float = 10.0, start: int = 0, alive=lambda: True) -> dict[str, str]:
        m = super().wait_for(pred, timeout, start, alive)
        if m is None:
            raise AssertionError(f"no such sd_notify message in {timeout}s; got {self.messages}")
        return m


class DaemonProc:
    def __init__(self, tmp: Path, config: Path, *extra: str, env: dict[str, str] | None = None,
                 module: str = "vcpud") -> None:
        self.notify = NotifySocket(tmp / f"notify-{time.monotonic_ns()}.sock")
        self.log_path = tmp / f"vcpud-{time.monotonic_ns()}.log"
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path), PYTHONPATH=str(REPO), **(env or {}))
        env.pop("JOURNAL_STREAM", None)
        self.log_file = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "run", "--config", str(config), "--log-level", "debug",
             # tests run many daemons: none takes the default metrics port unless asked to
             *(() if "--metrics-listen" in extra else ("--metrics-listen", "off")), *extra],
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT, env=env)
        try:
            self.notify.wait_for(lambda m: m.get("READY") == "1", timeout=30)
        except AssertionError as e:
            self.stop()
            raise AssertionError(f"vcpud never got ready:\n{self.log()}") from e

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def wait_log(self, pattern: str, start: int = 0, count: int = 1, timeout: float = 30.0) -> int:
        """Wait until regex ``pattern`` matched ``count`` times in the log from character ``start`` on;
        returns the log's end after the last match (a ``start`` for the next wait)."""
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.log()[start:], re.M))
            if len(found) >= count:
                return start + found[count - 1].end()
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} logged {len(found)} of {count} times in {timeout}s:\n"
                                     f"{self.log()[start:][-4000:]}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.notify.close()
        self.log_file.close()
        return rc

    def counts(self) -> tuple[int, int]:
        """(threads, open fds) of the daemon."""
        return (len(os.listdir(f"/proc/{self.pid}/task")), len(os.listdir(f"/proc/{self.pid}/fd")))
