"""What `vcpud demo` starts and must stop: tiny qemu guests and the daemon as children that die
with it; and how the demo looks at processes from outside (thread names, affinities, command
lines)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .cpuset import CpuSet

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Signals that end the demo (and that it passes on as a stop to what it started).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def kvm_unusable() -> str | None:
    """Why /dev/kvm cannot run a guest here (None: it can)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return None


def accel_args(kvm: bool) -> list[str]:
    return ["-accel", "kvm"] if kvm else ["-accel", "tcg,thread=multi"]


def guest_argv(qemu: str, name: str, smp: str, kvm: bool, extra: Sequence[str] = ()) -> list[str]:
    """A guest that costs next to nothing: paused before its first instruction (-S; its vCPU
    threads exist and can be hot-plugged), 64 MiB never touched, no disk, no devices."""
    return [qemu, "-name", f"guest={name},debug-threads=on", "-smp", smp, *accel_args(kvm),
            "-m", "64", "-display", "none", "-nodefaults", "-no-user-config", "-serial", "none",
            "-monitor", "none", "-S", *extra]


def affinity(tid: int) -> CpuSet | None:
    try:
        return CpuSet.of_kernel(os.sched_getaffinity(tid))
    except OSError:
        return None


def threads_named(pid: int) -> dict[str, int]:
    """comm -> tid of a process's threads (the first of a name)."""
    out: dict[str, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                out.setdefault(f.read().rstrip("\n"), int(tid))
        except OSError:
            pass
    return out


def has_vcpus(pid: int, n: int) -> bool | None:
    """True once threads `CPU 0/...` to `CPU n-1/...` exist (qemu names them as it creates them)."""
    names = threads_named(pid)
    return True if all(any(c.startswith(f"CPU {i}/") for c in names) for i in range(n)) else None


def command_lines() -> dict[int, list[bytes]]:
    """pid -> argv of every process (the first 4 KiB of it)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read(4096).split(b"\0")
            except OSError:
                pass  # exited meanwhile
    return out


def other_daemons() -> list[int]:
    """Pids of `vcpud run` processes on this host (the service, someone's test)."""
    return [pid for pid, argv in command_lines().items()
            if b"run" in argv and (os.path.basename(argv[0]) == b"vcpud" or b"vcpud" in argv[1:3])]


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text``: what is left of a run (its directory is in the
    command line of each guest and of the daemon)."""
    b = text.encode()
    return [pid for pid, argv in command_lines().items() if any(b in a for a in argv)]


@dataclass(frozen=True)
class Child:
    """A process the demo started: stopped by stop() or, if the demo is killed, by the kernel."""

    what: str
    proc: subprocess.Popen[bytes]
    log: Path  # its stdout and stderr

    @property
    def pid(self) -> int:
        return self.proc.pid


class Children:
    """Starts children that cannot outlive the demo and stops them all.

    Each child runs in a session of its own, so a Ctrl-C at the terminal reaches only the demo,
    which stops them in order; and with PR_SET_PDEATHSIG, so that a demo that is SIGKILLed (no
    finally runs) takes them with it: the kernel sends the signal when the thread that forked
    them exits.
    """

    def __init__(self) -> None:
        self.started: list[Child] = []
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._parent = os.getpid()

    def _in_child(self, deathsig: signal.Signals) -> Callable[[], None]:
        libc, parent = self._libc, self._parent

        def setup() -> None:
            # Runs between fork and exec. The parent blocks the stop signals around the fork (a
            # Ctrl-C then cannot lose a child between fork and the Popen object); unblock them here.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            if libc.prctl(PR_SET_PDEATHSIG, int(deathsig), 0, 0, 0) != 0 or os.getppid() != parent:
                os._exit(127)  # the demo died before the death signal was armed

        return setup

    def start(self, what: str, argv: Sequence[str], log_path: Path, deathsig: signal.Signals,
              env: dict[str, str] | None = None) -> Child:
        """Start ``argv`` with its output to ``log_path`` (a new file, 0600); ``deathsig``: what
        the kernel sends it when the demo dies."""
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, preexec_fn=self._in_child(deathsig))
            child = Child(what, proc, log_path)
            self.started.append(child)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os.close(fd)  # the child has its own
        log.debug("started %s: pid %d", what, proc.pid)
        return child

    def stop(self, child: Child, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (waited for: no zombie)."""
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
            try:
                return child.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", child.what, child.pid, timeout)
                child.proc.kill()
        return child.proc.wait()

    def stop_all(self) -> list[Child]:
        """Stop every child, the last started first; returns them."""
        for child in reversed(self.started):
            self.stop(child)
        return list(self.started)
