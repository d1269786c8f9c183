"""Command line: vcpud topology | check | apply | ps."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, ListenAddressError, load_config, parse_listen
from .cpuset import CpuSet
from .discovery import VM, Role, Scan, Smp, Thread, scan
from .engine import reconcile
from .holdings import FileStore, load_priors
from .pinning import OsAffinity, Outcome, PinResult
from .placement import PoolDecision, VMPlan, arrival_order, assign, plan, vcpu_count
from .pools import free_cpus
from .procfs import Procfs
from .topology import Topology, format_parse, format_summary, read_topology

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _setup(args: argparse.Namespace, required: bool) -> tuple[Topology, Config] | None:
    """This host's (or --sysroot's) topology and the config checked against it; None: errors printed."""
    try:
        topo = read_topology(Path(args.sysroot))
    except OSError as e:
        print(f"vcpud: cannot read the CPU topology under {args.sysroot}: {e}", file=sys.stderr)
        return None
    cfg = _load(args.config, topo.online, required=required)
    return None if cfg is None else (topo, cfg)


def _load(path: Path | None, online: CpuSet, required: bool) -> Config | None:
    """The config, or None (printed errors) when it does not load."""
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
    try:
        topo = read_topology(Path(args.sysroot))
    except (OSError, ValueError) as e:
        print(f"vcpud: cannot read topology under {args.sysroot}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(topo.to_json(), indent=2))
    elif args.parse or args.physical:
        sys.stdout.write(format_parse(topo, physical=args.physical))
    else:
        summary = format_summary(topo)
        sys.stdout.write(summary if summary.endswith("\n") else summary + "\n")
    return EXIT_OK


# --- check --------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    setup = _setup(args, required=True)
    if setup is None:
        return EXIT_CONFIG
    cfg = setup[1]
    print(f"{', '.join(cfg.files)}: OK, {len(cfg.policies)} policies, {len(cfg.pools)} pools")
    return EXIT_OK


# --- apply --------------------------------------------------------------------------
def _vm_line(v: VMPlan, results: Sequence[PinResult], dry_run: bool) -> list[str]:
    counts: dict[Outcome, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    failed = [r for r in results if not r.outcome.ok]
    head = f"{v.vm.display_name} (pid {v.vm.pid}) policy {v.policy}: "
    if dry_run:
        head += f"{counts.get(Outcome.PLANNED, 0)} to pin, {counts.get(Outcome.UNCHANGED, 0)} already right"
    else:
        head += f"{counts.get(Outcome.PINNED, 0)} pinned, {counts.get(Outcome.UNCHANGED, 0)} unchanged"
    head += f", {len(failed) + len(v.problems)} failed"
    if v.waiting:
        head += f"; {v.status}: {v.reason}"
    lines = [head]
    for r in results:
        a = r.assignment
        if r.outcome is Outcome.PLANNED:
            lines.append(f"  would pin tid {a.tid} {a.label}: {r.before} -> {a.cpus} ({a.rule})")
        elif not r.outcome.ok:
            lines.append(f"  FAILED tid {a.tid} {a.label} -> {a.cpus} ({a.rule}): {r.outcome}: {r.detail}")
    lines += [f"  FAILED {p}" for p in v.problems]
    return lines


def cmd_apply(args: argparse.Namespace) -> int:
    setup = _setup(args, required=True)
    if setup is None:
        return EXIT_CONFIG
    topo, cfg = setup
    online = topo.online
    report = reconcile(cfg, online, Procfs(Path(args.proc)), OsAffinity(Path(args.proc)), dry_run=args.dry_run,
                       topology=topo)
    _hint_unreadable(report.scan)
    for v in report.vms:
        if v.plan.policy is None:
            print(f"{v.plan.vm.display_name} (pid {v.plan.vm.pid}): no policy matches, left alone")
            continue
        print("\n".join(_vm_line(v.plan, v.results, args.dry_run)))
    if not report.vms:
        print("no VMs found")
    if report.scan.vanished:
        print(f"({report.scan.vanished} processes or threads vanished during the scan)")
    return EXIT_OK if report.ok else EXIT_FAILED


# --- ps -----------------------------------------------------------------------------
def ps_json(found: Scan, plans: Sequence[VMPlan]) -> dict[str, Any]:
    vms = []
    for vp in plans:
        vm = vp.vm
        threads = []
        for t in vm.threads:
            a = vp.wanted(t.tid)
            threads.append({
                "tid": t.tid, "comm": t.comm, "role": t.role.value, "vcpu": t.vcpu, "iothread": t.iothread,
                "label": t.label, "found_by": t.how, "psr": t.processor,
                "affinity": t.affinity.format(), "affinity_cpus": list(t.affinity),
                "want": a.cpus.format() if a else None, "want_cpus": list(a.cpus) if a else None,
                "rule": a.rule if a else None,
                "ok": (a is None) or (a.cpus == t.affinity),
            })
        vms.append({
            "pid": vm.pid, "starttime": vm.starttime, "name": vm.name, "uuid": vm.uuid,
            "user": vm.user, "uid": vm.uid, "exe": vm.exe,
            "policy": vp.policy or "unmanaged", "debug_threads": vm.debug_threads,
            "status": vp.status, "reason": vp.reason, "pool": vp.allocation.pool if vp.allocation else None,
            "smp": {"cpus": vm.smp.cpus, "maxcpus": vm.smp.maxcpus, "sockets": vm.smp.sockets,
                    "dies": vm.smp.dies, "clusters": vm.smp.clusters, "cores": vm.smp.cores,
                    "threads": vm.smp.threads},
            "problems": list(vp.problems),
            "threads": threads,
        })
    return {"vms": vms, "vanished": found.vanished}


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "+"


def ps_table(plans: Sequence[VMPlan]) -> str:
    out = []
    for vp in plans:
        vm = vp.vm
        s = vm.smp
        topo = f"{s.cpus} vCPUs ({s.sockets}s/{s.cores}c/{s.threads}t)"
        status = f" ({vp.status})" if vp.status not in ("pinned", "unmanaged") else ""
        out.append(_cut(f"{vm.display_name}  pid {vm.pid}  user {vm.user or vm.uid}  "
                        f"policy {vp.policy or 'unmanaged'}{status}  {topo}", 80))
        if vp.reason:
            out.append(_cut(f"  {vp.status}: {vp.reason}", 80))
        out.append(f"  {'TID':>7}  {'ROLE':<12} {'PSR':>3}  {'AFFINITY':<16} {'WANT':<16} COMM")
        for t in vm.threads:
            a = vp.wanted(t.tid)
            want = a.cpus.format() if a else "-"
            mark = " " if a is None or a.cpus == t.affinity else "!"
            out.append(f" {mark}{t.tid:>7}  {_cut(t.label, 12):<12} {t.processor:>3}  "
                       f"{_cut(t.affinity.format(), 16):<16} {_cut(want, 16):<16} {_cut(t.comm, 15)}".rstrip())
        for p in vp.problems:
            out.append(_cut(f"  ! {p}", 80))
        out.append("")
    if not plans:
        out.append("no VMs found")
    return "\n".join(out).rstrip("\n") + "\n"


def _hint_unreadable(found: Scan) -> None:
    # As root, an unreadable exe is some special process (a sandbox's init), not a VM.
    if found.unreadable and os.geteuid() != 0:
        print(f"vcpud: {found.unreadable} processes could not be inspected; run as root to see every VM",
              file=sys.stderr)


def _live(args: argparse.Namespace, cfg: Config) -> tuple[Scan, list[VM]]:
    """This host's VMs, oldest first (the order in which they claim pooled CPUs)."""
    found = scan(Procfs(Path(args.proc)), cfg.executables)
    _hint_unreadable(found)
    return found, arrival_order(found.vms)


def cmd_ps(args: argparse.Namespace) -> int:
    setup = _setup(args, required=False)
    if setup is None:
        return EXIT_CONFIG
    topo, cfg = setup
    online = topo.online
    found, vms = _live(args, cfg)
    p = plan(cfg, vms, online, topo, load_priors(cfg, FileStore(cfg.state_file), vms, online, topo))
    if args.json:
        print(json.dumps(ps_json(found, p.vms), indent=2))
    else:
        sys.stdout.write(ps_table(p.vms))
    return EXIT_OK


# --- plan ---------------------------------------------------------------------------
def what_if_vm(i: int, spec: str) -> VM:
    """An imagined VM from NAME:VCPUS[:THREADS] (THREADS = guest threads per core)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        raise ValueError(f"--what-if {spec!r}: expected NAME:VCPUS[:THREADS] with positive numbers")
    n = int(parts[1])
    t = int(parts[2]) if len(parts) == 3 else 1
    if n % t:
        raise ValueError(f"--what-if {spec!r}: {n} vCPUs are not whole cores of {t} threads")
    # Negative pids and start times after every live VM: imagined VMs arrive last, in order.
    return VM(pid=-(i + 1), starttime=2**62 + i, exe="", cmdline=(), uid=0, user=None, name=parts[0], uuid=None,
              smp=Smp(cpus=n, maxcpus=n, cores=n // t, threads=t), threads=(), debug_threads=True)


def plan_json(vp: VMPlan, cfg: Config, isolated: CpuSet) -> dict[str, Any]:
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
    return {
        "name": vm.display_name, "pid": vm.pid if vm.pid > 0 else None, "imagined": vm.pid < 0,
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
    if setup is None:
        return EXIT_CONFIG
    topo, cfg = setup
    online = topo.online
    try:
        imagined = [what_if_vm(i, spec) for i, spec in enumerate(args.what_if or [])]
    except ValueError as e:
        print(f"vcpud: {e}", file=sys.stderr)
        return EXIT_CONFIG
    live: list[VM] = []
    if os.path.realpath(args.sysroot) == "/":
        _, live = _live(args, cfg)
    else:
        print(f"vcpud: topology from {args.sysroot}: this host's VMs are not part of the plan", file=sys.stderr)
    prior = load_priors(cfg, FileStore(cfg.state_file), live, online, topo) if live else {}
    p = plan(cfg, live + imagined, online, topo, prior)
    rows = [plan_json(vp, cfg, topo.isolated) for vp in p.vms]
    free = free_cpus(cfg.pools, topo, list(p.allocations.values()))
    pools = {name: {"cpus": list(spec.cpus & online), "exclusive": spec.exclusive,
                    **({"free": list(free.get(name, CpuSet()))} if spec.exclusive else {})}
             for name, spec in cfg.pools.items()}
    if args.json:
        print(json.dumps({"vms": rows, "pools": pools}, indent=1))
        return EXIT_OK
    for r in rows:
        vc = _vcpu_map(r["vcpus"])
        head = f"{r['name']:<16} {r['policy'] or '-':<12} {r['status']:<9} vcpus {vc}"
        if r["emulator"]:
            head += f"  emulator {CpuSet.of(r['emulator']).format()}"
        print(head)
        if r["reason"]:
            print(f"    {r['reason']}")
        if args.verbose:
            for k, why in r["reasons"].items():
                print(f"    {k}: {why}")
    for name, spec in cfg.pools.items():
        extra = ""
        if spec.exclusive:
            left = free.get(name, CpuSet())
            extra = f", {len(left)} free ({left.format() or 'none'})"
        print(f"pool {name}: {len(spec.cpus & online)} CPUs{' exclusive' if spec.exclusive else ''}{extra}")
    return EXIT_OK


# --- run ----------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
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


# --- main ---------------------------------------------------------------------------
def _listen_arg(text: str) -> str:
    """--metrics-listen: the config's listen grammar; "off" or the address written out."""
    try:
        return str(parse_listen(text))
    except ListenAddressError as e:
        raise argparse.ArgumentTypeError(f"bad listen address {text!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vcpud", description="CPU placement for QEMU/KVM guests.")
    ap.add_argument("--version", action="version", version=f"vcpud {__version__}")
    levels = ["debug", "info", "warning", "error"]
    ap.add_argument("--log-level", default=None, choices=levels, help="default: info for run, else warning")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, config: bool = True) -> None:
        if config:
            p.add_argument("--config", "-c", type=Path, help="config file (default /etc/vcpud/vcpud.yaml)")
        p.add_argument("--sysroot", default="/", help="root of the sysfs tree to read the topology from")
        p.add_argument("--proc", default="/proc", help=argparse.SUPPRESS)
        p.add_argument("--log-level", default=argparse.SUPPRESS, choices=levels)

    p = sub.add_parser("topology", help="show the host's CPU topology")
    common(p, config=False)
    p.add_argument("--parse", action="store_true", help="print what `lscpu --parse` prints")
    p.add_argument("--physical", action="store_true", help="with --parse: kernel IDs, like `lscpu --parse --physical`")
    p.add_argument("--json", action="store_true", help="the whole model as JSON")
    p.set_defaults(func=cmd_topology)

    p = sub.add_parser("check", help="validate the configuration against this host")
    common(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("apply", help="pin every VM's threads once, as the policies say")
    common(p)
    p.add_argument("--dry-run", "-n", action="store_true", help="show what would change, change nothing")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("plan", help="the placement for live and imagined VMs, with its reasons")
    common(p)
    p.add_argument("--what-if", action="append", metavar="NAME:VCPUS[:THREADS]",
                   help="an imagined VM, placed after the live ones (repeatable)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verbose", "-v", action="store_true", help="why each CPU was chosen")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="the service: watch VMs and keep them pinned (foreground)")
    common(p)
    p.add_argument("--metrics-listen", metavar="HOST:PORT", type=_listen_arg,
                   help="serve Prometheus metrics there: HOST:PORT, [IPV6]:PORT (0.0.0.0:PORT or [::]:PORT for "
                        "every interface) or off; default from config, 127.0.0.1:9474")
    p.add_argument("--no-udev", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-connector", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ps", help="list VMs, their threads, roles and affinities")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ps)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
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
