import pytest
from hypothesis import given, strategies as st

from vcpud.cpuset import CpuSet, CpuSetError


@pytest.mark.parametrize(
    "text,cpus",
    [
        ("0-3,8", {0, 1, 2, 3, 8}),
        ("0", {0}),
        (" 1 , 3-4 ", {1, 3, 4}),
        ("0-15:2", set(range(0, 16, 2))),
        ("1-15:4,0", {0, 1, 5, 9, 13}),
        ("0x100", {8}),
        ("0X3", {0, 1}),
        ("0xff,ffffffff", set(range(40))),
        (5, {5}),
    ],
)
def test_parse(text, cpus):
    assert CpuSet.parse(text).cpus == frozenset(cpus)


@pytest.mark.parametrize("bad,token", [("3-x", "3-x"), ("5-2", "5-2"), ("0,", ""), ("", ""), ("x", "x"),
                                        ("1-", "1-"), ("-1", "-1"), ("0-7:0", "0-7:0"), ("3:2", "3:2"),
                                        ("0x", ""), ("0xg", "g"), ("0x0", "0x0"), ("99999", "99999"),
                                        ("1,,2", "")])
def test_parse_errors_name_the_token(bad, token):
    with pytest.raises(CpuSetError) as ei:
        CpuSet.parse(bad)
    assert ei.value.token == token
    assert repr(bad) in str(ei.value) or repr(token) in str(ei.value)


@pytest.mark.parametrize("bad", [True, None, 1.5, [1], -1])
def test_parse_rejects_non_lists(bad):
    with pytest.raises(CpuSetError):
        CpuSet.parse(bad)


def test_proc_mask_forms():
    # /proc/PID/status prints Cpus_allowed as 32-bit groups; an empty mask is possible there.
    assert CpuSet.from_mask("ff,ffffffff") == CpuSet.parse("0-39")
    assert CpuSet.from_mask("00000000,00000100") == CpuSet.parse("8")
    assert CpuSet.from_mask("0") == CpuSet()
    assert CpuSet.parse("0-39").to_mask() == "ff,ffffffff"
    assert CpuSet.parse("8").to_mask() == "100"
    assert CpuSet.parse("32").to_mask() == "1,00000000"
    assert CpuSet.parse("8").hex() == "0x100"
    with pytest.raises(CpuSetError):
        CpuSet.from_mask("1,123456789")  # a group wider than 32 bits


def test_format():
    assert CpuSet.parse("8,0-3").format() == "0-3,8"
    assert CpuSet.parse("0,1").format() == "0-1"  # the kernel writes runs of two as ranges too
    assert CpuSet.parse("0-6:2").format() == "0,2,4,6"
    assert CpuSet().format() == ""
    assert str(CpuSet.parse("1-2")) == "1-2"


def test_set_operations():
    a, b = CpuSet.parse("0-3"), CpuSet.parse("2-5")
    assert (a | b) == CpuSet.parse("0-5")
    assert (a & b) == CpuSet.parse("2-3")
    assert (a - b) == CpuSet.parse("0-1")
    assert CpuSet.parse("1") <= a and not (b <= a)
    assert list(CpuSet.parse("3,1,2")) == [1, 2, 3]
    assert 2 in a and 7 not in a and len(a) == 4
    assert hash(CpuSet.parse("0-1")) == hash(CpuSet.parse("0,1"))


cpu_sets = st.frozensets(st.integers(min_value=0, max_value=300), min_size=1).map(CpuSet)


@given(cpu_sets)
def test_roundtrip_list(cs):
    assert CpuSet.parse(cs.format()) == cs


@given(cpu_sets)
def test_roundtrip_masks(cs):
    assert CpuSet.from_mask(cs.to_mask()) == cs
    assert CpuSet.parse(cs.hex()) == cs
