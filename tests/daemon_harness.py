"""Run `vcpud run` as a real subprocess with a real NOTIFY_SOCKET, and QMP for real guests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import REPO


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket collecting what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def wait_for(self, pred, timeout: float = 10.0, start: int = 0) -> dict[str, str]:
        """The first message from index ``start`` on for which ``pred`` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages[start:]:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such sd_notify message in {timeout}s; got {self.messages}")
                self._cond.wait(left)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._t.join(timeout=2)


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


class Qmp:
    """A minimal QMP client over a unix socket."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.buf = b""
        self._recv()  # greeting
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def cmd(self, name: str, **args) -> object:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._recv()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")
            # asynchronous events are skipped

    def close(self) -> None:
        self.sock.close()
