"""Issue 9: whatever the state file holds, loading it gives a valid state or StateError (the
caller rebuilds from live affinities), and the file is only written to and trusted in a
directory no one else may write, whatever the umask."""

import json
import logging
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vcpud import bounded, holdings, state
from vcpud.cpuset import MAX_CPUS, CpuSet
from vcpud.pools import Allocation
from vcpud.state import Saved, StateError, UnsafeStateFile, decode, encode, load, save


def vm(**over):
    v = {"pid": 100, "starttime": 1000, "name": "vm", "policy": "db", "pool": "dedicated", "vcpus": [4, 5],
         "emulator": 6, "reserved": [36], "reasons": ["a", "b", "c"]}
    v.update(over)
    return v


def doc(*vms, **top):
    d = {"version": 1, "vms": list(vms)}
    d.update(top)
    return json.dumps(d)


def without(key):
    v = vm()
    del v[key]
    return v


def good():
    key = (100, 1000)
    a = Allocation(key=key, pool="dedicated", vcpus=(4, 5), emulator=6, reserved=CpuSet.of([36]),
                   reasons=("a", "b", "c"))
    return {key: Saved(pid=100, starttime=1000, name="vm", policy="db", allocation=a)}


def test_a_valid_file_still_loads():
    assert decode(doc(vm())) == good()
    assert decode(doc(vm()).encode()) == good()  # bytes as read from the file
    # Optional fields, as older files may lack them:
    d = decode(doc({"pid": 1, "starttime": 0, "pool": "p", "vcpus": [0]}))
    assert d[(1, 0)].allocation == Allocation(key=(1, 0), pool="p", vcpus=(0,))
    assert decode(doc()) == {}


CORRUPT = {
    # structure
    "deep list": "[" * 100_000,
    "deep object": '{"a":' * 100_000,
    "deep inside vms": '{"version": 1, "vms": ' + "[" * 100_000,
    "deep valid json": '{"version": 1, "vms": [' + "[" * 5000 + "]" * 5000 + "]}",
    "top is list": "[]",
    "top is null": "null",
    "vms is object": '{"version": 1, "vms": {}}',
    "vms is null": '{"version": 1, "vms": null}',
    "vm is list": doc([1, 2]),
    "vm is string": doc("x"),
    "vm is null": doc(None),
    "unknown top key": doc(extra=1),
    "unknown vm key": doc(vm(cpus=[1])),
    "duplicate key": '{"version": 1, "version": 1, "vms": []}',
    "duplicate vm key": doc(vm()).replace('"pid": 100', '"pid": 100, "pid": 101'),
    "missing pid": doc(without("pid")),
    "missing vcpus": doc(without("vcpus")),
    # version
    "version true": '{"version": true, "vms": []}',
    "version 1.0": '{"version": 1.0, "vms": []}',
    "version string": '{"version": "1", "vms": []}',
    "version 2": '{"version": 2, "vms": []}',
    # numbers
    "pid 1e400": doc(vm()).replace('"pid": 100', '"pid": 1e400'),
    "pid -1e400": doc(vm()).replace('"pid": 100', '"pid": -1e400'),
    "pid NaN": doc(vm()).replace('"pid": 100', '"pid": NaN'),
    "pid Infinity": doc(vm()).replace('"pid": 100', '"pid": Infinity'),
    "pid 5000 digits": doc(vm()).replace('"pid": 100', '"pid": ' + "9" * 5000),
    "cpu 5000 digits": doc(vm()).replace('"vcpus": [4, 5]', '"vcpus": [' + "9" * 5000 + "]"),
    "pid float": doc(vm(pid=100.0)),
    "pid true": doc(vm(pid=True)),
    "pid string": doc(vm(pid="100")),
    "pid null": doc(vm(pid=None)),
    "pid 0": doc(vm(pid=0)),
    "pid negative": doc(vm(pid=-5)),
    "pid absurd": doc(vm(pid=state.PID_MAX + 1)),
    "pid huge": doc(vm(pid=10**100)),
    "starttime negative": doc(vm(starttime=-1)),
    "starttime past u64": doc(vm(starttime=1 << 64)),
    "starttime false": doc(vm(starttime=False)),
    # CPUs
    "vcpus not list": doc(vm(vcpus="4-5")),
    "vcpus object": doc(vm(vcpus={"4": 1})),
    "vcpu true": doc(vm(vcpus=[True])),
    "vcpu float": doc(vm(vcpus=[4.0])),
    "vcpu string": doc(vm(vcpus=["4"])),
    "vcpu negative": doc(vm(vcpus=[-1])),
    "vcpu past MAX_CPUS": doc(vm(vcpus=[MAX_CPUS])),
    "vcpu 10**30": doc(vm(vcpus=[10**30])),
    "vcpu twice": doc(vm(vcpus=[4, 4])),
    "too many vcpus": doc(vm(vcpus=list(range(MAX_CPUS)) + [0], emulator=None, reserved=[])),
    "emulator true": doc(vm(emulator=True)),
    "emulator negative": doc(vm(emulator=-1)),
    "emulator is a vcpu": doc(vm(emulator=4)),
    "emulator list": doc(vm(emulator=[6])),
    "reserved null": doc(vm(reserved=None)),
    "reserved past MAX_CPUS": doc(vm(reserved=[MAX_CPUS + 5])),
    "reserved twice": doc(vm(reserved=[36, 36])),
    "reserved overlaps vcpus": doc(vm(reserved=[5])),
    "reserved overlaps emulator": doc(vm(reserved=[6])),
    # strings
    "pool number": doc(vm(pool=1)),
    "pool null": doc(vm(pool=None)),
    "name list": doc(vm(name=["x"])),
    "name too long": doc(vm(name="x" * (state.MAX_STRING + 1))),
    "policy object": doc(vm(policy={})),
    "reasons string": doc(vm(reasons="abc")),
    "reason number": doc(vm(reasons=[1])),
    "too many reasons": doc(vm(reasons=["r"] * (MAX_CPUS + 2))),
    # VMs
    "same pid twice": doc(vm(), vm(starttime=2000, vcpus=[7], emulator=None, reserved=[])),
    "same key twice": doc(vm(), vm(vcpus=[7], emulator=None, reserved=[])),
    "too many vms": doc(*[vm(pid=i + 1, vcpus=[], emulator=None, reserved=[], reasons=[])
                          for i in range(state.MAX_VMS + 1)]),
    # not JSON
    "empty": "",
    "truncated": doc(vm())[:-3],
    "binary": b"\x00\xff\xfe\x80garbage\x9c",
    "bad utf-8 inside a string": b'{"version": 1, "vms": [{"name": "\xff"}]}',
    "lone surrogate escape ok but key junk": '{"version": 1, "vms": [], "\\ud800": 1}',
    "over the size limit": " " * (bounded.STATE_LIMIT + 1) + "{}",
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_any_corrupt_content_is_a_state_error(content):
    with pytest.raises(StateError):
        decode(content)


# --- fuzz --------------------------------------------------------------------------------

KEYS = ["version", "vms", "pid", "starttime", "name", "policy", "pool", "vcpus", "emulator", "reserved", "reasons"]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-1, max_value=MAX_CPUS + 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.just(1))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner,
                                                                max_size=6),
    max_leaves=30,
)
vm_like = st.fixed_dictionaries(
    {"pid": st.integers(min_value=-2, max_value=state.PID_MAX + 2) | json_values,
     "starttime": st.integers(min_value=-1) | json_values,
     "pool": st.text(max_size=4) | json_values,
     "vcpus": st.lists(st.integers(min_value=-1, max_value=MAX_CPUS), max_size=6) | json_values},
    optional={k: json_values | st.lists(st.integers(min_value=-1, max_value=MAX_CPUS), max_size=4)
              for k in ("name", "policy", "emulator", "reserved", "reasons")},
)


@st.composite
def valid_vm(draw):
    cpus = draw(st.lists(st.integers(0, MAX_CPUS - 1), unique=True, max_size=8))
    n = draw(st.integers(0, len(cpus)))
    emulator = draw(st.sampled_from([None, *cpus[n:n + 1]]))
    v = {"pid": draw(st.integers(1, state.PID_MAX)), "starttime": draw(st.integers(0, state.STARTTIME_MAX)),
         "pool": draw(st.text(max_size=4)), "vcpus": cpus[:n], "emulator": emulator,
         "reserved": cpus[n + (emulator is not None):], "name": draw(st.text(max_size=4)),
         "policy": draw(st.text(max_size=4)), "reasons": draw(st.lists(st.text(max_size=3), max_size=3))}
    for key in draw(st.lists(st.sampled_from(sorted(v)), max_size=2)):  # spoil a field or two, or none
        v[key] = draw(json_values)
    return v


vm_docs = st.fixed_dictionaries({"version": st.just(1), "vms": st.lists(valid_vm(), max_size=4)})
docs = (st.fixed_dictionaries({"version": st.just(1) | json_values, "vms": st.lists(vm_like, max_size=4) | json_values})
        | vm_docs)


def text_of(value):
    return json.dumps(value, allow_nan=True)


contents = (
    (json_values | docs).map(text_of)
    | docs.map(text_of).flatmap(lambda t: st.integers(0, len(t)).map(lambda n: t[:n]))  # truncated
    | docs.map(text_of).flatmap(lambda t: st.integers(0, max(0, len(t) - 1)).flatmap(  # one byte changed
        lambda i: st.binary(min_size=1, max_size=1).map(lambda b: t.encode()[:i] + b + t.encode()[i + 1:])))
    | st.binary(max_size=200)
    | st.text(max_size=200)
    | st.integers(0, 50_000).map(lambda n: "[" * n)
)


def check_valid(out):
    assert isinstance(out, dict)
    seen_pids = set()
    for key, s in out.items():
        assert isinstance(s, Saved) and key == (s.pid, s.starttime) == s.allocation.key
        assert type(s.pid) is int and 1 <= s.pid <= state.PID_MAX and s.pid not in seen_pids
        seen_pids.add(s.pid)
        a = s.allocation
        held = list(a.vcpus) + list(a.reserved) + ([a.emulator] if a.emulator is not None else [])
        assert all(type(c) is int and 0 <= c < MAX_CPUS for c in held) and len(set(held)) == len(held)
        assert all(isinstance(x, str) for x in (s.name, s.policy, a.pool, *a.reasons))
    assert decode(encode(out)) == out  # what was accepted writes back and reads back the same


@settings(derandomize=True, max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(contents)
def test_fuzz_decode_returns_a_valid_state_or_raises_state_error(content):
    try:
        out = decode(content)
    except StateError:
        return
    check_valid(out)


@settings(derandomize=True, max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(docs)
def test_fuzz_near_valid_documents(d):
    try:
        out = decode(json.dumps(d, allow_nan=True))
    except StateError:
        return
    check_valid(out)


# --- the file itself ---------------------------------------------------------------------


def write_good(p: Path) -> Path:
    save(p, good())
    return p


def make_fifo(p):
    os.mkfifo(p)


def make_dir(p):
    p.mkdir()


def make_big(p):
    with open(p, "wb") as f:
        f.truncate(bounded.STATE_LIMIT + 1)


def make_symlink_to_good(p):
    write_good(p.parent / "real.json")
    p.symlink_to(p.parent / "real.json")


def make_symlink_to_zero(p):
    p.symlink_to("/dev/zero")


def make_dangling(p):
    p.symlink_to(p.parent / "nowhere")


def make_world_writable(p):
    write_good(p)
    os.chmod(p, 0o666)


def make_foreign_owner(p):
    write_good(p)
    os.chown(p, 12345, 12345)


def make_binary(p):
    p.write_bytes(os.urandom(4096) + b"\x00\xff")


def make_deep(p):
    p.write_text("[" * 100_000)


def make_huge_number(p):
    p.write_text(doc(vm()).replace('"pid": 100', '"pid": 1e400'))


FILES = {"fifo": make_fifo, "directory": make_dir, "over the limit": make_big, "symlink to a good file":
         make_symlink_to_good, "symlink to /dev/zero": make_symlink_to_zero, "dangling symlink": make_dangling,
         "world-writable file": make_world_writable, "file of another uid": make_foreign_owner,
         "binary": make_binary, "deep": make_deep, "1e400": make_huge_number}

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.mark.parametrize("make", FILES.values(), ids=FILES.keys())
def test_whatever_is_at_the_path_load_raises_state_error_only(tmp_path, make):
    if make is make_foreign_owner and os.geteuid() != 0:
        pytest.skip("chown needs root")
    p = tmp_path / "state.json"
    make(p)
    with pytest.raises(StateError):
        load(p)  # a FIFO must not hang: no writer ever comes
    with pytest.raises(StateError):
        holdings.FileStore(p).load()
    assert holdings.FileStore(p).exists()


def test_symlinks_and_unsafe_files_are_named_in_the_error(tmp_path):
    p = tmp_path / "state.json"
    make_symlink_to_good(p)
    with pytest.raises(UnsafeStateFile, match=f"{p} is a symbolic link"):
        load(p)
    q = tmp_path / "q.json"
    make_world_writable(q)
    with pytest.raises(UnsafeStateFile, match=f"{q} is not safe: mode 0666 is writable by group and others"):
        load(q)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), IsADirectoryError(21, "dir"),
                                   bounded.ReadError(27, "too big"), OSError(5, "I/O error")])
def test_read_errors_become_state_errors(tmp_path, monkeypatch, error):
    p = write_good(tmp_path / "state.json")

    def fail(path, limit):
        raise error

    monkeypatch.setattr(bounded, "read_bytes", fail)
    with pytest.raises(StateError, match="cannot read"):
        holdings.FileStore(p).load()


def test_parent_is_a_file_or_unreadable(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(StateError):
        load(tmp_path / "f" / "state.json")


def test_a_directory_writable_by_others_is_not_trusted(tmp_path):
    d = tmp_path / "d"
    p = write_good(d / "state.json")
    assert load(p) == good()
    for mode, who in ((0o777, "group and others"), (0o775, "group"), (0o757, "others"), (0o1777, "group and others")):
        os.chmod(d, mode)
        with pytest.raises(UnsafeStateFile, match=f"directory {d} of the state file {p} is not safe: "
                                                   f"mode {mode:04o} is writable by {who}"):
            load(p)
        with pytest.raises(UnsafeStateFile, match=f"mode {mode:04o}"):
            save(p, {})
        assert decode(p.read_bytes()) == good()  # the refused save wrote nothing


@needs_root
def test_a_directory_of_another_uid_is_not_trusted_by_root(tmp_path):
    d = tmp_path / "d"
    p = write_good(d / "state.json")
    os.chown(d, 12345, 12345)
    with pytest.raises(UnsafeStateFile, match=f"directory {d} .* owned by uid 12345, not by uid 0"):
        load(p)
    with pytest.raises(OSError, match="owned by uid 12345"):  # save_holders logs OSErrors
        save(p, {})


# --- load_priors: every StateError means "rebuild from live affinities" -------------------


@pytest.mark.parametrize("make", FILES.values(), ids=FILES.keys())
def test_load_priors_rebuilds_from_live_affinities_whatever_the_file(tmp_path, monkeypatch, caplog, make):
    if make is make_foreign_owner and os.geteuid() != 0:
        pytest.skip("chown needs root")
    p = tmp_path / "state.json"
    make(p)
    adopted = {("vm", 1): Allocation(key=("vm", 1), pool="dedicated", vcpus=(3,))}
    monkeypatch.setattr(holdings, "adopt", lambda *a: adopted)
    config = SimpleNamespace(select=lambda vm: SimpleNamespace(vcpus_rule=object()))
    with caplog.at_level(logging.INFO, logger="vcpud.holdings"):
        out = holdings.load_priors(config, holdings.FileStore(p), [object()], CpuSet.of([3]))
    assert out == adopted
    assert any(r.levelno == logging.WARNING and "rebuilt from live affinities" in r.getMessage()
               for r in caplog.records)


# --- writing: modes whatever the umask ----------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022, 0o077])
def test_save_creates_parents_0755_or_tighter_and_the_file_0600_whatever_the_umask(tmp_path, umask):
    p = tmp_path / "a" / "b" / "c" / "state.json"
    old = os.umask(umask)
    try:
        save(p, good())
    finally:
        os.umask(old)
    for d in (p.parent, p.parent.parent, p.parent.parent.parent):
        mode = stat.S_IMODE(os.stat(d).st_mode)
        assert mode & ~0o755 == 0, f"{d} is {mode:04o} under umask {umask:03o}"
        assert mode & 0o700 == 0o700
    assert stat.S_IMODE(os.stat(p).st_mode) == state.FILE_MODE == 0o600
    assert load(p) == good()


def test_save_does_not_loosen_the_mode_of_existing_directories_nor_set_setgid(tmp_path):
    top = tmp_path / "top"
    top.mkdir(mode=0o700)
    os.chmod(top, 0o2700)  # setgid parent: new subdirectories would inherit it
    p = top / "sub" / "state.json"
    old = os.umask(0)
    try:
        save(p, good())
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(top).st_mode) == 0o2700
    assert stat.S_IMODE(os.stat(p.parent).st_mode) == 0o755


def test_umask_000_in_a_fresh_process(tmp_path):
    """The daemon's own process under umask 000 (not only a umask set inside pytest)."""
    p = tmp_path / "x" / "y" / "state.json"
    code = ("import os, sys; os.umask(0); from pathlib import Path; from vcpud import state; "
            "state.save(Path(sys.argv[1]), {}); print(oct(os.umask(0)))")
    out = subprocess.run([sys.executable, "-c", code, str(p)], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(state.__file__).parents[1])}).stdout
    assert out.strip() == "0o0"  # save did not change the process umask
    assert [oct(stat.S_IMODE(os.stat(d).st_mode)) for d in (p.parent.parent, p.parent)] == ["0o755", "0o755"]
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600


def test_save_is_atomic_and_synced(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                  real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", Path(b) == p)), real_replace(a, b))[1])
    save(p, good())
    assert calls == [("fsync", False), ("replace", True), ("fsync", True)]
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


@needs_root
def test_a_non_root_service_owns_its_state_directory():
    """systemd DynamicUser=: the service's uid owns /var/lib/vcpud; it trusts it, and root's, not others'."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # pytest's tmp_path is root's alone: no way in
        os.chmod(top, 0o755)
        non_root_service(Path(top))


def non_root_service(tmp_path):
    mine, root_dir, other = tmp_path / "mine", tmp_path / "root", tmp_path / "other"
    for d in (mine, root_dir, other):
        d.mkdir(mode=0o755)
    os.chown(mine, 61000, 61000)
    os.chown(other, 61001, 61001)
    os.chmod(write_good(root_dir / "state.json"), 0o644)  # root's file, made readable to the service
    code = """
import os, sys
from pathlib import Path
from vcpud import state
import json, tempfile  # state.save's, as `vcpud run` imports them at start (here Python's files are root's alone)
os.setgid(61000); os.setuid(61000)
mine, root_dir, other = map(Path, sys.argv[1:])
state.save(mine / "state.json", {})
print(state.load(mine / "state.json"), len(state.load(root_dir / "state.json")))
try:
    state.save(other / "state.json", {})
except state.UnsafeStateFile as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code, str(mine), str(root_dir), str(other)], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(state.__file__).parents[1])}).stdout
    assert out.splitlines() == ["{} 1", f"directory {other} of the state file {other}/state.json is not safe: "
                                        "owned by uid 61001, not by uid 0 or uid 61000"]
