"""The state file: which VM holds which pooled CPUs, kept across restarts (atomic writes).

Whatever the file holds, `load` and `decode` return a valid state or raise `StateError`
(the caller then rebuilds from live affinities): the schema is checked exactly (types,
ranges, lengths, no unknown or duplicate keys), and the file is only read when it is a
regular file (not a symlink) of bounded size, in a directory only its owner can write.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, TypeVar

from . import bounded
from .cpuset import MAX_CPUS, CpuSet
from .pools import Allocation

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

VERSION = 1

# Bounds of a sane state file (anything past them is corruption, not a bigger host).
PID_MAX = 1 << 22             # the kernel's PID_MAX_LIMIT on 64-bit
STARTTIME_MAX = (1 << 64) - 1  # /proc/PID/stat field 22 is an unsigned long long
MAX_VMS = MAX_CPUS            # VMs holding pooled CPUs: never more than the host has CPUs
MAX_STRING = 1 << 17          # MAX_ARG_STRLEN: a VM name comes from one argument of its command line
FILE_MODE = 0o600             # the state file (VM names are the customers' business)
DIR_MODE = 0o755              # missing parent directories, whatever the umask

_VM_KEYS = {"pid", "starttime", "name", "policy", "pool", "vcpus", "emulator", "reserved", "reasons"}
_VM_REQUIRED = {"pid", "starttime", "pool", "vcpus"}


class StateError(Exception):
    """The state file is missing, unreadable, untrusted or corrupt; str() says which."""


class UnsafeStateFile(StateError, OSError):
    """The state file or its directory may be written by someone else: neither read nor written.

    An OSError too, so a refused save is reported like a failed one.
    """


@dataclass(frozen=True, slots=True)
class Saved:
    """One VM's allocation as remembered: who (pid + start time, name) and what it holds."""

    pid: int
    starttime: int
    name: str
    policy: str
    allocation: Allocation


def encode(saved: Mapping[Hashable, Saved]) -> str:
    import json  # here: `apply --dry-run` and `ps` with no state file never need it

    vms = []
    for s in sorted(saved.values(), key=lambda s: (s.starttime, s.pid)):
        a = s.allocation
        vms.append({
            "pid": s.pid, "starttime": s.starttime, "name": s.name, "policy": s.policy, "pool": a.pool,
            "vcpus": list(a.vcpus), "emulator": a.emulator, "reserved": list(a.reserved),
            "reasons": list(a.reasons),
        })
    return json.dumps({"version": VERSION, "vms": vms}, indent=1) + "\n"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise StateError(f"corrupt state file: key {k!r} given twice")
        out[k] = v
    return out


def _int(v: object, what: str, lo: int, hi: int) -> int:
    # bool is an int in Python; a float (1.0, 1e400, NaN) is not a pid or a CPU.
    if type(v) is not int:
        raise StateError(f"corrupt state file: {what} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise StateError(f"corrupt state file: {what} {v} out of range ({lo}..{hi})")
    return v


def _str(v: object, what: str) -> str:
    if type(v) is not str:
        raise StateError(f"corrupt state file: {what} must be a string, got {type(v).__name__}")
    if len(v) > MAX_STRING:
        raise StateError(f"corrupt state file: {what} longer than {MAX_STRING} characters")
    return v


def _list(v: object, what: str, most: int) -> list[Any]:
    if type(v) is not list:
        raise StateError(f"corrupt state file: {what} must be a list, got {type(v).__name__}")
    if len(v) > most:
        raise StateError(f"corrupt state file: {what} has {len(v)} entries (at most {most})")
    return v


def _cpus(v: object, what: str) -> list[int]:
    cpus = [_int(c, f"{what} CPU", 0, MAX_CPUS - 1) for c in _list(v, what, MAX_CPUS)]
    if len(set(cpus)) != len(cpus):
        raise StateError(f"corrupt state file: {what} lists a CPU twice")
    return cpus


def _vm(v: object, i: int) -> Saved:
    where = f"vms[{i}]"
    if type(v) is not dict:
        raise StateError(f"corrupt state file: {where} must be an object, got {type(v).__name__}")
    unknown = set(v) - _VM_KEYS
    if unknown:
        raise StateError(f"corrupt state file: {where} has unknown keys {sorted(unknown)}")
    missing = _VM_REQUIRED - set(v)
    if missing:
        raise StateError(f"corrupt state file: {where} lacks {sorted(missing)}")
    pid = _int(v["pid"], f"{where}.pid", 1, PID_MAX)
    where = f"VM pid {pid}"
    starttime = _int(v["starttime"], f"{where} starttime", 0, STARTTIME_MAX)
    vcpus = _cpus(v["vcpus"], f"{where} vcpus")
    emulator = v.get("emulator")
    if emulator is not None:
        emulator = _int(emulator, f"{where} emulator", 0, MAX_CPUS - 1)
    reserved = _cpus(v.get("reserved", []), f"{where} reserved")
    held = vcpus + ([emulator] if emulator is not None else []) + reserved
    if len(set(held)) != len(held):
        raise StateError(f"corrupt state file: {where} holds a CPU twice (vcpus, emulator, reserved overlap)")
    reasons = [_str(r, f"{where} reason") for r in _list(v.get("reasons", []), f"{where} reasons", MAX_CPUS + 1)]
    key = (pid, starttime)
    alloc = Allocation(key=key, pool=_str(v["pool"], f"{where} pool"), vcpus=tuple(vcpus), emulator=emulator,
                       reserved=CpuSet(frozenset(reserved)), reasons=tuple(reasons))
    return Saved(pid=pid, starttime=starttime, name=_str(v.get("name", ""), f"{where} name"),
                 policy=_str(v.get("policy", ""), f"{where} policy"), allocation=alloc)


def decode(data: str | bytes) -> dict[tuple[int, int], Saved]:
    """Parse a state file; returns a valid state or raises StateError, whatever ``data`` is
    (never returns half, never raises anything else)."""
    if len(data) > bounded.STATE_LIMIT:
        raise StateError(f"corrupt state file: larger than {bounded.STATE_LIMIT} bytes")
    import json

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except StateError:
        raise
    except RecursionError:
        raise StateError("corrupt state file: nested too deeply") from None
    except (ValueError, UnicodeError) as e:  # JSONDecodeError, ints past the digit limit, bad UTF-8
        raise StateError(f"corrupt state file: {str(e)[:200]}") from None
    if type(doc) is not dict or set(doc) != {"version", "vms"} or type(doc["version"]) is not int \
            or doc["version"] != VERSION:
        raise StateError(f"not a version {VERSION} vcpud state file")
    out: dict[tuple[int, int], Saved] = {}
    pids: set[int] = set()
    for i, v in enumerate(_list(doc["vms"], "vms", MAX_VMS)):
        s = _vm(v, i)
        if s.pid in pids:
            raise StateError(f"corrupt state file: VM pid {s.pid} listed twice")
        pids.add(s.pid)
        out[(s.pid, s.starttime)] = s
    return out


def _owners() -> tuple[int, ...]:
    """Who may own the state file and its directory: root, and us when we are not root
    (systemd's DynamicUser= gives the service its own uid and state directory)."""
    uid = os.geteuid()
    return (0,) if uid == 0 else (0, uid)


def _untrusted(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat may not be trusted, or None."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[mode & 0o022]
        return f"mode {mode:04o} is writable by {who}"
    if st.st_uid not in _owners():
        return f"owned by uid {st.st_uid}, not by {' or '.join(f'uid {u}' for u in _owners())}"
    return None


def check_directory(path: Path) -> None:
    """Raise UnsafeStateFile unless the state file's directory is ours alone to write."""
    d = path.parent
    try:
        st = os.stat(d)
    except OSError as e:
        raise StateError(f"cannot use directory {d} of the state file: {e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{d}, the directory of the state file {path}, is not a directory")
    why = _untrusted(st)
    if why is not None:
        raise UnsafeStateFile(f"directory {d} of the state file {path} is not safe: {why}")


def load(path: Path) -> dict[tuple[int, int], Saved]:
    """The state in ``path``, or StateError (missing, untrusted, unreadable or corrupt)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StateError(f"{path} does not exist") from None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStateFile(f"state file {path} is a symbolic link: not followed")
    check_directory(path)
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"state file {path} is not a regular file")
    why = _untrusted(st)
    if why is not None:
        raise UnsafeStateFile(f"state file {path} is not safe: {why}")
    try:
        data = bounded.read_bytes(path, bounded.STATE_LIMIT)  # a FIFO swapped in is an error, not a hang
    except OSError as e:
        raise StateError(f"cannot read {path}: {e}") from None
    return decode(data)


def _make_parents(d: Path) -> None:
    """Create ``d`` and missing parents DIR_MODE (or tighter, never looser) whatever the umask."""
    missing = []
    while not os.path.isdir(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            continue  # someone else made it: check_directory judges the last one
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        if mode & ~DIR_MODE:
            os.chmod(p, mode & DIR_MODE)  # a default ACL or an odd umask must not make it writable by others


def save(path: Path, saved: Mapping[Hashable, Saved]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never a mix.

    Raises OSError; UnsafeStateFile (an OSError) when the directory is writable by others.
    """
    import tempfile  # here: it imports shutil, which imports bz2 and lzma

    data = encode(saved).encode()
    _make_parents(path.parent)
    check_directory(path)
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename itself must reach the disk too.
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def conflicts(saved: Mapping[K, Saved]) -> list[str]:
    """CPUs claimed by two saved VMs (a state file that lies must not double-book)."""
    owner: dict[int, Saved] = {}
    out = []
    for s in saved.values():
        for cpu in s.allocation.cpus:
            if cpu in owner:
                out.append(f"CPU {cpu} held by pid {owner[cpu].pid} and pid {s.pid}")
            else:
                owner[cpu] = s
    return out
