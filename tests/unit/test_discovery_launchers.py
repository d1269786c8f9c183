"""VMs as other VM managers start them: the uuid given only through -smbios (Proxmox), and
``-daemonize`` (qemu forks through two short-lived parents before the process that runs the guest).

The QEMU behaviour these tests encode was checked on qemu-system-x86_64 7.2 with ``query-uuid``
over QMP (see each case), and by watching a ``-daemonize`` start with the proc connector.
"""

from __future__ import annotations

import logging
from pathlib import Path
from textwrap import dedent

import pytest

from tests.proctree import ProcTree, load
from tests.unit.test_reconciler import Actuator, Clock, MemoryStore
from vcpud.config import parse_config_text
from vcpud.cpuset import CpuSet
from vcpud.discovery import daemonizes, parse_uuid, scan, smbios_uuid
from vcpud.reconciler import FOLLOWUP_DELAYS, Reconciler

A = "aaaaaaaa-0000-0000-0000-000000000001"
B = "bbbbbbbb-0000-0000-0000-000000000002"


# --- the uuid -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,uuid", [
    ([], None),
    (["-uuid", A], A),
    (["-smbios", f"type=1,uuid={B}"], B),                                # Proxmox
    (["-smbios", f"type=1,manufacturer=x,,y,uuid={B}"], B),              # ,, is a comma in a value
    (["-smbios", f"type=1,uuid={B.upper()}"], B),                        # query-uuid prints lower case
    # QEMU applies -uuid and -smbios type=1,uuid= as it meets them: the last one wins
    (["-uuid", A, "-smbios", f"type=1,uuid={B}"], B),
    (["-smbios", f"type=1,uuid={B}", "-uuid", A], A),
    (["-uuid", A, "-smbios", "type=1,manufacturer=x"], A),               # a type 1 without uuid changes nothing
    (["-smbios", f"type=1,uuid={A},uuid={B}"], B),                       # the last of a repeated key
    (["--smbios", f"type=1,uuid={B}"], B),
    (["-smbios=type=1,uuid=" + B], B),
    # the type as qemu_strtou64(..., 0) reads a number: all of these are type 1 to QEMU 7.2
    (["-smbios", f"type=0x1,uuid={B}"], B),
    (["-smbios", f"type=001,uuid={B}"], B),
    (["-smbios", f"type=+1,uuid={B}"], B),
    (["-smbios", f"type= 1,uuid={B}"], B),
    (["-smbios", f"uuid={B},type=1"], B),                                 # keys in any order
    # not a type 1 entry: QEMU refuses these or gives the uuid to no one
    (["-smbios", f"type=2,uuid={B}"], None),
    (["-smbios", f"type=11,uuid={B}"], None),
    (["-smbios", f"uuid={B}"], None),                                     # "Must specify type= or file="
    (["-smbios", f"1,uuid={B}"], None),                                   # no implied key: "1" is a flag
    (["-smbios", f"type=1 ,uuid={B}"], None),                             # "expects a number"
    (["-smbios", f"type=0b1,uuid={B}"], None),
    (["-smbios", f"type=-1,uuid={B}"], None),                             # "out of range!"
    (["-smbios", f"type=,uuid={B}"], None),
    (["-smbios", f"file=/x.bin,type=1,uuid={B}"], None),                  # file= loads a table, ignores the rest
    (["-smbios", f"type=1,uuid={B},,x"], None),                           # "Invalid UUID"
    (["-smbios", "type=1,uuid=zz"], None),
    (["-uuid", A, "-smbios", "type=1,uuid=zz"], A),
    # an option's value is not an option
    (["-append", "-smbios", "-smbios", f"type=1,uuid={B}"], B),
    (["-append", "-smbios", "type=1,uuid=" + A], None),
])
def test_uuid(argv, uuid):
    assert parse_uuid(["qemu-system-x86_64", *argv]) == uuid


def test_smbios_uuid_alone():
    assert smbios_uuid(f"type=1,uuid={B}") == B
    assert smbios_uuid(f"type=3,uuid={B}") is None
    assert smbios_uuid("type=1") is None


def test_daemonizes():
    assert daemonizes(["q", "-S", "-daemonize", "-pidfile", "/run/x.pid"])
    assert daemonizes(["q", "--daemonize"])
    assert not daemonizes(["q", "-S"])
    assert not daemonizes(["q", "-name", "-daemonize"])  # a guest called "-daemonize"
    assert not daemonizes(["q", "-append", "-daemonize"])


# --- over a captured /proc ------------------------------------------------------------------
QEMU_ARGS_NAMED = ("-name", "guest=fixture-named,debug-threads=on", "-smp", "2", "-enable-kvm", "-display", "none",
                   "-nodefaults", "-no-user-config", "-m", "64", "-serial", "none", "-monitor", "none", "-S",
                   "-object", "iothread,id=io1")


def set_cmdline(tree: ProcTree, pid: int, *args: str) -> None:
    (tree.root / str(pid) / "cmdline").write_bytes(b"".join(a.encode() + b"\0"
                                                            for a in ("/usr/bin/qemu-system-x86_64", *args)))


def strip_guest(tree: ProcTree, pid: int) -> None:
    """Make ``pid`` a qemu process before its guest: no KVM fds, only the main and call_rcu
    threads (what /proc showed for the processes -daemonize forks through). The capture's
    call_rcu is its second thread."""
    fs = tree.procfs()
    for fd, target in fs.fd_targets(pid).items():
        if "kvm" in target:
            (tree.root / str(pid) / "fd" / str(fd)).unlink()
    keep = set(fs.tids(pid)[:2])
    for tid in fs.tids(pid):
        if tid not in keep:
            tree.remove_thread(pid, tid)


@pytest.fixture
def tree(tmp_path: Path) -> ProcTree:
    return load(tmp_path / "proc")


def test_smbios_uuid_of_a_captured_vm_matches_a_policy(tree):
    named = tree.pid("named")
    set_cmdline(tree, named, *QEMU_ARGS_NAMED, "-smbios", f"type=1,manufacturer=Proxmox,,VE,uuid={B.upper()}")
    (vm,) = [v for v in scan(tree.procfs(), exe_check=tree.exe_check()).vms if v.pid == named]
    assert vm.uuid == B
    cfg = parse_config_text(dedent(f"""
        policies:
          - name: by-uuid
            match: {{uuid: "{B.upper()}"}}
            affinity: "1"
        """), "t.yaml", online=CpuSet.parse("0-3"))
    policy = cfg.select(vm)
    assert policy is not None and policy.name == "by-uuid"


def daemonized_start(tree: ProcTree) -> tuple[int, int, int]:
    """The three processes of ``qemu -daemonize``: the exec'd parent P1 (waits for the guest's
    initialisation, then exits), P2 (setsid(), forks, exits) and P3 (runs the guest): P3 is the
    captured "named" VM with -daemonize added, the others copies of it without a guest."""
    p3 = tree.pid("named")
    args = (*QEMU_ARGS_NAMED, "-daemonize", "-pidfile", "/run/x.pid")
    set_cmdline(tree, p3, *args)
    p1, p2 = 60000, 61000
    for p in (p1, p2):
        tree.clone_process(p3, p)
        strip_guest(tree, p)
    return p1, p2, p3


def test_scan_skips_the_daemonizing_parents(tree):
    p1, p2, p3 = daemonized_start(tree)
    s = scan(tree.procfs(), exe_check=tree.exe_check())
    assert p3 in {vm.pid for vm in s.vms}
    assert not {p1, p2} & {vm.pid for vm in s.vms}
    assert sorted(s.starting) == [p1, p2]
    # without -daemonize a qemu that has no guest yet is a VM as before (it will be one)
    set_cmdline(tree, p1, *QEMU_ARGS_NAMED)
    s = scan(tree.procfs(), exe_check=tree.exe_check())
    assert p1 in {vm.pid for vm in s.vms} and s.starting == (p2,)


def test_daemonized_vm_found_once_and_pinned(tree, caplog):
    p1, p2, p3 = daemonized_start(tree)
    # P3 before its guest: saved to put back when KVM_CREATE_VM comes
    guest_tids = tree.procfs().tids(p3)
    saved = tree.root / "p3-later"
    (tree.root / str(p3)).rename(saved)  # its threads' links dangle until it is back
    act, clock = Actuator(tree), Clock()
    cfg = parse_config_text(dedent("""
        policies:
          - name: all
            match: {name: fixture-named}
            affinity: "1"
        """), "t.yaml", online=CpuSet.parse("0-3"))
    rec = Reconciler(cfg, CpuSet.parse("0-3"), tree.procfs(), act, MemoryStore(), clock=clock,
                     exe_check=tree.exe_check())
    caplog.set_level(logging.INFO, logger="vcpud")
    rec.on_exec(p1)                                              # EXEC of the qemu the manager ran
    rec.on_comm(tree.procfs().tids(p2)[1], p2)                  # P2 names its call_rcu thread
    assert not rec.vms and not act.calls and p1 not in rec.not_vm and p2 not in rec.not_vm
    assert rec.due[p1] == pytest.approx(clock() + FOLLOWUP_DELAYS[0])
    rec.on_exit(p2, p2)
    tree.remove_process(p2)
    assert p2 not in rec.due and p2 not in rec.starting
    clock.advance(FOLLOWUP_DELAYS[0])
    rec.run_due()                                                # P1 still waiting on its pipe
    assert not rec.vms and rec.due[p1] == pytest.approx(clock() + FOLLOWUP_DELAYS[1])
    # P3 appears (a fork, no exec), opens /dev/kvm and creates the VM and its vCPUs
    saved.rename(tree.root / str(p3))
    rec.on_kvm_uevent("create", p3)
    rec.run_due()
    assert set(rec.vms) == {p3}
    assert all(tree.procfs().affinity(p3, t) == CpuSet.parse("1") for t in guest_tids
               if tree.procfs().comm(p3, t) != "kvm-nx-lpage-re")
    clock.advance(FOLLOWUP_DELAYS[1])
    rec.run_due()                                                # P1's follow-up: still not a VM
    rec.on_exit(p1, p1)
    tree.remove_process(p1)
    assert set(rec.vms) == {p3} and not rec.starting
    found = [r.getMessage() for r in caplog.records if r.getMessage().startswith("found VM")]
    assert found == [f"found VM fixture-named (pid {p3}), policy all"]
    assert not [r for r in caplog.records if "exited" in r.getMessage()]


def test_followups_find_the_guest_when_its_event_came_too_early(tree):
    # the kvm "create" uevent is sent before the kvm-vm fd is installed; an unnamed guest
    # sends no COMM events for its vCPUs: the follow-ups of a starting process find it
    unnamed = tree.pid("unnamed")
    fs = tree.procfs()
    argv = [a for a in fs.cmdline(unnamed)[1:]] + ["-daemonize"]
    set_cmdline(tree, unnamed, *argv)
    fds = {fd: t for fd, t in fs.fd_targets(unnamed).items() if "kvm" in t}
    for fd in fds:
        (tree.root / str(unnamed) / "fd" / str(fd)).unlink()
    rec = Reconciler(parse_config_text("policies: [{name: all, match: {}, affinity: '1'}]", "t.yaml",
                                       online=CpuSet.parse("0-3")),
                     CpuSet.parse("0-3"), fs, Actuator(tree), MemoryStore(), clock=(clock := Clock()),
                     exe_check=tree.exe_check())
    rec.on_kvm_uevent("create", unnamed)
    rec.run_due()
    assert unnamed not in rec.vms and unnamed in rec.due
    for fd, target in fds.items():
        (tree.root / str(unnamed) / "fd" / str(fd)).symlink_to(target)
    clock.advance(FOLLOWUP_DELAYS[0])
    rec.run_due()
    assert unnamed in rec.vms and [t.vcpu for t in rec.vms[unnamed].vm.vcpu_threads()] == [0, 1]
