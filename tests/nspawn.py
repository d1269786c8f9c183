"""Boot a real systemd in a throw-away systemd-nspawn container of this very host, for tests.

The machine the tests run on does not run systemd as PID 1, so a unit file can only be tried
for real inside a container that boots one:

    systemd-nspawn -D / --volatile=yes --keep-unit --register=no -b systemd.firstboot=off

How it works:

* ``--volatile=yes``: the container's root is a fresh tmpfs and only the host's /usr is
  mounted into it (read-only); /etc, /var, /root... start empty (systemd fills /etc from
  its presets on the first boot) and vanish with the container. Anything else the test
  needs is bound in: the repository (read-only, same path), the Python prefix the venv's
  interpreter lives in (e.g. pyenv under /root/.pyenv, read-only, same path), /dev/kvm.
* Or (:class:`Root`) the host's whole root, /usr, /etc and /var included, under an overlayfs
  whose upper layer is a tmpfs, made in a private mount namespace (nspawn's own
  ``--volatile=overlay`` refuses ``-D /``): everything is writable and thrown away with the
  container. dpkg sees the host's package database, so ``apt-get install ./some.deb`` inside
  resolves its dependencies from what the host has installed, without a network, and the host
  never changes. The host's /etc brings its enabled units too: ``tmpfs=["/etc/systemd/system"]``
  boots without them (a package's own enablement links land there).
* ``--keep-unit --register=no``: the host has no systemd/machined to register with, so
  ``machinectl`` cannot reach the container and ``--property=`` (e.g. DeviceAllow=) has no
  effect. The host's device cgroup does not confine us, so a bound /dev/kvm just works.
* Capabilities: nspawn keeps CAP_SYS_NICE and CAP_SYS_PTRACE in the container's bounding
  set but drops CAP_NET_ADMIN unless it gets a private network; vcpud needs the proc
  connector in the *initial* network namespace, so the container shares the host's network
  and gets ``--capability=CAP_NET_ADMIN`` instead.
* Commands run inside with ``nsenter --target <container PID 1> --all``: PID 1 is the child
  of the nspawn process whose NSpid (as this host sees it) ends in 1 and that has exec'd
  systemd. Files are put in place through ``/proc/<PID 1>/root/...`` from the host.
* Booted = ``systemctl is-system-running --wait`` answers running (or degraded).
* The volatile /etc has no ld.so.cache, without which ctypes.util.find_library() (pyudev
  loading libudev) finds nothing: the host's is copied in once booted (its paths are in
  /usr, which is the host's).
* Shut down: ``systemctl poweroff`` inside; if the container is not gone in time, SIGKILL
  to its PID 1 (which kills every process in its PID namespace), then to nspawn.

PIDs differ inside and outside: :meth:`Container.host_pid` maps a container PID to the
host's through the NSpid lines of the host's /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Sequence

NSPAWN = shutil.which("systemd-nspawn")
NSENTER = shutil.which("nsenter")
UNSHARE = shutil.which("unshare")

# Environment for commands run inside: nothing of the test's own environment leaks in.
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}


# Host files a volatile container lacks and the tests need (see the module docstring).
COPY_FROM_HOST = ("/etc/ld.so.cache",)


class Root(enum.Enum):
    """What the container's root file system is (see the module docstring)."""

    VOLATILE = "volatile"  # nspawn --volatile=yes: a fresh tmpfs with the host's /usr read-only
    OVERLAY = "overlay"  # the host's whole root under an overlayfs with a tmpfs upper layer


# Run as `sh -c OVERLAY_SCRIPT sh DIR NSPAWN-ARGV...` in a private mount namespace (unshare):
# the tmpfs and the overlay exist only there and vanish with it. nspawn refuses
# `-D / --volatile=overlay` ("Spawning container on root directory is not supported"), so the
# overlay is made here, the same way: the host's root file system (without what is mounted
# below it: /proc, /sys... nspawn mounts its own) as the read-only lower layer.
OVERLAY_SCRIPT = """set -e
d=$1; shift
mount -t tmpfs -o mode=0755 vcpud-test "$d"
mkdir "$d/upper" "$d/work" "$d/root"
mount -t overlay -o lowerdir=/,upperdir="$d/upper",workdir="$d/work" vcpud-test "$d/root"
exec "$@"
"""


class ContainerError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM nspawn (an orderly poweroff) if the test process dies without stop()."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _nspid(pid: int | str) -> list[int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """One booted container. Use as a context manager, or call start()/stop() (stop is idempotent)."""

    def __init__(
        self,
        workdir: Path,
        *,
        bind_ro: Iterable[str | Path] = (),
        bind: Iterable[str | Path] = (),
        capabilities: Sequence[str] = ("CAP_NET_ADMIN",),
        boot_timeout: float = 90.0,
        root: Root = Root.VOLATILE,
        tmpfs: Iterable[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.machine = f"vcpud-test-{uuid.uuid4().hex[:8]}"
        self.bind_ro = [str(p) for p in bind_ro]
        self.bind = [str(p) for p in bind]
        self.capabilities = list(capabilities)
        self.boot_timeout = boot_timeout
        self.root = root
        self.tmpfs = list(tmpfs)
        self.log = self.workdir / f"{self.machine}.console.log"
        self.proc: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self._logf = None

    # --- lifecycle ------------------------------------------------------------------
    def argv(self) -> list[str]:
        if NSPAWN is None:
            raise ContainerError("systemd-nspawn not found (apt-get install systemd-container)")
        if self.root is Root.OVERLAY:
            if UNSHARE is None:
                raise ContainerError("unshare not found (util-linux)")
            overlay = self.workdir / "overlay"
            overlay.mkdir(mode=0o700, exist_ok=True)
            root = ["-D", str(overlay / "root")]
        else:
            root = ["-D", "/", "--volatile=yes"]
        argv = [
            NSPAWN, *root, "--keep-unit", "--register=no",
            f"--machine={self.machine}", "--console=read-only",
        ]
        if self.capabilities:
            argv.append("--capability=" + ",".join(self.capabilities))
        argv += [f"--bind-ro={p}" for p in self.bind_ro]
        argv += [f"--bind={p}" for p in self.bind]
        argv += [f"--tmpfs={p}" for p in self.tmpfs]
        argv += ["-b", "systemd.firstboot=off"]
        if self.root is Root.OVERLAY:
            assert UNSHARE is not None
            return [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", OVERLAY_SCRIPT, "sh",
                    str(overlay), *argv]
        return argv

    def start(self) -> "Container":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._logf = self.log.open("wb")
        # Own session: no terminal signal of ours reaches it (nspawn would act on ^C/^]).
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        try:
            self.init_pid = self._find_init(deadline=time.monotonic() + 30)
            self.wait_booted(deadline=time.monotonic() + self.boot_timeout)
            for f in COPY_FROM_HOST:
                if Path(f).is_file() and not self.path(f).exists():
                    self.copy_in(f, f)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_init(self, deadline: float) -> int:
        """The container's PID 1 among nspawn's descendants, once it runs systemd."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.console()}")
            todo, seen = [self.proc.pid], set()
            while todo:
                p = todo.pop()
                if p in seen:
                    continue
                seen.add(p)
                ns = _nspid(p)
                if p != self.proc.pid and ns and len(ns) >= 2 and ns[-1] == 1 and _comm(p) == "systemd":
                    return p
                todo += _children(p)
            if time.monotonic() > deadline:
                raise ContainerError(f"no systemd PID 1 under nspawn {self.proc.pid}:\n{self.console()}")
            time.sleep(0.05)

    def wait_booted(self, deadline: float) -> str:
        last = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContainerError(f"container did not boot: is-system-running said {last!r}\n{self.console()}")
            try:
                r = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
            except subprocess.TimeoutExpired:
                continue
            last = (r.stdout + r.stderr).strip()
            if r.stdout.strip() in ("running", "degraded"):
                return r.stdout.strip()
            # Before PID 1 listens on its socket systemctl fails at once: retry.
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """Power off; kill whatever is left. Safe to call more than once, or after a failed start."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                return
            if self.init_pid is not None:
                try:
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
                except (subprocess.TimeoutExpired, OSError):
                    pass
            else:
                # No init found: nspawn turns SIGTERM into an orderly shutdown.
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                pass
            # Killing PID 1 of a PID namespace kills every process in it.
            init = self.init_pid or next((p for p in _children(self.proc.pid) if (_nspid(p) or [0])[-1] == 1), None)
            if init is not None:
                try:
                    os.kill(init, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        finally:
            if self._logf is not None:
                self._logf.close()
                self._logf = None

    def __enter__(self) -> "Container":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def console(self, tail: int = 60) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    # --- inside -----------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the container (all its namespaces, its root) and capture it."""
        if self.init_pid is None:
            raise ContainerError("container not started")
        if NSENTER is None:
            raise ContainerError("nsenter not found (util-linux)")
        cmd = [NSENTER, f"--target={self.init_pid}", "--all", "--", *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=INSIDE_ENV,
                           input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise ContainerError(f"{' '.join(argv)} exited {r.returncode} inside {self.machine}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def path(self, inside: str | Path) -> Path:
        """The host path of a path inside the container (through /proc/PID/root)."""
        assert self.init_pid is not None
        return Path(f"/proc/{self.init_pid}/root") / str(inside).lstrip("/")

    def upper(self) -> Path:
        """Root.OVERLAY: the host path of the overlay's upper layer, i.e. everything the container has
        written since it started (deleted host files as whiteouts: character devices 0:0). Through
        nspawn's /proc/PID/root, which resolves in the private mount namespace the overlay is in."""
        assert self.root is Root.OVERLAY and self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root") / str(self.workdir / "overlay" / "upper").lstrip("/")

    def write_file(self, inside: str | Path, text: str, mode: int = 0o644) -> None:
        p = self.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        tmp.replace(p)

    def copy_in(self, host: str | Path, inside: str | Path, mode: int = 0o644) -> None:
        p = self.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(Path(host).read_bytes())
        tmp.chmod(mode)
        tmp.replace(p)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.systemctl("show", unit, *[f"--property={p}" for p in props])
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, unit: str) -> list[dict]:
        r = self.run("journalctl", "--no-pager", "-o", "json", "-u", unit, check=False)
        out = []
        for line in r.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def host_pid(self, pid: int) -> int:
        """The host's PID of the container's process `pid`."""
        assert self.init_pid is not None
        if pid == 1:
            return self.init_pid
        ns = os.stat(f"/proc/{self.init_pid}/ns/pid")
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            ids = _nspid(name)
            if not ids or len(ids) < 2 or ids[-1] != pid:
                continue
            try:
                st = os.stat(f"/proc/{name}/ns/pid")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
                return int(name)
        raise ContainerError(f"no process {pid} in container {self.machine}")


@contextlib.contextmanager
def booted(c: Container) -> Iterator[Container]:
    """``c`` started, and stopped (and checked gone) however the block ends."""
    c.start()
    try:
        yield c
    finally:
        c.stop()
        assert c.proc is not None and c.proc.poll() is not None, "container still running after stop()"
