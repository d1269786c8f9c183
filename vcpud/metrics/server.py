"""The HTTP server of ``/metrics``: a daemon thread that renders each snapshot once, at the first
scrape that finds it, and serves the bytes; plus the ``HOST:PORT`` parser.

The event loop publishes an immutable snapshot after each reconcile (one reference swap). A scrape
reads that snapshot, never takes a lock the loop holds, and every family of one scrape comes from the
*same* snapshot object; the only /proc it reads is the vCPU time of the vCPUs the snapshot lists as
pinned to one CPU (activity.VcpuClock, at most once a second), so that an idle daemon nobody scrapes
reads nothing, and renders nothing. No process or GC collectors: the
service manager and node_exporter report the process; a scrape reports only the snapshot.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import socketserver
import threading
from dataclasses import replace
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ..config import listen as listen_grammar
from ..activity import VcpuClock
from ..snapshot import Snapshot
from .textformat import CONTENT_TYPE, exposition

log = logging.getLogger(__name__)

Source = Callable[[], "Snapshot | None"]


class ListenError(OSError, ValueError):
    """A ``HOST:PORT`` that does not parse (an OSError too, so callers handling bind errors see it)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[V6]:PORT"`` -> (host, port); the grammar is vcpud.config.listen's."""
    try:
        address = listen_grammar.parse_listen(listen)
    except listen_grammar.ListenAddressError as e:
        raise ListenError(f"bad listen address {listen!r}: {e}") from None
    if isinstance(address, str):
        raise ListenError(f"bad listen address {listen!r}: 'off' is no address to serve on")
    return address.host, address.port


class _Handler(WSGIRequestHandler):
    timeout = 10  # a client that connects and says nothing does not keep a thread forever

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    timeout = 0.0  # handle_request() is called when the socket is readable: it must never wait

    def __init__(self, address: tuple, family: int) -> None:
        self.address_family = family
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's FQDN (socket.getfqdn): never do that.
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("metrics: error serving %s", client_address, exc_info=True)


class MetricsServer:
    """Serves ``/metrics`` for ``source()`` from a daemon thread; ``start()`` then ``stop()``."""

    def __init__(self, source: Source, vcpu_clock: VcpuClock | None = None) -> None:
        self.source = source
        self.vcpu_clock = vcpu_clock
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stop = threading.Event()
        self._cache: tuple[object, int, bytes] | None = None  # (snapshot, vCPU time sample, body)
        self._render_lock = threading.Lock()
        self.address: tuple[str, int] | None = None

    def start(self, listen: str) -> tuple[str, int]:
        """Bind ``listen`` (port 0: any free port) and serve; returns the bound (host, port).

        Raises OSError (ListenError for an address that does not parse) and then serves nothing.
        """
        if self._httpd is not None:
            raise RuntimeError("MetricsServer already started")
        host, port = parse_listen(listen)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r}: {e}") from e
        family, _, _, _, sockaddr = infos[0]
        httpd = _Server(sockaddr, family)
        httpd.set_app(self._app)
        self._httpd = httpd
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="vcpud-metrics", daemon=True)
        self._thread.start()
        bound = httpd.socket.getsockname()
        self.address = (bound[0], bound[1])
        return self.address

    def stop(self) -> None:
        """Stop serving and close the listening socket (returns at once; idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()
        assert self._wake_w is not None and self._thread is not None
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(timeout=2)
        httpd.server_close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        self._thread = None

    def _serve(self) -> None:
        """Accept loop: sleeps until a client connects or stop()."""
        httpd, wake, stop = self._httpd, self._wake_r, self._stop
        assert httpd is not None and wake is not None
        with selectors.DefaultSelector() as sel:
            sel.register(httpd.socket, selectors.EVENT_READ)
            sel.register(wake, selectors.EVENT_READ)
            while not stop.is_set():
                for key, _ in sel.select():
                    if stop.is_set():
                        return
                    if key.fileobj is httpd.socket:
                        httpd.handle_request()

    def scrape(self) -> bytes:
        """The body of one scrape: the text format of ``source()``'s snapshot, rendered once per snapshot
        (and vCPU time sample).

        The daemon publishes a new snapshot object after each reconcile; until it does, scrapes
        reuse the bytes rendered for the current one (Prometheus HA pairs, a dashboard and ``curl``
        then cost nothing). The cache is one tuple swapped whole.
        """
        with self._render_lock:  # two scrapes at once (a Prometheus HA pair): one renders, one reuses
            snap = self.source()
            clock = self.vcpu_clock
            source, sample = snap, 0
            if snap is not None and clock is not None:
                secs = clock.sample(snap.pinned_vcpus)
                sample = clock.version
                snap = replace(snap, vcpu_seconds=secs)
            cached = self._cache
            if cached is not None and cached[0] is source and cached[1] == sample:
                return cached[2]
            body = exposition(snap)
            self._cache = (source, sample, body)
            return body

    def _app(self, environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/":
            body = b'<html><head><title>vcpud</title></head><body><a href="/metrics">Metrics</a></body></html>\n'
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found; metrics are at /metrics\n"]
        try:
            body = self.scrape()
        except Exception as e:  # a bug here must not take the thread down; the scrape fails (up == 0)
            log.exception("metrics: cannot render")
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"cannot render metrics: {e}\n".encode("utf-8", "replace")]
        start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
