"""The proc connector's BPF filter program: run by a tiny classic-BPF interpreter and by the kernel.

The kernel runs it through an AF_UNIX datagram socket (SO_ATTACH_FILTER applies to any socket,
no privilege needed): a datagram the filter drops never arrives. The same tables go through
both, so the interpreter here is checked against the kernel's, and the program against a
plain-Python statement of what it should pass (`should_pass`).
"""

from __future__ import annotations

import random
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcpud import procfilter
from vcpud.procconn import (
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    NLMSG_OVERRUN,
    PROC_EVENT_COMM,
    PROC_EVENT_COREDUMP,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_NONE,
    PROC_EVENT_UID,
    ProcEvent,
    parse,
)
from vcpud.procfilter import AND, JA, JEQ, JGE, LD_H, LD_LEN, LD_W, RET, Insn, TooLong, build

DAEMON_KINDS = ("fork", "exec", "comm", "exit")  # what vcpud run asks for
PID_MAX = 4194304  # the largest pid_max on 64-bit


# --- messages, laid out as the kernel sends them (tests/unit/test_procconn.py has captures) -----
def message(what: int, body: bytes = b"", nl_type: int = NLMSG_DONE, idx: int = 1, val: int = 1) -> bytes:
    event = struct.pack("=IIQ", what, 1, 1305988314551) + body.ljust(24, b"\0")  # struct proc_event: 40 bytes
    cn = struct.pack("=IIIIHH", idx, val, 7, 0, len(event), 0) + event  # struct cn_msg
    return struct.pack("=IHHII", 16 + len(cn), nl_type, 0, 7, 0) + cn  # struct nlmsghdr


def fork(child_tgid: int, child_pid: int | None = None, parent: int = 1) -> bytes:
    return message(PROC_EVENT_FORK, struct.pack("=iiii", parent, parent, child_pid or child_tgid, child_tgid))


def comm(tgid: int, name: bytes, pid: int | None = None) -> bytes:
    return message(PROC_EVENT_COMM, struct.pack("=ii16s", pid or tgid, tgid, name))


def exec_(tgid: int) -> bytes:
    return message(PROC_EVENT_EXEC, struct.pack("=ii", tgid, tgid))


def exit_(tgid: int, pid: int | None = None) -> bytes:
    return message(PROC_EVENT_EXIT, struct.pack("=iiIi", pid or tgid, tgid, 0, 17))


def ack(nonce: int = 0x1235) -> bytes:
    out = bytearray(message(PROC_EVENT_NONE, struct.pack("=I", 0)))
    struct.pack_into("=I", out, 28, nonce)  # cn_msg.ack
    return bytes(out)


def uid(tgid: int) -> bytes:
    return message(PROC_EVENT_UID, struct.pack("=iiII", tgid, tgid, 65534, 65534))


def test_messages_parse_as_meant():
    assert parse(fork(200, 201, 100)) == [ProcEvent("fork", 201, 200, 100, 100, timestamp_ns=1305988314551)]
    assert parse(comm(7, b"CPU 3/KVM", 8)) == [ProcEvent("comm", 8, 7, comm="CPU 3/KVM", timestamp_ns=1305988314551)]
    assert parse(exit_(7, 8))[0].what == "exit" and parse(exec_(7))[0].what == "exec"
    assert parse(ack()) == [] and len(ack()) == procfilter.MESSAGE_SIZE == 76


# --- two ways to run a program ---------------------------------------------------------------
class Interpreter:
    """Classic BPF, only the opcodes procfilter emits; `steps` counts instructions run."""

    def __init__(self, prog: list[Insn]) -> None:
        self.prog = prog
        self.steps = 0

    def run(self, data: bytes) -> int:
        a, pc = 0, 0
        while True:
            code, jt, jf, k = self.prog[pc]  # IndexError: ran off the end, which the kernel refuses
            pc += 1
            self.steps += 1
            if code == LD_LEN:
                a = len(data)
            elif code in (LD_W, LD_H):
                size = 4 if code == LD_W else 2
                if k + size > len(data):
                    return 0  # the kernel ends the program with 0 (drop) on a load past the end
                a = int.from_bytes(data[k : k + size], "big")
            elif code == AND:
                a &= k
            elif code == JA:
                pc += k
            elif code == JEQ:
                pc += jt if a == k else jf
            elif code == JGE:
                pc += jt if a >= k else jf
            elif code == RET:
                return k
            else:
                raise AssertionError(f"opcode {code:#x} is not one procfilter emits")

    def passes(self, data: bytes) -> bool:
        return self.run(data) != 0


class Kernel:
    """The program attached to an AF_UNIX datagram socket: the kernel's checker, JIT and verdict."""

    MARK = b"mark"  # under 76 bytes: always passes

    def __init__(self, prog: list[Insn]) -> None:
        self.rx, self.tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        procfilter.attach(self.rx, prog)
        self.rx.setblocking(False)

    def passes(self, data: bytes) -> bool:
        self.tx.send(data)
        self.tx.send(self.MARK)
        got = self.rx.recv(4096)
        if got == self.MARK:
            return False
        assert got == data, "a passing datagram arrives whole"
        assert self.rx.recv(4096) == self.MARK
        return True

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


@pytest.fixture(params=["interpreter", "kernel"])
def engine(request):
    made: list[Kernel] = []

    def load(prog: list[Insn]) -> Interpreter | Kernel:
        if request.param == "interpreter":
            return Interpreter(prog)
        made.append(Kernel(prog))
        return made[-1]

    yield load
    for k in made:
        k.close()


def should_pass(data: bytes, tgids: set[int] | None, kinds: tuple[str, ...] | None) -> bool:
    """The filter's contract, stated in Python on the parsed fields."""
    if len(data) < 76 or struct.unpack_from("=H", data, 4)[0] != NLMSG_DONE:
        return True
    if struct.unpack_from("=II", data, 16) != (1, 1):
        return True
    what = struct.unpack_from("=I", data, 36)[0]
    names = {PROC_EVENT_FORK: "fork", PROC_EVENT_EXEC: "exec", PROC_EVENT_COMM: "comm", PROC_EVENT_EXIT: "exit"}
    if what == PROC_EVENT_NONE:
        return True
    if what not in names:
        return kinds is None
    name = names[what]
    if kinds is not None and name not in kinds:
        return False
    if name == "exec" or tgids is None:
        return True
    if name == "fork":
        return struct.unpack_from("=I", data, 64)[0] in tgids
    if name == "comm" and data[60:76].startswith((b"CPU ", b"IO ")):
        return True
    return struct.unpack_from("=I", data, 56)[0] in tgids


# --- the table ------------------------------------------------------------------------------
WATCHED = {100, 200, 300}
FULL = fork(200, 201, 100)
CASES = [  # (id, message, passes with WATCHED and the daemon's kinds)
    ("fork-thread-of-watched", fork(200, 201, 100), True),
    ("fork-process-of-watched-parent", fork(999, 999, 200), False),
    ("fork-unwatched", fork(999, 1000, 50), False),
    ("comm-watched-any-name", comm(100, b"worker", 101), True),
    ("comm-watched-main-thread", comm(300, b"qemu-system-x86"), True),
    ("comm-unknown-vcpu", comm(999, b"CPU 3/KVM", 1000), True),
    ("comm-unknown-tcg", comm(999, b"CPU 0/TCG", 1000), True),
    ("comm-unknown-iothread", comm(999, b"IO iothread0", 1000), True),
    ("comm-unknown-io-exact", comm(999, b"IO ", 1000), True),
    ("comm-unknown-foo", comm(999, b"foo", 1000), False),
    ("comm-unknown-empty", comm(999, b"", 1000), False),
    ("comm-unknown-CPU-no-space", comm(999, b"CPU", 1000), False),
    ("comm-unknown-CPUx", comm(999, b"CPUx 1/KVM", 1000), False),
    ("comm-unknown-lowercase", comm(999, b"cpu 1/kvm", 1000), False),
    ("comm-unknown-IO-no-space", comm(999, b"IO", 1000), False),
    ("comm-unknown-IOx", comm(999, b"IOx", 1000), False),
    ("comm-unknown-full-16-bytes", comm(999, b"0123456789abcdef", 1000), False),
    ("exec-unwatched", exec_(999), True),
    ("exec-watched", exec_(100), True),
    ("exit-watched-process", exit_(100), True),
    ("exit-watched-thread", exit_(100, 101), True),
    ("exit-unwatched", exit_(999), False),
    ("exit-unwatched-thread-with-watched-pid", exit_(999, 100), False),
    ("ack", ack(), True),
    ("uid-unwatched", uid(999), False),
    ("uid-watched", uid(100), False),
    ("coredump", message(PROC_EVENT_COREDUMP, struct.pack("=ii", 100, 100)), False),
    ("noop", message(PROC_EVENT_FORK, struct.pack("=iiii", 1, 1, 9, 9), nl_type=NLMSG_NOOP), True),
    ("error", struct.pack("=IHHIIi", 36, NLMSG_ERROR, 0, 0, 0, -105) + FULL[:16], True),
    ("error-full-length", message(PROC_EVENT_FORK, struct.pack("=iiii", 1, 1, 9, 9), nl_type=NLMSG_ERROR), True),
    ("overrun", message(PROC_EVENT_EXIT, struct.pack("=ii", 9, 9), nl_type=NLMSG_OVERRUN), True),
    ("other-connector-idx", message(PROC_EVENT_FORK, struct.pack("=iiii", 1, 1, 9, 9), idx=2), True),
    ("other-connector-val", message(PROC_EVENT_FORK, struct.pack("=iiii", 1, 1, 9, 9), val=2), True),
    ("one-byte-short", fork(999)[:75], True),
    ("header-only", fork(999)[:16], True),
    ("empty", b"", True),
    ("zeros", b"\0" * 76, True),
    ("ones", b"\xff" * 76, True),
    ("trailing-bytes-watched", fork(200) + b"\0" * 24, True),
    ("trailing-bytes-unwatched", fork(999) + b"\0" * 24, False),
    ("two-messages-first-decides", fork(999) + fork(200), False),
]


@pytest.mark.parametrize("data, want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_daemon_filter(engine, data, want):
    prog = build(WATCHED, DAEMON_KINDS)
    assert should_pass(data, WATCHED, DAEMON_KINDS) == want  # the table agrees with the contract
    assert engine(prog).passes(data) == want


@pytest.mark.parametrize("data", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_every_kind_wanted_passes_the_unknown_kinds(engine, data):
    prog = engine(build(WATCHED, None))
    assert prog.passes(data) == should_pass(data, WATCHED, None)
    assert prog.passes(uid(999)) and prog.passes(message(0x400, struct.pack("=ii", 9, 9)))


@pytest.mark.parametrize("kinds", [("comm",), ("exec", "exit"), ("fork",), ()], ids=str)
def test_kinds_not_asked_for_are_dropped(engine, kinds):
    prog = engine(build(WATCHED, kinds))
    for _, data, _ in CASES:
        assert prog.passes(data) == should_pass(data, WATCHED, kinds), data.hex()


def test_empty_watch_set_passes_only_exec_names_and_control(engine):
    prog = engine(build(set(), DAEMON_KINDS))
    assert [prog.passes(m) for m in (fork(200), comm(100, b"x"), exit_(100))] == [False] * 3
    assert [prog.passes(m) for m in (exec_(5), comm(5, b"CPU 0/KVM"), comm(5, b"IO x"), ack(), b"")] == [True] * 5


def test_no_watch_set_passes_every_wanted_kind(engine):
    prog = engine(build(None, DAEMON_KINDS))
    assert all(prog.passes(m) for m in (fork(999), comm(999, b"foo"), exit_(999), exec_(999), ack()))
    assert not prog.passes(uid(999))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 100, 500, 2000])
def test_many_tgids_each_found_and_others_not(n):
    rng = random.Random(n)
    watched = set(rng.sample(range(1, PID_MAX + 1), n))
    prog = build(watched, DAEMON_KINDS)
    vm = Interpreter(prog)
    for t in watched:
        assert vm.passes(fork(t, t + 1)) and vm.passes(exit_(t)) and vm.passes(comm(t, b"x"))
    others = [t for t in rng.sample(range(1, PID_MAX + 1), 2000) if t not in watched]
    others += [min(watched) - 1, max(watched) + 1, 0, PID_MAX + 1, 2**31 - 1, -1]
    assert not any(vm.passes(fork(t)) or vm.passes(exit_(t)) for t in others if t not in watched)


def test_500_tgids_cost_per_event():
    """What the kernel runs per event, worst case (an unwatched COMM walks the whole path)."""
    watched = set(random.Random(500).sample(range(1, PID_MAX + 1), 500))
    prog = build(watched, DAEMON_KINDS)
    worst = 0
    for t in list(watched)[:100] + list(range(1, 1000, 7)):
        for m in (fork(t), comm(t, b"foo"), exit_(t)):
            vm = Interpreter(prog)
            vm.run(m)
            worst = max(worst, vm.steps)
    # 13 header + 7 comm + a 63-leaf tree (depth 6, at most 2 each) + 8 tests + RET
    assert len(prog) < 800 and worst <= 13 + 7 + 2 * 6 + 8 + 1, worst
    vm = Interpreter(prog)
    vm.run(exec_(1))
    assert vm.steps == 11


def test_the_kernel_accepts_the_largest_program():
    fits, too_many = 1, procfilter.BPF_MAXINSNS  # bisect for the most tgids that fit
    while too_many - fits > 1:
        mid = (fits + too_many) // 2
        try:
            build(range(1, mid + 1), DAEMON_KINDS)
            fits = mid
        except TooLong:
            too_many = mid
    n = fits
    assert n >= 2700
    prog = build(range(1, n + 1), DAEMON_KINDS)
    assert len(prog) <= procfilter.BPF_MAXINSNS
    k = Kernel(prog)
    try:
        assert k.passes(fork(n)) and not k.passes(fork(n + 1)) and k.passes(exit_(1))
    finally:
        k.close()
    with pytest.raises(TooLong):
        build(range(1, n + 2), DAEMON_KINDS)


def test_the_kernel_refuses_a_broken_program():
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OSError):
            procfilter.attach(rx, [Insn(JA, 0, 0, 5), Insn(RET, 0, 0, 0)])  # jumps past the end
        procfilter.detach(rx)  # no filter: nothing to do, no error
    finally:
        rx.close()
        tx.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="uid"):
        build({1}, ("fork", "uid"))
    with pytest.raises(ValueError):
        build({1}, None, leaf=255)


# --- the contract, on random sets and messages ----------------------------------------------
tgid_sets = st.one_of(st.none(), st.sets(st.integers(1, PID_MAX), max_size=300))
kinds_st = st.one_of(st.none(), st.sets(st.sampled_from(DAEMON_KINDS)).map(lambda s: tuple(sorted(s))))
names = st.sampled_from([b"CPU 1/KVM", b"IO a", b"IO", b"CPU", b"worker", b"", b"IO \xff", b"CPU\x00x"])


@st.composite
def messages(draw, tgids):
    pool = sorted(tgids or ()) + [draw(st.integers(0, PID_MAX))]
    t = draw(st.sampled_from(pool))
    kind = draw(st.sampled_from(["fork", "comm", "exec", "exit", "ack", "uid", "other"]))
    data = {"fork": lambda: fork(t, t + 1, draw(st.sampled_from(pool))), "comm": lambda: comm(t, draw(names)),
            "exec": lambda: exec_(t), "exit": lambda: exit_(t, draw(st.sampled_from(pool))), "ack": ack,
            "uid": lambda: uid(t), "other": lambda: message(draw(st.integers(0, 2**32 - 1)))}[kind]()
    flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=2))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    out = bytearray(data)
    for at, value in flips:
        out[at] = value
    return bytes(out[:cut] if cut is not None else out)


@settings(deadline=None, max_examples=200)
@given(st.data(), tgid_sets, kinds_st, st.integers(1, 254))
def test_program_keeps_the_contract(data, tgids, kinds, leaf):
    vm = Interpreter(build(tgids, kinds, leaf=leaf))
    for _ in range(20):
        msg = data.draw(messages(tgids))
        assert vm.passes(msg) == should_pass(msg, tgids, kinds), msg.hex()


def test_kernel_agrees_with_the_interpreter_on_random_messages():
    rng = random.Random(11)
    watched = set(rng.sample(range(1, PID_MAX), 50))
    prog = build(watched, DAEMON_KINDS)
    k, vm = Kernel(prog), Interpreter(prog)
    pool = sorted(watched) + [rng.randrange(PID_MAX) for _ in range(50)]
    try:
        for _ in range(2000):
            t = rng.choice(pool)
            msg = bytearray(rng.choice([fork(t), comm(t, b"CPU 1/KVM"), comm(t, b"x"), exit_(t), exec_(t), ack()]))
            for _ in range(rng.randrange(3)):
                msg[rng.randrange(len(msg))] = rng.randrange(256)
            data = bytes(msg[: rng.choice([len(msg), rng.randrange(len(msg) + 1)])])
            assert k.passes(data) == vm.passes(data) == should_pass(data, watched, DAEMON_KINDS), data.hex()
    finally:
        k.close()


def test_layout_agrees_with_the_parser():
    from vcpud import procconn

    assert procfilter.EVENT_CODES == procconn.EVENT_CODES
    assert (procfilter.NLMSG_DONE, procfilter.CN_IDX_PROC, procfilter.CN_VAL_PROC) == (
        procconn.NLMSG_DONE, procconn.CN_IDX_PROC, procconn.CN_VAL_PROC)
    assert procfilter.WHAT_AT == procconn._PROC_EVENT_AT == 36
    assert procfilter.PROCESS_TGID_AT == procconn._PROC_EVENT_AT + procconn._PROC_EVENT.size + 4
    assert procfilter.CHILD_TGID_AT == procconn._PROC_EVENT_AT + procconn._PROC_EVENT.size + 12
    assert procfilter.COMM_AT == procconn._PROC_EVENT_AT + procconn._PROC_EVENT.size + 8
