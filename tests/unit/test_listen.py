"""Tests for vcpud.config.listen: the one listen-address grammar of the config, the CLI and the server."""

from __future__ import annotations

import argparse

import pytest

from vcpud.cli import _listen_arg
from vcpud.config import ConfigError, ListenAddress, ListenAddressError, parse_config_text, parse_listen
from vcpud.metrics import ListenError
from vcpud.metrics import parse_listen as metrics_parse_listen


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9474", ListenAddress("127.0.0.1", 9474)), ("[::1]:9474", ListenAddress("::1", 9474)),
    ("[::]:0", ListenAddress("::", 0)), ("localhost:65535", ListenAddress("localhost", 65535)),
    (" 0.0.0.0:80 ", ListenAddress("0.0.0.0", 80)), ("[fe80::1%eth0]:1", ListenAddress("fe80::1%eth0", 1)),
    ("off", "off"), (" Off ", "off"),
])
def test_parse_listen(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("address, text", [
    (ListenAddress("127.0.0.1", 0), "127.0.0.1:0"), (ListenAddress("::", 9474), "[::]:9474"),
    (ListenAddress("fe80::1%eth0", 1), "[fe80::1%eth0]:1"), (ListenAddress("example.org", 80), "example.org:80"),
])
def test_str_round_trips(address, text):
    assert str(address) == text and parse_listen(text) == address


@pytest.mark.parametrize("text, fragment", [
    (":9474", "the host is missing: write 0.0.0.0:9474 (every IPv4 interface) or [::]:9474 (every interface)"),
    (":0", "the host is missing"), ("[]:9474", "'' in brackets is not an IPv6 address"),
    ("9474", "expected HOST:PORT"), ("::1:9474", "write an IPv6 address in brackets"),
    ("h:65536", "from 0 to 65535"), ("h:-1", "port '-1'"), ("", "expected HOST:PORT"),
])
def test_parse_listen_refuses(text, fragment):
    with pytest.raises(ListenAddressError) as e:
        parse_listen(text)
    assert fragment in str(e.value)


SPECS = ["127.0.0.1:9474", "127.0.0.1:0", "[::]:0", ":9474", ":0", "9474", "[::1]9474", "h:65536", "localhost:1",
         "bad_host:1", "1.2.3.256:1", "[1.2.3.4]:1", "[fe80::1%eth0]:1", "off", "0.0.0.0:65535", "[::1]:"]


@pytest.mark.parametrize("spec", SPECS)
def test_config_flag_and_server_agree(spec):
    """The config, `--metrics-listen` and the metrics server accept exactly the same addresses."""
    try:
        want: object = parse_listen(spec)
    except ListenAddressError:
        want = None
    try:
        config = parse_config_text(f'metrics:\n  listen: "{spec}"\n').metrics_listen
    except ConfigError:
        config = None
    try:
        flag: str | None = _listen_arg(spec)
    except argparse.ArgumentTypeError:
        flag = None
    try:
        server: tuple[str, int] | str | None = metrics_parse_listen(spec)
    except ListenError:
        server = None
    if want is None:
        assert (config, flag, server) == (None, None, None)
    elif want == "off":
        assert (config, flag, server) == ("off", "off", None)  # the server is never started for off
    else:
        assert isinstance(want, ListenAddress)
        assert config == flag == str(want) and server == (want.host, want.port)
