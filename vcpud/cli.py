"""Command line: vcpud topology | check | apply | plan | ps | run | demo.

A one-shot command imports what it uses, in the functions that use it: `topology` no config
(nor YAML), `check` no discovery or pinning, only `apply` the reconciler, `apply`, `ps` and `plan`
libvirt-python only for a VM libvirt started (libvirtrun.OnDemand), only `run` the daemon with its
event sources, journal and metrics.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import __version__
from .cpuset import CpuSet
from .libvirtrun import OnDemand
from .procfs import Procfs
from .topology import Topology, TopologyError, read_topology
from .text import emit as _emit
from .text import printable_lines, show
from .text import short as _short
from .vocab import VMStatus
from .whatif import MAX_VM_VCPUS, MAX_WHAT_IF, WHAT_IF_EXPECTED, what_if_vm, what_if_vms  # noqa: F401 (tests, completion)

if TYPE_CHECKING:
    from .cgroups import Cgroups, Confinement
    from .config import Config
    from .discovery import VM, Scan
    from .engine import Report
    from .pinning import AffinityOps, Chain, Outcome, PinResult
    from .placement import Assignment, VMPlan

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# `ps --json` status of a managed VM some of whose threads are not where its policy wants them
# (moved since, or never pinned: vcpud not running), though nothing says pinning would fail.
OFF_POLICY = "off-policy"

# argparse takes time quadratic in the number of options (50,000 --what-if: 100 s): longer
# command lines are refused before it sees them.
MAX_ARGS = 2 * MAX_WHAT_IF + 64
NO_VMS_HINT = "no VMs found; to see vcpud at work, run `vcpud demo` (as root: three tiny guests for about 30 s)"


# --- the topology and the config: one path for every command ---------------------
def load_topology(sysroot: str) -> Topology | None:
    """The topology of this host or of the sysfs dump at ``sysroot``, or None after printing why.

    The only place commands read the topology: every failure of read_topology() (a
    TopologyError naming the file, or any other OSError) becomes one line on stderr.
    """
    try:
        return read_topology(Path(sysroot))
    except (TopologyError, OSError) as e:
        print(printable_lines(f"vcpud: cannot read the CPU topology under {sysroot}: {e}"), file=sys.stderr)
        return None


def _setup(args: argparse.Namespace, required: bool) -> tuple[Topology, Config] | int:
    """This host's (or --sysroot's) topology and the config checked against it, or the exit code
    after printing the errors: EXIT_FAILED when the topology cannot be read, EXIT_CONFIG when the
    config does not load."""
    topo = load_topology(args.sysroot)
    if topo is None:
        return EXIT_FAILED
    cfg = _load(args.config, topo.online, required=required)
    return EXIT_CONFIG if cfg is None else (topo, cfg)


def _procfs(args: argparse.Namespace) -> Procfs | None:
    """The /proc tree to scan (hidden --proc), or None after printing why it cannot be read."""
    try:
        with os.scandir(args.proc):  # opened, not listed: the scan lists it
            pass
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"vcpud: cannot read the process list in {_short(str(args.proc))}: {why}", file=sys.stderr)
        return None
    return Procfs(Path(args.proc))


def _load(path: Path | None, online: CpuSet, required: bool) -> Config | None:
    """The config, or None (printed errors) when it does not load."""
    from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config

    target = path or DEFAULT_CONFIG_PATH
    if path is None and not required and not target.exists():
        print(f"vcpud: no {target}: showing VMs without policies", file=sys.stderr)
        return Config()
    try:
        return load_config(target, online=online)
    except ConfigError as e:
        for issue in e.issues:
            print(str(issue), file=sys.stderr)
        return None


# --- topology -----------------------------------------------------------------------
def cmd_topology(args: argparse.Namespace) -> int:
    topo = load_topology(args.sysroot)
    if topo is None:
        return EXIT_FAILED
    if args.json:
        import json

        print(json.dumps(topo.to_json(), indent=2))
        return EXIT_OK
    from .lscpu import format_parse, format_summary

    if args.parse or args.physical:
        _emit(format_parse(topo, physical=args.physical))
    else:
        summary = format_summary(topo)  # CPU type names come from /proc/cpuinfo: _emit() escapes
        _emit(summary if summary.endswith("\n") else summary + "\n")
    return EXIT_OK


# --- check --------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    setup = _setup(args, required=True)
    if isinstance(setup, int):
        return setup
    cfg = setup[1]
    print(f"{', '.join(cfg.files)}: OK, {len(cfg.policies)} policies, {len(cfg.pools)} pools")
    return EXIT_OK


# --- owners: who pins a thread ---------------------------------------------------
def _cgroups(args: argparse.Namespace, once: bool = False) -> Cgroups:
    """``once``: each cgroup read once (ps, plan: they only read, about every thread)."""
    from .cgroups import Cgroups

    return Cgroups(Path(args.proc), Path(args.cgroup_root), once=once)


def _router(args: argparse.Namespace, libvirt: OnDemand) -> Chain:
    """Who pins a VM's threads: libvirt's API for libvirt's VMs (libvirt-python installed), the
    thread's own cgroup where a known VM manager gives it one (as libvirt does), else
    sched_setaffinity."""
    from .cgroups import CgroupOwner
    from .pinning import Chain

    os_ops = OsAffinity(Path(args.proc))
    return Chain(libvirt, CgroupOwner(_cgroups(args), os_ops), fallback=os_ops)


def owner_name(c: Confinement | None) -> str:
    """Which owner would pin a thread confined by ``c``: cgroup, sched_setaffinity (libvirt: the
    libvirt owner, where it is wired up, decides first)."""
    return "cgroup" if c is not None and c.writable else "sched_setaffinity"


def _prediction(cg: Cgroups, a: Assignment, affinity: CpuSet | None, libvirt: bool = False) -> dict[str, Any]:
    """What pinning ``a`` would do: the thread's cgroup, the owner, and a predicted failure
    (none through libvirt: it moves its own cgroups)."""
    from .pinning import predict

    c = cg.confinement(a.pid, a.tid)
    p = predict(a, c, cg) if affinity != a.cpus and not libvirt else None
    return {
        "via": "libvirt" if libvirt else owner_name(c),
        "cgroup": None if c is None else {
            "path": c.path, "version": c.version, "owner": c.owner.value, "per_thread": c.per_thread,
            "effective": c.effective.format() if c.effective is not None else None},
        "would": None if p is None else p[0].value,
        "would_detail": None if p is None else p[1],
        "confinement": c,
    }


# --- apply --------------------------------------------------------------------------
def _vm_line(v: VMPlan, results: Sequence[PinResult], dry_run: bool) -> list[str]:
    from .pinning import Outcome

    counts: dict[Outcome, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    failed = [r for r in results if not r.outcome.ok]
    head = f"{show(v.vm.display_name)} (pid {v.vm.pid}) policy {show(v.policy)}: "
    if dry_run:
        head += f"{counts.get(Outcome.PLANNED, 0)} to pin, {counts.get(Outcome.UNCHANGED, 0)} already right"
    else:
        head += f"{counts.get(Outcome.PINNED, 0)} pinned, {counts.get(Outcome.UNCHANGED, 0)} unchanged"
    head += f", {len(failed) + len(v.problems)} failed"
    if v.waiting:
        head += f"; {v.status}: {v.reason}"
    vias = sorted({r.via for r in results if r.via and r.via != "sched_setaffinity"})
    if vias:
        head += f" (via {', '.join(vias)})"
    lines = [head]
    # Threads a cgroup shared by the VM keeps off their CPUs: one message for that cgroup.
    shared: dict[tuple[Outcome, str], list[PinResult]] = {}
    for r in results:
        if not r.outcome.ok and r.cgroup is not None and not r.cgroup.per_thread:
            shared.setdefault((r.outcome, r.cgroup.path), []).append(r)
    for r in results:
        a = r.assignment
        if r.outcome is Outcome.PLANNED:
            via = f" via {r.via}" if r.via and r.via != "sched_setaffinity" else ""
            lines.append(f"  would pin tid {a.tid} {show(a.label)}: {r.before} -> {a.cpus} ({a.rule}){via}")
        elif not r.outcome.ok and not (r.cgroup is not None and (r.outcome, r.cgroup.path) in shared):
            lines.append(f"  FAILED tid {a.tid} {show(a.label)} -> {a.cpus} ({a.rule}): {r.outcome}: {r.detail}")
    for (outcome, _), rs in shared.items():
        lines.append(_shared_line(outcome, rs, dry_run))
    lines += [f"  FAILED {p}" for p in v.problems]
    return lines


def _shared_line(outcome: Outcome, rs: Sequence[PinResult], dry_run: bool) -> str:
    c = rs[0].cgroup
    assert c is not None
    threads = ", ".join(f"{show(r.assignment.label)} (tid {r.assignment.tid}) -> {r.assignment.cpus}" for r in rs)
    verb = "would fail" if dry_run else "failed"
    return (f"  FAILED {len(rs)} threads {verb} ({outcome}): the VM is confined by {c.describe()}: "
            f"{threads}; {c.hint()}")


def cmd_apply(args: argparse.Namespace) -> int:
    setup = _setup(args, required=True)
    if isinstance(setup, int):
        return setup
    topo, cfg = setup
    online = topo.online
    procfs = _procfs(args)
    if procfs is None:
        return EXIT_FAILED
    report = reconcile(cfg, online, procfs, OsAffinity(Path(args.proc)), dry_run=args.dry_run, topology=topo,
                       router=_router(args, OnDemand()))
    _hint_unreadable(report.scan)
    lines: list[str] = []
    for v in report.vms:
        if v.plan.policy is None:
            lines.append(f"{show(v.plan.vm.display_name)} (pid {v.plan.vm.pid}): no policy matches, left alone")
            continue
        lines += _vm_line(v.plan, v.results, args.dry_run)
    if not report.vms:
        lines.append("no VMs found")
    if report.scan.vanished:
        lines.append(f"({report.scan.vanished} processes or threads vanished during the scan)")
    _emit("".join(line + "\n" for line in lines))
    return EXIT_OK if report.ok else EXIT_FAILED


# Imported when called (by `apply` alone, and `scan` by `ps` and `plan` too), and looked up here,
# where tests replace them.
def reconcile(*args: Any, **kwargs: Any) -> Report:
    """engine.reconcile."""
    from .engine import reconcile as engine_reconcile

    return engine_reconcile(*args, **kwargs)


def OsAffinity(proc: Path) -> AffinityOps:
    """A pinning.OsAffinity."""
    from .pinning import OsAffinity as Affinity

    return Affinity(proc)


def scan(procfs: Procfs, executables: Sequence[str]) -> Scan:
    """discovery.scan."""
    from .discovery import scan as discover

    return discover(procfs, executables)


# --- ps -----------------------------------------------------------------------------
def ps_json(found: Scan, plans: Sequence[VMPlan], cgroups: Cgroups | None = None,
            libvirt: OnDemand | None = None) -> dict[str, Any]:
    libvirt = libvirt or OnDemand()
    vms = []
    for vp in plans:
        vm = vp.vm
        threads = []
        status: str = vp.status
        lv = cgroups is not None and vp.policy is not None and libvirt.owns(vm)
        for t in vm.threads:
            a = vp.wanted(t.tid)
            pred: dict[str, Any] = {}
            if a is not None and cgroups is not None:
                pred = _prediction(cgroups, a, t.affinity, lv)
                pred.pop("confinement")
            ok = (a is None) or (a.cpus == t.affinity)
            if not ok and status in (VMStatus.PINNED, VMStatus.PLACED):
                # Not where the policy wants it: not pinned (failed if pinning would fail).
                status = VMStatus.FAILED if pred.get("would") else OFF_POLICY
            if pred.get("would"):
                status = VMStatus.FAILED
            threads.append({**pred,
                "tid": t.tid, "comm": t.comm, "role": t.role.value, "vcpu": t.vcpu, "iothread": t.iothread,
                "label": t.label, "found_by": t.how, "psr": t.processor,
                "affinity": t.affinity.format(), "affinity_cpus": list(t.affinity),
                "want": a.cpus.format() if a else None, "want_cpus": list(a.cpus) if a else None,
                "rule": a.rule if a else None,
                "ok": ok,
            })
        vms.append({
            "pid": vm.pid, "starttime": vm.starttime, "name": vm.name, "uuid": vm.uuid,
            "user": vm.user, "uid": vm.uid, "exe": vm.exe,
            "policy": vp.policy or "unmanaged", "debug_threads": vm.debug_threads,
            "status": str(status), "reason": vp.reason, "pool": vp.allocation.pool if vp.allocation else None,
            "smp": {"cpus": vm.smp.cpus, "maxcpus": vm.smp.maxcpus, "sockets": vm.smp.sockets,
                    "dies": vm.smp.dies, "clusters": vm.smp.clusters, "cores": vm.smp.cores,
                    "threads": vm.smp.threads},
            "problems": list(vp.problems),
            "threads": threads,
        })
    return {"vms": vms, "vanished": found.vanished}


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "+"


def _cgroup_lines(vp: VMPlan, cgroups: Cgroups | None, affinity: dict[int, CpuSet] | None,
                  libvirt: OnDemand | None = None) -> list[str]:
    """For ps and plan: the owner that would pin, when it is not sched_setaffinity, and one line
    per cgroup that would refuse the plan."""
    if cgroups is None or vp.policy is None:
        return []
    vias: set[str] = set()
    blocked: dict[str, tuple[Confinement, list[tuple[Assignment, str]]]] = {}
    lv = (libvirt or OnDemand()).owns(vp.vm)
    for a in vp.assignments:
        p = _prediction(cgroups, a, affinity.get(a.tid) if affinity is not None else None, lv)
        vias.add(p["via"])
        c = p["confinement"]
        if p["would"] and c is not None:
            blocked.setdefault(c.path, (c, []))[1].append((a, p["would"]))
    out = []
    if vias - {"sched_setaffinity"}:
        out.append(f"  pinned via {', '.join(sorted(vias))}")
    for c, items in blocked.values():
        what = ", ".join(f"{show(a.label)} -> {a.cpus}" for a, _ in items)
        out.append(f"  ! would fail ({items[0][1]}): {what}: confined by {c.describe()}; {c.hint()}")
    return out


def ps_table(plans: Sequence[VMPlan], cgroups: Cgroups | None = None, libvirt: OnDemand | None = None) -> str:
    libvirt = libvirt or OnDemand()
    out = []
    for vp in plans:
        vm = vp.vm
        s = vm.smp
        topo = f"{s.cpus} vCPUs ({s.sockets}s/{s.cores}c/{s.threads}t)"
        status = f" ({vp.status})" if vp.status not in ("pinned", "unmanaged") else ""
        out.append(_cut(f"{show(vm.display_name)}  pid {vm.pid}  user {show(vm.user or vm.uid)}  "
                        f"policy {show(vp.policy or 'unmanaged')}{status}  {topo}", 80))
        if vp.reason:
            out.append(_cut(f"  {vp.status}: {vp.reason}", 80))
        out.append(f"  {'TID':>7}  {'ROLE':<12} {'PSR':>3}  {'AFFINITY':<16} {'WANT':<16} COMM")
        for t in vm.threads:
            a = vp.wanted(t.tid)
            want = a.cpus.format() if a else "-"
            mark = " " if a is None or a.cpus == t.affinity else "!"
            out.append(f" {mark}{t.tid:>7}  {_cut(show(t.label), 12):<12} {t.processor:>3}  "
                       f"{_cut(t.affinity.format(), 16):<16} {_cut(want, 16):<16} {_cut(show(t.comm), 15)}".rstrip())
        for p in vp.problems:
            out.append(_cut(f"  ! {p}", 80))
        out += _cgroup_lines(vp, cgroups, {t.tid: t.affinity for t in vm.threads}, libvirt)
        out.append("")
    if not plans:
        out.append(NO_VMS_HINT)
    return printable_lines("\n".join(out).rstrip("\n") + "\n")


def _hint_unreadable(found: Scan) -> None:
    # As root, an unreadable exe is some special process (a sandbox's init), not a VM.
    if found.unreadable and os.geteuid() != 0:
        print(f"vcpud: {found.unreadable} processes could not be inspected; run as root to see every VM",
              file=sys.stderr)


def _live(args: argparse.Namespace, cfg: Config) -> tuple[Scan, list[VM]] | None:
    """This host's VMs, oldest first (the order in which they claim pooled CPUs); None: --proc
    cannot be read (printed)."""
    procfs = _procfs(args)
    if procfs is None:
        return None
    from .placement import arrival_order

    found = scan(procfs, cfg.executables)
    _hint_unreadable(found)
    return found, arrival_order(found.vms)


def cmd_ps(args: argparse.Namespace) -> int:
    setup = _setup(args, required=False)
    if isinstance(setup, int):
        return setup
    topo, cfg = setup
    online = topo.online
    live = _live(args, cfg)
    if live is None:
        return EXIT_FAILED
    found, vms = live
    from .holdings import FileStore, load_priors
    from .placement import plan

    p = plan(cfg, vms, online, topo, load_priors(cfg, FileStore(cfg.state_file), vms, online, topo))
    cg = _cgroups(args, once=True)
    if args.json:
        import json

        print(json.dumps(ps_json(found, p.vms, cg, OnDemand()), indent=2))
    else:
        _emit(ps_table(p.vms, cg, OnDemand()))
    return EXIT_OK


# --- plan ---------------------------------------------------------------------------
def plan_json(vp: VMPlan, cfg: Config, isolated: CpuSet, cgroups: Cgroups | None = None,
              libvirt: OnDemand | None = None) -> dict[str, Any]:
    from .discovery import Role, Thread
    from .placement import PoolDecision, assign, vcpu_count

    vm = vp.vm
    policy = cfg.select(vm) if vp.policy else None
    vcpus: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    emulator: list[int] = []
    if policy is not None:
        decision = PoolDecision(allocation=vp.allocation)
        for i in range(vcpu_count(vm)):
            r = assign(Thread(tid=0, comm="", role=Role.VCPU, vcpu=i), vm, policy, cfg, decision, isolated)
            if r is not None:
                vcpus[str(i)] = list(r[1])
                reasons[str(i)] = vp.allocation.reasons[i] if vp.allocation and i < len(vp.allocation.reasons) \
                    else r[0]
        r = assign(Thread(tid=vm.pid, comm="", role=Role.EMULATOR), vm, policy, cfg, decision, isolated)
        if r is not None:
            emulator = list(r[1])
            reasons["emulator"] = r[0]
    threads: dict[str, dict[str, Any]] = {}
    if cgroups is not None and vm.pid > 0:
        affinity = {t.tid: t.affinity for t in vm.threads}
        lv = (libvirt or OnDemand()).owns(vm)
        for a in vp.assignments:
            p = _prediction(cgroups, a, affinity.get(a.tid), lv)
            p.pop("confinement")
            threads[str(a.tid)] = {"label": a.label, "cpus": list(a.cpus), **p}
    return {
        "name": vm.display_name, "pid": vm.pid if vm.pid > 0 else None, "imagined": vm.pid < 0,
        "threads": threads,
        "policy": vp.policy, "status": vp.status, "reason": vp.reason,
        "pool": vp.allocation.pool if vp.allocation else None,
        "vcpus": vcpus, "emulator": emulator, "reasons": reasons,
    }


def _vcpu_map(vcpus: dict[str, list[int]]) -> str:
    """"0:5 1:37" for dedicated CPUs; runs of vCPUs with the same CPUs folded: "0-39:0-1"."""
    runs: list[list[Any]] = []
    for i, cpus in ((int(k), CpuSet.of(v).format()) for k, v in vcpus.items()):
        if runs and runs[-1][1] == i - 1 and runs[-1][2] == cpus:
            runs[-1][1] = i
        else:
            runs.append([i, i, cpus])
    return " ".join(f"{a}:{c}" if a == b else f"{a}-{b}:{c}" for a, b, c in runs) or "-"


def cmd_plan(args: argparse.Namespace) -> int:
    setup = _setup(args, required=True)
    if isinstance(setup, int):
        return setup
    topo, cfg = setup
    online = topo.online
    try:
        imagined = what_if_vms(args.what_if or [])
    except ValueError as e:
        print(f"vcpud: {e}", file=sys.stderr)
        return EXIT_CONFIG
    live: list[VM] = []
    if os.path.realpath(args.sysroot) == "/":
        found = _live(args, cfg)
        if found is None:
            return EXIT_FAILED
        live = found[1]
    else:
        print(printable_lines(f"vcpud: topology from {args.sysroot}: this host's VMs are not part of the plan"),
              file=sys.stderr)
    from .placement import plan
    from .pools import free_cpus

    if live:
        from .holdings import FileStore, load_priors

        prior = load_priors(cfg, FileStore(cfg.state_file), live, online, topo)
    else:
        prior = {}
    p = plan(cfg, live + imagined, online, topo, prior)
    cg = _cgroups(args, once=True) if live else None
    libvirt = OnDemand()
    rows = [plan_json(vp, cfg, topo.isolated, cg, libvirt) for vp in p.vms]
    free = free_cpus(cfg.pools, topo, list(p.allocations.values()))
    pools = {name: {"cpus": list(spec.cpus & online), "exclusive": spec.exclusive,
                    **({"free": list(free.get(name, CpuSet()))} if spec.exclusive else {})}
             for name, spec in cfg.pools.items()}
    if args.json:
        import json

        print(json.dumps({"vms": rows, "pools": pools}, indent=1))
        return EXIT_OK
    out: list[str] = []
    for vp, r in zip(p.vms, rows, strict=True):
        vc = _vcpu_map(r["vcpus"])
        head = f"{show(r['name']):<16} {show(r['policy'] or '-'):<12} {r['status']:<9} vcpus {vc}"
        if r["emulator"]:
            head += f"  emulator {CpuSet.of(r['emulator']).format()}"
        out.append(head)
        if r["reason"]:
            out.append(f"    {r['reason']}")
        if args.verbose:
            out += [f"    {k}: {why}" for k, why in r["reasons"].items()]
        if cg is not None and vp.vm.pid > 0:
            out += ["  " + line for line in _cgroup_lines(vp, cg, {t.tid: t.affinity for t in vp.vm.threads},
                                                          libvirt)]
    for name, spec in cfg.pools.items():
        extra = ""
        if spec.exclusive:
            left = free.get(name, CpuSet())
            extra = f", {len(left)} free ({left.format() or 'none'})"
        out.append(f"pool {name}: {len(spec.cpus & online)} CPUs{' exclusive' if spec.exclusive else ''}{extra}")
    _emit("".join(line + "\n" for line in out))
    return EXIT_OK


# --- run ----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    # What writing the state file takes, imported when the service starts, not at its first
    # save hours later (vcpud.state imports them when it needs them, for one-shot commands).
    import json  # noqa: F401
    import tempfile  # noqa: F401

    from .config import DEFAULT_CONFIG_PATH, ConfigError
    from .daemon import Daemon
    from .sdnotify import setup_logging

    setup_logging(args.log_level)
    d = Daemon(args.config or DEFAULT_CONFIG_PATH, sysroot=Path(args.sysroot), proc=Path(args.proc),
               use_udev=not args.no_udev, use_connector=not args.no_connector)
    d.metrics_listen = args.metrics_listen
    try:
        d.load()
    except ConfigError as e:
        for issue in e.issues:
            log.error("%s", issue)
        return EXIT_CONFIG
    except OSError as e:
        log.error("cannot read the CPU topology under %s: %s", args.sysroot, e)
        return EXIT_FAILED
    return d.run()


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo  # vcpud.demo: the guests, the daemon, the steps

    return demo(args.pace)


# --- main ---------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, as wide as shutil.get_terminal_size() says (COLUMNS, else the terminal, else
    80) without importing shutil, and with it bz2 and lzma, for every command line: argparse
    makes a formatter for each argument it is given."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            width = _terminal_columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns or 80


def _listen_arg(text: str) -> str:
    """--metrics-listen: the config's listen grammar; "off" or the address written out."""
    from .config import ListenAddressError, parse_listen

    try:
        return str(parse_listen(text))
    except ListenAddressError as e:
        raise argparse.ArgumentTypeError(f"bad listen address {_short(text)}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vcpud", description="CPU placement for QEMU/KVM guests.",
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--version", action="version", version=f"vcpud {__version__}")
    levels = ["debug", "info", "warning", "error"]
    ap.add_argument("--log-level", default=None, choices=levels, help="default: info for run, else warning")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, formatter_class=_HelpFormatter)

    def common(p: argparse.ArgumentParser, config: bool = True) -> None:
        if config:
            p.add_argument("--config", "-c", type=Path, help="config file (default /etc/vcpud/vcpud.yaml)")
        p.add_argument("--sysroot", default="/", help="root of the sysfs tree to read the topology from")
        p.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
        p.add_argument("--cgroup-root", default="/sys/fs/cgroup", help=argparse.SUPPRESS)
        p.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels)

    p = command("topology", "show the host's CPU topology")
    common(p, config=False)
    p.add_argument("--parse", action="store_true", help="print what `lscpu --parse` prints")
    p.add_argument("--physical", action="store_true", help="with --parse: kernel IDs, like `lscpu --parse --physical`")
    p.add_argument("--json", action="store_true", help="the whole model as JSON")
    p.set_defaults(func=cmd_topology)

    p = command("check", "validate the configuration against this host")
    common(p)
    p.set_defaults(func=cmd_check)

    p = command("apply", "pin every VM's threads once, as the policies say")
    common(p)
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would change, change nothing")
    p.set_defaults(func=cmd_apply)

    p = command("plan", "the placement for live and imagined VMs, with its reasons")
    common(p)
    p.add_argument("--what-if", action="append", metavar="NAME:VCPUS[:THREADS]",
                   help="an imagined VM, placed after the live ones (repeatable)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true", help="why each CPU was chosen")
    p.set_defaults(func=cmd_plan)

    p = command("run", "the service: watch VMs and keep them pinned (foreground)")
    common(p)
    p.add_argument("--metrics-listen", metavar="HOST:PORT", type=_listen_arg,
                   help="serve Prometheus metrics there: HOST:PORT, [IPV6]:PORT (0.0.0.0:PORT or [::]:PORT for "
                        "every interface) or off; default from config, 127.0.0.1:9474")
    p.add_argument("--no-udev", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-connector", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = command("demo", "start three tiny guests and show vcpud pinning them (about 30 s, as root)")
    p.add_argument("--pace", type=float, default=3.0, metavar="SECONDS",
                   help="pause for the reader between steps (default 3; 0: none)")
    p.set_defaults(func=cmd_demo)

    p = command("ps", "list VMs, their threads, roles and affinities")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) > MAX_ARGS:
        print(f"vcpud: error: {len(argv)} arguments are too many (at most {MAX_ARGS}; "
              f"at most {MAX_WHAT_IF} --what-if VMs)", file=sys.stderr)
        return EXIT_CONFIG
    if argv[:1] == ["__complete"]:  # a question from packaging/completion/, not a command
        from .completion import main as complete
        return complete(argv[1:])
    args = build_parser().parse_args(argv)
    args.log_level = args.log_level or ("info" if args.command == "run" else "warning")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="vcpud: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
