"""vcpud(8): the prose of every command and option, laid over the argparse parser's own list.

The commands and options come from :func:`vcpud.cli.build_parser` (options whose help is
argparse.SUPPRESS are internal and left out); each needs prose here, in COMMANDS, OPTIONS or
COMMON, or rendering fails, so a new flag without a description cannot ship.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from . import roff

NAME = "vcpud"
SUMMARY = "CPU placement daemon for QEMU/KVM guests"

DESCRIPTION = """\
`vcpud` places the threads of QEMU/KVM guests on host CPUs. It finds every QEMU process on the host, tells its \
threads apart (vCPU <N>, IO thread, vhost worker, emulator thread, kernel worker), matches the VM against the \
policies of its configuration file, and pins each thread with sched_setaffinity(2), as `virsh vcpupin`, \
`virsh emulatorpin`, `virsh iothreadpin` or `taskset` would, but for VMs it did not start, and checked against \
what the kernel reports back. Policies can name CPUs or take them from pools: an exclusive pool gives each vCPU \
a CPU of its own, topology-aware, never to two VMs at once. The configuration is described in \
vcpud.yaml(5).

A process is a VM only if /proc/<PID>/exe resolves to one of the configured executables, that file is owned by \
root and not writable by group or others, and it is the very file at that path on the host. The name a process \
gives itself and its argv[0] count for nothing.

A VM started with `-name guest=<NAME>,debug-threads=on` names its vCPU and IO threads. Without debug-threads, \
vcpud finds the vCPUs from the KVM_RUN ioctl they sit in; until every vCPU is accounted for, such a VM's other \
unnamed threads are shown as `unknown` and never pinned. Kernel workers of the process are shown, never pinned.

Where another owner confines a VM's threads, vcpud pins through it: through libvirt's API for a VM libvirt \
started (when libvirt-python is installed and libvirtd answers), by writing the per-thread cpuset cgroup of a \
known VM manager's layout, else with sched_setaffinity(2). A thread in a shared cgroup that does not allow the \
policy's CPUs is not pinned; vcpud says which cgroup and what to change.

`vcpud run` is the service; the other commands run once and exit. vcpud needs root, or CAP_SYS_NICE (to pin \
other users' threads) and CAP_SYS_PTRACE (to read their /proc/<PID>/exe and /proc/<TID>/syscall); `vcpud run` \
also uses CAP_NET_ADMIN for the netlink proc connector."""

# Prose per command, in the parser's order.
COMMANDS: dict[str, str] = {
    "topology": """\
Show the host's CPU topology as the kernel's sysfs describes it: sockets, cores, SMT siblings, NUMA nodes, \
caches, online and isolated CPUs. It reads no configuration.""",
    "check": """\
Load the configuration and check it against this host's online CPUs (or those of `--sysroot`), without \
touching any VM. It prints \
`<FILE>: OK, <N> policies, <M> pools` (every file read, the included ones too) and exits 0, or prints every \
error it finds, each as `<FILE>:<LINE>:<COL>: <message>`, and exits 2. A missing configuration file is an \
error.""",
    "apply": """\
Pin every VM's threads once, as the policies say, then exit: discover the VMs, match each to the first policy \
whose `match` holds, place the ones that take CPUs from pools (oldest VM first), pin, and read each affinity \
back. One line per VM says how many threads were pinned, unchanged or failed, and why each failure happened \
(`outside-cpuset`: a cpuset cgroup such as libvirt's refused the CPUs; `no-permission`; `vanished`: the thread \
exited). A VM no policy matches is left alone. Pool assignments are recorded in the state file, as `vcpud run` \
does. The configuration file is required. Exits 1 if any thread that should be pinned is not.""",
    "plan": """\
Show the placement the policies give this host's VMs and, with `--what-if`, imagined ones, with the reason for \
each choice, and the pools with their free CPUs; it pins nothing and writes nothing. Imagined VMs are placed \
after the live ones, in the order given, so `plan` answers how many more VMs of a kind fit. With `--sysroot` \
pointing at another machine's sysfs dump, the live VMs are left out: only imagined VMs are placed on that \
topology. The configuration file is required.""",
    "run": """\
The service: pin every VM at start, then keep them pinned, in the foreground, until SIGTERM or SIGINT. vCPUs, \
IO threads and vhost workers are pinned as they appear (from the netlink proc connector's events, kvm uevents \
and libvirt's events), and a rescan every `rescan_interval` catches what events missed and puts back threads \
that someone else moved. Exclusive pool CPUs are handed out as VMs start and taken back as they stop; VMs \
waiting for pool CPUs are placed as soon as CPUs free up, oldest first. Under systemd (NOTIFY_SOCKET set) it \
reports readiness, reloads, its status line and watchdog pings through sd_notify(3), and logs to the journal \
with the fields VM=, VM_PID=, TID=, ROLE=, CPUS= and POLICY= (`journalctl -u vcpud VM=web1`); elsewhere it \
logs to standard error. It serves Prometheus metrics on http://127.0.0.1:9474/metrics unless the \
configuration or `--metrics-listen` says otherwise. When vcpud stops, the pins stay as they are.""",
    "demo": """\
Show the main job on three tiny paused guests of its own (64 MiB each; KVM, else TCG, said which), in about 30 \
seconds: it starts them (named `vcpud-demo-`<PID>`-1` to `-3`), prints the example policy it writes for them \
and `vcpud ps` before and after starting `vcpud run` on it, hot-plugs a vCPU through QMP and shows it pinned, \
moves a vCPU with `taskset` and shows it put back, prints a few metric lines, then stops everything it \
started, also on Ctrl-C or SIGTERM (if the demo itself is killed, the kernel stops its guests and daemon). \
The policy matches only its own guests, by name and by the demo's private directory in their command line; \
its daemon has its own state file and metrics port, so VMs already on the host and a running vcpud service \
are left alone (a service whose policy matches every VM would fight the demo over its guests: the demo says \
so when it sees one). Needs root, qemu-system-x86_64 and taskset. Exits 1 if a step was not seen in time, \
with the daemon's last log lines.""",
    "ps": """\
List the VMs, their policy and status, and each thread: its role, the CPU it last ran on (PSR), where it may \
run now (AFFINITY) and where its policy wants it (WANT; `-`: no rule). A `!` before a thread marks one that is \
not where its policy wants it. Without a configuration file at the default path it lists every VM as \
unmanaged; a file given with `--config` must exist.""",
}

# Prose per (command, option) for options of one command; the option is its longest spelling.
OPTIONS: dict[tuple[str, str], str] = {
    ("topology", "--parse"): "Print what `lscpu --parse` prints, one CPU a line with logical IDs.",
    ("topology", "--physical"): "With `--parse`: the kernel's IDs, as `lscpu --parse --physical` prints them.",
    ("topology", "--json"): "Print the whole topology model as JSON.",
    ("apply", "--dry-run"): """\
Show what would change and change nothing: no affinity is set and the state file is not written. Pins that a \
cgroup would refuse are predicted (`would fail (outside-cpuset)`), and then the exit status is 1.""",
    ("plan", "--what-if"): """\
Place an imagined VM called <NAME> with <VCPUS> vCPUs and, optionally, <THREADS> guest threads per core (as \
`-smp ...,threads=` says; <VCPUS> must be whole cores), after the live VMs. The name is what policies match \
on (`match: {name: ...}`); an imagined VM has no UUID, command line or user. Repeat the option for more VMs: at \
most 1000, each of at most 4096 vCPUs.""",
    ("plan", "--json"): "Print the plan as JSON: each VM with its CPUs per vCPU, emulator CPUs and reasons, and the "
                        "pools with their free CPUs.",
    ("plan", "--verbose"): "Also print why each vCPU and the emulator got its CPUs.",
    ("run", "--metrics-listen"): """\
Serve the Prometheus metrics at <HOST>`:`<PORT>, `[`<IPV6>`]:`<PORT>, or not at all with `off`; this wins over \
`metrics.listen` in the configuration (default `127.0.0.1:9474`). The host is required: `0.0.0.0:`<PORT> or \
`[::]:`<PORT> listen on every interface. Port 0 takes any free port. A bad address is refused before anything \
starts.""",
    ("demo", "--pace"): "Pause this many seconds between steps, for the reader (default 3; 0: none; at most 60).",
    ("ps", "--json"): "Print every VM and thread as JSON, with each thread's cgroup and which owner would pin it.",
}

# Options that several commands take: described once, in COMMON OPTIONS.
COMMON: dict[str, str] = {
    "--config": "The configuration file, described in vcpud.yaml(5). Default: /etc/vcpud/vcpud.yaml.",
    "--sysroot": """\
Read the CPU topology from <DIR>`/sys/devices/system/cpu` instead of this host's: a copy of another machine's \
sysfs, to look at its topology or plan on it. Default: `/`.""",
    "--log-level": """\
How much to log to standard error (or to the journal, for `run`): `debug`, `info`, `warning` or `error`. Given \
before or after the command. Default: `info` for `run`, `warning` for the other commands.""",
    "--help": "Print a summary of the command's options and exit.",
}

# Placeholders of options whose parser gives none (argparse would say CONFIG, SYSROOT).
PLACEHOLDERS = {"--config": "FILE", "--sysroot": "DIR", "--log-level": "LEVEL"}

GLOBAL_OPTIONS: dict[str, str] = {
    "--version": "Print vcpud's version and exit.",
    "--log-level": "See COMMON OPTIONS.",
    "--help": "Print the list of commands and exit.",
}

SIGNALS = [
    ("SIGHUP", """\
`vcpud run` reads its configuration again (`systemctl reload vcpud` sends it), off the event loop, so threads \
are pinned meanwhile. A valid configuration replaces the running one: VMs whose policy, pool CPUs or placement \
inputs changed are planned again, and threads that are not where the new policy wants them are pinned. An \
invalid one is logged, every error as <FILE>`:`<LINE>`:`<COL>, the running configuration stays, and the \
status line and the metric `vcpud_config_last_reload_successful` say the reload failed. A change of \
`metrics.listen` takes effect only when vcpud restarts. A SIGHUP during a reload reads the file again after it."""),
    ("SIGTERM, SIGINT", """\
`vcpud run` stops within a second and exits 0; pinned threads keep their affinity. The one-shot commands \
exit 130 on SIGINT."""),
]

FILES = [
    ("/etc/vcpud/vcpud.yaml", "The configuration, see vcpud.yaml(5). Files it includes are read too."),
    ("/var/lib/vcpud/state.json", """\
Which exclusive pool CPUs each VM holds, so that a restart keeps every VM on its CPUs (`state_file` in the \
configuration). Written atomically by `run` and `apply`; a missing or corrupt file is rebuilt from the threads' \
current affinities. Not trusted, and not written, if its directory is writable by group or others."""),
    ("/usr/lib/systemd/system/vcpud.service", """\
The systemd unit for `vcpud run`: Type=notify, reload by SIGHUP, a dynamic user holding only CAP_SYS_NICE, \
CAP_NET_ADMIN and CAP_SYS_PTRACE (so the configuration must be world-readable), state in /var/lib/vcpud."""),
    ("http://127.0.0.1:9474/metrics", "Prometheus metrics served by `vcpud run` (see `--metrics-listen`)."),
]

EXIT_STATUS = [
    ("0", "Success. For `run`: stopped by SIGTERM or SIGINT."),
    ("1", """\
A failure: `apply` could not pin some thread (or, with `--dry-run`, predicts it); the CPU topology under \
`--sysroot` cannot be read; the process list cannot be read."""),
    ("2", """\
The configuration does not load (every error is printed as <FILE>`:`<LINE>`:`<COL>`:` <message>), or the \
command line is wrong: an unknown option, a bad value for `--log-level`, `--metrics-listen` or `--what-if`."""),
    ("130", "A one-shot command interrupted by SIGINT."),
]

ENVIRONMENT = [
    ("NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID", """\
Set by systemd for a Type=notify service: `vcpud run` then sends READY=1, RELOADING=1, STOPPING=1, STATUS= and \
watchdog pings (every half of WATCHDOG_USEC)."""),
    ("JOURNAL_STREAM", "Set by systemd when standard error goes to the journal: `vcpud run` then logs to the journal "
                       "with structured fields."),
    ("COLUMNS", "The width of `--help` output."),
]

# (what it shows, command lines); the vcpud lines are parsed by tests/test_manpages.py.
EXAMPLES: list[tuple[str, list[str]]] = [
    ("Check a configuration before installing it:", ["vcpud check --config ./vcpud.yaml"]),
    ("See vcpud at work on three guests of its own, without pauses:", ["vcpud demo --pace 0"]),
    ("See every VM and thread, and what the policies want:", ["vcpud ps"]),
    ("Show what `apply` would change, then pin once:", ["vcpud apply --dry-run", "vcpud apply"]),
    ("How would two more 8-vCPU database VMs with 2 threads per core be placed, with the reasons?",
     ["vcpud plan --what-if db-new1:8:2 --what-if db-new2:8:2 -v"]),
    ("The same question for another machine, from a copy of its /sys:",
     ["vcpud plan --sysroot /srv/dumps/host42 --what-if db-new1:8:2 --json"]),
    ("Run the service in the foreground with debug logging and metrics on every interface:",
     ["vcpud run --log-level debug --metrics-listen 0.0.0.0:9474"]),
    ("Reload the configuration of the running service, and look at its log for one VM:",
     ["systemctl reload vcpud", "journalctl -u vcpud VM=web1"]),
]

SEE_ALSO = ["vcpud.yaml(5)", "taskset(1)", "lscpu(1)", "virsh(1)", "systemd.exec(5)", "sched_setaffinity(2)",
            "cpuset(7)"]


@dataclass(frozen=True)
class Option:
    """One option of the parser, as the page shows it."""

    spellings: tuple[str, ...]  # longest first: --dry-run, -n
    placeholder: str | None     # None: a flag without a value
    repeatable: bool = False

    @property
    def key(self) -> str:
        return self.spellings[0]

    def synopsis(self) -> str:
        value = f" <{self.placeholder}>" if self.placeholder else ""
        return f"[`{self.key}`{value}]" + ("..." if self.repeatable else "")

    def tag(self) -> str:
        value = f" <{self.placeholder}>" if self.placeholder else ""
        return ", ".join(f"`{s}`{value}" for s in self.spellings)


def options(parser: argparse.ArgumentParser) -> list[Option]:
    """The parser's options that a user sees (not SUPPRESSed ones), help excluded."""
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        spellings = tuple(sorted(action.option_strings, key=lambda s: (-len(s), s)))
        takes_value = action.nargs != 0
        placeholder = None
        if takes_value:
            metavar = action.metavar if isinstance(action.metavar, str) else None
            placeholder = metavar or PLACEHOLDERS.get(spellings[0])
            if placeholder is None:
                raise LookupError(f"option {spellings[0]} takes a value but has no placeholder for the man page")
        out.append(Option(spellings, placeholder, isinstance(action, argparse._AppendAction)))
    return out


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The listed subcommands (those with a help line) and their parsers, in the parser's order."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = [a.dest for a in sub._choices_actions]
    return {name: sub.choices[name] for name in listed}


def _prose(command: str, opt: Option) -> str:
    if (command, opt.key) in OPTIONS:
        return OPTIONS[(command, opt.key)]
    if opt.key in COMMON:
        return COMMON[opt.key]
    raise LookupError(f"no man page text for option {opt.key} of `vcpud {command}`")


def _check_unused(cmds: dict[str, argparse.ArgumentParser], common_users: dict[str, list[str]]) -> None:
    """Text for a command or option the parser does not have is an error too: the page would lie."""
    unused = [f"command {c}" for c in COMMANDS if c not in cmds]
    unused += [f"option {o} of {c}" for c, o in OPTIONS if c not in cmds or o not in {x.key for x in options(cmds[c])}]
    unused += [f"common option {o}" for o in COMMON if o != "--help" and o not in common_users]
    if unused:
        raise LookupError(f"man page text for what the parser does not have: {', '.join(unused)}")


def render(parser: argparse.ArgumentParser, date: str, version: str) -> str:
    cmds = commands(parser)
    out = [roff.title(NAME, "8", date, f"vcpud {version}", "System Administration"), roff.heading("NAME"),
           f"{NAME} \\- {roff.escape(SUMMARY)}", roff.heading("SYNOPSIS")]
    out += roff.synopsis("vcpud", ["[`--log-level` <LEVEL>]", "<COMMAND>", "[<OPTIONS>]"])
    out += roff.synopsis("vcpud", ["`--version`"])
    for name, p in cmds.items():
        out += roff.synopsis("vcpud", [f"`{name}`", *(o.synopsis() for o in options(p))])
    out += [roff.heading("DESCRIPTION"), *roff.paragraphs(DESCRIPTION), roff.heading("COMMANDS")]
    common_users: dict[str, list[str]] = {}
    for name, p in cmds.items():
        out += roff.tagged(f"`vcpud {name}`", COMMANDS[name])
        own = []
        for opt in options(p):
            if (name, opt.key) in OPTIONS:
                own.append(opt)
            else:
                _prose(name, opt)  # a LookupError for an option without text
                common_users.setdefault(opt.key, []).append(name)
        if own:
            out += [".RS"]
            for opt in own:
                out += roff.tagged(opt.tag(), OPTIONS[(name, opt.key)])
            out += [".RE"]
    _check_unused(cmds, common_users)
    out.append(roff.heading("COMMON OPTIONS"))
    out += roff.paragraphs("Options that several commands take, after the command's name:")
    spelled = {o.key: o for p in cmds.values() for o in options(p)}
    for key, users in common_users.items():
        which = "every command" if len(users) == len(cmds) else ", ".join(f"`{u}`" for u in users)
        out += roff.tagged(spelled[key].tag(), f"{COMMON[key]} Taken by {which}.")
    out += roff.tagged("`-h`, `--help`", COMMON["--help"])
    out.append(roff.heading("GLOBAL OPTIONS"))
    out += roff.paragraphs("Options before the command:")
    for opt in options(parser):
        if opt.key not in GLOBAL_OPTIONS:
            raise LookupError(f"no man page text for global option {opt.key}")
        out += roff.tagged(opt.tag(), GLOBAL_OPTIONS[opt.key])
    out += roff.tagged("`-h`, `--help`", GLOBAL_OPTIONS["--help"])
    for title, items in (("SIGNALS", SIGNALS), ("EXIT STATUS", EXIT_STATUS), ("ENVIRONMENT", ENVIRONMENT),
                         ("FILES", FILES)):
        out.append(roff.heading(title))
        for tag, body in items:
            out += roff.tagged(f"`{tag}`" if title != "EXIT STATUS" else tag, body)
    out.append(roff.heading("EXAMPLES"))
    for i, (what, lines) in enumerate(EXAMPLES):
        out += ([".PP"] if i else []) + roff.paragraphs(what) + roff.example(lines)
    out += [roff.heading("SEE ALSO"), roff.line(",\n".join(f"\\fB{roff.escape(s.split('(')[0])}\\fR({s.split('(')[1]}"
                                                          for s in SEE_ALSO))]
    return "\n".join(out) + "\n"
