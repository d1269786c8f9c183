"""vcpud.sdnotify.NotifyListener: the service manager's side of sd_notify, as `vcpud demo` and the
tests run the daemon."""

from __future__ import annotations

import socket
import threading

from vcpud.sdnotify import NotifyListener


def test_collects_messages_and_keeps_reading(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(str(listener.path))
            s.settimeout(5)  # a listener that stopped reading would make a send block: fail instead
            s.send(b"READY=1\nSTATUS=3 VMs")
            assert listener.wait_for(lambda m: m.get("READY") == "1", timeout=5) == {"READY": "1",
                                                                                      "STATUS": "3 VMs"}
            # Far more than a datagram socket queues (net.unix.max_dgram_qlen): read as they come.
            for i in range(5000):
                s.send(f"STATUS=rescan {i}".encode())
        assert listener.wait_for(lambda m: m.get("STATUS") == "rescan 4999", timeout=5) is not None
        assert listener.status == "rescan 4999"
        assert len(listener.messages) == 5001
    finally:
        listener.close()


def test_wait_for_gives_up(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        assert listener.wait_for(lambda m: True, timeout=0.05) is None
        gone = threading.Event()
        gone.set()
        assert listener.wait_for(lambda m: True, timeout=30, alive=lambda: not gone.is_set()) is None
        assert listener.status == ""
    finally:
        listener.close()


def test_the_daemons_notifier_never_blocks_on_a_manager_that_stops_reading(tmp_path, monkeypatch, caplog):
    """libsystemd's sd_notify() would block once the manager's queue is full; vcpud's drops the
    message, says so once, and sends again once the manager reads."""
    import logging
    import time

    from vcpud.sdnotify import Notifier

    path = tmp_path / "notify.sock"
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(path))  # bound, never read (yet)
    try:
        for addr in (str(path), "@" + "x" * 8):
            monkeypatch.setenv("NOTIFY_SOCKET", addr)
            assert Notifier().enabled
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        n = Notifier()
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="vcpud.sdnotify"):
            for i in range(500):  # far beyond net.unix.max_dgram_qlen
                n.status(f"rescan {i}")
        assert time.monotonic() - t0 < 5
        assert [r.getMessage() for r in caplog.records].count(
            "sd_notify: the service manager's queue is full; dropping messages until it reads") == 1
        manager.settimeout(1)
        got = []
        while True:
            try:
                got.append(manager.recv(4096).decode())
            except socket.timeout:
                break
        assert got and got[0] == "STATUS=rescan 0" and len(got) < 500
        n.ready("3 VMs")  # the manager read: sent again
        assert manager.recv(4096).decode() == "READY=1\nSTATUS=3 VMs"
        n.close()
    finally:
        manager.close()
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not Notifier().enabled
