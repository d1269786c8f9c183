"""packaging/rpm/vcpud.spec builds with `rpmbuild -bb` (Debian's rpm package) into a noarch rpm that
holds what the .deb holds, its config marked %config(noreplace) and the unit handled by systemd's
scriptlets.

Debian's rpm lacks Fedora's pyproject-rpm-macros and systemd-rpm-macros, so MACROS below stands in
for them, for this test only (the spec is the one Fedora would build): the wheel is built by pip
(with build isolation, which fetches setuptools >= 77 as Fedora's %pyproject_buildrequires would
list it: Debian 12's setuptools 66 cannot read pyproject.toml's PEP 639 license), installed by
Debian's python3 with the `installer` module into Fedora's layout, and the systemd scriptlets are
systemd's own macro definitions (macros.systemd, systemd 252) without their argument checks; docs
go to /usr/share/doc/NAME as redhat-rpm-config has it (rpm's default is NAME-VERSION).
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO, skip_or_fail
from vcpud import __version__

SPEC = REPO / "packaging" / "rpm" / "vcpud.spec"
PY = "/usr/bin/python3"
PYVER = subprocess.run([PY, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                       text=True).stdout.strip() if Path(PY).exists() else sysconfig.get_python_version()
SITELIB = f"/usr/lib/python{PYVER}/site-packages"

# Fedora's %{python3_sitelib} layout, by Debian's python3 and python3-installer: install_wheel.py
# BUILDROOT WHEELDIR.
INSTALL_WHEEL = f"""\
import glob, sys
from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile
lib = "/usr/lib/python{PYVER}/site-packages"
scheme = dict(purelib=lib, platlib=lib, headers="/usr/include/python{PYVER}", scripts="/usr/bin", data="/usr")
dest = SchemeDictionaryDestination(scheme, interpreter="{PY}", script_kind="posix", destdir=sys.argv[1])
with WheelFile.open(glob.glob(sys.argv[2] + "/*.whl")[0]) as wheel:
    install(wheel, dest, {{"INSTALLER": b"rpm"}})
"""


HELPER = "/usr/lib/systemd/systemd-update-helper"
# systemd's scriptlet macros: name -> (when, with $1 the number of versions left installed, what).
SYSTEMD_SCRIPTLETS = {
    "systemd_post": ("-eq 1", "install-system-units"),
    "systemd_preun": ("-eq 0", "remove-system-units"),
    "systemd_postun_with_restart": ("-ge 1", "mark-restart-system-units"),
}


def macros(top: Path) -> str:
    sitelib = "%{python3_sitelib}/%{1}"
    lines = [
        "%_unitdir /usr/lib/systemd/system",
        "%_docdir_fmt %%{NAME}",
        f"%python3 {PY}",
        f"%__python3 {PY}",
        f"%python3_sitelib {SITELIB}",
        "%_pyproject_wheeldir %{_builddir}/pyproject-wheeldir",
        "%pyproject_files %{_builddir}/pyproject-files",
        "%pyproject_buildrequires echo 'python3dist(setuptools) >= 77'",
        f"%pyproject_wheel {sys.executable} -m pip wheel --no-deps --disable-pip-version-check -q"
        " -w %{_pyproject_wheeldir} .",
        f"%pyproject_install {PY} {top}/install_wheel.py %{{buildroot}} %{{_pyproject_wheeldir}}",
        f"%pyproject_save_files(lL) (echo '{sitelib}/'; echo '{sitelib}-%{{version}}.dist-info/')"
        " > %{pyproject_files}",
        "%systemd_requires Requires(post): systemd",
    ]
    lines += [f"%{name}() if [ $1 {when} ] && [ -x {HELPER} ]; then {HELPER} {what} %{{?*}} || : ; fi"
              for name, (when, what) in SYSTEMD_SCRIPTLETS.items()]
    return "\n".join(lines) + "\n"


def _run(*argv: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def rpm(tmp_path_factory) -> Path:
    if shutil.which("rpmbuild") is None:
        skip_or_fail("rpmbuild not installed (Debian package rpm; contrib/setup-dev.sh installs it)")
    top = tmp_path_factory.mktemp("rpmbuild")
    (top / "SOURCES").mkdir()
    (top / "install_wheel.py").write_text(INSTALL_WHEEL)
    stand_ins = top / "macros.fedora-stand-ins"
    stand_ins.write_text(macros(top))
    tree = subprocess.run(["git", "stash", "create"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    _run("git", "archive", f"--prefix=vcpud-{__version__}/", "-o", str(top / "SOURCES" / f"vcpud-{__version__}.tar.gz"),
         tree or "HEAD", cwd=REPO)
    # --nodeps: Debian's rpm database is empty, no BuildRequires can be found installed in it.
    _run("rpmbuild", "-bb", "--nodeps", "--define", f"_topdir {top}",
         "--load", str(stand_ins), str(SPEC))
    built = list((top / "RPMS" / "noarch").glob("*.rpm"))
    assert [p.name for p in built] == [f"vcpud-{__version__}-1.noarch.rpm"], built
    return built[0]


def test_spec_version_is_the_code_version():
    versions = [ln.split()[1] for ln in SPEC.read_text().splitlines() if ln.startswith("Version:")]
    assert versions == [__version__]


def test_rpm_files(rpm: Path):
    files = set(_run("rpm", "-qlp", str(rpm)).stdout.split())
    expected = {
        "/usr/bin/vcpud",
        "/usr/lib/systemd/system/vcpud.service",
        "/etc/vcpud/vcpud.yaml",
        "/usr/share/bash-completion/completions/vcpud",
        "/usr/share/zsh/site-functions/_vcpud",
        "/usr/share/vcpud/grafana/vcpud-dashboard.json",
        "/usr/share/vcpud/prometheus/vcpud-alerts.yml",
        "/usr/share/doc/vcpud/README.md",
        "/usr/share/doc/vcpud/vcpud.yaml",
        f"{SITELIB}/vcpud/__init__.py",
        f"{SITELIB}/vcpud-{__version__}.dist-info/METADATA",
    }
    assert expected <= files, sorted(expected - files)
    for page in ("/usr/share/man/man8/vcpud.8", "/usr/share/man/man5/vcpud.yaml.5"):
        assert any(f.startswith(page) for f in files), f"{page} not in {sorted(files)}"
    modules = {f"{SITELIB}/{p.relative_to(REPO)}" for p in (REPO / "vcpud").rglob("*.py")}
    assert modules <= files, sorted(modules - files)
    assert _run("rpm", "-qcp", str(rpm)).stdout.split() == ["/etc/vcpud/vcpud.yaml"]


def test_rpm_scripts_and_requires(rpm: Path):
    scripts = _run("rpm", "-qp", "--scripts", str(rpm)).stdout
    for _, what in SYSTEMD_SCRIPTLETS.values():
        assert f"{HELPER} {what} vcpud.service" in scripts, scripts
    requires = _run("rpm", "-qp", "--requires", str(rpm)).stdout
    for dep in ("python3-pyudev", "python3-pyyaml", "python3-systemd", "python3-prometheus_client"):
        assert dep in requires.split(), requires
    payload = _cpio(subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, timeout=60, check=True).stdout)
    assert payload["/usr/bin/vcpud"][1].startswith(f"#!{PY}\n".encode()), payload["/usr/bin/vcpud"][1][:200]
    assert payload["/usr/bin/vcpud"][0] & 0o7777 == 0o755
    for path in ("/etc/vcpud/vcpud.yaml", "/usr/lib/systemd/system/vcpud.service"):
        assert payload[path][0] & 0o7777 == 0o644, path
    assert not [p for p, (mode, _) in payload.items() if mode & 0o002 and not stat.S_ISLNK(mode)], "world-writable"
    for path, src in (("/usr/lib/systemd/system/vcpud.service", "packaging/systemd/vcpud.service"),
                      ("/etc/vcpud/vcpud.yaml", "packaging/vcpud.yaml")):
        assert payload[path][1] == (REPO / src).read_bytes(), path


def _cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """path -> (mode, content) of an rpm's payload: a cpio archive in the "newc" format."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"not newc cpio at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name.removeprefix(".")] = (mode, data[pos:pos + size])
        pos = (pos + size + 3) & ~3
