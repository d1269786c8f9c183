"""packaging/completion/vcpud in a real bash, against vcpud's parser, and the hidden hook it asks for
`plan --what-if` values (`vcpud __complete what-if [CONFIG]`).

Each case runs `bash --norc` with the file sourced, COMP_LINE/COMP_POINT/COMP_WORDS/COMP_CWORD set as
readline sets them (COMP_WORDS split at the characters of COMP_WORDBREAKS too, so `--what-if=db:4`
arrives as five words), calls the completion function and reads COMPREPLY. The vcpud it asks is
this checkout's, through a wrapper on PATH.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import REPO, skip_or_fail
from vcpud import cli
from vcpud.completion import glob_sample
from vcpud.manpages import vcpud8

SCRIPT = REPO / "packaging" / "completion" / "vcpud"
BREAKS = "\"'><=;|&(:"  # bash's default COMP_WORDBREAKS, blanks aside


def comp_words(line: str) -> list[str]:
    """COMP_WORDS as bash makes them: blanks separate words, and runs of COMP_WORDBREAKS characters
    are words of their own."""
    words = re.findall(rf"[^\s{re.escape(BREAKS)}]+|[{re.escape(BREAKS)}]+", line)
    return words + [""] if not line or line[-1].isspace() else words


@pytest.fixture(scope="module")
def path_env(tmp_path_factory) -> dict[str, str]:
    """PATH with a `vcpud` that runs this checkout."""
    bindir = tmp_path_factory.mktemp("bin")
    exe = bindir / "vcpud"
    python = shlex.quote(sys.executable)
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} exec {python} -m vcpud \"$@\"\n")
    exe.chmod(0o755)
    return dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")


def complete(env: dict[str, str], line: str, cwd: Path | None = None) -> tuple[list[str], str]:
    """(COMPREPLY, the compopt options the function asked for) at the end of ``line``, or where a
    ``|`` in it marks the cursor (right after a word)."""
    point = line.find("|") if "|" in line else len(line)
    line = line.replace("|", "")
    cword = len(comp_words(line[:point])) - 1
    words = comp_words(line)
    if point < len(line):
        words = words[:-1] if words[-1] == "" else words
    script = f"""
        source {shlex.quote(str(SCRIPT))}
        opts=""
        compopt() {{ opts+=" $*"; }}  # outside a real completion compopt only fails: record instead
        COMP_LINE={shlex.quote(line)}; COMP_POINT={point}
        COMP_WORDS=({" ".join(shlex.quote(w) for w in words)}); COMP_CWORD={cword}
        _vcpud vcpud {shlex.quote(words[cword])} {shlex.quote(words[cword - 1] if cword else "")}
        printf 'reply:%s\\n' "${{COMPREPLY[@]}}"
        printf 'opts:%s\\n' "$opts"
    """
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    replies = [ln[len("reply:"):] for ln in p.stdout.splitlines() if ln.startswith("reply:")]
    opts = next(ln for ln in p.stdout.splitlines() if ln.startswith("opts:"))
    return [r for r in replies if r], opts


def replies(env: dict[str, str], line: str, cwd: Path | None = None) -> list[str]:
    return complete(env, line, cwd)[0]


# --- commands and options --------------------------------------------------------------------------
def test_commands(path_env):
    assert replies(path_env, "vcpud ") == list(vcpud8.commands(cli.build_parser()))
    assert replies(path_env, "vcpud p") == ["plan", "ps"]
    assert replies(path_env, "vcpud --log-level debug pl") == ["plan"]
    assert replies(path_env, "vcpud plan ") == []  # no command takes positional arguments


def test_global_options(path_env):
    parser = cli.build_parser()
    want = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert set(replies(path_env, "vcpud -")) == want


@pytest.mark.parametrize("command", list(vcpud8.commands(cli.build_parser())))
def test_each_commands_options_are_the_parsers(path_env, command):
    parser = vcpud8.commands(cli.build_parser())[command]
    want = {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    got = replies(path_env, f"vcpud {command} -")
    assert len(got) == len(set(got)) and set(got) == want
    assert not {"--proc", "--cgroup-root", "--no-udev", "--no-connector"} & set(got)
    assert set(replies(path_env, f"vcpud --log-level info {command} --")) == {w for w in want if w.startswith("--")}


def test_log_level_values(path_env):
    choices = next(a.choices for a in cli.build_parser()._actions if "--log-level" in a.option_strings)
    assert replies(path_env, "vcpud --log-level ") == list(choices)
    assert replies(path_env, "vcpud ps --log-level w") == ["warning"]
    assert replies(path_env, "vcpud run --log-level=d") == ["debug"]  # bash replaces the word after '='


def test_metrics_listen_values_are_valid_addresses(path_env):
    from vcpud.config import parse_listen

    values = replies(path_env, "vcpud run --metrics-listen ")
    assert "off" in values and "127.0.0.1:9474" in values
    for v in values:
        parse_listen(v)
    assert replies(path_env, "vcpud run --metrics-listen 127.0.0.1:") == ["9474"]


def test_config_completes_files_and_sysroot_directories(path_env, tmp_path):
    (tmp_path / "vcpud.yaml").write_text("")
    (tmp_path / "other.yml").write_text("")
    (tmp_path / "dumps").mkdir()
    got, opts = complete(path_env, f"vcpud check --config {tmp_path}/")
    assert sorted(got) == [f"{tmp_path}/dumps", f"{tmp_path}/other.yml", f"{tmp_path}/vcpud.yaml"]
    assert "-o filenames" in opts  # bash then appends '/' to directories and quotes names
    assert replies(path_env, "vcpud plan -c v", cwd=tmp_path) == ["vcpud.yaml"]
    assert replies(path_env, "vcpud apply --config=o", cwd=tmp_path) == ["other.yml"]
    assert replies(path_env, f"vcpud topology --sysroot {tmp_path}/") == [f"{tmp_path}/dumps"]


# --- --what-if -----------------------------------------------------------------------------------
CONFIG = """\
include: more.yaml
policies:
  - name: db
    match: {name: "db-*"}
    vcpus: "0"
  - name: big
    match: {name: "big?", vcpus: "4-16"}
    affinity: "0"
  - name: by-uuid              # a what-if VM has no UUID: never selected
    match: {uuid: 6f1c6ad2-6d28-4f4e-9a1b-3c2d8e0a5b71}
  - name: shadowed             # its name sample, db-x, goes to policy db first
    match: {name: "db-x*"}
"""
MORE = """\
policies:
  - name: web
    match: {name: "web[0-9]*"}
  - name: rest
    match: {}
"""
OFFERED = ["db-:", "big1:4", "big1:16", "web0:", "rest:"]


@pytest.fixture()
def config(tmp_path) -> Path:
    (tmp_path / "more.yaml").write_text(MORE)
    (tmp_path / "vcpud.yaml").write_text(CONFIG)
    return tmp_path / "vcpud.yaml"


def test_what_if_offers_names_the_policies_select(path_env, config):
    got, opts = complete(path_env, f"vcpud plan -c {config} --what-if ")
    assert got == OFFERED
    assert "-o nospace" in opts  # NAME: waits for its vCPU count
    assert replies(path_env, f"vcpud plan --what-if b| --config {config}") == ["big1:4", "big1:16"]
    assert replies(path_env, f"vcpud plan --config={config} --what-if=w") == ["web0:"]
    assert replies(path_env, f"vcpud plan -c {config} --what-if x:1 --what-if big1:1") == ["16"]  # after the ':'
    got, opts = complete(path_env, f"vcpud plan -c {config} --what-if big1:4")
    assert got == ["4"] and "nospace" not in opts
    # each value is one plan takes, and goes to the policy it was offered for
    from vcpud.config import load_config
    from vcpud.cpuset import CpuSet
    from vcpud.placement import plan

    cfg = load_config(config)
    vms = cli.what_if_vms([v + ("1" if v.endswith(":") else "") for v in OFFERED])
    assert [vp.policy for vp in plan(cfg, vms, CpuSet.parse("0-1")).vms] == ["db", "big", "big", "web", "rest"]


def test_what_if_without_a_usable_config_offers_nothing_quietly(path_env, tmp_path):
    (tmp_path / "broken.yaml").write_text("policies: [{name: x}]\n")  # no match: an error
    assert replies(path_env, f"vcpud plan -c {tmp_path}/broken.yaml --what-if ") == []
    assert replies(path_env, f"vcpud plan -c {tmp_path}/missing.yaml --what-if ") == []
    env = dict(path_env, PATH="/usr/bin:/bin")  # no vcpud to ask
    assert replies(env, f"vcpud plan -c {tmp_path}/broken.yaml --what-if ") == []


# --- the hook --------------------------------------------------------------------------------------
def hook(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vcpud", "__complete", *args], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_hook_prints_values_and_their_policies(config):
    p = hook("what-if", str(config))
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.splitlines() == [f"{v}\tpolicy {pol}" for v, pol in zip(OFFERED, ["db", "big", "big", "web",
                                                                                       "rest"], strict=True)]


@pytest.mark.parametrize("args", [(), ("what-if", "/nonexistent.yaml"), ("policies",), ("what-if", "a", "b"),
                                  ("what-if", "/dev/zero"), ("what-if", "/")])
def test_hook_never_complains(args):
    p = hook(*args)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_hook_reads_the_default_config_without_one(monkeypatch, config, capsys):
    import vcpud.config
    from vcpud.completion import main

    monkeypatch.setattr(vcpud.config, "DEFAULT_CONFIG_PATH", config)
    assert main(["what-if"]) == 0 and main(["what-if", ""]) == 0
    lines = [f"{v}\tpolicy {p}" for v, p in zip(OFFERED, ["db", "big", "big", "web", "rest"], strict=True)]
    assert capsys.readouterr().out.splitlines() == lines * 2


def test_hook_imports_neither_the_daemon_nor_libvirt(config):
    child = textwrap.dedent("""\
        import contextlib, io, sys
        from vcpud import cli
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(sys.argv[1:])
        print(code, *sorted(sys.modules))
    """)
    p = subprocess.run([sys.executable, "-c", child, "__complete", "what-if", str(config)], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    code, *modules = p.stdout.split()
    assert code == "0", p.stderr
    assert not {"libvirt", "pyudev", "systemd", "vcpud.daemon", "vcpud.metrics", "vcpud.sources", "vcpud.placement",
                "vcpud.pinning", "vcpud.cgroups"} & set(modules)


@pytest.mark.parametrize("glob, sample", [
    ("db-*", "db-"), ("web?", "web1"), ("[ab]x", "ax"), ("[!1]y", "xy"), ("*", None), ("a[z-b]", None),
    ("web[0-9]*", "web0"), ("exact", "exact"), ("[x", "[x"),
])
def test_glob_samples(glob, sample):
    assert glob_sample(glob) == sample


@given(st.text(alphabet="ab*?[]!-01", max_size=12))
def test_a_glob_sample_is_matched_by_its_glob(glob):
    sample = glob_sample(glob)
    assert sample is None or (sample and fnmatch.fnmatchcase(sample, glob))


# --- in an interactive bash: readline splits the line, completes, and inserts --------------------
class Terminal:
    """An interactive shell on a pseudo-terminal, its completion loaded by ``setup``."""

    def __init__(self, argv: list[str], env: dict[str, str], home: Path, setup: str) -> None:
        import pty

        env = dict(env, PS1="$ ", TERM="dumb", INPUTRC="/dev/null", HOME=str(home), HISTFILE="/dev/null")
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: only exec
            os.execve(argv[0], argv, env)
        self.screen = b""
        # A shell function named vcpud shows the arguments as completed (the completions ask the vcpud
        # on PATH: `command` skips functions).
        self.type(f"{setup}; vcpud() {{ printf '<%s>' \"$@\"; echo END; }}; echo READY\n", "READY\r\n")

    def type(self, keys: str, until: str, timeout: float = 30) -> str:
        """Send ``keys``; what the terminal shows once ``until`` appears (AssertionError if it does not)."""
        import select
        import time

        start = len(self.screen)
        os.write(self.fd, keys.encode())
        deadline = time.monotonic() + timeout
        while until.encode() not in self.screen[start:] and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:
                try:
                    self.screen += os.read(self.fd, 4096)
                except OSError:
                    break
        shown = self.screen[start:].decode(errors="replace")
        assert until in shown, f"waited {timeout} s for {until!r}, the terminal shows {shown!r}"
        return shown

    def close(self) -> None:
        import signal

        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture()
def terminal(path_env, tmp_path):
    t = Terminal(["/bin/bash", "--norc", "--noprofile", "-i"], path_env, tmp_path,
                 f"source {shlex.quote(str(SCRIPT))}")
    yield t
    t.close()


def test_readline_completes_what_if_values_and_files(terminal, config):
    """Tab, then Enter: the shell function vcpud shows the arguments as completed."""
    cases = [
        (f"vcpud plan -c {config} --what-if big1:1\t\n", f"<plan><-c><{config}><--what-if><big1:16>END"),
        (f"vcpud plan -c {config} --what-if=we\t4 --js\t\n", f"<plan><-c><{config}><--what-if=web0:4><--json>END"),
        ("vcpud run --metrics-listen [::1\t\n", "<run><--metrics-listen><[::1]:9474>END"),
        (f"vcpud check --config={config.parent}/mo\t\n", f"<check><--config={config.parent}/more.yaml>END"),
        ("vcpud --log-level=wa\tp\tl\t\n", "<--log-level=warning><plan>END"),
    ]
    for keys, shown in cases:
        terminal.type(keys, shown)


# --- zsh -----------------------------------------------------------------------------------------------
ZSH_SCRIPT = REPO / "packaging" / "completion" / "_vcpud"


def zsh() -> str:
    exe = shutil.which("zsh")
    if exe is None:
        skip_or_fail("zsh not installed (Debian package zsh; contrib/setup-dev.sh installs it)")
    return exe


def test_zsh_completion_parses():
    p = subprocess.run([zsh(), "-n", str(ZSH_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (0, "")


def zsh_options() -> dict[str, set[str]]:
    """The options each command's _arguments spec names, read from the file."""
    text = ZSH_SCRIPT.read_text()
    spec = r"(--?[a-z][a-z-]*)[=+]?(?=\[|,[^ ]|\})"  # an option at the start of a spec, not in a description
    groups = {name: set(re.findall(spec, re.search(rf"local -a {name}=\((.*?)\)\n", text, re.S).group(1)))
              for name in ("help", "config", "common")}
    groups["common"] |= groups["help"] | {"--log-level"}
    out = {}
    for command, body in re.findall(r"^ {8}([a-z]+)\)\n(.*?);;", text, re.M | re.S):
        config = groups["config"] if "$config" in body else set()
        shared = groups["common"] if "$common" in body else groups["help"] if "$help" in body else set()
        out[command] = set(re.findall(spec, body)) | shared | config
    return out


def test_zsh_options_are_the_parsers():
    parser = cli.build_parser()
    want = {name: {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
            for name, p in vcpud8.commands(parser).items()}
    assert zsh_options() == want
    block = ZSH_SCRIPT.read_text().split("local -a cmds=(")[1].split("\n      )\n")[0]
    commands = re.findall(r"^\s+[\"']([a-z]+):", block, re.M)
    assert commands == list(want)


@pytest.fixture()
def zsh_terminal(path_env, tmp_path):
    setup = (f"fpath=({shlex.quote(str(ZSH_SCRIPT.parent))} $fpath); autoload -Uz compinit; "
             f"compinit -u -d {shlex.quote(str(tmp_path / 'zcompdump'))}")
    t = Terminal([zsh(), "-f", "-i"], path_env, tmp_path, setup)
    yield t
    t.close()


def test_zsh_completes_commands_options_and_what_if_values(zsh_terminal, config):
    cases = [
        ("vcpud pl\t\n", "<plan>END"),
        ("vcpud --log-level w\tp\tl\t--js\t\n", "<--log-level><warning><plan><--json>END"),
        (f"vcpud plan -c {config} --what-if big1:1\t\n", f"<plan><-c><{config}><--what-if><big1:16>END"),
        (f"vcpud plan --config={config} --what-if d\t4\n", f"<plan><--config={config}><--what-if><db-:4>END"),
        (f"vcpud check --config {config.parent}/mo\t\n", f"<check><--config><{config.parent}/more.yaml>END"),
        ("vcpud apply --dry\t\n", "<apply><--dry-run>END"),
    ]
    for keys, shown in cases:
        zsh_terminal.type(keys, shown)
