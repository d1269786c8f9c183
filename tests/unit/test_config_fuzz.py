"""Fuzzing the config loader (issue 9): mutated and generated documents end in a Config or a
ConfigError whose every issue is FILE:LINE:COL, each in under 1 s of CPU and 200 MB.

Seeded (derandomize) and bounded: the whole module takes well under a minute on 2 CPUs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from vcpud.config import ConfigError, load_config, parse_config_text

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = (REPO / "config" / "vcpud.yaml").read_text()
SNIPPETS = [
    EXAMPLE,
    'pools:\n  dedicated: {cpus: "4-31", exclusive: true}\n  shared: {cpus: "2-3"}\npolicies:\n'
    '  - name: db\n    match: {name: "db-*", vcpus: "2-8", user: "0"}\n'
    "    vcpus: {pool: dedicated, smt: mirror, numa: single, cache: l3}\n"
    "    emulatorpin: {pool: shared}\n    on_exhausted: shared\n",
    "x-base: &base {match: {}, affinity: 0-3}\npolicies:\n  - <<: *base\n    name: a\n"
    '    vcpupin: {0: "0", 1: "1"}\n    iothreadpin: {io1: "0x3"}\nrescan_interval: 500ms\n',
]
POSITIONED = re.compile(r"[^\n]*:\d+:\d+: .")
HUGE = ["9" * 5000, "0x" + "f" * 5000, "0-" + "9" * 4400, ",".join(["0-8191"] * 3000), "1e99999",
        "0.0000001", "-1", "0" * 5000 + "1"]
TOKEN = re.compile(r"[0-9]+|[A-Za-z_]+")
BOMB = "x-a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"x-{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8)
)


def load(text: str) -> None:
    try:
        parse_config_text(text, "f.yaml", base_dir=None)
    except ConfigError as e:
        assert e.issues
        for issue in e.issues:
            assert POSITIONED.match(str(issue)), str(issue)
            assert issue.pos.line >= 1 and issue.pos.col >= 1


def check(text: str) -> None:
    """Loads, timed in CPU seconds (robust on a loaded machine), then again under tracemalloc
    (which slows Python down severalfold) for the peak memory."""
    t0 = time.process_time()
    load(text)
    cpu = time.process_time() - t0
    assert cpu < 1.0, f"{cpu:.2f}s of CPU"
    tracemalloc.start()
    try:
        load(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, f"{peak >> 20} MB"


@st.composite
def mutated(draw) -> str:
    lines = draw(st.sampled_from(SNIPPETS)).splitlines()
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["delete", "duplicate", "insert", "huge", "unicode", "nest", "alias", "tag", "swap"]))
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        line = lines[i] if lines else ""
        if op == "delete" and lines:
            del lines[i]
        elif op == "duplicate":
            lines[i:i] = [line] * draw(st.integers(1, 20))
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(SNIPPETS)).splitlines()[draw(st.integers(0, 5))])
        elif op == "huge":
            tokens = list(TOKEN.finditer(line))
            if tokens:
                m = tokens[draw(st.integers(0, len(tokens) - 1))]
                lines[i] = line[: m.start()] + draw(st.sampled_from(HUGE)) + line[m.end():]
        elif op == "unicode":
            pos = draw(st.integers(0, len(line)))
            lines[i] = line[:pos] + draw(st.text(max_size=8)) + line[pos:]
        elif op == "nest":
            depth = draw(st.integers(1, 2000))
            lines.insert(i, "x-n: " + "[" * depth + "]" * depth)
        elif op == "alias":
            lines[0:0] = BOMB.splitlines()
            lines.insert(len(BOMB.splitlines()) + i, draw(st.sampled_from(
                ["policies: *i", "x-z: *i", "executables: *h", "  - <<: *a", "pools: {p: {cpus: *a}}"])))
        elif op == "tag":
            tag = draw(st.sampled_from(["!!binary ", "!custom ", "!!python/object "]))
            lines[i] = line.replace(": ", ": " + tag, 1)
        elif op == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines) + "\n"


scalars = st.one_of(st.integers(-(10**30), 10**30).map(str), st.sampled_from(HUGE), st.text(max_size=20))
keys = st.sampled_from(["policies", "pools", "name", "match", "vcpus", "vcpupin", "affinity", "emulatorpin",
                        "iothreadpin", "cpus", "exclusive", "user", "rescan_interval", "metrics", "listen",
                        "include", "pool", "on_exhausted", "x-a", "<<"])
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                      max_leaves=30)


def to_yaml(v: object, indent: int = 0) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {to_yaml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(to_yaml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' if not str(v).isdigit() else str(v)


FUZZ = settings(derandomize=True, max_examples=int(os.environ.get("VCPUD_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=max(FUZZ.max_examples // 2, 1))  # each one is a whole config file
@given(mutated())
def test_mutated_documents(text):
    check(text)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_generated_documents(doc):
    check("".join(f"{k}: {to_yaml(v)}\n" for k, v in doc.items()))


@settings(derandomize=True, max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_text(text):
    check(text)


def test_includes_through_load_config(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    (tmp_path / "bomb.yaml").write_text(BOMB + "policies: *i\n")
    main = tmp_path / "vcpud.yaml"
    main.write_text("include: ['*.yaml']\n")
    t0 = time.process_time()
    try:
        load_config(main)
    except ConfigError as e:
        assert all(POSITIONED.match(str(i)) for i in e.issues)
        assert len(e.issues) == 3, str(e)
    assert time.process_time() - t0 < 1.0


NASTY = {
    "huge-number": f'policies:\n  - {{name: a, match: {{}}, affinity: "{"9" * 5000}"}}\n',
    "alias-bomb": BOMB + "policies: *i\n",
    "zero-include": "include: zero.yaml\n",
    "huge-vcpupin": f'policies:\n  - {{name: a, match: {{user: {"9" * 5000}}}, vcpupin: {{? {"9" * 5000} : "0"}}}}\n',
    "tiny-rescan": "rescan_interval: 0.0000001\n",
}


def test_cli_check_never_tracebacks(tmp_path):
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.yaml")
    paths = [tmp_path / "fifo.yaml", Path("/dev/zero")]
    for name, text in NASTY.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        paths.append(tmp_path / f"{name}.yaml")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for path in paths:
        p = subprocess.run([sys.executable, "-m", "vcpud", "check", "--config", str(path)], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 2, (path, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr
        assert p.stderr and all(POSITIONED.match(line) for line in p.stderr.splitlines()), p.stderr
