"""Discovery on snapshots taken from real qemu 7.2 processes on a KVM host (values copied from /proc)."""

import pytest

from vcpud.cpuset import CpuSet
from vcpud.discovery import (
    Smp, classify, kvm_run_fd, needs_syscall, option_values, parse_name, parse_smp, parse_uuid,
    path_matches, split_qemu_opts,
)
from vcpud.procfs import ProcessSnapshot, ThreadSnapshot, parse_stat

ALL = CpuSet.parse("0-1")
# task flags as read from /proc/TID/stat field 9 on this host (kernel 6.18)
USER = 138412224          # ordinary qemu thread
MAIN = 138412480
NX_WORKER = 138428608     # kvm-nx-lpage-recovery: PF_USER_WORKER set


def t(tid, comm, flags=USER):
    return ThreadSnapshot(tid=tid, comm=comm, state="S", flags=flags, processor=0, utime=0, stime=0,
                          starttime=6967, affinity=ALL)


NODBG_ARGV = ("qemu-system-x86_64", "-name", "nodbg", "-smp", "2", "-enable-kvm", "-display", "none",
              "-nodefaults", "-m", "64", "-daemonize", "-pidfile", "/tmp/q2.pid")
NODBG = ProcessSnapshot(
    pid=4200, starttime=6967, comm="qemu-system-x86", exe="/usr/bin/qemu-system-x86_64", cmdline=NODBG_ARGV, uid=0,
    threads=(t(4200, "qemu-system-x86", MAIN), t(4201, "qemu-system-x86"), t(4202, "qemu-system-x86"),
             t(4203, "qemu-system-x86"), t(4205, "kvm-nx-lpage-re", NX_WORKER)),
)
NODBG_SYSCALLS = {
    4201: "202 0x55e381a747a8 0x0 0xffffffff 0x0 0x0 0x0 0x7f18e05fe668 0x7f18e11fd829",
    4202: "16 0xc 0xae80 0x0 0x0 0x55e381352290 0xff 0x7f18dfc7a530 0x7f18e11f9d6b",
    4203: "16 0xd 0xae80 0x0 0x0 0x55e381352290 0x55e381a41260 0x7f18df479530 0x7f18e11f9d6b",
    # the kernel worker shows the registers it was copied from: a vCPU's KVM_RUN on fd 0xd
    4205: "16 0xd 0xae80 0x0 0x0 0x55e381352290 0x0 0x0 0x0",
}
NODBG_FDS = {12: 0, 13: 1}


def roles(vm):
    return {th.tid: th.label for th in vm.threads}


def test_nodbg_vcpus_found_by_kvm_run_fd():
    assert needs_syscall(NODBG) == [4201, 4202, 4203]
    vm = classify(NODBG, NODBG_SYSCALLS, NODBG_FDS)
    assert roles(vm) == {4200: "emulator", 4201: "emulator", 4202: "vcpu 0", 4203: "vcpu 1", 4205: "kernel"}
    assert vm.name == "nodbg" and not vm.debug_threads
    assert [th.tid for th in vm.vcpu_threads()] == [4202, 4203]


def test_nx_lpage_worker_never_a_vcpu_even_if_asked():
    # Even if its syscall were consulted, the worker's flags decide first.
    vm = classify(NODBG, {**NODBG_SYSCALLS, 4203: "running"}, NODBG_FDS)
    assert roles(vm)[4205] == "kernel"
    # vCPU 1 is on a CPU right now: unknown, and so is every other unnamed thread
    assert roles(vm)[4203] == "unknown" and roles(vm)[4201] == "unknown"
    assert roles(vm)[4200] == "emulator"  # the main thread runs the main loop, never a vCPU


def test_unnamed_without_kvm_fds_is_unknown():
    vm = classify(NODBG, {}, {})
    assert roles(vm) == {4200: "emulator", 4201: "unknown", 4202: "unknown", 4203: "unknown", 4205: "kernel"}


CORE8_ARGV = ("qemu-system-x86_64", "-name", "guest=core8,debug-threads=on", "-smp", "4,sockets=1,cores=2,threads=2",
              "-enable-kvm", "-S", "-display", "none", "-nodefaults", "-m", "64",
              "-object", "iothread,id=io1", "-uuid", "5A0F5B3C-8E9E-4F41-9D77-0C2B1F0E6A11")
CORE8 = ProcessSnapshot(
    pid=4140, starttime=100, comm="qemu-system-x86", exe="/usr/bin/qemu-system-x86_64", cmdline=CORE8_ARGV, uid=0,
    threads=(t(4140, "qemu-system-x86", MAIN), t(4141, "call_rcu"), t(4142, "CPU 0/KVM"), t(4143, "CPU 1/KVM"),
             t(4144, "CPU 2/KVM"), t(4145, "CPU 3/KVM"), t(4146, "IO io1"), t(4147, "IO mon_iothread"),
             t(4148, "worker"), t(4149, "vhost-4140", NX_WORKER), t(4150, "kvm-nx-lpage-re", NX_WORKER)),
)


def test_named_threads():
    assert needs_syscall(CORE8) == []
    vm = classify(CORE8)
    assert roles(vm) == {4140: "emulator", 4141: "emulator", 4142: "vcpu 0", 4143: "vcpu 1", 4144: "vcpu 2",
                         4145: "vcpu 3", 4146: "iothread io1", 4147: "emulator", 4148: "emulator",
                         4149: "vhost", 4150: "kernel"}
    assert vm.name == "core8" and vm.debug_threads
    assert vm.uuid == "5a0f5b3c-8e9e-4f41-9d77-0c2b1f0e6a11"
    assert vm.smp == Smp(cpus=4, maxcpus=4, sockets=1, dies=1, clusters=1, cores=2, threads=2)
    assert vm.key == (4140, 100)


def test_tcg_names():
    snap = ProcessSnapshot(pid=1, starttime=1, comm="qemu-system-x86", exe="/usr/bin/qemu-system-x86_64",
                           cmdline=("qemu-system-x86_64",), uid=0,
                           threads=(t(1, "qemu-system-x86", MAIN), t(2, "CPU 0/TCG"), t(3, "CPU 12/TCG")))
    assert roles(classify(snap)) == {1: "emulator", 2: "vcpu 0", 3: "vcpu 12"}


@pytest.mark.parametrize("argv,smp", [
    ([], Smp()),
    (["-smp", "4"], Smp(cpus=4, maxcpus=4, cores=4)),                     # QEMU >= 6.2 prefers cores
    (["-smp", "4,sockets=1,cores=2,threads=2"], Smp(4, 4, 1, 1, 1, 2, 2)),
    (["-smp", "cpus=2,maxcpus=4"], Smp(cpus=2, maxcpus=4, cores=4)),
    (["-smp", "sockets=2,cores=4,threads=2"], Smp(16, 16, 2, 1, 1, 4, 2)),
    (["-smp", "8,sockets=2"], Smp(8, 8, 2, 1, 1, 4, 1)),
    (["-smp", "8,cores=2,threads=2"], Smp(8, 8, 2, 1, 1, 2, 2)),
    (["-smp", "12,sockets=2,dies=2,cores=3"], Smp(12, 12, 2, 2, 1, 3, 1)),
    (["-machine", "pc-i440fx-6.1", "-smp", "4"], Smp(cpus=4, maxcpus=4, sockets=4)),  # old machine: sockets
    (["-machine", "type=pc-q35-7.2,accel=kvm", "-smp", "4"], Smp(cpus=4, maxcpus=4, cores=4)),
    (["-smp", "2", "-smp", "6"], Smp(cpus=6, maxcpus=6, cores=6)),       # last one wins, as in qemu
])
def test_smp(argv, smp):
    assert parse_smp(["qemu-system-x86_64", *argv]) == smp


def test_smp_position():
    s = Smp(16, 16, 2, 1, 1, 4, 2)
    assert s.position(0) == {"socket": 0, "die": 0, "cluster": 0, "core": 0, "thread": 0}
    assert s.position(3) == {"socket": 0, "die": 0, "cluster": 0, "core": 1, "thread": 1}
    assert s.position(9)["socket"] == 1


def test_name_forms():
    assert parse_name(["q", "-name", "web1"]) == ("web1", False)
    assert parse_name(["q", "-name", "web1,debug-threads=on"]) == ("web1", True)
    assert parse_name(["q", "--name", "guest=a,,b,debug-threads=on"]) == ("a,b", True)
    assert parse_name(["q", "-name", "process=x,guest=y"]) == ("y", False)
    assert parse_name(["q"]) == (None, False)
    assert parse_uuid(["q", "-uuid", "ABC"]) == "abc"
    assert split_qemu_opts("a,,b,c=d") == ["a,b", "c=d"]
    # an option's value is not itself an option
    assert option_values(["q", "-append", "-name", "-name", "x"], "name") == ["x"]


def test_kvm_run_fd():
    assert kvm_run_fd("16 0xd 0xae80 0x0", 16, 0xAE80) == 13
    assert kvm_run_fd("running", 16, 0xAE80) is None
    assert kvm_run_fd("16 0xd 0xae81 0x0", 16, 0xAE80) is None
    assert kvm_run_fd("29 0xd 0xae80 0x0", 16, 0xAE80) is None
    assert kvm_run_fd(None, 16, 0xAE80) is None


def test_path_matches_does_not_cross_slash():
    pats = ["/usr/bin/qemu-system-*", "/usr/libexec/qemu-kvm"]
    assert path_matches("/usr/bin/qemu-system-x86_64", pats)
    assert path_matches("/usr/libexec/qemu-kvm", pats)
    assert not path_matches("/usr/bin/qemu-system-x/../../tmp/evil", pats)
    assert not path_matches("/tmp/qemu-system-x86_64", pats)
    assert not path_matches("/usr/bin/qemu-img", pats)


def test_parse_stat_comm_with_parens_and_spaces():
    line = ("4142 (CPU 0/KVM) S 1 4140 4140 0 -1 138412224 12 0 0 0 5 462 0 0 20 0 6 0 6968 363458560 "
            "6716 18446744073709551615 1 1 0 0 0 0 268444224 4096 17610 0 0 0 -1 1 0 0 0 0 0")
    st = parse_stat(line)
    assert st.comm == "CPU 0/KVM" and st.state == "S" and st.flags == 138412224
    assert (st.utime, st.stime, st.starttime, st.processor) == (5, 462, 6968, 1)
    weird = parse_stat("7 (a) b)) R 1 7 7 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 3 0")
    assert weird.comm == "a) b)" and weird.processor == 3
