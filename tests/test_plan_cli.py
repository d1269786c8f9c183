"""`vcpud plan --what-if` on real machines' topologies, through the command an operator runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import DUMPS, SHARED_TOPOLOGIES, _unpack, run_vcpud
from vcpud.cpuset import CpuSet
from vcpud.topology import read_topology

SIZES = (2, 4, 6, 8, 4, 2, 12)


def config_for(tmp: Path, topo) -> tuple[Path, CpuSet]:
    housekeeping = topo.cores[0]
    pool = topo.online - housekeeping
    cfg = tmp / "vcpud.yaml"
    cfg.write_text(f"""\
state_file: {tmp / 'state.json'}
pools:
  dedicated: {{cpus: "{pool.format()}", exclusive: true}}
  shared: {{cpus: "{housekeeping.format()}"}}
policies:
  - name: db
    match: {{name: "db*"}}
    vcpus: {{pool: dedicated, smt: mirror, numa: single, cache: l3}}
    emulatorpin: {{pool: shared}}
    on_exhausted: shared
""")
    return cfg, pool


def _threads_per_core(name: str) -> int:
    """From what lscpu printed for that machine (known before unpacking anything)."""
    for line in (SHARED_TOPOLOGIES / f"{name}.lscpu").read_text().splitlines():
        if line.startswith("Thread(s) per core:"):
            return int(line.split(":")[1])
    return 1


SMT_DUMPS = [n for n in DUMPS if _threads_per_core(n) > 1]


def test_there_are_smt_machines_to_test():
    assert len(SMT_DUMPS) >= 3, SMT_DUMPS


@pytest.mark.parametrize("name", SMT_DUMPS)
def test_fill_a_dedicated_pool_on_every_smt_machine(name, unpacked, tmp_path):
    root = unpacked(name)
    topo = read_topology(root)
    assert topo.smt_threads_per_core > 1
    cfg, pool = config_for(tmp_path, topo)
    n_vms = len(pool) // 2 + 8  # surely more than fit
    what_if = []
    for i in range(n_vms):
        what_if += ["--what-if", f"db{i}:{SIZES[i % len(SIZES)]}:2"]
    p = run_vcpud("plan", "--config", str(cfg), "--sysroot", str(root), "--json", *what_if)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    vms = data["vms"]
    assert [v["name"] for v in vms] == [f"db{i}" for i in range(n_vms)]
    by_cpu = {c.cpu: c for c in topo.cpus}
    used: dict[int, str] = {}
    placed = 0
    for v in vms:
        if v["status"] != "placed":
            continue
        placed += 1
        cpus = [c[0] for _, c in sorted(v["vcpus"].items(), key=lambda kv: int(kv[0]))]
        assert all(len(c) == 1 for c in v["vcpus"].values())
        for cpu in cpus:
            assert cpu in pool, (v["name"], cpu)
            assert cpu not in used, f"CPU {cpu} given to {used.get(cpu)} and {v['name']}"
            used[cpu] = v["name"]
        # smt mirror: guest core k = vCPUs 2k, 2k+1 -> siblings of one host core; cores distinct
        host_cores = []
        for k in range(len(cpus) // 2):
            a, b = cpus[2 * k], cpus[2 * k + 1]
            assert b in by_cpu[a].siblings and a != b, (v["name"], k, a, b)
            host_cores.append(by_cpu[a].siblings)
        assert len(set(host_cores)) == len(host_cores), f"{v['name']}: two guest cores on one host core"
        # numa: single whenever it fits (it was placed, so it fit)
        assert len({by_cpu[c].node for c in cpus}) == 1, (v["name"], cpus)
        assert v["emulator"] == sorted(topo.cores[0])
    statuses = Counter(v["status"] for v in vms)
    assert placed > 0
    # the last ones do not fit: they float over the shared pool, as on_exhausted says
    assert vms[-1]["status"] == "floating" and statuses["floating"] >= 1
    for v in vms:
        if v["status"] == "floating":
            assert all(c == sorted(topo.cores[0]) for c in v["vcpus"].values())
            assert "exhausted" in v["reason"] or "does not fit" in v["reason"]
    assert sorted(data["pools"]["dedicated"]["free"]) == sorted(set(pool) - set(used))


def test_plan_text_and_bad_what_if(tmp_path):
    name = "x86_64-64cpu"
    if name not in DUMPS:
        pytest.fail(f"{name} dump missing")
    root = _unpack(SHARED_TOPOLOGIES / f"{name}.tar.gz", tmp_path)
    cfg, _ = config_for(tmp_path, read_topology(root))
    p = run_vcpud("plan", "--config", str(cfg), "--sysroot", str(root), "--what-if", "db1:8:2", "-v")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("db1 ") and "placed" in p.stdout and "smt mirror" in p.stdout
    assert "pool dedicated:" in p.stdout
    for bad in ("db1", "db1:x", "db1:3:2", ":4", "db1:0"):
        r = run_vcpud("plan", "--config", str(cfg), "--sysroot", str(root), "--what-if", bad)
        assert r.returncode == 2 and "--what-if" in r.stderr and "Traceback" not in r.stderr, bad
