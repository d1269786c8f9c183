"""Discovery over /proc captured from real qemu 7.2 processes (tests/fixtures/proc.ttar): no root, no qemu."""

import dataclasses
import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

from tests.proctree import ARCHIVE, ArchiveWriter, load, parse_archive
from vcpud.cpuset import CpuSet
from vcpud.discovery import (
    DEFAULT_EXECUTABLES, FileFacts, HostExeCheck, Role, kvm_run_fd, refresh_vm, scan, verify_executable,
)
from vcpud.procfs import PF_USER_WORKER, Procfs, Vanished

QEMU = "/usr/bin/qemu-system-x86_64"
_VCPU = re.compile(r"CPU (\d+)/KVM\Z")


@pytest.fixture
def tree(tmp_path):
    return load(tmp_path / "proc")


def found(tree):
    return scan(tree.procfs(), exe_check=tree.exe_check())


def vm_of(tree, fixture):
    (vm,) = [v for v in found(tree).vms if v.pid == tree.pid(fixture)]
    return vm


def label_from_comm(comm):
    """What the name alone says in a guest with debug-threads (the captured thread names)."""
    m = _VCPU.match(comm)
    if m:
        return f"vcpu {m.group(1)}"
    return f"iothread {comm[3:]}" if comm.startswith("IO ") else "emulator"


def verify(tree, fixture, patterns=DEFAULT_EXECUTABLES):
    return verify_executable(tree.procfs(), tree.pid(fixture), patterns, tree.exe_check())


# --- the archive ---------------------------------------------------------------------------
def test_archive_round_trips_and_loads_byte_for_byte(tree):
    a = parse_archive(ARCHIVE.read_text())
    w = ArchiveWriter()
    for e in a.entries:
        if e.symlink is not None:
            w.symlink(e.path, e.symlink, e.facts)
        else:
            w.file(e.path, e.content)
    assert parse_archive(w.text()).entries == a.entries
    for e in a.entries:
        p = tree.root / e.path
        if e.symlink is not None:
            assert os.readlink(p) == e.symlink
        else:
            assert p.read_bytes() == e.content
    # the argv survives as NUL-separated elements, the way the kernel shows it
    cmdline = (tree.root / str(tree.pid("named")) / "cmdline").read_bytes()
    assert cmdline.endswith(b"\0") and b"guest=fixture-named,debug-threads=on\0" in cmdline


def test_threads_are_reachable_but_not_listed(tree):
    fs = tree.procfs()
    pid = tree.pid("named")
    assert fs.pids() == sorted(tree.fixtures.values())
    for tid in fs.tids(pid):
        assert fs.tgid(tid) == pid


# --- what scan finds -----------------------------------------------------------------------
def test_scan_finds_the_vms_and_rejects_the_lookalike(tree):
    s = found(tree)
    assert sorted(vm.pid for vm in s.vms) == sorted(tree.pid(n) for n in ("named", "unnamed", "deleted"))
    assert [(r.pid, r.reason) for r in s.rejected] == [
        (tree.pid("lookalike"), "not the host's file at that path (other mount namespace?)")]
    assert (s.errors, s.vanished, s.unreadable) == ((), 0, 0)


def test_named_guest_roles_follow_thread_names(tree):
    vm = vm_of(tree, "named")
    fs = tree.procfs()
    assert {t.tid: t.label for t in vm.threads} == {
        tid: label_from_comm(fs.comm(vm.pid, tid)) for tid in fs.tids(vm.pid)}
    labels = Counter(t.label for t in vm.threads)
    assert labels["vcpu 0"] == labels["vcpu 1"] == labels["iothread io1"] == 1
    assert [t.how for t in vm.vcpu_threads()] == ["name", "name"]
    assert (vm.name, vm.debug_threads, vm.uuid) == ("fixture-named", True, "7f3c2a10-5b1e-4c6d-9a8b-0e1f2a3b4c5d")
    assert (vm.smp.cpus, vm.user, vm.exe) == (2, "root", QEMU)
    assert vm.key == (vm.pid, fs.stat(vm.pid).starttime)


def test_unnamed_guest_vcpus_found_by_kvm_run_and_fd(tree):
    vm = vm_of(tree, "unnamed")
    fs = tree.procfs()
    assert vm.name is None and not vm.debug_threads
    assert all(fs.comm(vm.pid, t) in ("qemu-system-x86", "kvm-nx-lpage-re", f"vhost-{vm.pid}")
               for t in fs.tids(vm.pid))
    vcpus = vm.vcpu_threads()
    assert [t.vcpu for t in vcpus] == [0, 1] and {t.how for t in vcpus} == {"kvm_run"}
    fds = fs.fd_targets(vm.pid)
    for t in vcpus:  # the fd its KVM_RUN names is that vCPU's fd
        fd = kvm_run_fd(fs.syscall(vm.pid, t.tid), 16, 0xAE80)
        assert fds[fd] == f"anon_inode:kvm-vcpu:{t.vcpu}"
    roles = {t.tid: t.role for t in vm.threads}
    assert roles[vm.pid] is Role.EMULATOR
    assert Counter(roles.values()) == {Role.VCPU: 2, Role.EMULATOR: 2, Role.KERNEL: 1, Role.VHOST: 1}


def test_nx_recovery_worker_is_kernel_though_its_syscall_looks_like_kvm_run(tree):
    vm = vm_of(tree, "unnamed")
    fs = tree.procfs()
    nx = tree.tid_by_comm(vm.pid, "kvm-nx-lpage-re")
    # the worker shows the registers of the vCPU it was copied from: KVM_RUN on a vCPU fd
    fd = kvm_run_fd(fs.syscall(vm.pid, nx), 16, 0xAE80)
    assert fd in fs.vcpu_fds(vm.pid)
    assert fs.stat(vm.pid, nx).flags & PF_USER_WORKER
    (t,) = [t for t in vm.threads if t.tid == nx]
    assert (t.role, t.how, t.vcpu) == (Role.KERNEL, "flags", None)


def test_nx_worker_recognised_by_name_too(tree):
    # A thread created as "kvm-nx-lpage-recovery" is cut to 15 bytes by the kernel; even
    # without PF_USER_WORKER (as if copied from a plain thread) the name keeps it off the vCPUs.
    pid = tree.pid("named")
    tree.add_thread(pid, 99999, "kvm-nx-lpage-recovery", syscall="16 0x9 0xae80 0x0 0x0 0x0 0x0 0x0 0x0")
    assert tree.procfs().comm(pid, 99999) == "kvm-nx-lpage-re"
    assert not tree.procfs().stat(pid, 99999).flags & PF_USER_WORKER
    (t,) = [t for t in vm_of(tree, "named").threads if t.tid == 99999]
    assert t.role is Role.KERNEL


def test_vhost_worker(tree):
    # synthesized (this kernel has no vhost-net): see the SYNTHESIZED comment in the archive
    vm = vm_of(tree, "unnamed")
    tid = tree.tid_by_comm(vm.pid, f"vhost-{vm.pid}")
    assert tree.procfs().stat(vm.pid, tid).flags & PF_USER_WORKER
    (t,) = [t for t in vm.threads if t.tid == tid]
    assert (t.role, t.how) == (Role.VHOST, "flags")


def test_unnamed_vcpu_on_a_cpu_leaves_the_unnamed_threads_unknown(tree):
    pid = tree.pid("unnamed")
    vcpu1 = [t for t in vm_of(tree, "unnamed").vcpu_threads() if t.vcpu == 1][0].tid
    tree.set_syscall(pid, vcpu1, "running")
    vm = vm_of(tree, "unnamed")
    roles = {t.tid: t.role for t in vm.threads}
    assert [t.vcpu for t in vm.vcpu_threads()] == [0]
    assert roles[vcpu1] is Role.UNKNOWN
    assert roles[pid] is Role.EMULATOR  # the main thread is never a vCPU
    assert Counter(roles.values())[Role.UNKNOWN] == 2  # vCPU 1 and the unnamed call_rcu thread


# --- executables ---------------------------------------------------------------------------
def test_deleted_binary_accepted_in_our_mount_namespace_only(tree):
    exe = os.readlink(tree.root / str(tree.pid("deleted")) / "exe")
    assert exe.endswith(" (deleted)")
    assert verify(tree, "deleted") == (exe.removesuffix(" (deleted)"), None)
    assert vm_of(tree, "deleted").exe == exe.removesuffix(" (deleted)")
    tree.set_mount_ns(tree.pid("deleted"), "mnt:[4026599999]")
    assert verify(tree, "deleted") == (exe, "deleted binary in another mount namespace")


def test_lookalike_same_comm_and_argv_other_file(tree):
    fs = tree.procfs()
    named, look = tree.pid("named"), tree.pid("lookalike")
    assert fs.stat(look).comm == fs.stat(named).comm
    assert fs.cmdline(look)[0] == fs.cmdline(named)[0] and fs.exe(look) == fs.exe(named) == QEMU
    assert verify(tree, "lookalike") == (QEMU, "not the host's file at that path (other mount namespace?)")
    assert verify(tree, "named") == (QEMU, None)


def test_lookalike_exe_elsewhere(tree):
    pid = tree.pid("named")
    tree.set_exe(pid, "/tmp/qemu-system-x86_64")
    assert verify(tree, "named") == ("/tmp/qemu-system-x86_64", "not a configured executable")
    assert [(r.pid, r.reason) for r in found(tree).rejected if r.pid == pid] == [
        (pid, "not a configured executable")]


def test_non_vm_process_rejected_with_reason_and_not_reported(tree):
    assert verify(tree, "shell") == ("/usr/bin/dash", "not a configured executable")
    s = found(tree)
    assert tree.pid("shell") not in {vm.pid for vm in s.vms} | {r.pid for r in s.rejected}


@pytest.mark.parametrize("change,reason", [
    ({"uid": 1000}, "binary not root-owned or writable by others"),
    ({"mode": 0o100775}, "binary not root-owned or writable by others"),
    ({"mode": 0o100757}, "binary not root-owned or writable by others"),
])
def test_binary_ownership_and_mode(tree, change, reason):
    pid = tree.pid("named")
    facts = tree.exe_check().running(tree.procfs(), pid)
    tree.set_exe(pid, QEMU, dataclasses.replace(facts, **change))
    assert verify(tree, "named") == (QEMU, reason)
    assert pid not in {vm.pid for vm in found(tree).vms}


def test_host_binary_replaced_or_gone(tree):
    facts = tree.exe_check().at_path(QEMU)
    tree.set_host_files({QEMU: dataclasses.replace(facts, ino=facts.ino + 1)})  # a package upgrade
    assert verify(tree, "named") == (QEMU, "not the host's file at that path (other mount namespace?)")
    tree.set_host_files({QEMU: None})
    assert verify(tree, "named") == (QEMU, "no such file on the host (other mount namespace?)")


def test_exe_check_of_a_vanished_process(tree):
    pid = tree.pid("named")
    tree.remove_process(pid)
    with pytest.raises(Vanished):
        verify(tree, "named")
    with pytest.raises(Vanished):
        tree.exe_check().running(tree.procfs(), pid)


def test_host_exe_check_is_the_default_and_reads_the_live_host():
    # a child of ours running a system binary, through the production check on the real /proc
    sleep = shutil.which("sleep")
    child = subprocess.Popen([sleep, "30"])
    try:
        fs = Procfs()
        exe = fs.exe(child.pid)
        check = HostExeCheck()
        assert check.running(fs, child.pid) == check.at_path(exe) == FileFacts.of(os.stat(exe))
        assert check.same_mount_ns(fs, child.pid)
        assert check.at_path("/nonexistent/qemu") is None
        st = os.stat(exe)
        want = None if st.st_uid == 0 and not st.st_mode & 0o022 else "binary not root-owned or writable by others"
        assert verify_executable(fs, child.pid, [exe]) == (exe, want)
        assert verify_executable(fs, child.pid, DEFAULT_EXECUTABLES) == (exe, "not a configured executable")
    finally:
        child.kill()
        child.wait()


# --- the tree edits reconciler tests build on ----------------------------------------------
def test_add_and_remove_threads(tree):
    pid = tree.pid("named")
    tree.add_thread(pid, 99990, "CPU 2/KVM")
    tree.add_thread(pid, 99991, "IO io2")
    vm = vm_of(tree, "named")
    labels = {t.tid: t.label for t in vm.threads}
    assert (labels[99990], labels[99991]) == ("vcpu 2", "iothread io2")
    assert tree.procfs().tgid(99990) == pid
    tree.remove_thread(pid, 99990)
    assert 99990 not in tree.procfs().tids(pid)
    with pytest.raises(Vanished):
        tree.procfs().tgid(99990)
    assert [t.vcpu for t in vm_of(tree, "named").vcpu_threads()] == [0, 1]
    with pytest.raises(ValueError):
        tree.remove_thread(pid, pid)


def test_rename_thread_is_seen_and_defeats_refresh(tree):
    pid = tree.pid("named")
    before = vm_of(tree, "named")
    tid = [t.tid for t in before.threads if t.role is Role.EMULATOR and t.tid != pid][0]
    tree.rename_thread(pid, tid, "IO io7")
    assert refresh_vm(tree.procfs(), before) is None
    assert {t.tid: t.label for t in vm_of(tree, "named").threads}[tid] == "iothread io7"
    tree.rename_thread(pid, pid, "main-renamed")
    fs = tree.procfs()
    assert fs.stat(pid).comm == fs.stat(pid, pid).comm == fs.comm(pid, pid) == "main-renamed"


def test_set_affinity(tree):
    pid = tree.pid("named")
    vm = vm_of(tree, "named")
    tid = vm.vcpu_threads()[1].tid
    tree.set_affinity(pid, tid, [1])
    fs = tree.procfs()
    assert fs.affinity(pid, tid) == CpuSet.parse("1")
    assert fs.status(pid, tid)["Cpus_allowed"] == "2"
    refreshed = refresh_vm(fs, vm)
    assert refreshed is not None and refreshed.vcpu_threads()[1].affinity == CpuSet.parse("1")
    assert refreshed.vcpu_threads()[0].affinity == vm.vcpu_threads()[0].affinity
    with pytest.raises(ValueError):
        tree.set_affinity(pid, tid, [64])  # the captured host has 2 CPUs


def test_clone_under_a_new_pid(tree):
    pid = tree.pid("unnamed")
    tids = tree.clone_process(pid, 50000)
    assert tids[pid] == 50000
    fs = tree.procfs()
    assert fs.tids(50000) == sorted(tids.values())
    assert all(fs.tgid(t) == 50000 for t in tids.values() if t != 50000)
    old, new = vm_of(tree, "unnamed"), [v for v in found(tree).vms if v.pid == 50000][0]
    assert new.key != old.key and new.cmdline == old.cmdline
    assert [tids[t.tid] for t in old.vcpu_threads()] == [t.tid for t in new.vcpu_threads()]
    assert {t.comm for t in new.threads if t.role is Role.VHOST} == {"vhost-50000"}
    with pytest.raises(ValueError):
        tree.clone_process(pid, 50000)


def test_clone_in_place_is_pid_reuse(tree):
    pid = tree.pid("named")
    old = vm_of(tree, "named")
    tree.clone_process(pid, starttime=old.starttime + 5000)
    new = vm_of(tree, "named")
    assert new.pid == old.pid and new.key == (pid, old.starttime + 5000)
    assert refresh_vm(tree.procfs(), old) is None  # another process under the same pid
    assert {t.label for t in new.threads} == {t.label for t in old.threads}
    with pytest.raises(ValueError):
        tree.clone_process(pid, starttime=new.starttime)
