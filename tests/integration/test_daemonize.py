"""`vcpud run` and a guest started the way Proxmox starts them: ``-daemonize`` (qemu forks through two
parents that exit) and its uuid given only as ``-smbios type=1,uuid=...``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_daemon import PINNED_WITHIN, daemon_factory  # noqa: F401 (a fixture)
from tests.qemu import QEMU, RUN, accel_args

pytestmark = pytest.mark.qemu


def threads(pid: int) -> dict[int, str]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            pass
    return out


def allowed(tid: int) -> str:
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def test_daemonized_guest_found_once_by_its_smbios_uuid_and_pinned(tmp_path, daemon_factory):  # noqa: F811
    vm_uuid = str(uuid.uuid4())
    name = RUN + "dz1"
    cfg = tmp_path / "vcpud.yaml"
    # the policy asks for the uuid only -smbios gives (and the run's name prefix, as every test policy)
    cfg.write_text(f"rescan_interval: 1h\npolicies:\n  - name: proxmox\n"
                   f"    match: {{name: \"{RUN}dz*\", uuid: \"{vm_uuid.upper()}\"}}\n    affinity: \"1\"\n")
    d = daemon_factory(cfg)
    pidfile = tmp_path / "dz1.pid"
    argv = [QEMU, "-name", f"guest={name},debug-threads=on", "-smp", "2", *accel_args(), "-display", "none",
            "-nodefaults", "-no-user-config", "-m", "64", "-S",
            "-smbios", f"type=1,manufacturer=Proxmox,,VE,uuid={vm_uuid}", "-daemonize", "-pidfile", str(pidfile)]
    pid = 0
    try:
        # returns when the first parent exits: once the daemonized guest has initialised
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        pid = int(pidfile.read_text())
        vcpus = {tid for tid, comm in threads(pid).items() if re.fullmatch(r"CPU \d+/(KVM|TCG)", comm)}
        assert len(vcpus) == 2
        deadline = time.monotonic() + PINNED_WITHIN
        while True:
            bad = {f"{tid} {comm}": allowed(tid) for tid, comm in threads(pid).items()
                   if not comm.startswith("kvm-nx") and allowed(tid) != "1"}
            if not bad:
                break
            assert time.monotonic() < deadline, f"not pinned: {bad}\n{d.log()[-3000:]}"
            time.sleep(0.01)
        d.wait_log(rf"found VM {re.escape(name)} \(pid {pid}\), policy proxmox")
        time.sleep(0.5)  # the first parent's follow-ups have run out or it has gone
        log = d.log()
        found = re.findall(rf"found VM {re.escape(name)} \(pid (\d+)\)", log)
        assert found == [str(pid)], log[-3000:]
        assert not re.search(rf"VM {re.escape(name)} \(pid \d+\) exited", log), log[-3000:]
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
        elif pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
