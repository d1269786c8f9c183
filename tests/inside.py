"""What tests of vcpud.service in a Container (tests/nspawn.py) share: a paused qemu guest
started inside, its threads' affinity read from the host, and vcpud's journal entries about it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import skip_or_fail
from tests.nspawn import NSENTER, NSPAWN, UNSHARE, Container
from tests.qemu import QEMU

PF_KTHREAD, PF_USER_WORKER = 0x00200000, 0x00004000
# Functional deadlines only: whether the service pins at all, not how fast (a loaded shared host, a
# slow container start). How fast it pins is measured in tests/benchmarks/bench_daemon.py.
PIN_DEADLINE = 15.0
# The fields of vcpud's journal entry about a pinned thread.
PIN_FIELDS = ("VM_PID", "TID", "ROLE", "CPUS", "POLICY")


def require_container() -> None:
    """What booting a Container needs; skip (fail in CI) without it."""
    if os.geteuid() != 0:
        skip_or_fail("systemd-nspawn needs root")
    if NSPAWN is None:
        skip_or_fail("systemd-nspawn not installed (apt-get install systemd-container)")
    if NSENTER is None or UNSHARE is None:
        skip_or_fail("nsenter or unshare not installed (util-linux)")
    if not Path("/usr/lib/systemd/systemd").exists():
        skip_or_fail("no /usr/lib/systemd/systemd to boot")


def status(pid: int, tid: int | None = None) -> dict[str, str]:
    p = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    out = {}
    for line in Path(p, "status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def guest_threads(pid: int) -> dict[int, tuple[str, str]]:
    """The guest's user threads (kernel workers excluded), host pid `pid`.

    TID as the container sees it (the journal's TID=) -> (comm, Cpus_allowed_list).
    """
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            flags = int(stat[stat.rindex(")") + 2:].split()[6])
            st = status(pid, tid)
        except (OSError, ValueError):
            continue
        if flags & (PF_KTHREAD | PF_USER_WORKER):
            continue
        out[int(st["NSpid"].split()[-1])] = (st["Name"], st["Cpus_allowed_list"])
    return out


def wait_affinity(pid: int, want: str, timeout: float = PIN_DEADLINE) -> dict[int, tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        threads = guest_threads(pid)
        if threads and all(cpus == want for _, cpus in threads.values()):
            return threads
        if time.monotonic() > deadline:
            return threads
        time.sleep(0.02)


def start_guest(c: Container, name: str, timeout: float = 30.0) -> tuple[int, int]:
    """A paused 2-vCPU guest `name` as the transient unit guest-NAME inside: (its PID inside, on the host),
    once both vCPU threads exist."""
    accel = ["-enable-kvm"] if c.run("test", "-c", "/dev/kvm", check=False).returncode == 0 \
        else ["-accel", "tcg,thread=multi"]
    c.run("systemd-run", f"--unit=guest-{name}", "--collect", "--", QEMU,
          "-name", f"guest={name},debug-threads=on", "-smp", "2", *accel, "-S", "-display", "none",
          "-nodefaults", "-no-user-config", "-m", "64", "-serial", "none", "-monitor", "none")
    deadline = time.monotonic() + timeout
    while True:
        inner = int(c.show(f"guest-{name}.service", "MainPID")["MainPID"])
        if inner:
            guest = c.host_pid(inner)
            names = {n for n, _ in guest_threads(guest).values()}
            if all({f"CPU {i}/KVM", f"CPU {i}/TCG"} & names for i in range(2)):
                return inner, guest
        if time.monotonic() >= deadline:
            journal = c.run("journalctl", "-u", f"guest-{name}", "--no-pager", check=False).stdout
            raise AssertionError(f"guest vCPU threads did not appear\n{journal}")
        time.sleep(0.05)


def values(e: dict, field: str) -> set[str]:
    """A journal entry's values of `field`: journalctl's JSON gives a list for a field given more than once."""
    v = e.get(field)
    return set(v) if isinstance(v, list) else {v} if v is not None else set()


def pinned_tids(c: Container, vm: str, policy: str, cpus: str) -> set[str]:
    """TIDs that vcpud.service's journal says it pinned to `cpus` for `vm` under `policy`."""
    return set().union(*(values(e, "TID") for e in c.journal("vcpud.service")
                         if e.get("VM") == vm and e.get("CPUS") == cpus and e.get("POLICY") == policy))


def diagnostics(c: Container) -> str:
    st = c.run("systemctl", "status", "--no-pager", "-l", "-n", "0", "vcpud.service", check=False)
    log = c.run("journalctl", "--no-pager", "-o", "short-monotonic", "-n", "60", "-u", "vcpud.service", check=False)
    return f"{st.stdout}{st.stderr}\n{log.stdout}{log.stderr}"
