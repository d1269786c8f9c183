import os

import pytest

from vcpud.bounded import ReadError, read_bytes, read_text


def test_regular_file_within_limit(tmp_path):
    p = tmp_path / "f"
    p.write_text("0-3\n")
    assert read_text(p, 4) == "0-3\n"


def test_file_past_its_limit_is_refused(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 5)
    with pytest.raises(ReadError, match="larger than 4 bytes"):
        read_bytes(p, 4)


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p)
    with pytest.raises(ReadError, match="not a regular file"):
        read_bytes(p, 100)


def test_device_and_directory_are_refused(tmp_path):
    with pytest.raises(ReadError, match="not a regular file"):
        read_bytes("/dev/zero", 100)
    with pytest.raises(ReadError, match="a directory"):
        read_bytes(tmp_path, 100)


def test_sysfs_and_procfs_attributes_are_regular_files():
    assert read_text("/proc/self/stat", 4096).split()[0] == str(os.getpid())
    assert read_text("/sys/devices/system/cpu/online", 4096).strip()
