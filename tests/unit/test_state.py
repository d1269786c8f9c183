import json
import os

import pytest

from vcpud.cpuset import CpuSet
from vcpud.pools import Allocation
from vcpud.state import Saved, StateError, conflicts, decode, load, save


def saved(pid, cpus, emulator=None, reserved=""):
    key = (pid, pid * 10)
    a = Allocation(key=key, pool="dedicated", vcpus=tuple(cpus), emulator=emulator,
                   reserved=CpuSet.parse(reserved) if reserved else CpuSet(), reasons=("r",) * len(cpus))
    return key, Saved(pid=pid, starttime=pid * 10, name=f"vm{pid}", policy="db", allocation=a)


def test_roundtrip(tmp_path):
    d = dict([saved(100, [4, 5], emulator=6, reserved="36-37"), saved(200, [8])])
    p = tmp_path / "sub" / "state.json"
    save(p, d)
    assert load(p) == d
    assert json.loads(p.read_text())["version"] == 1
    assert [f for f in os.listdir(p.parent) if f.startswith(".state.")] == []  # no temp file left


@pytest.mark.parametrize("text", ["", "{", "[]", '{"version": 2, "vms": []}', '{"version": 1}',
                                  '{"version": 1, "vms": [{"pid": "x"}]}',
                                  '{"version": 1, "vms": [{"pid": 1, "starttime": 2, "pool": "p", "vcpus": ["a"]}]}',
                                  '{"version": 1, "vms": [{"pid": 1, "starttime": 2, "pool": "p", "vcpus": [1]},'
                                  ' {"pid": 1, "starttime": 2, "pool": "p", "vcpus": [2]}]}'])
def test_corrupt_is_an_error_not_half_a_state(text):
    with pytest.raises(StateError):
        decode(text)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(StateError, match="does not exist"):
        load(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    with pytest.raises(StateError):
        load(tmp_path / "bin.json")


def test_conflicts():
    a, b = saved(1, [4, 5]), saved(2, [5, 6])
    assert conflicts(dict([a, b])) == ["CPU 5 held by pid 1 and pid 2"]
    assert conflicts(dict([a, saved(3, [7])])) == []


def test_save_replaces_atomically(tmp_path):
    p = tmp_path / "state.json"
    save(p, dict([saved(1, [1])]))
    ino = os.stat(p).st_ino
    save(p, dict([saved(2, [2])]))
    assert os.stat(p).st_ino != ino  # a new file renamed over the old one, not rewritten in place
    assert list(load(p)) == [(2, 20)]
