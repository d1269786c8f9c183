"""Hostile configs (issue 9): huge numbers, small files with big costs, unbounded reads, busy loops.

Every case must end in a ConfigError with positioned issues, quickly and in little memory.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from vcpud.config import ConfigError, load_config, parse_config_text
from vcpud.config import loader
from vcpud.cpuset import MAX_CPUS, CpuSet, CpuSetError

BIG = "9" * 5000  # past Python's 4,300-digit int() limit
POSITIONED = re.compile(r"[^\n]+:\d+:\d+: \S")


def errors(text: str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_config_text(text, "t.yaml", **kw)
    for line in str(ei.value).splitlines():
        assert POSITIONED.match(line), line
    return ei.value


def policy(**keys: str) -> str:
    body = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return f"policies:\n  - name: p\n    match: {{}}\n{body}"


@pytest.mark.parametrize(
    "text,where,words",
    [
        (policy(affinity=f'"{BIG}"'), "4:15", ["out of range", "8191"]),
        (policy(affinity=f'"0-{BIG}"'), "4:15", ["out of range", "8191"]),
        (policy(affinity=f'"0-15:{BIG}"'), "4:15", ["out of range"]),
        (policy(affinity=f'"{"0" * 5000}1"'), None, []),  # leading zeros: CPU 1, fine
        (policy(affinity=f'"0x{"f" * 5000}"'), "4:15", ["beyond 8191"]),
        (policy(vcpupin=f'{{? {BIG} : "0"}}'), "4:17", ["vCPU index", "out of range"]),
        (policy(vcpupin=f'{{0: "{BIG}"}}'), "4:18", ["out of range"]),
        (policy(iothreadpin=f'{{io1: "{BIG}"}}'), "4:24", ["out of range"]),
        ("policies:\n  - name: p\n    match: {user: " + BIG + "}\n", "3:19", ["uid", "out of range"]),
        ("policies:\n  - name: p\n    match: {vcpus: " + BIG + "}\n", "3:20", ["vCPU count", "out of range"]),
        ('policies:\n  - name: p\n    match: {vcpus: "1-' + BIG + '"}\n', "3:20", ["out of range"]),
        (f"rescan_interval: {BIG}\n", "1:18", ["at most"]),
        (f"rescan_interval: 0.0000001{'0' * 5000}\n", "1:18", ["at least 100ms"]),
        (f"pools:\n  a: {{cpus: \"{BIG}\"}}\n", "2:13", ["out of range"]),
        (f'metrics: {{listen: "127.0.0.1:{BIG}"}}\n', "1:19", ["port"]),
    ],
)
def test_huge_numbers_are_positioned_errors(text, where, words):
    if where is None:
        assert parse_config_text(text, "t.yaml").policies[0].affinity == CpuSet.parse("1")
        return
    e = errors(text)
    assert len(e.issues) == 1, str(e)
    assert str(e.issues[0].pos) == f"t.yaml:{where}", str(e)
    for w in words:
        assert w in e.issues[0].message
    assert len(str(e)) < 500  # the 5,000 digits are not repeated back


def test_cpuset_refuses_before_expanding():
    for bad in (BIG, f"0-{BIG}", f"0x{'f' * 300_000}", ",".join(["0-8191"] * 10_000), f"{MAX_CPUS}"):
        t0 = time.process_time()
        with pytest.raises(CpuSetError):
            CpuSet.parse(bad)
        assert time.process_time() - t0 < 0.1
    with pytest.raises(CpuSetError):
        CpuSet.parse(10**5000)
    assert CpuSet.parse("0-8191:4096") == CpuSet.of([0, 4096])
    assert CpuSet.parse("0x" + "0" * 100 + "100") == CpuSet.of([8])


@pytest.mark.parametrize("interval", ["0.0000001", "1ms", "99ms", "0.05s"])
def test_rescan_interval_has_a_floor(interval):
    e = errors(f"rescan_interval: {interval}\n")
    assert "at least 100ms" in e.issues[0].message
    assert parse_config_text("rescan_interval: 100ms\n").rescan_interval == 0.1


def bounded_run(text: str, limit: float = 1.0) -> ConfigError | None:
    t0 = time.process_time()
    try:
        parse_config_text(text, "t.yaml")
        out = None
    except ConfigError as e:
        out = e
    assert time.process_time() - t0 < limit
    return out


def test_overlapping_pools_are_near_linear_and_capped():
    text = "pools:\n" + "".join(f"  p{i}: {{cpus: 0-7}}\n" for i in range(1000))
    e = bounded_run(text)
    assert e is not None and len(e.issues) == 21
    assert e.issues[-1].message.startswith("... and 994 more pools overlapping earlier ones")
    # everything else is capped too: 1,000 unknown keys
    e = bounded_run("".join(f"k{i}: 0\n" for i in range(1000)))
    assert e is not None and len(e.issues) == loader.MAX_ISSUES + 1
    cap = loader.MAX_ISSUES
    assert str(e.issues[-1]) == f"t.yaml:{cap + 1}:1: ... and {1000 - cap} more issues, from here on (not shown)"
    # few pools: every pair, as before
    e = errors("pools:\n  a: {cpus: 0-3}\n  b: {cpus: 2-5}\n  c: {cpus: 5-7}\n")
    assert [i.message for i in e.issues] == [
        "pools 'a' and 'b' overlap on CPUs 2-3", "pools 'b' and 'c' overlap on CPU 5",
    ]


def test_overlap_reports_are_capped_with_a_count():
    text = "pools:\n" + "".join(f"  p{i}: {{cpus: '{i},100'}}\n" for i in range(40))
    e = errors(text)
    msgs = [i.message for i in e.issues]
    assert len(msgs) == 21 and msgs[-1].startswith("... and 34 more pools overlapping"), msgs
    assert str(e.issues[-1].pos) == "t.yaml:8:14"  # p6: its overlap with p5 is the 21st


def test_big_cpu_lists_are_cheap():
    assert bounded_run(policy(affinity='"0x' + "f" * 300_000 + '"')) is not None
    assert bounded_run(policy(affinity='"' + ",".join(["0-8191"] * 10_000) + '"')) is not None
    ok = policy(affinity='"' + ",".join(["0-8191"] * 8000) + '"')
    assert bounded_run(ok) is None


def test_many_different_cpu_lists_are_bounded():
    text = "policies:\n" + "".join(f"  - {{name: p{i}, match: {{}}, affinity: '{i}-8191'}}\n" for i in range(200))
    e = bounded_run(text, 5.0)
    assert e is not None and "too many different CPU lists" in str(e)
    same = "policies:\n" + "".join(f"  - {{name: p{i}, match: {{}}, affinity: '0-8191'}}\n" for i in range(200))
    assert bounded_run(same, 5.0) is None


def test_size_and_count_limits():
    e = errors("# " + "x" * (1 << 20) + "\n")
    assert "too large" in e.issues[0].message and str(e.issues[0].pos) == "t.yaml:1:1"
    text = "policies:\n" + "".join(f"  - {{name: p{i}, match: {{}}}}\n" for i in range(10_001))
    e = bounded_run(text, 10.0)
    assert e is not None and "too many policies" in str(e) and str(e.issues[0].pos) == "t.yaml:10002:5"
    e = errors("pools:\n" + "".join(f"  p{i}: {{cpus: '{i}'}}\n" for i in range(1025)))
    assert "at most 1024" in str(e)
    e = bounded_run("x-a: [" + ",".join(["0"] * 100_001) + "]\n", 10.0)
    assert e is not None and "more than 100000 values" in str(e)


def test_alias_bombs_are_bounded():
    lol = "x-a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"x-{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8)
    )
    e = bounded_run(lol + "policies: *i\n")
    assert e is not None and "alias bomb" in str(e)
    long = "x-s: &s " + "y" * 100_000 + "\npolicies:\n" + "".join(
        f"  - {{name: p{i}, match: {{}}, affinity: *s}}\n" for i in range(100)
    )
    e = bounded_run(long)
    assert e is not None and "alias bomb" in str(e)
    # merge keys of merge keys
    merges = "x-m0: &m0 {a: 1, b: 2}\n" + "".join(
        f"x-m{i}: &m{i} {{<<: [" + ",".join([f"*m{i - 1}"] * 10) + "]}\n" for i in range(1, 9)
    )
    assert bounded_run(merges + "policies: []\n") is not None
    assert bounded_run("x-a: &a [*a]\npolicies: []\n") is None  # a cycle, harmless


def test_fifo_and_device_configs_are_errors(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as ei:
        load_config(fifo)
    assert str(ei.value) == f"{fifo}:1:1: cannot read config file: not a regular file"
    with pytest.raises(ConfigError) as ei:
        load_config(Path("/dev/zero"))
    assert str(ei.value) == "/dev/zero:1:1: cannot read config file: not a regular file"
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(ConfigError) as ei:
        load_config(big)
    assert "larger than 1048576 bytes" in str(ei.value)


def test_fifo_and_device_includes_are_positioned_errors(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    main = tmp_path / "vcpud.yaml"
    main.write_text("include:\n  - fifo.yaml\n  - zero.yaml\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    assert [str(i) for i in ei.value.issues] == [
        f"{main}:2:5: cannot read included file '{tmp_path}/fifo.yaml': not a regular file",
        f"{main}:3:5: cannot read included file '{tmp_path}/zero.yaml': not a regular file",
    ]


def test_too_many_includes(tmp_path):
    for i in range(300):
        (tmp_path / f"i{i:03d}.yaml").write_text("policies: []\n")
    main = tmp_path / "vcpud.yaml"
    main.write_text("include: i*.yaml\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    assert str(ei.value).startswith(f"{main}:1:10: include 'i*.yaml': more than 256 included files")


def test_unexpected_exceptions_become_config_errors(monkeypatch, caplog):
    import vcpud.config.schema as schema

    def boom(*a, **k):
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    monkeypatch.setattr(schema, "compose", boom)
    with pytest.raises(ConfigError) as ei:
        parse_config_text("policies: []\n", "t.yaml")
    assert str(ei.value).startswith("t.yaml:1:1: cannot load this config: ValueError: ")
