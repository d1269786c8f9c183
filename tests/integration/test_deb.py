"""The Debian package, for real: `bash packaging/build-deb OUTDIR` builds it (once per module, from
scratch), lintian finds no error in it, and apt installs it in a throw-away container of this host
(tests/nspawn.py, Root.OVERLAY: the host's root under a tmpfs overlay, so the Debian python3-*
packages it depends on are there and apt needs no network). There the service starts from the
shipped config with Debian's own python3, reloads, pins a guest and says so in the journal, restarts
on an upgrade, stops on removal, and a purge leaves no file behind. The host never gets the package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO, skip_or_fail
from tests.inside import PIN_FIELDS, diagnostics, pinned_tids, require_container, start_guest, values, wait_affinity
from tests.nspawn import Container, Root, booted
from tests.qemu import QEMU, kvm_usable
from vcpud import __version__

BUILD_DEB = REPO / "packaging" / "build-deb"
DEB_NAME = f"vcpud_{__version__}_all.deb"
INSIDE_DEB = f"/var/tmp/{DEB_NAME}"
DEPENDS = {"python3-pyudev", "python3-yaml", "python3-systemd", "python3-prometheus-client"}
# What the package owns outside the Python package (path -> where it comes from in the repository).
SHIPPED = {
    "/lib/systemd/system/vcpud.service": "packaging/systemd/vcpud.service",
    "/etc/vcpud/vcpud.yaml": "packaging/vcpud.yaml",
    "/usr/share/vcpud/grafana/vcpud-dashboard.json": "contrib/grafana/vcpud-dashboard.json",
    "/usr/share/vcpud/prometheus/vcpud-alerts.yml": "contrib/prometheus/vcpud-alerts.yml",
    "/usr/share/bash-completion/completions/vcpud": "packaging/completion/vcpud",
    "/usr/share/zsh/vendor-completions/_vcpud": "packaging/completion/_vcpud",
    "/usr/share/doc/vcpud/examples/vcpud.yaml": "config/vcpud.yaml",
}
MAN_PAGES = ("/usr/share/man/man8/vcpud.8.gz", "/usr/share/man/man5/vcpud.yaml.5.gz")
# Where a package's files and its service's leftovers can be.
SCANNED = ("/etc", "/usr", "/var", "/opt", "/srv")
# Files that apt and dpkg themselves write while installing and purging anything: logs, apt's and
# debconf's caches, dpkg's database (its own files; the package's are in /var/lib/dpkg/info/),
# PackageKit's apt hook's transaction log; and man-db's cache of formatted pages (`systemd-analyze
# verify` runs man for Documentation=), which man-db's own daily job prunes. Not the package's.
BOOKKEEPING = re.compile(r"^/var/log/|^/var/cache/(apt|debconf|ldconfig)/|^/var/cache/man/|"
                         r"^/var/lib/dpkg/(status|available|\w+-old|triggers/\w+|lock[\w-]*)$|^/var/lib/apt/|"
                         r"^/var/lib/PackageKit/transactions\.db$")
# Run by Debian's python3 inside: where vcpud and prometheus_client come from, and vcpud's requirements
# (extras aside) with the versions installed.
PROBE = """\
import importlib.metadata as m, json, re, vcpud, prometheus_client
reqs = [r for r in m.requires("vcpud") if "extra ==" not in r]
print(json.dumps([vcpud.__file__, prometheus_client.__file__,
                  [(r, m.version(re.split("[ ;<>=!~]", r)[0])) for r in reqs]]))
"""
# In an interactive login bash (/etc/profile.d/bash_completion.sh loads bash-completion): what the
# on-demand loader finds for vcpud, then its completions of `vcpud <TAB>`.
COMPLETE = """\
_completion_loader vcpud
spec=$(complete -p vcpud) || exit 3
echo "$spec"
f=$(sed -n 's/.*-F \\([^ ]*\\) .*/\\1/p' <<<"$spec")
COMP_WORDS=(vcpud ""); COMP_CWORD=1; COMP_LINE="vcpud "; COMP_POINT=6
"$f" vcpud "" vcpud
printf '%s\\n' "${COMPREPLY[@]}"
"""
CONFIG = """\
# written by tests/integration/test_deb.py, as an admin would
rescan_interval: 500ms
include: policies.d/*.yaml
"""
DROPIN = """\
policies:
  - name: web
    match: {name: "web*"}
    affinity: "0"
"""


def _sh(*argv: str, timeout: float = 120, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


def _host_dpkg_status() -> str:
    return _sh("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", "vcpud").stdout


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """The package, built now by the documented command into a fresh directory."""
    if shutil.which("dpkg-buildpackage") is None and os.geteuid() != 0:
        skip_or_fail("dpkg-dev missing and not root to let packaging/build-deb install it")
    out = tmp_path_factory.mktemp("deb")
    t0 = time.monotonic()
    # umask 0: the package's modes must not depend on the builder's.
    r = _sh("bash", str(BUILD_DEB), str(out), timeout=900, umask=0)
    assert r.returncode == 0, f"build-deb exited {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}"
    print(f"\nbuild-deb: {time.monotonic() - t0:.1f} s")
    assert sorted(p.name for p in out.iterdir()) == [DEB_NAME], "build-deb left more than the .deb in OUTDIR"
    return out / DEB_NAME


def _contents(deb: Path) -> dict[str, str]:
    """path -> permissions, as dpkg-deb -c lists them."""
    r = _sh("dpkg-deb", "-c", str(deb))
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        perms, *_, path = line.split(maxsplit=5)
        out[path.removeprefix(".").rstrip("/") or "/"] = perms
    return out


def test_deb_fields_and_files(deb: Path, tmp_path: Path):
    fields = {k: _sh("dpkg-deb", "-f", str(deb), k).stdout.strip() for k in ("Version", "Depends", "Recommends")}
    assert fields["Version"] == __version__
    depends = {d.strip().split()[0] for d in fields["Depends"].split(",")}
    assert DEPENDS <= depends, fields["Depends"]
    assert not {d for d in depends if "pip" in d or "venv" in d}, depends
    assert "python3-libvirt" in fields["Recommends"]

    files = _contents(deb)
    assert "/usr/bin/vcpud" in files and files["/usr/bin/vcpud"] == "-rwxr-xr-x"
    for path in (*SHIPPED, *MAN_PAGES):
        assert path in files, f"{path} not in the package"
    # Every module of this checkout, in Debian's python3 path.
    modules = {f"/usr/lib/python3/dist-packages/{p.relative_to(REPO)}" for p in (REPO / "vcpud").rglob("*.py")}
    assert modules <= files.keys(), sorted(modules - files.keys())
    # Nothing world-writable, nothing setuid.
    assert not [p for p, m in files.items() if m[8] == "w" and m[0] != "l" or "s" in m[1:]], files

    root = tmp_path / "root"
    r = _sh("dpkg-deb", "-x", str(deb), str(root))
    assert r.returncode == 0, r.stderr
    for path, src in SHIPPED.items():
        assert (root / path.lstrip("/")).read_bytes() == (REPO / src).read_bytes(), path
    assert (root / "usr/bin/vcpud").read_text().startswith("#!/usr/bin/python3\n")

    ctl = _sh("dpkg-deb", "-I", str(deb), "conffiles")
    assert ctl.stdout.split() == ["/etc/vcpud/vcpud.yaml"], ctl.stdout + ctl.stderr


def test_lintian_finds_no_error(deb: Path):
    if shutil.which("lintian") is None:
        skip_or_fail("lintian not installed (contrib/setup-dev.sh installs it)")
    r = _sh("lintian", "--fail-on", "error", "--info", str(deb), timeout=300)
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("E:")]
    assert r.returncode == 0 and not errors, f"lintian exited {r.returncode}:\n{r.stdout}\n{r.stderr}"


# --- in a container ------------------------------------------------------------------------------
def _written(c: Container) -> tuple[set[str], set[str]]:
    """What the container has written under SCANNED: (paths there, host paths it deleted).

    From the overlay's upper layer, not a listing of the container's root: the lower layer is the
    live host, where others' tests come and go. /etc/systemd/system is a tmpfs of the container's own.
    """
    upper = c.upper()
    files, deleted = set(), set()
    for top in SCANNED:
        for dirpath, dirnames, filenames in os.walk(upper / top.lstrip("/")):
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st = p.lstat()
                inside = "/" + str(p.relative_to(upper))
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    deleted.add(inside)
                else:
                    files.add(inside)
    units = c.path("/etc/systemd/system")
    files |= {"/etc/systemd/system/" + str(p.relative_to(units)) for p in units.rglob("*")}
    return files, deleted


def _apt(c: Container, *args: str) -> subprocess.CompletedProcess:
    r = c.run("apt-get", "-y", "--no-install-recommends", "-o", "Dpkg::Use-Pty=0", *args, check=False, timeout=300)
    assert r.returncode == 0, f"apt-get {' '.join(args)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr}"
    return r


def _state(c: Container) -> tuple[str, str, str, str]:
    s = c.show("vcpud.service", "LoadState", "ActiveState", "SubState", "MainPID")
    return s["LoadState"], s["ActiveState"], s["SubState"], s["MainPID"]


@pytest.fixture
def container(tmp_path):
    require_container()
    with booted(Container(tmp_path / "nspawn", root=Root.OVERLAY, tmpfs=["/etc/systemd/system"],
                          bind=["/dev/kvm"] if kvm_usable() else [], capabilities=("CAP_NET_ADMIN",))) as c:
        yield c


@pytest.mark.qemu
def test_install_reload_upgrade_purge_in_container(deb: Path, container: Container):
    c = container
    if not Path(QEMU).exists():
        skip_or_fail(f"{QEMU} missing")
    host_before = _host_dpkg_status()
    t0 = time.monotonic()
    # This host's image carries Docker's policy-rc.d ("exit 101": never start services on install),
    # which a Debian host does not have: gone, in the container only, so postinst starts the unit.
    c.run("rm", "-f", "/usr/sbin/policy-rc.d")
    c.copy_in(deb, INSIDE_DEB)
    before, deleted_before = _written(c)

    # --- install: only this package is new (its dependencies are Debian's, already there), the
    # unit is enabled and running from the shipped config.
    r = _apt(c, "install", INSIDE_DEB)
    assert re.search(r"^0 upgraded, 1 newly installed, 0 to remove", r.stdout, re.M), r.stdout
    print(f"apt-get install: {time.monotonic() - t0:.1f} s")
    assert c.systemctl("is-enabled", "vcpud.service", check=False).stdout.strip() == "enabled"
    assert c.path("/etc/systemd/system/multi-user.target.wants/vcpud.service").is_symlink()
    load, active, sub, pid = _state(c)
    assert (active, sub) == ("active", "running"), f"{load} {active} {sub}\n{diagnostics(c)}"
    assert c.run("vcpud", "check", "--config", "/etc/vcpud/vcpud.yaml").returncode == 0
    assert c.run("vcpud", "--version").stdout.split()[-1] == __version__

    # Debian's python3 and python3-* packages, and metadata they satisfy (pip would refuse otherwise).
    probe = c.run("python3", "-c", PROBE)
    vcpud_file, prom_file, reqs = json.loads(probe.stdout)
    assert vcpud_file == "/usr/lib/python3/dist-packages/vcpud/__init__.py"
    assert c.run("dpkg", "-S", prom_file).stdout.startswith("python3-prometheus-client:")
    for req, version in reqs:
        assert Requirement(req).specifier.contains(version, prereleases=True), f"{req} but Debian has {version}"

    # Metrics, from Debian's prometheus-client. The container shares the host's network: first make
    # sure that the port is this vcpud's (a bind error is logged, not fatal), not another process's.
    serving = "serving metrics on http://127.0.0.1:9474/metrics"
    deadline = time.monotonic() + 10  # journald takes the line from the service's stream a little later
    while not any(e.get("MESSAGE") == serving for e in c.journal("vcpud.service")):
        assert time.monotonic() < deadline, f"vcpud in the container does not serve the metrics port\n{diagnostics(c)}"
        time.sleep(0.2)
    metrics = c.run("python3", "-c", "import urllib.request as u;"
                    "print(u.urlopen('http://127.0.0.1:9474/metrics', timeout=10).read().decode())").stdout
    assert f'vcpud_build_info{{version="{__version__}"}} 1.0' in metrics.splitlines(), metrics[:2000]
    assert re.search(r"^vcpud_vms(_by_status)?\{.*\} \d", metrics, re.M), metrics[:2000]

    # Man pages and completions, where man, an interactive login bash and zsh's compinit find them.
    assert c.run("man", "-w", "vcpud").stdout.strip() == MAN_PAGES[0]
    assert c.run("man", "-w", "5", "vcpud.yaml").stdout.strip() == MAN_PAGES[1]
    assert c.run("systemd-analyze", "verify", "vcpud.service").stderr == ""
    comp = c.run("bash", "-l", "-i", "-c", COMPLETE, check=False)
    lines = comp.stdout.splitlines()
    assert comp.returncode == 0 and lines and re.fullmatch(r"complete -F \S+ vcpud", lines[0]), \
        comp.stdout + comp.stderr
    assert {"run", "check"} <= set(lines[1:]), comp.stdout
    zsh = c.run("zsh", "-c", "autoload -U compinit && compinit -u -d /tmp/zcompdump && print -r -- $_comps[vcpud]")
    assert zsh.stdout.strip() == "_vcpud", zsh.stdout + zsh.stderr

    # --- reload: the admin's policy applies to a guest, in the same process.
    c.write_file("/etc/vcpud/vcpud.yaml", CONFIG)
    c.write_file("/etc/vcpud/policies.d/web.yaml", DROPIN)
    c.run("vcpud", "check")
    r = c.systemctl("reload", "vcpud.service", check=False)
    assert r.returncode == 0, f"reload failed: {r.stderr}\n{diagnostics(c)}"
    inner, guest = start_guest(c, "web1")
    threads = wait_affinity(guest, "0")
    assert all(cpus == "0" for _, cpus in threads.values()), f"not pinned: {threads}\n{diagnostics(c)}"
    assert _state(c)[1:] == ("active", "running", pid), f"restarted instead of reloaded\n{diagnostics(c)}"
    tids = {str(t) for t in threads}
    deadline = time.monotonic() + 10
    while not pinned_tids(c, "web1", "web", "0") >= tids and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pinned_tids(c, "web1", "web", "0") >= tids, f"journal misses pins of {tids}\n{diagnostics(c)}"
    for e in c.journal("vcpud.service"):
        if e.get("VM") == "web1" and e.get("POLICY") == "web" and e.get("CPUS") == "0":
            assert all(e.get(f) for f in PIN_FIELDS), e
            assert values(e, "VM_PID") == {str(inner)}, e

    # --- upgrade (a reinstall runs the same postinst `configure OLD-VERSION`): restarted on the
    # new code, the admin's config kept, the guest still pinned.
    _apt(c, "install", "--reinstall", INSIDE_DEB)
    load, active, sub, pid2 = _state(c)
    assert (active, sub) == ("active", "running") and pid2 != pid, f"not restarted: {pid} {pid2}\n{diagnostics(c)}"
    assert c.path("/etc/vcpud/vcpud.yaml").read_text() == CONFIG
    assert all(cpus == "0" for _, cpus in wait_affinity(guest, "0").values())

    # --- remove: stopped, unit gone, config and state kept.
    _apt(c, "remove", "vcpud")
    assert _state(c)[:2] in (("not-found", "inactive"), ("not-found", "failed")), _state(c)
    assert c.run("kill", "-0", pid2, check=False).returncode != 0, f"vcpud {pid2} still runs after remove"
    assert c.path("/etc/vcpud/vcpud.yaml").exists() and c.path("/var/lib/private/vcpud").is_dir()
    assert not c.path("/lib/systemd/system/vcpud.service").exists()

    # --- purge: nothing of it left, anywhere.
    _apt(c, "purge", "vcpud")
    assert c.run("dpkg-query", "-W", "vcpud", check=False).returncode != 0
    after, deleted = _written(c)
    # What the container wrote since, bookkeeping aside: only directories of the host's, copied up to
    # the upper layer because something was created in them (and is gone again).
    left = sorted(p for p in after - before if not BOOKKEEPING.match(p)
                  and not ((c.upper() / p.lstrip("/")).is_dir() and Path(p).is_dir()))
    assert not left, f"left after purge: {left}"
    # It deleted no host file but systemd's /var/lib/private, if empty (see debian/vcpud.postrm).
    assert deleted - deleted_before <= {"/var/lib/private"}, sorted(deleted - deleted_before)
    helper = c.run("find", "/var/lib/systemd/deb-systemd-helper-enabled", "-name", "*vcpud*").stdout
    assert not helper, f"deb-systemd-helper still remembers: {helper}"
    assert _host_dpkg_status() == host_before, "the host's dpkg database changed"
    print(f"container part: {time.monotonic() - t0:.1f} s")
