"""Cost of loading hostile configs: small files that used to cost seconds and hundreds of MB.

Run: python3 -m tests.benchmarks.bench_config [--code DIR]   (no root needed)

Writes each case to a temporary file and loads it with ``vcpud.config.load_config`` in a
child process (so that each gets its own peak RSS), from this checkout or from ``--code DIR``
(another checkout's root, e.g. ``git archive`` of an older commit, to compare). Prints CPU
seconds, peak RSS, the outcome and the number of issues printed.

The cases (issue 9):
  pools-overlap  1,000 one-line pools that all overlap (20 KB)
  hex-mask       a hex mask of 300,000 digits
  ranges         "0-8191" ten thousand times in one CPU list
  policies       100,000 policies (6 MB)
  bignum         a 5,000-digit CPU number (past Python's int-conversion limit)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cases() -> dict[str, str]:
    pools = "pools:\n" + "".join(f"  p{i}: {{cpus: 0-7}}\n" for i in range(1000))
    hex_mask = f'policies:\n  - {{name: a, match: {{}}, affinity: "0x{"f" * 300_000}"}}\n'
    ranges = f'policies:\n  - {{name: a, match: {{}}, affinity: "{",".join(["0-8191"] * 10_000)}"}}\n'
    policies = "policies:\n" + "".join(
        f"  - {{name: pol{i:06d}, match: {{name: vm{i:06d}-*}}, affinity: 0-1, emulatorpin: '0'}}\n"
        for i in range(100_000)
    )
    bignum = f'policies:\n  - {{name: a, match: {{}}, affinity: "{"9" * 5000}"}}\n'
    return {"pools-overlap": pools, "hex-mask": hex_mask, "ranges": ranges, "policies": policies, "bignum": bignum}


CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from vcpud.config import ConfigError, load_config
t0 = time.process_time()
try:
    load_config(Path(sys.argv[1]))
    outcome, issues = "ok", 0
except ConfigError as e:
    outcome, issues = "ConfigError", len(e.issues)
    # what `vcpud check` prints
    lines = str(e).count("\n") + 1
except Exception as e:  # noqa: BLE001 - what the old code let escape
    outcome, issues = f"{type(e).__name__} (traceback)", 0
cpu = time.process_time() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"cpu": cpu, "rss_mb": rss, "outcome": outcome, "issues": issues}))
"""


def run_case(code: Path, path: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(code))
    p = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    if p.returncode != 0:
        return {"cpu": float("nan"), "rss_mb": float("nan"), "outcome": f"crashed: {p.stderr[-200:]}", "issues": 0}
    result: dict[str, object] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code", type=Path, default=REPO, help="checkout root whose vcpud to load (default: this one)")
    ap.add_argument("cases", nargs="*", help="case names (default: all)")
    args = ap.parse_args()
    chosen = cases()
    names = args.cases or list(chosen)
    print(f"vcpud from {args.code}")
    print(f"{'case':<14} {'size':>9} {'CPU s':>8} {'peak RSS':>9}  outcome")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp, f"{name}.yaml")
            path.write_text(chosen[name])
            r = run_case(args.code, path)
            size = path.stat().st_size
            print(f"{name:<14} {size:>9,} {r['cpu']:>8.2f} {r['rss_mb']:>7.0f}MB  {r['outcome']}, {r['issues']} issues")
    return 0


if __name__ == "__main__":
    sys.exit(main())
