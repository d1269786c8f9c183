"""procfs readers over a /proc tree copied from this very process, with parts removed to play 'vanished'."""

import os
import shutil
import threading
from pathlib import Path

import pytest

from vcpud.cpuset import CpuSet
from vcpud.procfs import Procfs, Vanished


@pytest.fixture
def proc_copy(tmp_path):
    """A copy of /proc/self (and two of its threads) under tmp_path/proc."""
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="worker")
    t.start()
    try:
        pid = os.getpid()
        src = Path(f"/proc/{pid}")
        dst = tmp_path / "proc" / str(pid)
        (dst / "task").mkdir(parents=True)
        for name in ("stat", "status", "cmdline"):
            (dst / name).write_bytes((src / name).read_bytes())
        tids = sorted(int(x) for x in os.listdir(src / "task"))[:2]
        for tid in tids:
            (dst / "task" / str(tid)).mkdir()
            for name in ("stat", "status"):
                (dst / "task" / str(tid) / name).write_bytes((src / "task" / str(tid) / name).read_bytes())
        yield tmp_path / "proc", pid, tids
    finally:
        stop.set()
        t.join()


def test_snapshot_of_a_real_process(proc_copy):
    root, pid, tids = proc_copy
    fs = Procfs(root)
    assert fs.pids() == [pid]
    snap = fs.process(pid, "/usr/bin/python3")
    assert [t.tid for t in snap.threads] == tids
    assert snap.uid == os.getuid()
    assert snap.threads[0].affinity == CpuSet.of(os.sched_getaffinity(0))
    assert snap.cmdline[0].endswith(("python", "python3")) or "python" in snap.cmdline[0]
    assert snap.vanished_threads == 0


def test_thread_vanishing_mid_snapshot_is_counted(proc_copy):
    root, pid, tids = proc_copy
    shutil.rmtree(root / str(pid) / "task" / str(tids[1]))
    (root / str(pid) / "task" / str(tids[1])).mkdir()  # listed, but its files are gone: ENOENT
    snap = Procfs(root).process(pid, "x")
    assert [t.tid for t in snap.threads] == [tids[0]]
    assert snap.vanished_threads == 1


def test_process_gone(proc_copy):
    root, pid, _ = proc_copy
    shutil.rmtree(root / str(pid))
    fs = Procfs(root)
    for call in (lambda: fs.process(pid, "x"), lambda: fs.tids(pid), lambda: fs.exe(pid), lambda: fs.cmdline(pid)):
        with pytest.raises(Vanished):
            call()
    assert not fs.exists(pid)


def test_real_proc_thread_and_tgid():
    fs = Procfs()
    pid = os.getpid()
    assert fs.tgid(threading.get_native_id()) == pid
    t = fs.thread(pid, pid)
    assert t.comm and t.affinity == CpuSet.of(os.sched_getaffinity(0))
    with pytest.raises(Vanished):
        fs.thread(pid, 2**22 + 12345)  # beyond pid_max: never a thread
