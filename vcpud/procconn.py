"""The Linux process-events connector: a netlink socket reporting fork/exec/comm/exit of every thread."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from . import procfilter

log = logging.getLogger(__name__)

# linux/netlink.h, linux/connector.h, linux/cn_proc.h
NETLINK_CONNECTOR = 11
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
CN_IDX_PROC, CN_VAL_PROC = 1, 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2

PROC_EVENT_NONE = 0x00000000
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_GID = 0x00000040
PROC_EVENT_SID = 0x00000080
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_COMM = 0x00000200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

# The kinds a caller may ask the kernel to filter on (ProcConnector(events=...)).
EVENT_CODES = {"fork": PROC_EVENT_FORK, "exec": PROC_EVENT_EXEC, "comm": PROC_EVENT_COMM, "exit": PROC_EVENT_EXIT}

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # cb_id.idx, cb_id.val, seq, ack, len, flags
# what, cpu, timestamp_ns. The kernel 8-aligns the timestamp inside struct proc_event; since
# what+cpu already fill 8 bytes there is no padding, and "=" (no alignment) matches it. On the
# wire proc_event starts at byte 36 of the message (16 nlmsghdr + 20 cn_msg), which is not
# 8-aligned: the kernel aligns it in its own stack buffer, not in the datagram.
_PROC_EVENT = struct.Struct("=IIQ")
_PIDS = struct.Struct("=ii")  # process_pid, process_tgid: the start of every union member
_FORK = struct.Struct("=iiii")  # parent_pid, parent_tgid, child_pid, child_tgid
_COMM = struct.Struct("=ii16s")
_EXIT = struct.Struct("=iiI")  # process_pid, process_tgid, exit_code (exit_signal, parent_* follow)
_ACK = struct.Struct("=I")
_PROC_EVENT_AT = _NLMSGHDR.size + _CN_MSG.size

MAX_DATAGRAMS_PER_READ = 512
LISTEN_ACK_TIMEOUT_S = 1.0
_RECV_BUFFER = 32 * 1024  # one datagram; the connector caps messages at 16 KiB


class ProcConnectorUnavailable(Exception):
    """The process-events connector cannot be used here; str() says why."""


class Overrun(Exception):
    """The socket overflowed (ENOBUFS): events were lost and the caller must rescan.

    `events` holds what that read() got, including the queue it discarded after the loss: all of
    them are older than the caller's rescan.
    """

    def __init__(self, message: str, events: list[ProcEvent] | None = None) -> None:
        super().__init__(message)
        self.events: list[ProcEvent] = events or []


@dataclass(frozen=True, slots=True)
class ProcEvent:
    """One kernel process event, about one thread."""

    what: str  # "fork", "exec", "comm", "exit" or "other"
    pid: int  # the thread concerned; for fork the new (child) thread
    tgid: int  # its process
    # Fork only. Kernel quirk: this is task->real_parent, which for a new thread (CLONE_THREAD)
    # is the parent of the whole process, not the thread that called clone().
    parent_pid: int = 0
    parent_tgid: int = 0
    comm: str | None = None  # comm only: the new name (at most 15 bytes)
    # Exit only: task->exit_code in wait-status encoding (code << 8 | signal), as waitpid()
    # returns it; os.waitstatus_to_exitcode() decodes it.
    exit_code: int | None = None
    timestamp_ns: int = 0  # ktime_get_ns(): comparable with time.monotonic_ns()


@dataclass(frozen=True, slots=True)
class _Ack:
    """The kernel's answer to a LISTEN/IGNORE: cn_msg.ack is the request's ack + 1."""

    ack: int
    err: int


def _decode(data: bytes) -> Iterator[ProcEvent | _Ack]:
    """Every process event and ack in one recv() buffer, stopping quietly at truncation."""
    end_of_data = len(data)
    offset = 0
    while end_of_data - offset >= _NLMSGHDR.size:
        nl_len, nl_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if nl_len < _NLMSGHDR.size or offset + nl_len > end_of_data:
            log.debug("netlink message at %d claims %d bytes of %d: truncated, stopping", offset, nl_len, end_of_data)
            return
        start, offset = offset, offset + ((nl_len + 3) & ~3)  # NLMSG_ALIGN
        # The connector sends every message with type NLMSG_DONE (a one-part "multipart"
        # reply), so DONE carries the payload and must not be skipped like NOOP.
        if nl_type in (NLMSG_NOOP, NLMSG_ERROR, NLMSG_OVERRUN):
            continue
        item = _decode_cn(data, start, start + nl_len)
        if item is not None:
            yield item


def _decode_cn(data: bytes, start: int, end: int) -> ProcEvent | _Ack | None:
    """The proc event in one netlink message [start, end), or None if it holds none."""
    if end - start < _PROC_EVENT_AT:
        return None
    idx, val, _seq, ack, cn_len, _flags = _CN_MSG.unpack_from(data, start + _NLMSGHDR.size)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None
    at = start + _PROC_EVENT_AT
    size = min(cn_len, end - at)
    if size < _PROC_EVENT.size:
        return None
    what, _cpu, ts = _PROC_EVENT.unpack_from(data, at)
    body, body_size = at + _PROC_EVENT.size, size - _PROC_EVENT.size

    def fits(s: struct.Struct) -> bool:
        return body_size >= s.size

    if what == PROC_EVENT_NONE:
        return _Ack(ack, _ACK.unpack_from(data, body)[0]) if fits(_ACK) else None
    if what == PROC_EVENT_FORK and fits(_FORK):
        ppid, ptgid, pid, tgid = _FORK.unpack_from(data, body)
        return ProcEvent("fork", pid, tgid, parent_pid=ppid, parent_tgid=ptgid, timestamp_ns=ts)
    if what == PROC_EVENT_COMM and fits(_COMM):
        pid, tgid, raw = _COMM.unpack_from(data, body)
        comm = raw.split(b"\0", 1)[0].decode("utf-8", "replace")  # as procfs decodes comm
        return ProcEvent("comm", pid, tgid, comm=comm, timestamp_ns=ts)
    if what == PROC_EVENT_EXIT and fits(_EXIT):
        pid, tgid, code = _EXIT.unpack_from(data, body)
        return ProcEvent("exit", pid, tgid, exit_code=code, timestamp_ns=ts)
    if what in (PROC_EVENT_FORK, PROC_EVENT_COMM, PROC_EVENT_EXIT):
        log.debug("proc event 0x%x with a %d-byte body: truncated, dropped", what, body_size)
        return None
    # exec, and every other kind (uid, gid, sid, ptrace, coredump, and codes newer than
    # this module), starts its union with process_pid, process_tgid.
    if not fits(_PIDS):
        return None
    pid, tgid = _PIDS.unpack_from(data, body)
    return ProcEvent("exec" if what == PROC_EVENT_EXEC else "other", pid, tgid, timestamp_ns=ts)


def parse(data: bytes) -> list[ProcEvent]:
    """The process events in one recv() buffer, in order.

    Pure and total: never raises on bad input. Messages for other connector users are
    ignored; the kernel's acks to LISTEN/IGNORE (PROC_EVENT_NONE) are dropped, since they
    concern no thread. A truncated or garbled netlink header ends parsing (the rest of the
    buffer cannot be framed) and the events before it are returned; a well-framed message
    whose event body is too short is skipped.
    """
    try:
        return [item for item in _decode(data) if isinstance(item, ProcEvent)]
    except struct.error:  # every read is bounds-checked first: a backstop for the no-raise promise
        log.exception("unparseable connector buffer of %d bytes", len(data))
        return []


def control_message(op: int, ack: int, event_mask: int | None = None, portid: int = 0) -> bytes:
    """A PROC_CN_MCAST_LISTEN/IGNORE request; with event_mask, the newer filtered form (struct proc_input)."""
    payload = struct.pack("=I", op) if event_mask is None else struct.pack("=II", op, event_mask)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, portid) + cn


def _ack_error(err: int) -> str:
    if err == errno.EPERM:
        # Older kernels; newer ones (6.18 here) let anyone listen.
        return "the kernel refused PROC_CN_MCAST_LISTEN (EPERM): needs CAP_NET_ADMIN in the initial user namespace"
    return f"the kernel refused PROC_CN_MCAST_LISTEN: {errno.errorcode.get(err, err)} ({os.strerror(err)})"


class ProcConnector:
    """A listening process-events socket. Non-blocking: poll fileno(), then read()."""

    def __init__(self, rcvbuf: int = 4 * 1024 * 1024, events: Collection[str] | None = None) -> None:
        """Open, bind and subscribe; raises ProcConnectorUnavailable.

        events: if given, a subset of EVENT_CODES' names; read() returns only those kinds, and
        newer kernels filter too (older ones ignore the request: the filtering is then ours alone).
        """
        if events is not None and not set(events) <= EVENT_CODES.keys():
            raise ValueError(f"events must be among {sorted(EVENT_CODES)}, got {sorted(events)}")
        self._events = frozenset(events) if events is not None else None
        self._pending: list[ProcEvent] = []
        self._overrun_pending = False
        self._closed = False
        self._said_too_long = False
        self._buf = bytearray(_RECV_BUFFER)
        try:
            self._sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR
            )
        except OSError as e:
            if e.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
                raise ProcConnectorUnavailable(f"kernel without the netlink connector (CONFIG_CONNECTOR): {e}") from e
            raise ProcConnectorUnavailable(f"cannot open a NETLINK_CONNECTOR socket: {e}") from e
        try:
            self._set_rcvbuf(rcvbuf)
            self._subscribe()
        except BaseException:
            self._sock.close()
            self._closed = True
            raise

    def _set_rcvbuf(self, size: int) -> None:
        # SO_RCVBUFFORCE (CAP_NET_ADMIN) may exceed net.core.rmem_max; SO_RCVBUF is capped by it.
        # Either way the kernel doubles the value and raises it to SOCK_MIN_RCVBUF (2304 bytes on
        # 6.18 x86_64: about two events).
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        effective = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # Each queued event costs its skb's truesize (~800 bytes here), never under 512.
        self._drain_cap = max(MAX_DATAGRAMS_PER_READ, effective // 512)
        log.debug("proc connector receive buffer: %d bytes", effective)

    def _subscribe(self) -> None:
        try:
            # Port id 0: the kernel picks a free one (the pid may already be taken by another
            # netlink socket of this process). nl_groups is a bitmask: bit 0 is CN_IDX_PROC.
            self._sock.bind((0, 1 << (CN_IDX_PROC - 1)))
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise ProcConnectorUnavailable(f"binding to the proc events group needs CAP_NET_ADMIN: {e}") from e
            raise ProcConnectorUnavailable(f"cannot bind the NETLINK_CONNECTOR socket: {e}") from e
        self._portid = self._sock.getsockname()[0]
        # The kernel answers LISTEN with an ack (what == PROC_EVENT_NONE, cn_msg.ack = ours + 1),
        # multicast to every listener; it stays silent when it ignores us (other PID or user
        # namespace, no CONFIG_PROC_EVENTS), so a missing ack is the only sign of that.
        nonces = {self._send_listen()}
        congested = False
        deadline = time.monotonic() + LISTEN_ACK_TIMEOUT_S
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        acked = False
        while not acked:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcConnectorUnavailable(
                    "no acknowledgement to PROC_CN_MCAST_LISTEN: the kernel ignores listeners outside the "
                    "initial PID and user namespaces (containers), lacks CONFIG_PROC_EVENTS, or (older "
                    "kernels) refused us for lack of CAP_NET_ADMIN and, nobody else listening, did not say so"
                )
            poller.poll(remaining * 1000)
            try:
                data = self._recv()
            except BlockingIOError:
                if congested:
                    # The ack may have been lost with the rest; the queue is empty now, which
                    # ends netlink's "congested" state (all new messages dropped): ask again.
                    congested = False
                    nonces.add(self._send_listen())
                continue
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise ProcConnectorUnavailable(f"reading the connector socket failed: {e}") from e
                self._overrun_pending = congested = True
                continue
            for item in _decode(data or b""):
                if isinstance(item, ProcEvent):
                    self._pending.append(item)
                elif item.ack - 1 in nonces:
                    if item.err:
                        raise ProcConnectorUnavailable(_ack_error(item.err))
                    acked = True
        if self._events is not None:
            mask = 0
            for name in self._events:
                mask |= EVENT_CODES[name]
            # Newer kernels (verified on 6.18) read a struct proc_input and filter per socket;
            # older ones drop the 8-byte request silently (so read() filters too). Kernel quirk: a filtered socket
            # no longer receives acks (their event code 0 matches no filter bit), so there is
            # nothing to wait for here.
            self._send(control_message(PROC_CN_MCAST_LISTEN, 0, mask, self._portid))

    def _send_listen(self) -> int:
        nonce = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        self._send(control_message(PROC_CN_MCAST_LISTEN, nonce, None, self._portid))
        return nonce

    def _send(self, message: bytes) -> None:
        try:
            self._sock.sendto(message, (0, 0))
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                # The connector's kernel socket exists only in the initial network namespace.
                raise ProcConnectorUnavailable(
                    f"no process events connector in this network namespace (only the initial one has it): {e}"
                ) from e
            if e.errno in (errno.EPERM, errno.EACCES):
                raise ProcConnectorUnavailable(f"sending to the connector needs CAP_NET_ADMIN: {e}") from e
            raise ProcConnectorUnavailable(f"cannot subscribe to process events: {e}") from e

    def _recv(self) -> bytes | None:
        """One datagram, or None for one that did not come from the kernel."""
        n, (portid, _groups) = self._sock.recvfrom_into(self._buf)
        if portid != 0:
            # Only the kernel (port 0) speaks for the connector; anything else is forged.
            log.warning("dropped a %d-byte datagram from netlink port %d posing as the kernel", n, portid)
            return None
        return bytes(memoryview(self._buf)[:n])

    def watch(self, tgids: Collection[int] | None) -> None:
        """Let the kernel drop the fork/comm/exit events of every process but ``tgids``.

        A classic BPF socket filter (vcpud.procfilter) that also passes every exec, every COMM
        naming a "CPU ..." or "IO ..." thread, the kernel's acks and whatever it does not
        understand; with ``events`` given, it drops the other kinds too (for kernels that ignore
        the event-type mask). ``None``: no filter, every event passes. Replaces the filter for
        the events that follow; those already queued are read as they are. More tgids than fit
        in the kernel's 4,096 instructions (2,712): every fork/comm/exit passes, said once
        in the log. If the kernel refuses the program, the socket is left without a filter.
        """
        if self._closed:
            raise ValueError("watch() on a closed ProcConnector")
        prog, what = None, "none"
        if tgids is not None:
            try:
                prog = procfilter.build(tgids, self._events)
                what = f"{len(tgids)} processes"
            except procfilter.TooLong as e:
                if not self._said_too_long:
                    self._said_too_long = True
                    log.warning("%d processes to watch need a proc connector filter of %s: every fork, comm and "
                                "exit passes instead (said once)", len(tgids), e)
                if self._events is not None:
                    prog = procfilter.build(None, self._events)  # the kinds at least, for older kernels
                    what = "event kinds only"
        try:
            if prog is None:
                procfilter.detach(self._sock)
            else:
                procfilter.attach(self._sock, prog)
        except OSError as e:
            log.warning("cannot set the proc connector filter (%s): every event passes", e)
            try:
                procfilter.detach(self._sock)
            except OSError as e2:  # never seen: the previous filter stays, rescans find what it drops
                log.error("cannot remove the proc connector filter either (%s)", e2)
            return
        log.debug("proc connector filter: %s, %d instructions", what, len(prog or ()))

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self) -> list[ProcEvent]:
        """The events available now, oldest first; never blocks.

        Reads at most MAX_DATAGRAMS_PER_READ datagrams so that an event storm cannot starve the
        caller; the socket then stays readable. Raises Overrun when the kernel dropped events,
        having discarded the stale queue (into Overrun.events): the caller rescans, and the
        next read() returns events from after the loss.
        """
        if self._closed:
            raise ValueError("read() on a closed ProcConnector")
        events, self._pending = self._pending, []
        if self._overrun_pending:
            self._overrun_pending = False
            raise Overrun("process events lost while subscribing", events)
        for _ in range(MAX_DATAGRAMS_PER_READ):
            try:
                data = self._recv()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._drain(events)
                log.debug("proc connector overrun: %d stale events", len(events))
                raise Overrun("process events lost: the connector socket overflowed (ENOBUFS)", events) from e
            if data:
                events.extend(parse(data))
        if self._events is not None:
            events = [ev for ev in events if ev.what in self._events]
        return events

    def _drain(self, into: list[ProcEvent]) -> None:
        """Empty the queue after an overrun, so that what read() returns next postdates the loss."""
        # Kernel quirk: netlink reports ENOBUFS *before* the datagrams still queued, which are
        # older than the loss; and the socket stays "congested" (drops every new event) until
        # its queue is empty. The cap only matters if a storm refills it as fast as we read.
        for _ in range(self._drain_cap):
            try:
                data = self._recv()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                continue
            if data:
                into.extend(parse(data))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Kernel quirk: listeners are counted by LISTEN/IGNORE messages, not by open sockets;
            # closing without IGNORE can leave the kernel building events for nobody.
            self._sock.sendto(control_message(PROC_CN_MCAST_IGNORE, 0, None, self._portid), (0, 0))
        except OSError as e:
            log.debug("PROC_CN_MCAST_IGNORE failed: %s", e)
        finally:
            self._sock.close()

    def __enter__(self) -> ProcConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
