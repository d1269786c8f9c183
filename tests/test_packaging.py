"""packaging/systemd/vcpud.service: systemd-analyze verify is clean, the exposure is at most 2.0.

`systemd-analyze verify` also checks that ExecStart='s binary exists; /usr/bin/vcpud does
not on a development machine, so it checks a temporary copy whose ExecStart= points at this
venv's vcpud (the only line that differs). That the shipped file fails *only* for that reason
is checked too. Both work without systemd running as PID 1.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_vcpud, skip_or_fail

UNIT = REPO / "packaging" / "systemd" / "vcpud.service"
VCPUD = Path(sys.executable).parent / "vcpud"
MAX_EXPOSURE = 2.0
CAPS = {"CAP_SYS_NICE", "CAP_NET_ADMIN", "CAP_SYS_PTRACE"}


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        skip_or_fail("systemd-analyze not installed (Debian package systemd)")
    return exe


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def _with_execstart(tmp_path: Path, exe: Path) -> Path:
    text = UNIT.read_text()
    new, n = re.subn(r"(?m)^ExecStart=/usr/bin/vcpud ", f"ExecStart={exe} ", text)
    assert n == 1, "expected exactly one ExecStart=/usr/bin/vcpud line in the unit"
    d = tmp_path / "units"
    d.mkdir()
    copy = d / "vcpud.service"  # the unit's name is its file's name
    copy.write_text(new)
    return copy


def _verify(analyze: str, unit: Path) -> subprocess.CompletedProcess:
    # --man=no: Documentation=man:vcpud(8) is installed by the packages only; tests/integration/test_deb.py
    # verifies the installed unit with its man pages.
    return subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120)


def test_unit_verifies_clean(tmp_path):
    analyze = _analyze()
    if not VCPUD.exists():
        skip_or_fail(f"{VCPUD} missing: run contrib/setup-dev.sh")
    r = _verify(analyze, _with_execstart(tmp_path, VCPUD))
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, f"systemd-analyze verify exited {r.returncode}:\n{out}"


def test_shipped_unit_only_lacks_the_installed_binary():
    analyze = _analyze()
    r = _verify(analyze, UNIT)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    if Path("/usr/bin/vcpud").exists():
        assert r.returncode == 0 and not lines, "\n".join(lines)
    else:
        other = [ln for ln in lines if "/usr/bin/vcpud" not in ln]
        assert not other, ("systemd-analyze verify complains about more than the missing /usr/bin/vcpud:\n"
                           + "\n".join(other))


def test_security_exposure():
    analyze = _analyze()
    r = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=120)
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        skip_or_fail("systemd-analyze too old for security --offline (needs systemd >= 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, f"no exposure level in systemd-analyze security output (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    exposure = float(m.group(1))
    failing = [ln for ln in r.stdout.splitlines() if ln.startswith("✗")]
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n" + "\n".join(failing)


def test_unit_settings():
    s = _settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/bin/vcpud run --config /etc/vcpud/vcpud.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert "WatchdogSec" in s
    # Exactly the three capabilities, bounding and ambient alike.
    assert set(" ".join(s["CapabilityBoundingSet"]).split()) == CAPS
    assert set(" ".join(s["AmbientCapabilities"]).split()) == CAPS
    # The proc connector only works in the initial network namespace.
    assert s.get("PrivateNetwork", ["no"]) == ["no"]
    assert set(" ".join(s["RestrictAddressFamilies"]).split()) == {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"}
    assert s["StateDirectory"] == ["vcpud"] and s["ConfigurationDirectory"] == ["vcpud"]


@pytest.mark.parametrize("syscall", ["sched_setaffinity", "sched_getaffinity"])
def test_syscall_filter_allows(syscall, tmp_path):
    """The unit's SystemCallFilter= lines, replayed with systemd's rules, keep what vcpud calls."""
    analyze = _analyze()
    lines = _settings(UNIT.read_text())["SystemCallFilter"]

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        r = subprocess.run([analyze, "syscall-filter", "--no-pager", name], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        out: set[str] = set()
        for ln in r.stdout.splitlines()[1:]:
            ln = ln.strip()
            if ln and not ln.startswith("#"):
                out |= expand(ln) if ln.startswith("@") else {ln}
        return out

    # First line non-inverted: an allow list seeded with @default; later non-inverted lines
    # add, inverted ("~") lines remove.
    assert not lines[0].startswith("~")
    allowed = expand("@default")
    for line in lines:
        inverted = line.startswith("~")
        names = set().union(*(expand(n) for n in line.lstrip("~").split()))
        allowed = allowed - names if inverted else allowed | names
    assert syscall in allowed


def test_every_subpackage_is_packaged():
    """A wheel (and so a .deb) carries every package under vcpud/, not only the top one."""
    import tomllib

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    spec = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = set(find_packages(str(root), include=spec["include"]))
    on_disk = {str(p.parent.relative_to(root)).replace("/", ".") for p in (root / "vcpud").rglob("__init__.py")}
    assert on_disk >= {"vcpud", "vcpud.config", "vcpud.metrics"}
    assert found == on_disk


# --- the packages (tests/integration/test_deb.py and tests/test_rpm.py build them) ------------------------------
CONFFILE = REPO / "packaging" / "vcpud.yaml"


def test_debian_changelog_has_the_code_version():
    """packaging/build-deb refuses to build when they differ; this says so without building."""
    from vcpud import __version__

    first = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    m = re.fullmatch(r"vcpud \(([^)]+)\) \S+; urgency=\w+", first)
    assert m, first
    assert m.group(1) == __version__, f"debian/changelog {m.group(1)} != vcpud.__version__ {__version__}"


def test_shipped_config_passes_check_on_this_host():
    p = run_vcpud("check", "--config", str(CONFFILE))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 policies" in p.stdout, "the packaged config must move no VM on install"


def test_shipped_config_passes_check_on_every_dump(dump):
    name, root = dump
    online = (root / "sys/devices/system/cpu/online").read_text().strip()
    p = run_vcpud("check", "--config", str(CONFFILE), "--sysroot", str(root))
    assert p.returncode == 0, f"{name} (online {online}): {p.stdout}{p.stderr}"
