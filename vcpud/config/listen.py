"""The one grammar of a metrics listen address, shared by the config, `--metrics-listen` and the server.

``off`` (any case), ``HOST:PORT`` or ``[IPV6]:PORT``, surrounding blanks ignored. HOST is an
IPv4 address or a host name; an IPv6 address (with an optional ``%zone``) goes in brackets.
The host is required: listening beyond loopback is always written out, as ``0.0.0.0:PORT``
(every IPv4 interface) or ``[::]:PORT`` (every interface). PORT is 0 to 65535; 0 asks the
kernel for any free port (what tests use).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal


OFF: Literal["off"] = "off"
EXPECTED = 'HOST:PORT like "127.0.0.1:9474" or "[::1]:9474", or off'

_DIGITS = re.compile(r"[0-9]+\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def _quote(text: str, n: int = 40) -> str:
    """A piece of the input for a message: repr(), cut to about ``n`` characters (a port of
    5,000 digits is not worth echoing)."""
    return repr(text) if len(text) <= n else repr(text[:n]) + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: an IPv4 address, IPv6 address (no brackets) or host name, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ListenAddressError(ValueError):
    """Text that is not a listen address; the message says what is wrong, without the text itself."""


def parse_listen(text: str) -> ListenAddress | Literal["off"]:
    """``text`` as a :class:`ListenAddress`, or ``"off"``; raise ListenAddressError."""
    spec = text.strip()
    if spec.lower() == OFF:
        return OFF
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ListenAddressError("missing ']' after the IPv6 address")
        host, rest = spec[1:end], spec[end + 1:]
        if not rest.startswith(":"):
            raise ListenAddressError('expected [IPV6]:PORT like "[::1]:9474"')
        port = rest[1:]
    else:
        host, sep, port = spec.rpartition(":")
        if not sep:
            raise ListenAddressError(f"expected {EXPECTED}")
    if not _PORT.match(port) or int(port) > 65535:
        raise ListenAddressError(f"port {_quote(port)} must be a number from 0 to 65535 (0: any free port)")
    problem = _ipv6_problem(host) if spec.startswith("[") else _host_problem(host, int(port))
    if problem:
        raise ListenAddressError(problem)
    return ListenAddress(host, int(port))


def _ipv6_problem(host: str) -> str | None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f"{_quote(host)} in brackets is not an IPv6 address"
    return None


def _host_problem(host: str, port: int) -> str | None:
    if not host:
        return (
            f"the host is missing: write 0.0.0.0:{port} (every IPv4 interface) or [::]:{port} "
            "(every interface) to listen beyond loopback"
        )
    if ":" in host or "[" in host or "]" in host:
        return 'write an IPv6 address in brackets, like "[::1]:9474"'
    labels = host.split(".")
    if all(_DIGITS.match(label) for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{_quote(host)} is not an IPv4 address"
        return None
    if len(host) > 253:
        return f"host name {_quote(host)} is longer than 253 characters"
    if not all(_HOST_LABEL.match(label) for label in labels):
        return (f"{_quote(host)} is not a host name or IP address (a host name is labels of 1 to 63 letters, "
                "digits and inner hyphens, joined by dots)")
    return None
