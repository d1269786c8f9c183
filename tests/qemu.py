"""Start and stop real qemu-system-x86_64 guests for integration tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"

# Tests give their guests names beginning with RUN, and their policies match only such names: other
# VMs on the host (another test run's, anyone's) are never managed by this run's daemons or `vcpud apply`,
# nor this run's guests by theirs.
RUN = f"t{os.getpid()}-"


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def accel_args() -> list[str]:
    return ["-enable-kvm"] if kvm_usable() else ["-accel", "tcg,thread=multi"]


@dataclass
class Guest:
    name: str
    proc: subprocess.Popen
    argv: list[str]
    log: Path
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def threads(self) -> dict[int, str]:
        out = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                out[int(tid)] = Path(f"/proc/{self.pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                pass
        return out

    def affinity(self, tid: int) -> str:
        for line in Path(f"/proc/{self.pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError("no Cpus_allowed_list")

    def unpin(self) -> None:
        """Allow every thread on every CPU we may use (undo any pinning)."""
        for tid in self.threads():
            try:
                os.sched_setaffinity(tid, os.sched_getaffinity(0))
            except OSError:
                pass  # a thread that exited, or a kernel worker that refuses

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_guest(tmp: Path, name: str | None, *args: str, debug_threads: bool = True, paused: bool = True,
                smp: str = "2", wait_vcpus: bool = True, exe: str = QEMU) -> Guest:
    argv = [exe]
    if name is not None:
        argv += ["-name", f"guest={name},debug-threads=on" if debug_threads else name]
    argv += ["-smp", smp, *accel_args(), "-display", "none", "-nodefaults", "-no-user-config", "-m", "64",
             "-serial", "none", "-monitor", "none"]
    if exe != QEMU:
        # a copy elsewhere finds no firmware relative to itself
        argv += ["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]
    if paused:
        argv.append("-S")
    argv += list(args)
    log = tmp / f"qemu-{name or 'anon'}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT)
    g = Guest(name or "", proc, argv, log)
    if wait_vcpus and debug_threads:
        ncpu = int(smp.split(",")[0].split("=")[-1])
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"qemu exited {proc.returncode}: {log.read_text()}")
            names = set(g.threads().values())
            if all(any(n == f"CPU {i}/KVM" or n == f"CPU {i}/TCG" for n in names) for i in range(ncpu)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vCPU threads did not appear: {names}")
            time.sleep(0.02)
    return g
