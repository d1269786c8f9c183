"""Start-up cost of the one-shot commands: interpreter start, imports and the command, as a shell sees it.

Run: python3 -m tests.benchmarks.bench_startup [--rounds N] [--code DIR ...] [--no-pyc] [--guests N [--smp S]]

Each measurement is a fresh ``python -m vcpud ...`` (or ``python -c ...``) process, timed from the
parent around fork, exec and exit; the cases take turns, ``--rounds`` times. Printed in ms: the
median and the minimum wall time, the median less that of ``python -c pass`` (what vcpud adds to
a bare interpreter), and the CPU time (user + system) of the child, which other work on the
machine disturbs less than the wall time. Then ``import vcpud.cli`` timed inside the interpreter, the
heavy modules an ``apply --dry-run`` leaves in ``sys.modules``, and the imports that cost the most
by ``-X importtime`` (self time, and the modules vcpud.cli imports directly, with what they pull in).

``--code DIR``: the vcpud of that checkout's root (``git archive main | tar -x -C /tmp/old``); given
more than once, the checkouts take turns in every round, so that they share the machine's moods.
Byte code: by default every run reads compiled modules from a private ``PYTHONPYCACHEPREFIX`` that
a first run fills, as an installed package has them; ``--no-pyc`` sets ``PYTHONDONTWRITEBYTECODE=1``
without a prefix, so that vcpud is compiled from source in every run unless ``DIR/vcpud/__pycache__``
holds its byte code (the development environment exports that variable).

The configs match no VM (``nomatch*``) unless ``--guests N`` starts N paused qemu guests (root; ``-smp
S``, default 2) named ``bstart-*``: then an ``apply`` case pins them (a first untimed run pins, the
timed ones find them right) and a ``ps`` case lists them. VMs other runs own are scanned but matched
by no policy. The state file is in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Modules a one-shot command has no use for (tests/test_cli.py checks them).
HEAVY = ("libvirt", "libvirtmod", "vcpud.libvirt", "prometheus_client", "pyudev", "systemd", "http.server",
         "socketserver", "selectors", "vcpud.daemon", "vcpud.metrics", "vcpud.sources", "vcpud.procconn",
         "vcpud.sdnotify", "vcpud.publisher", "vcpud.snapshot", "tempfile", "shutil", "difflib")

NOMATCH = """\
state_file: {state}
policies:
  - name: nomatch
    match: {{name: "nomatch*"}}
    affinity: "0"
"""
MATCH = """\
state_file: {state}
policies:
  - name: bstart
    match: {{name: "bstart-*"}}
    vcpus: "0-1"
    emulatorpin: "0"
"""

IN_PROCESS = "import time; t = time.perf_counter(); import vcpud.cli; print(time.perf_counter() - t)"
MODULES = ("import io, sys, contextlib; from vcpud import cli\n"
           "with contextlib.redirect_stdout(io.StringIO()): cli.main(sys.argv[1:])\n"
           f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules) or '-')")


def environment(code: Path, pyc: Path | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(code))
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if pyc is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env["PYTHONPYCACHEPREFIX"] = str(pyc)
    return env


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run of ``argv``."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, cwd=env["PYTHONPATH"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode not in (0, 1):
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)}: exit {p.returncode}: {err.read().decode(errors='replace')[-500:]}")
    return elapsed, usage.ru_utime + usage.ru_stime


def output(argv: list[str], env: dict[str, str]) -> str:
    # in the checkout: `python -m` and `-c` put the working directory first on sys.path
    return subprocess.run(argv, env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True,
                          check=True).stdout.strip()


def importtime(argv: list[str], env: dict[str, str]) -> list[tuple[int, int, int, str]]:
    """(self us, cumulative us, depth, module) for every import of ``argv`` run under -X importtime."""
    err = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, cwd=env["PYTHONPATH"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False).stderr
    out = []
    for line in err.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2, m.group(4)))
    return out


def report(code: Path, env: dict[str, str], cases: dict[str, list[str]], times: dict[str, list[float]],
           cpu: dict[str, list[float]], rounds: int, nomatch: Path) -> None:
    py = sys.executable
    print(f"vcpud from {code}, Python {sys.version.split()[0]}, byte code "
          f"{'cached' if 'PYTHONPYCACHEPREFIX' in env else 'compiled in every run'}; {rounds} rounds")
    base = statistics.median(times["python -c pass"])
    print(f"  {'wall time, ms':<44} {'median':>7} {'min':>7} {'-pass':>7} {'CPU median':>11} {'min':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<44} {med * 1e3:>7.1f} {min(ts) * 1e3:>7.1f} {(med - base) * 1e3:>7.1f} "
              f"{statistics.median(cpu[name]) * 1e3:>11.1f} {min(cpu[name]) * 1e3:>7.1f}")
    inproc = [float(output([py, "-c", IN_PROCESS], env)) for _ in range(rounds)]
    print(f"  import vcpud.cli in the interpreter: median {statistics.median(inproc) * 1e3:.1f} ms, "
          f"min {min(inproc) * 1e3:.1f} ms")
    print("  heavy modules after apply --dry-run:",
          output([py, "-c", MODULES, "apply", "--dry-run", "--config", str(nomatch)], env))
    imports = importtime(cases["apply --dry-run (no VM matches)"][1:], env)
    print("  apply --dry-run under -X importtime, the most self time:")
    for self_us, cum_us, _, name in sorted(imports, reverse=True)[:12]:
        print(f"    {self_us / 1e3:6.2f} ms self {cum_us / 1e3:6.2f} ms with its imports  {name}")
    # what vcpud.cli imports directly: the depth-1 lines right before it
    idx = next((i for i, row in enumerate(imports) if row[3] == "vcpud.cli"), None)
    if idx is None:
        return
    print(f"  vcpud.cli: {imports[idx][1] / 1e3:.2f} ms under -X importtime, of which what it imports directly:")
    children = []
    for _, cum, depth, name in reversed(imports[:idx]):
        if depth == 0:
            break
        if depth == 1:
            children.append((cum, name))
    for cum, name in sorted(children, reverse=True)[:10]:
        print(f"    {cum / 1e3:6.2f} ms  {name}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--code", type=Path, action="append",
                    help="checkout root whose vcpud to run (default: this one); repeat to compare, runs interleaved")
    ap.add_argument("--no-pyc", action="store_true", help="compile vcpud from source in every run")
    ap.add_argument("--guests", type=int, default=0, help="start this many paused qemu guests (root)")
    ap.add_argument("--smp", default="2", help="their -smp")
    args = ap.parse_args()
    codes = [c.resolve() for c in args.code or [REPO]]
    py = sys.executable
    guests = []
    with tempfile.TemporaryDirectory() as tmp:
        envs = [environment(code, None if args.no_pyc else Path(tmp, f"pycache{i}")) for i, code in enumerate(codes)]
        nomatch, match = Path(tmp, "nomatch.yaml"), Path(tmp, "match.yaml")
        nomatch.write_text(NOMATCH.format(state=Path(tmp, "state-nomatch.json")))
        match.write_text(MATCH.format(state=Path(tmp, "state-match.json")))
        vcpud = [py, "-m", "vcpud"]
        cases: dict[str, list[str]] = {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import vcpud.cli'": [py, "-c", "import vcpud.cli"],
            "apply --dry-run (no VM matches)": [*vcpud, "apply", "--dry-run", "--config", str(nomatch)],
            "check": [*vcpud, "check", "--config", str(nomatch)],
            "ps (no VM matches)": [*vcpud, "ps", "--config", str(nomatch)],
            "topology": [*vcpud, "topology"],
        }
        try:
            if args.guests:
                from tests.qemu import start_guest

                for i in range(args.guests):
                    guests.append(start_guest(Path(tmp), f"bstart-{i}", smp=args.smp))
                threads = sum(len(g.threads()) for g in guests)
                label = f"{args.guests} VMs / {threads} threads"
                cases[f"apply ({label})"] = [*vcpud, "apply", "--config", str(match)]
                cases[f"apply --dry-run ({label})"] = [*vcpud, "apply", "--dry-run", "--config", str(match)]
                cases[f"ps ({label})"] = [*vcpud, "ps", "--config", str(match)]
            for env in envs:
                for argv in cases.values():  # fill the byte-code cache; the first apply pins
                    timed(argv, env)
            times = [{name: [] for name in cases} for _ in codes]
            cpu = [{name: [] for name in cases} for _ in codes]
            for _ in range(args.rounds):
                for name, argv in cases.items():
                    for i, env in enumerate(envs):
                        wall, used = timed(argv, env)
                        times[i][name].append(wall)
                        cpu[i][name].append(used)
            qemus = output([py, "-c", "from vcpud.discovery import scan; from vcpud.procfs import Procfs; "
                                      "print(len(scan(Procfs()).vms))"], envs[-1])
            print(f"{qemus} qemu processes on the host, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
            for i, code in enumerate(codes):
                report(code, envs[i], cases, times[i], cpu[i], args.rounds, nomatch)
        finally:
            for g in guests:
                g.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
