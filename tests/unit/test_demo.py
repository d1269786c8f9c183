"""vcpud demo's pure parts: the CPU layout on small and large hosts, and a policy that loads
there and matches only the run's own guests."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.synth_topology import synth
from vcpud import demo
from vcpud.config import load_config
from vcpud.cpuset import CpuSet
from vcpud.demo import Layout, Role, Run, config_text, guest_smp, layout, metric_lines
from vcpud.demoprocs import guest_argv
from vcpud.discovery import VM, parse_name, parse_smp
from vcpud.placement import plan

HOLES = CpuSet.parse("2-3,5,7,40-47")
TOPOLOGIES = {
    "1 CPU": synth((1,), smt=1),
    "2 CPUs": synth((2,), smt=1),
    "3 CPUs": synth((3,), smt=1),
    "4 CPUs, SMT": synth((2,), smt=2),
    "64 CPUs, 2 nodes, SMT": synth((16, 16), smt=2),
    "online CPUs with holes": synth((48,), smt=1, offline=[c for c in range(48) if c not in HOLES]),
}
HOSTS = {name: t.online for name, t in TOPOLOGIES.items()}


@pytest.mark.parametrize("cpus", HOSTS.values(), ids=HOSTS.keys())
def test_layout_keeps_the_pool_to_itself(cpus):
    lay = layout(cpus)
    fixed = CpuSet.of(lay.fixed)
    assert lay.housekeeping == min(cpus)
    assert fixed | lay.floating | lay.pool | CpuSet.of([lay.housekeeping]) <= cpus
    assert not lay.pool & (fixed | lay.floating | CpuSet.of([lay.housekeeping])), "the pool is exclusive"
    assert bool(lay.pool) == (len(cpus) > 1)
    assert lay.dedicated_vcpus <= max(1, len(lay.pool))
    # From 3 CPUs on the housekeeping CPU holds only emulator threads.
    assert (lay.housekeeping not in fixed) == (len(cpus) >= 3) == lay.pin_emulator


def test_layout_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        layout(CpuSet())


def guest(run: Run, role: Role, lay: Layout, workdir: Path | None = None, name: str | None = None) -> VM:
    """A VM as discovery makes it from the command line the demo starts its guests with."""
    workdir = workdir or run.workdir
    argv = guest_argv("/usr/bin/qemu-system-x86_64", name or run.name(role), guest_smp(role, lay), True,
                      ["-qmp", f"unix:{workdir}/qmp-{role}.sock,server=on,wait=off"])
    vm_name, debug = parse_name(argv)
    return VM(pid=1000 + role.number, starttime=role.number, exe=argv[0], cmdline=tuple(argv), uid=0, user="root",
              name=vm_name, uuid=None, smp=parse_smp(argv), threads=(), debug_threads=debug)


@pytest.mark.parametrize("cpus", HOSTS.values(), ids=HOSTS.keys())
def test_the_policy_loads_and_matches_only_this_runs_guests(tmp_path, cpus):
    workdir = tmp_path / "vcpud-demo-4242-ab_c9"
    workdir.mkdir()
    run = Run(4242, workdir)
    lay = layout(cpus)
    path = workdir / "vcpud.yaml"
    path.write_text(config_text(run, lay))
    cfg = load_config(path, online=cpus)

    assert [p.name for p in cfg.policies] == [str(r) for r in Role]
    assert cfg.state_file == workdir / "state.json", "never the service's state file"
    assert str(cfg.metrics_listen) == "127.0.0.1:0", "a free loopback port, never the service's 9474"
    assert cfg.rescan_interval == 1.0
    if lay.pool:
        assert cfg.pools["dedicated"].exclusive and cfg.pools["dedicated"].cpus == lay.pool
    for role in Role:
        assert cfg.select(guest(run, role, lay)).name == str(role)
    # The same names elsewhere: another directory, even one this one's name begins with, or none.
    other = tmp_path / "elsewhere"
    for role in Role:
        assert cfg.select(guest(run, role, lay, workdir=other)) is None
        assert cfg.select(guest(run, role, lay, workdir=Path(f"{workdir}x"))) is None
    # Another run's guest, or a name one guest's name begins with.
    assert cfg.select(guest(Run(4243, workdir), Role.PINNED, lay)) is None
    assert cfg.select(guest(run, Role.PINNED, lay, name=run.name(Role.PINNED) + "0")) is None


@pytest.mark.parametrize("topo", TOPOLOGIES.values(), ids=TOPOLOGIES.keys())
def test_the_plan_pins_as_the_layout_says(tmp_path, topo):
    cpus = topo.online
    run = Run(7, tmp_path)
    lay = layout(cpus)
    path = tmp_path / "vcpud.yaml"
    path.write_text(config_text(run, lay))
    cfg = load_config(path, online=cpus)
    p = plan(cfg, [guest(run, r, lay) for r in Role], cpus, topo)
    by_policy = {vp.policy: vp for vp in p.vms}
    assert set(by_policy) == {str(r) for r in Role}
    dedicated = by_policy[str(Role.DEDICATED)]
    if lay.pool:
        assert dedicated.allocation is not None and CpuSet.of(dedicated.allocation.cpus) <= lay.pool
        assert len(dedicated.allocation.cpus) == lay.dedicated_vcpus
    assert all(not vp.problems and not vp.waiting for vp in p.vms)


def test_config_text_shows_no_regex_noise_in_the_directory():
    run = Run(9, Path("/tmp/vcpud-demo-9-a1_b2"))
    assert run.marker == "/tmp/vcpud-demo-9-a1_b2/"
    assert Run(9, Path("/tmp/a.b+c")).marker == r"/tmp/a\.b\+c/"


def test_metric_lines():
    text = '# HELP x y\nvcpud_vms{policy="pinned"} 1.0\nvcpud_drift_corrections_total 2\nbad line here x\n'
    assert metric_lines(text) == {'vcpud_vms{policy="pinned"}': 1.0, "vcpud_drift_corrections_total": 2.0}


def test_wait_for_says_what_was_not_met():
    with pytest.raises(demo.StepFailed, match="the thing: not within"):
        demo.wait_for("the thing", lambda: None, timeout=0.01)
    with pytest.raises(demo.StepFailed, match="the thing: guest x exited"):
        demo.wait_for("the thing", lambda: None, alive=lambda: "guest x exited")
    assert demo.wait_for("now", lambda: 5)[0] == 5


@pytest.mark.parametrize("pace", [-1.0, math.nan, math.inf, demo.MAX_PACE + 1])
def test_bad_pace_is_a_usage_error(pace, capsys):
    assert demo.main(pace) == demo.EXIT_USAGE
    assert "--pace" in capsys.readouterr().err


def test_not_root_says_so(monkeypatch, capsys):
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    assert demo.main(0) == demo.EXIT_FAILED
    assert "must run as root" in capsys.readouterr().err


def test_layout_is_frozen():
    lay = layout(CpuSet.parse("0-3"))
    assert isinstance(lay, Layout)
    with pytest.raises(AttributeError):
        lay.housekeeping = 1  # type: ignore[misc]
