"""The man pages: generated as packaging builds do, clean for groff and lexgrog, and in step with the
parser (every command and option, no more) and the config schema (every key, no more, defaults,
limits), with examples that vcpud's own parser and config loader take.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, skip_or_fail
from vcpud import __version__, cli
from vcpud.manpages import RELEASE_DATES, vcpud8, vcpud_yaml5

# Debian's own python3, as dpkg-buildpackage runs it; -S: without site-packages (no PyYAML).
BARE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
HIDDEN = ("--proc", "--cgroup-root", "--no-udev", "--no-connector", "__complete")


def generate(outdir: Path, umask: int = 0o022, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([BARE_PYTHON, "-S", "-m", "vcpud.manpages", str(outdir)], capture_output=True, text=True,
                          env=environ, timeout=60, preexec_fn=lambda: os.umask(umask))


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("man")
    p = generate(out)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    return {name: (out / name).read_text(encoding="ascii") for name in ("vcpud.8", "vcpud.yaml.5")}


def tool(name: str, package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        skip_or_fail(f"{name} not installed (Debian package {package})")
    return exe


# --- reading the roff back -----------------------------------------------------------------------
def plain(text: str) -> str:
    """Roff text as a reader sees it, fonts and escapes undone."""
    text = re.sub(r"\\f[BIRP]|\\%|\\&", "", text)
    for esc, c in (("\\-", "-"), ("\\(aq", "'"), ("\\(ga", "`"), ("\\(ha", "^"), ("\\(ti", "~"), ("\\e", "\\"),
                   ("\\(em", "--")):
        text = text.replace(esc, c)
    return text


@dataclass
class Item:
    tag: str
    body: list[str] = field(default_factory=list)
    children: list[Item] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.body)


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)


def sections(page: str) -> dict[str, Section]:
    """The page's .SH sections, each with its .TP items (and items nested one .RS deeper)."""
    out: dict[str, Section] = {}
    sec: Section | None = None
    depth = 0
    lines = page.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        i += 1
        if ln.startswith(".SH "):
            sec = out.setdefault(plain(ln[4:]).strip('"'), Section(plain(ln[4:]).strip('"')))
            depth = 0
            continue
        if sec is None:
            continue
        if ln == ".RS" and sec.items:
            depth += 1
        elif ln == ".RE" and depth:
            depth -= 1
        elif ln == ".TP":
            item = Item(plain(lines[i]))
            i += 1
            (sec.items[-1].children if depth else sec.items).append(item)
        elif not ln.startswith("."):
            sec.lines.append(plain(ln))
            if sec.items:
                target = sec.items[-1].children[-1] if depth and sec.items[-1].children else sec.items[-1]
                target.body.append(plain(ln))
    return out


def spellings(tag: str) -> set[str]:
    """The options a tag like "--dry-run, -n" or "--config FILE, -c FILE" names."""
    return {w for w in re.split(r"[ ,]+", tag) if w.startswith("-")}


def parser_options(p) -> set[str]:
    """Every option a user sees (help=SUPPRESS ones are internal), -h/--help excluded."""
    return {s for o in vcpud8.options(p) for s in o.spellings}


# --- generation ----------------------------------------------------------------------------------
def test_generated_by_a_bare_python_readable_by_all_whatever_the_umask(tmp_path):
    out = tmp_path / "new" / "man"
    p = generate(out, umask=0o077)
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["vcpud.8", "vcpud.yaml.5"]
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755
    p = generate(tmp_path / "open", umask=0)
    assert p.returncode == 0, p.stderr
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "open").iterdir()} == {0o644}


def test_output_is_deterministic_and_dated_by_source_date_epoch(tmp_path, pages):
    assert generate(tmp_path / "a").returncode == 0
    for name, text in pages.items():
        assert (tmp_path / "a" / name).read_text() == text  # same source, same bytes
        assert f'"{RELEASE_DATES[__version__]}" "vcpud {__version__}"' in text.splitlines()[0]
    assert generate(tmp_path / "b", SOURCE_DATE_EPOCH="1700000000").returncode == 0
    for name in pages:
        assert '"2023-11-14" "vcpud' in (tmp_path / "b" / name).read_text().splitlines()[0]


def test_this_version_has_a_release_date():
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", RELEASE_DATES.get(__version__, "")), \
        f"add vcpud {__version__}'s release date to RELEASE_DATES in vcpud/manpages/__init__.py"


@pytest.mark.parametrize("epoch", ["yesterday", "-5", "1e9", "9" * 40])
def test_a_bad_source_date_epoch_is_a_clear_error(tmp_path, epoch):
    p = generate(tmp_path, SOURCE_DATE_EPOCH=epoch)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "SOURCE_DATE_EPOCH must be seconds since 1970" in p.stderr


def test_usage_and_an_unwritable_outdir(tmp_path):
    p = subprocess.run([BARE_PYTHON, "-S", "-m", "vcpud.manpages"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert p.returncode == 2 and "usage: python3 -m vcpud.manpages OUTDIR" in p.stderr
    (tmp_path / "file").write_text("")
    p = generate(tmp_path / "file" / "man")
    assert p.returncode == 1 and "Traceback" not in p.stderr and "cannot create" in p.stderr


# --- rendering -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vcpud.8", "vcpud.yaml.5"])
def test_groff_renders_without_warnings_and_lexgrog_finds_the_name(tmp_path, pages, name):
    groff = tool("groff", "groff-base")
    f = tmp_path / name
    f.write_text(pages[name])
    p = subprocess.run([groff, "-man", "-ww", "-z", str(f)], capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    p = subprocess.run([tool("man", "man-db"), "--warnings", "-l", str(f)], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, MANPAGER="cat", MANWIDTH="80"))
    assert p.returncode == 0 and p.stderr == ""
    p = subprocess.run([tool("lexgrog", "man-db"), str(f)], capture_output=True, text=True, timeout=60)
    summary = {"vcpud.8": "vcpud - CPU placement daemon for QEMU/KVM guests",
               "vcpud.yaml.5": "vcpud.yaml - configuration file of vcpud(8)"}[name]
    assert p.returncode == 0 and p.stdout.strip() == f'{f}: "{summary}"'


def rendered(page: str, tmp_path: Path) -> str:
    """What man shows, as plain ASCII (no bold, no underline), wide enough to keep lines whole."""
    f = tmp_path / "page"
    f.write_text(page)
    p = subprocess.run([tool("groff", "groff-base"), "-man", "-Tascii", "-P-cbou", "-rLL=200n", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("name", ["vcpud.8", "vcpud.yaml.5"])
def test_pages_are_ascii_with_every_hyphen_a_minus(pages, name):
    text = pages[name]
    assert text.isascii()
    body = [ln for ln in text.splitlines() if not ln.startswith(".")]
    assert not [ln for ln in body if re.search(r"(?<!\\)-", ln)], "an unescaped '-' renders as a hyphen"
    filled, nofill = [], False  # in no-fill blocks (examples) leading blanks are the YAML's indentation
    for ln in text.splitlines():
        nofill = {".nf": True, ".fi": False}.get(ln, nofill)
        if not nofill:
            filled.append(ln)
    assert not [ln for ln in body if ln.startswith("'")]
    assert not [ln for ln in filled if ln.startswith(" ")]


# --- vcpud(8) and the parser -------------------------------------------------------------------
REQUIRED_8 = ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "COMMON OPTIONS", "GLOBAL OPTIONS", "SIGNALS",
              "EXIT STATUS", "ENVIRONMENT", "FILES", "EXAMPLES", "SEE ALSO"]


def test_vcpud8_has_its_sections_in_order(pages):
    assert list(sections(pages["vcpud.8"])) == REQUIRED_8


def test_every_command_and_no_other_is_documented(pages):
    parser = cli.build_parser()
    commands = vcpud8.commands(parser)
    sec = sections(pages["vcpud.8"])
    assert [i.tag for i in sec["COMMANDS"].items] == [f"vcpud {c}" for c in commands]
    assert set(commands) == {"topology", "check", "apply", "plan", "run", "demo", "ps"}  # the hidden hook is none


def test_every_option_of_every_command_and_no_other_is_documented(pages):
    parser = cli.build_parser()
    sec = sections(pages["vcpud.8"])
    common = {}
    for item in sec["COMMON OPTIONS"].items:
        m = re.search(r"Taken by (every command|[a-z, ]+)\.", item.text)
        if item.tag != "-h, --help":
            assert m, item
            common[frozenset(spellings(item.tag))] = m.group(1)
    for item in sec["COMMANDS"].items:
        name = item.tag.removeprefix("vcpud ")
        documented = {s for child in item.children for s in spellings(child.tag)}
        documented |= {s for spelled, users in common.items() for s in spelled
                       if users == "every command" or name in users.split(", ")}
        assert documented == parser_options(vcpud8.commands(parser)[name]), name


def test_the_synopsis_lists_each_commands_options(pages):
    parser = cli.build_parser()
    synopses = re.findall(r"^\.SY vcpud\n(.*?)^\.YS", pages["vcpud.8"], re.M | re.S)
    by_command = {}
    for s in synopses:
        words = plain(s).split()
        by_command[words[0]] = {w.strip("[]") for w in words if w.startswith("[-")}
    assert by_command.pop("--version") == set()
    assert by_command.pop("[--log-level") == {"--log-level"}  # vcpud [--log-level LEVEL] COMMAND [OPTIONS]
    for name, p in vcpud8.commands(parser).items():
        assert by_command.pop(name) == {o.key for o in vcpud8.options(p)}, name
    assert by_command == {}


def test_global_options_match_the_parser(pages):
    parser = cli.build_parser()
    items = sections(pages["vcpud.8"])["GLOBAL OPTIONS"].items
    assert {s for i in items for s in spellings(i.tag)} == parser_options(parser) | {"-h", "--help"}


def test_hidden_options_are_not_in_the_page_and_every_long_option_in_it_exists(pages, tmp_path):
    text = rendered(pages["vcpud.8"], tmp_path)
    parser = cli.build_parser()
    real = parser_options(parser) | {s for p in vcpud8.commands(parser).values() for s in parser_options(p)}
    for hidden in HIDDEN:
        assert hidden not in text
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) - {"--help"} <= real


def test_option_text_matches_the_parser_values(pages):
    parser = cli.build_parser()
    sec = sections(pages["vcpud.8"])
    level = next(i for i in sec["COMMON OPTIONS"].items if "--log-level" in i.tag)
    choices = next(a.choices for a in parser._actions if "--log-level" in a.option_strings)
    levels = level.text.split("for run):")[1].split(".")[0]
    assert re.findall(r"\b(debug|info|warning|error)\b", levels) == list(choices)
    config = next(i for i in sec["COMMON OPTIONS"].items if "--config" in i.tag)
    from vcpud.config import DEFAULT_CONFIG_PATH, DEFAULT_METRICS_LISTEN

    assert f"Default: {DEFAULT_CONFIG_PATH}." in config.text
    plan = next(i for i in sec["COMMANDS"].items if i.tag == "vcpud plan")
    what_if = next(c for c in plan.children if "--what-if" in c.tag)
    assert f"at most {cli.MAX_WHAT_IF}, each of at most {cli.MAX_VM_VCPUS} vCPUs" in what_if.text
    run = next(i for i in sec["COMMANDS"].items if i.tag == "vcpud run")
    assert f"(default {DEFAULT_METRICS_LISTEN})" in run.children[0].text


def test_exit_statuses_and_signals_are_the_codes(pages):
    sec = sections(pages["vcpud.8"])
    assert [i.tag for i in sec["EXIT STATUS"].items] == [str(c) for c in (cli.EXIT_OK, cli.EXIT_FAILED,
                                                                           cli.EXIT_CONFIG)] + ["130"]
    handled = set(re.findall(r"signal\.signal\(signal\.(SIG[A-Z]+)", (REPO / "vcpud" / "sources.py").read_text()))
    handled |= set(re.findall(r"for sig in \(([^)]*)\)", (REPO / "vcpud" / "sources.py").read_text())[0]
                   .replace("signal.", "").replace(" ", "").split(","))
    handled.discard("sig")
    assert handled == {"SIGHUP", "SIGTERM", "SIGINT"}
    assert {s for i in sec["SIGNALS"].items for s in i.tag.split(", ")} == handled


def test_examples_are_real_command_lines(pages, capsys):
    parser = cli.build_parser()
    shown = sections(pages["vcpud.8"])["EXAMPLES"].lines
    n = 0
    for _, lines in vcpud8.EXAMPLES:
        for line in lines:
            assert line in " ".join(shown) or any(line == s.strip() for s in shown)
            argv = shlex.split(line)
            if argv[0] != "vcpud":
                continue
            n += 1
            args = parser.parse_args(argv[1:])  # SystemExit (exit 2) for an option that does not exist
            assert args.func is not None
            if args.command == "plan":
                cli.what_if_vms(args.what_if or [])  # ValueError for a bad NAME:VCPUS[:THREADS]
    assert n >= 5


def test_a_new_option_without_text_or_text_without_an_option_fails():
    parser = cli.build_parser()
    vcpud8.commands(parser)["ps"].add_argument("--wide", action="store_true", help="a new flag")
    with pytest.raises(LookupError, match="no man page text for option --wide of `vcpud ps`"):
        vcpud8.render(parser, "2026-01-01", "0")
    parser = cli.build_parser()
    vcpud8.commands(parser)["plan"]._actions = [a for a in vcpud8.commands(parser)["plan"]._actions
                                                if "--verbose" not in a.option_strings]
    with pytest.raises(LookupError, match="option --verbose of plan"):
        vcpud8.render(parser, "2026-01-01", "0")


# --- vcpud.yaml(5) and the schema --------------------------------------------------------------
REQUIRED_5 = ["NAME", "SYNOPSIS", "DESCRIPTION", "TOP-LEVEL KEYS", "POLICY KEYS", "POOLS", "CPU LIST SYNTAX",
              "PRECEDENCE", "EXAMPLES", "FILES", "SEE ALSO"]


def schema_keys() -> dict[str, set[str]]:
    """Every key of the schema by the section that documents it, nested tables as dotted paths."""
    from vcpud.config import matching, pooldefs, schema

    nested = {  # the table of each mapping-valued key: where it sits, and its path prefix
        "TOP-LEVEL KEYS": [(schema.TOP_FIELDS, ""), (schema.METRICS_FIELDS, "metrics.")],
        "POLICY KEYS": [(schema.POLICY_FIELDS, ""), (matching.MATCH_FIELDS, "match."),
                        (pooldefs.VCPUS_FIELDS, "vcpus."), (pooldefs.EMULATOR_FIELDS, "emulatorpin.")],
        "POOLS": [(pooldefs.POOL_FIELDS, "pools.NAME.")],
    }
    # A table of Fields that is not listed above would be a key the page cannot know about.
    tables = [v for m in (schema, matching, pooldefs) for k, v in vars(m).items()
              if k.endswith("_FIELDS") and isinstance(v, dict)]
    listed = [t for ts in nested.values() for t, _ in ts]
    assert all(any(t is x for x in listed) for t in tables), "a new table of config keys: add it here"
    return {sec: {prefix + key for table, prefix in ts for key in table} for sec, ts in nested.items()}


def test_vcpud_yaml5_has_its_sections_in_order(pages):
    assert list(sections(pages["vcpud.yaml.5"])) == REQUIRED_5


def test_every_config_key_and_no_other_is_documented(pages):
    sec = sections(pages["vcpud.yaml.5"])
    for title, keys in schema_keys().items():
        documented = {i.tag.split(":")[0] for i in sec[title].items}
        assert documented == keys, title


def test_documented_defaults_and_values_are_the_codes():
    from vcpud.config import (DEFAULT_EXECUTABLES, DEFAULT_METRICS_LISTEN, DEFAULT_RESCAN_INTERVAL,
                              DEFAULT_STATE_FILE, ON_EXHAUSTED_MODES, Policy)
    from vcpud.pools import CACHE_MODES, NUMA_MODES, SMT_MODES, PlacementRule, PoolSpec

    keys = {k.path: k for k in vcpud_yaml5.TOP_KEYS + vcpud_yaml5.POLICY_KEYS + vcpud_yaml5.POOL_KEYS}
    assert keys["executables"].default == f"[{', '.join(DEFAULT_EXECUTABLES)}]"
    assert keys["rescan_interval"].default == f"{DEFAULT_RESCAN_INTERVAL:g}s"
    assert keys["metrics.listen"].default == DEFAULT_METRICS_LISTEN
    assert keys["state_file"].default == str(DEFAULT_STATE_FILE)
    assert keys["pools.<NAME>.exclusive"].default == str(PoolSpec("p", None).exclusive).lower()  # type: ignore
    assert keys["emulatorpin.isolate"].default == str(Policy("p").emulator_isolate).lower()
    assert keys["on_exhausted"].default == Policy("p").on_exhausted
    assert re.findall(r"`(\w+)`", keys["on_exhausted"].value) == list(ON_EXHAUSTED_MODES)
    for path, modes in (("vcpus.smt", SMT_MODES), ("vcpus.numa", NUMA_MODES), ("vcpus.cache", CACHE_MODES)):
        assert re.findall(r"`([\w-]+)`", keys[path].value) == list(modes), path
        assert keys[path].default == getattr(PlacementRule("p"), path.split(".")[1])
        assert all(f"`{m}`" in keys[path].body for m in modes)
    defaults = {k.path for k in keys.values() if k.default is not None}
    assert defaults == {"executables", "rescan_interval", "metrics.listen", "state_file", "pools.<NAME>.exclusive",
                        "emulatorpin.isolate", "on_exhausted", "vcpus.smt", "vcpus.numa", "vcpus.cache"}


def test_documented_limits_are_the_codes(pages, tmp_path):
    from vcpud.config import loader, pooldefs, schema, sources
    from vcpud.cpuset import MAX_CPUS

    text = " ".join(rendered(pages["vcpud.yaml.5"], tmp_path).split())
    assert f"at most {loader.MAX_ISSUES}, then how many more" in text
    assert f"more than {sources.MAX_INCLUDED_FILES} included files" in text
    assert f"at most {pooldefs.MAX_POOLS}." in text
    assert f"At most {schema.MAX_POLICIES} in all files" in text
    assert f"CPU numbers above {MAX_CPUS - 1} are errors" in text
    assert schema.MIN_RESCAN_INTERVAL == 0.1 and schema.MAX_RESCAN_INTERVAL == 86400
    assert "from 100ms to a day" in text


def test_cpu_list_syntax_as_documented():
    from vcpud.cpuset import CpuSet, CpuSetError

    claims = {"0-3,8": {0, 1, 2, 3, 8}, "0-15:2": set(range(0, 15, 2)), "0x100": {8}, "1": {1}, " 2 , 4-5 ": {2, 4, 5}}
    for text, cpus in claims.items():
        assert set(CpuSet.parse(text)) == cpus
        if text.strip() != text or text == "1":
            continue
        assert f'`"{text}"`' in vcpud_yaml5.CPU_LISTS
    for bad in ("", "1,,2", "5-3", "8192"):
        with pytest.raises(CpuSetError):
            CpuSet.parse(bad)


@pytest.mark.parametrize("example", vcpud_yaml5.EXAMPLES, ids=lambda e: e.intro[:40])
def test_config_examples_load_on_the_host_they_are_written_for(tmp_path, pages, example):
    from vcpud.config import load_config
    from vcpud.cpuset import CpuSet

    for name, text in example.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    main = tmp_path / next(iter(example.files))
    config = load_config(main, online=CpuSet.parse(example.online))
    assert config.policies and len(config.files) == len(example.files)
    shown = "\n".join(sections(pages["vcpud.yaml.5"])["EXAMPLES"].lines)
    for text in example.files.values():
        assert "\n".join(ln.rstrip() for ln in text.splitlines()) in shown


def test_two_cpu_examples_pass_vcpud_check_on_this_host(tmp_path):
    """`vcpud check` itself, on this 2-CPU machine (CI's is the same), for the examples written for it."""
    online = Path("/sys/devices/system/cpu/online").read_text().strip()
    from vcpud.cpuset import CpuSet

    checked = 0
    for i, example in enumerate(vcpud_yaml5.EXAMPLES):
        if not CpuSet.parse(example.online) <= CpuSet.parse(online):
            continue
        d = tmp_path / str(i)
        for name, text in example.files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
        p = subprocess.run([sys.executable, "-m", "vcpud", "check", "--config", str(d / next(iter(example.files)))],
                           capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert p.returncode == 0 and ": OK, " in p.stdout, p.stderr
        checked += 1
    assert checked >= 3


def test_roff_escaping_survives_groff(tmp_path):
    """Text that roff would take for requests, escapes or hyphens comes out as written."""
    from vcpud.manpages import roff

    tricky = [".SH not a heading", "'br not a request", r"back\slash \fB not bold", "--dry-run -n a-b", "~ ^ ` '"]
    page = "\n".join([roff.title("t", "1", "2026-01-01", "s", "m"), roff.heading("NAME"), "t \\- t",
                      *(roff.line(roff.escape(t)) + "\n.br" for t in tricky),
                      *roff.paragraphs("A `.bold start` and <ITALIC> and `-c` <FILE>."),
                      *roff.example(tricky), *roff.synopsis("t", ["[`--x` <Y>]"])])
    text = rendered(page, tmp_path)
    for t in tricky:
        assert text.count(t) == 2, t  # once as prose, once in the example
    assert "A .bold start and ITALIC and -c FILE." in " ".join(text.split())
    assert "t [--x Y]" in " ".join(text.split())
    with pytest.raises(roff.RoffError):
        roff.escape("caf\u00e9")
    with pytest.raises(roff.RoffError):
        roff.inline("an `unclosed literal")
