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
