"""Reading a new configuration off the event loop, so that a reload never stalls pinning.

SIGHUP starts a thread that reads the topology and parses the file; the loop keeps serving
events and picks the result up when the thread wakes it. Whatever the file holds, the result
is a loaded configuration or a failure to report: never an exception in the loop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config, ConfigError, ConfigIssue, load_config
from .topology import Topology, read_topology

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Loaded:
    topology: Topology
    config: Config


@dataclass(frozen=True, slots=True)
class Failed:
    why: str                              # one line for the status
    issues: tuple[ConfigIssue, ...] = ()  # FILE:LINE:COL each, for the log


class BackgroundLoader:
    def __init__(self, path: Path, sysroot: Path, wake: Callable[[], None]) -> None:
        self.path = path
        self.sysroot = sysroot
        self.wake = wake
        self._thread: threading.Thread | None = None
        self._result: Loaded | Failed | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Begin reading (the caller checks ``busy`` first)."""
        self._thread = threading.Thread(target=self._run, name="vcpud-reload", daemon=True)
        self._thread.start()

    def result(self) -> Loaded | Failed | None:
        """The finished read, once; None while it runs or when none was started."""
        with self._lock:
            r, self._result = self._result, None
        if r is not None and self._thread is not None:
            self._thread.join()
            self._thread = None
        return r

    def _run(self) -> None:
        r: Loaded | Failed
        try:
            topology = read_topology(self.sysroot)
            r = Loaded(topology, load_config(self.path, online=topology.online))
        except ConfigError as e:
            r = Failed(f"{len(e.issues)} errors, see log", e.issues)
        except OSError as e:
            r = Failed(str(e))
        except Exception as e:  # a reload must never end the daemon
            log.error("reload: unexpected error reading %s", self.path, exc_info=True)
            r = Failed(f"internal error: {e!r}")
        with self._lock:
            self._result = r
        self.wake()
