"""A classic BPF socket filter for the proc connector: the kernel drops the events vcpud does not need.

The kernel runs the program (JIT-compiled where the JIT is on) for every process event on the
host, in the context of the task that forks, execs, renames itself or exits, before it queues
the event on this socket (net/netlink/af_netlink.c: do_one_broadcast runs the connector's own
event-type filter, then sk_filter, then delivers). A dropped event costs the listener nothing:
no wake-up, no receive-buffer space. An overrun is not a message but the socket error ENOBUFS
(set when a *passing* event finds the buffer full): no filter can drop it.

The connector sends one netlink message per datagram (drivers/connector/connector.c,
cn_netlink_send_mult: one nlmsg_put per skb), and the program sees the datagram from its
nlmsghdr: 16 bytes nlmsghdr + 20 cn_msg + 40 struct proc_event = 76 bytes. The verdict:

- anything the program does not recognise as a full-length proc-connector message passes:
  netlink control messages (NOOP, ERROR, OVERRUN), other connector users, short or garbled
  datagrams. ProcConnector's parser deals with those; the filter drops only what it understands.
- PROC_EVENT_NONE passes: the kernel's acks to LISTEN/IGNORE (multicast to every listener).
- EXEC passes: a new qemu shows up by its exec.
- FORK passes when child_tgid is watched (a new thread of a watched process); COMM and EXIT when
  process_tgid is. A new *process* (child_tgid never watched yet) is dropped: vcpud cares for its
  exec, not its fork.
- COMM naming a thread "CPU ..." or "IO ..." passes whatever its process: a vCPU or IO thread of a
  qemu vcpud does not know yet (its exec was missed, or it came up by fork, as -daemonize does).
- other kinds (uid, gid, sid, ptrace, coredump, newer codes) pass when the connector wants every
  kind, and are dropped when it asked for some (older kernels ignore the event-type mask that
  ProcConnector sends, so this filter does all of the dropping there).

The fields are in host byte order, but BPF_LD|BPF_ABS loads big-endian: the program compares
against byte-swapped constants (`_be`). The watched tgids are searched by a binary tree of
unsigned comparisons (over the swapped values, which are as well ordered as any), ending in short
lists of equality tests: at most 2 log2(n/8) + 9 instructions after the 13 to 18 that find the
tgid (38 in all for 500 tgids, 45 for 2,712, the most that fit: 1.5 instructions per tgid).
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
import sys
from collections.abc import Collection
from typing import NamedTuple

# linux/bpf_common.h, linux/filter.h
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_H = 0x00, 0x08
BPF_ABS, BPF_LEN = 0x20, 0x80
BPF_JA, BPF_JEQ, BPF_JGE = 0x00, 0x10, 0x30
BPF_AND = 0x50
BPF_K = 0x00
BPF_MAXINSNS = 4096
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)

LD_LEN = BPF_LD | BPF_W | BPF_LEN
LD_W = BPF_LD | BPF_W | BPF_ABS
LD_H = BPF_LD | BPF_H | BPF_ABS
JA = BPF_JMP | BPF_JA
JEQ = BPF_JMP | BPF_JEQ | BPF_K
JGE = BPF_JMP | BPF_JGE | BPF_K
AND = BPF_ALU | BPF_AND | BPF_K
RET = BPF_RET | BPF_K

PASS = 0xFFFFFFFF  # keep the whole datagram (a return value is the length to keep)
DROP = 0

# The layout, as vcpud.procconn parses it (linux/netlink.h, connector.h, cn_proc.h).
NLMSG_DONE = 3  # every connector message; NOOP, ERROR, OVERRUN pass as "not understood"
CN_IDX_PROC = CN_VAL_PROC = 1
MESSAGE_SIZE = 16 + 20 + 40
TYPE_AT = 4  # nlmsghdr.nlmsg_type (u16)
IDX_AT, VAL_AT = 16, 20  # cn_msg.id.idx, cn_msg.id.val
WHAT_AT = 36  # proc_event.what
CHILD_TGID_AT = 64  # fork: parent_pid@52 parent_tgid@56 child_pid@60 child_tgid@64
PROCESS_TGID_AT = 56  # exec, comm, exit: process_pid@52 process_tgid@56
COMM_AT = 60  # comm: comm[16]

EVENT_CODES = {"fork": 0x00000001, "exec": 0x00000002, "comm": 0x00000200, "exit": 0x80000000}
PROC_EVENT_NONE = 0

# Thread names that make a COMM pass from any process: qemu's "CPU %d/KVM" (or /TCG) and
# "IO <iothread id>" (-name ...,debug-threads=on).
VCPU_PREFIX = b"CPU "
IOTHREAD_PREFIX = b"IO "

LEAF = 8  # equality tests at the bottom of the tgid tree


class Insn(NamedTuple):
    """struct sock_filter."""

    code: int
    jt: int
    jf: int
    k: int


_SOCK_FILTER = struct.Struct("=HBBI")


class TooLong(ValueError):
    """The program would exceed the kernel's BPF_MAXINSNS."""

    def __init__(self, size: int) -> None:
        super().__init__(f"{size} instructions, over the kernel's {BPF_MAXINSNS}")
        self.size = size


def _be(value: int, size: int = 4) -> int:
    """What a BPF_ABS load (network byte order) reads where the host stored ``value``."""
    return int.from_bytes((value & ((1 << 8 * size) - 1)).to_bytes(size, sys.byteorder), "big")


class _Label:
    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = -1


Target = int | _Label


class _Asm:
    """Instructions with symbolic forward jumps; assemble() resolves them."""

    def __init__(self) -> None:
        self.code: list[tuple[int, Target, Target, Target]] = []

    def emit(self, code: int, k: Target = 0, jt: Target = 0, jf: Target = 0) -> None:
        self.code.append((code, jt, jf, k))

    def label(self, label: _Label) -> None:
        label.at = len(self.code)

    def assemble(self) -> list[Insn]:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            if code == JA:
                out.append(Insn(code, 0, 0, self._offset(pc, k, len(self.code) - pc - 2)))
            elif code & 0x07 == BPF_JMP:
                assert not isinstance(k, _Label)
                out.append(Insn(code, self._offset(pc, jt, 255), self._offset(pc, jf, 255), k))
            else:
                assert not isinstance(k, _Label)
                out.append(Insn(code, 0, 0, k))
        return out

    @staticmethod
    def _offset(pc: int, target: Target, limit: int) -> int:
        """Instructions to skip from ``pc`` to reach ``target``: classic BPF jumps only forward,
        conditional ones at most 255 ahead."""
        if isinstance(target, _Label):
            if target.at < 0:
                raise AssertionError("jump to a label never placed")
            target = target.at - pc - 1
        if not 0 <= target <= limit:
            raise AssertionError(f"jump of {target} at {pc}")
        return target


def build(tgids: Collection[int] | None, kinds: Collection[str] | None = None, leaf: int = LEAF) -> list[Insn]:
    """The filter program (see the module's docstring).

    tgids: whose fork/comm/exit pass; None: every process's. kinds: the event kinds wanted (names
    of EVENT_CODES); None: every kind, including those the program does not know. Raises TooLong
    when the tgid tree does not fit in BPF_MAXINSNS instructions (over 2,712 tgids).
    """
    if not 1 <= leaf <= 254:
        raise ValueError("leaf must be 1 to 254")
    wanted = set(EVENT_CODES) if kinds is None else set(kinds)
    if not wanted <= EVENT_CODES.keys():
        raise ValueError(f"kinds must be among {sorted(EVENT_CODES)}, got {sorted(wanted)}")
    asm = _Asm()
    passed, dropped, tree = _Label(), _Label(), _Label()
    asm.emit(LD_LEN)
    asm.emit(JGE, MESSAGE_SIZE, jf=passed)
    asm.emit(LD_H, TYPE_AT)
    asm.emit(JEQ, _be(NLMSG_DONE, 2), jf=passed)
    asm.emit(LD_W, IDX_AT)
    asm.emit(JEQ, _be(CN_IDX_PROC), jf=passed)
    asm.emit(LD_W, VAL_AT)
    asm.emit(JEQ, _be(CN_VAL_PROC), jf=passed)
    asm.emit(LD_W, WHAT_AT)
    blocks: dict[str, _Label] = {}
    for name in ("exec", "fork", "comm", "exit"):
        if name not in wanted:
            target = dropped
        elif name == "exec" or tgids is None:
            target = passed
        else:
            target = blocks[name] = _Label()
        asm.emit(JEQ, _be(EVENT_CODES[name]), jt=target)
    asm.emit(JEQ, PROC_EVENT_NONE, jt=passed)
    asm.emit(RET, PASS if kinds is None else DROP)
    asm.label(passed)
    asm.emit(RET, PASS)
    asm.label(dropped)
    asm.emit(RET, DROP)
    if "fork" in blocks:
        asm.label(blocks["fork"])
        asm.emit(LD_W, CHILD_TGID_AT)
        asm.emit(JA, tree)
    if "comm" in blocks:
        named = _Label()  # jumps only go forward: this block has its own RET PASS
        asm.label(blocks["comm"])
        asm.emit(LD_W, COMM_AT)
        asm.emit(JEQ, int.from_bytes(VCPU_PREFIX, "big"), jt=named)
        asm.emit(AND, 0xFFFFFF00)
        asm.emit(JEQ, int.from_bytes(IOTHREAD_PREFIX + b"\0", "big"), jt=named)
        asm.emit(LD_W, PROCESS_TGID_AT)
        asm.emit(JA, tree)
        asm.label(named)
        asm.emit(RET, PASS)
    if "exit" in blocks:
        asm.label(blocks["exit"])
        asm.emit(LD_W, PROCESS_TGID_AT)
    if blocks:
        asm.label(tree)
        assert tgids is not None
        values = sorted({_be(t) for t in tgids})
        _tgid_tree(asm, values, 0, len(values), leaf)
    prog = asm.assemble()
    if len(prog) > BPF_MAXINSNS:
        raise TooLong(len(prog))
    return prog


def _tgid_tree(asm: _Asm, values: list[int], lo: int, hi: int, leaf: int) -> None:
    """RET PASS if A is one of values[lo:hi] (sorted), else RET DROP. Conditional jumps reach at
    most 255 instructions ahead: a subtree's far side is reached through a JA."""
    if hi - lo <= leaf:
        for i in range(lo, hi):
            asm.emit(JEQ, values[i], jt=hi - i)  # over the other tests and the RET DROP
        asm.emit(RET, DROP)
        if hi > lo:
            asm.emit(RET, PASS)
        return
    leaves = -(-(hi - lo) // leaf)
    mid = lo + leaves // 2 * leaf  # full leaves: the fewest instructions
    right = _Label()
    asm.emit(JGE, values[mid], jf=1)  # A >= values[mid]: on to the JA; else over it, to the left half
    asm.emit(JA, right)
    _tgid_tree(asm, values, lo, mid, leaf)
    asm.label(right)
    _tgid_tree(asm, values, mid, hi, leaf)


def pack(prog: list[Insn]) -> bytes:
    """The struct sock_filter array."""
    return b"".join(_SOCK_FILTER.pack(*insn) for insn in prog)


def attach(sock: socket.socket, prog: list[Insn]) -> None:
    """SO_ATTACH_FILTER: replaces any filter the socket had, atomically for the events that follow
    (those already queued stay). Raises OSError (EINVAL: the kernel's checker refused it)."""
    code = ctypes.create_string_buffer(pack(prog))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, native alignment.
    # The kernel copies the program during the call: the buffer may go right after it.
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    """SO_DETACH_FILTER: every event passes again. A socket without a filter is left as it is."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
