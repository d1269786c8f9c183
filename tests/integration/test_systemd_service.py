"""packaging/systemd/vcpud.service under a real systemd: booted in a systemd-nspawn container.

See tests/nspawn.py for how the container is made. Inside it the unit is installed as an
admin would (/etc/systemd/system/vcpud.service, unchanged) plus a drop-in that only points
ExecStart at this checkout's venv and makes the venv reachable despite ProtectHome= and the private /tmp
when the checkout or the Python it uses lives under /root, /home or /tmp; every other
hardening setting is the shipped one.

Inside a container vcpud is not in the initial PID namespace: the kernel ignores its netlink
proc connector subscription and kvm uevents carry host PIDs, so it finds new VMs by its
periodic rescan only; the test config sets ``rescan_interval: 500ms`` for that reason (on a
host the events make it immediate).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, skip_or_fail
from tests.inside import (PIN_DEADLINE, PIN_FIELDS, diagnostics, require_container, start_guest, status, values,
                          wait_affinity)
from tests.nspawn import Container, booted
from tests.qemu import QEMU, kvm_usable

UNIT = REPO / "packaging" / "systemd" / "vcpud.service"
VCPUD = Path(sys.executable).parent / "vcpud"
# This checkout's code with the venv's interpreter: the venv may be an editable install of another
# checkout (a git worktree shares the main tree's venv), whose sources are not bound in.
RUN_VCPUD = f"{sys.executable} -m vcpud"
CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19, "CAP_SYS_NICE": 23}
CAP_MASK = sum(1 << b for b in CAPS.values())

CONFIG = """\
# written by tests/integration/test_systemd_service.py
rescan_interval: 500ms
policies:
  - name: web
    match: {{name: "web*"}}
    affinity: "{cpus}"
"""


def _under(p: Path, *tops: str) -> bool:
    return any(p == Path(t) or Path(t) in p.parents for t in tops)


def _python_paths() -> list[Path]:
    """What running the venv's vcpud needs besides /usr: the checkout, the venv, the base Python."""
    out: list[Path] = []
    for p in (REPO, Path(sys.prefix), Path(sys.base_prefix), Path(os.path.realpath(sys.executable)).parents[1]):
        p = Path(os.path.realpath(p))
        if _under(p, "/usr") or any(_under(p, str(q)) for q in out):
            continue
        out = [q for q in out if not _under(q, str(p))] + [p]
    return out


@pytest.fixture
def container(tmp_path):
    require_container()
    with booted(Container(tmp_path / "nspawn", bind_ro=_python_paths(), bind=["/dev/kvm"] if kvm_usable() else [],
                          capabilities=("CAP_NET_ADMIN",))) as c:
        yield c


# --- the harness on its own -----------------------------------------------------------------
def test_nspawn_harness_boots(container: Container):
    c = container
    assert c.run("systemctl", "is-system-running", check=False).stdout.strip() in ("running", "degraded")
    # nspawn's bounding set for the container has what vcpud.service asks for.
    bnd = int(status(c.init_pid)["CapBnd"], 16)
    missing = [n for n, b in CAPS.items() if not bnd >> b & 1]
    assert not missing, f"container lacks {missing} in its bounding set"
    # A transient unit inside, seen from the host through the PID mapping.
    c.run("systemd-run", "--unit=harness-sleep", "--collect", "--", "/bin/sleep", "300")
    props = c.show("harness-sleep.service", "ActiveState", "MainPID")
    assert props["ActiveState"] == "active", props
    inner = int(props["MainPID"])
    host = c.host_pid(inner)
    assert Path(f"/proc/{host}/comm").read_text().strip() == "sleep"
    assert Path(f"/proc/{host}/cmdline").read_bytes().split(b"\0")[:2] == [b"/bin/sleep", b"300"]
    # Files written from the host land in the container's root.
    c.write_file("/etc/vcpud-harness-probe", "hello\n")
    assert c.run("cat", "/etc/vcpud-harness-probe").stdout == "hello\n"
    # The repo is there, read-only, at the same path.
    assert c.run("test", "-f", str(REPO / "pyproject.toml"), check=False).returncode == 0
    assert c.run("touch", str(REPO / ".nspawn-write-probe"), check=False).returncode != 0
    c.systemctl("stop", "harness-sleep.service")
    assert c.show("harness-sleep.service", "ActiveState")["ActiveState"] in ("inactive", "")
    c.stop()
    assert c.proc is not None and c.proc.returncode == 0, c.console()
    assert not Path(f"/proc/{host}").exists() or Path(f"/proc/{host}/comm").read_text().strip() != "sleep"


# --- vcpud.service ----------------------------------------------------------------------------
def _dropin() -> str:
    lines = [
        "# written by tests/integration/test_systemd_service.py: run this checkout's venv",
        "[Service]",
        "ExecStart=",
        f"ExecStart={RUN_VCPUD} run --config /etc/vcpud/vcpud.yaml",
        f"Environment=PYTHONPATH={REPO}",
    ]
    paths = _python_paths()
    home = [p for p in paths if _under(p, "/root", "/home", "/run/user")]
    if home:
        # ProtectHome=yes hides them; a tmpfs home with just these bound in keeps the rest hidden.
        lines += ["ProtectHome=tmpfs", "BindReadOnlyPaths=" + " ".join(shlex.quote(str(p)) for p in home)]
    tmp = [p for p in paths if _under(p, "/tmp", "/var/tmp")]
    if tmp:
        # DynamicUser= implies a PrivateTmp= that cannot be turned off: bind the checkout in.
        lines.append("BindReadOnlyPaths=" + " ".join(shlex.quote(str(p)) for p in tmp))
    return "\n".join(lines) + "\n"


@pytest.mark.qemu
def test_vcpud_service_in_nspawn(container: Container):
    c = container
    if (os.cpu_count() or 1) < 2:
        skip_or_fail("needs 2 CPUs to move threads from CPU 0 to CPU 1")
    if not VCPUD.exists():
        skip_or_fail(f"{VCPUD} missing: run contrib/setup-dev.sh")
    if not Path(QEMU).exists():
        skip_or_fail(f"{QEMU} missing")
    help_ = c.run("env", f"PYTHONPATH={REPO}", *RUN_VCPUD.split(), "run", "--help", check=False)
    assert help_.returncode == 0, f"`vcpud run` not available yet:\n{help_.stdout}{help_.stderr}"

    # Install the unit as shipped, the drop-in, and the config.
    c.write_file("/etc/systemd/system/vcpud.service", UNIT.read_text())
    c.write_file("/etc/systemd/system/vcpud.service.d/override.conf", _dropin())
    c.write_file("/etc/vcpud/vcpud.yaml", CONFIG.format(cpus="0"))
    c.systemctl("daemon-reload")

    # Type=notify: start returns once READY=1 arrived (or fails).
    r = c.systemctl("start", "vcpud.service", check=False, timeout=90)
    assert r.returncode == 0, f"start failed: {r.stderr}\n{diagnostics(c)}"
    assert c.systemctl("is-active", "vcpud.service", check=False).stdout.strip() == "active", diagnostics(c)
    svc = c.show("vcpud.service", "MainPID", "StatusText", "NRestarts")
    assert svc["StatusText"], f"no STATUS= line: {svc}"
    daemon = c.host_pid(int(svc["MainPID"]))
    st = status(daemon)
    # DynamicUser=yes; exactly the three capabilities, effective through the ambient set.
    assert st["Uid"].split()[0] != "0", st["Uid"]
    for k in ("CapEff", "CapAmb", "CapBnd"):
        assert int(st[k], 16) == CAP_MASK, f"{k}={st[k]}, want {CAP_MASK:016x}"
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"

    # A guest inside the container: vcpud must find it and pin every thread to CPU 0.
    inner, guest = start_guest(c, "web1")

    threads = wait_affinity(guest, "0", timeout=PIN_DEADLINE)
    assert all(cpus == "0" for _, cpus in threads.values()), \
        f"not pinned to 0 within {PIN_DEADLINE:.0f} s: {threads}\n{diagnostics(c)}"

    # Reload with a new config: the threads move, the service stays up.
    c.write_file("/etc/vcpud/vcpud.yaml", CONFIG.format(cpus="1"))
    r = c.systemctl("reload", "vcpud.service", check=False)
    assert r.returncode == 0, f"reload failed: {r.stderr}\n{diagnostics(c)}"
    threads = wait_affinity(guest, "1", timeout=PIN_DEADLINE)
    assert all(cpus == "1" for _, cpus in threads.values()), \
        f"not moved to 1 after reload: {threads}\n{diagnostics(c)}"
    svc2 = c.show("vcpud.service", "ActiveState", "SubState", "MainPID", "NRestarts")
    assert (svc2["ActiveState"], svc2["SubState"]) == ("active", "running"), f"{svc2}\n{diagnostics(c)}"
    assert svc2["MainPID"] == svc["MainPID"] and svc2["NRestarts"] == "0", f"restarted instead of reloaded: {svc2}"

    # Every pinned thread is in a structured journal entry, before and after the reload (TID and
    # VM_PID as vcpud sees them: inside the container). A pass that pins several threads of a VM
    # to the same CPUs says it in one entry, with a TID= field per thread (journalctl's JSON: a list).
    tids = {str(t) for t in threads}

    deadline = time.monotonic() + 10
    while True:
        entries = [e for e in c.journal("vcpud.service") if e.get("VM") == "web1"]
        pinned = {cpus: set().union(*(values(e, "TID") for e in entries
                                     if e.get("CPUS") == cpus and e.get("POLICY") == "web"))
                  for cpus in ("0", "1")}
        if all(pinned[cpus] >= tids for cpus in ("0", "1")) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert entries, "no journal entry with VM=web1:\n" + "\n".join(
        str(e.get("MESSAGE")) for e in c.journal("vcpud.service")[-40:])
    for e in entries:
        if e.get("POLICY") == "web" and e.get("CPUS") in ("0", "1"):
            for f in PIN_FIELDS:
                assert e.get(f), f"journal entry without {f}: {e.get('MESSAGE')!r}"
            assert e["VM_PID"] == str(inner), e
    for cpus in ("0", "1"):
        assert pinned[cpus] >= tids, f"threads {sorted(tids - pinned[cpus])} have no journal entry with CPUS={cpus}"
    roles = set().union(*(values(e, "ROLE") for e in entries))
    assert any(r and r.startswith("vcpu") for r in roles), roles

    # Stop: SIGTERM, STOPPING=1, a clean exit.
    c.systemctl("stop", "vcpud.service", timeout=60)
    end = c.show("vcpud.service", "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert end["ActiveState"] == "inactive", end
    assert end["Result"] == "success", end
    assert end["ExecMainStatus"] == "0", end
    c.systemctl("stop", "guest-web1.service", check=False)
