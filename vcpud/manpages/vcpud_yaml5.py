"""vcpud.yaml(5): the prose of every configuration key, section by section, and the examples.

Each key is a :class:`Key` whose path tests/test_manpages.py compares with the schema's field
tables (vcpud.config.schema, pooldefs, matching) in both directions, and whose default with the
code's constants. This module imports nothing outside the standard library (nor the schema:
it needs PyYAML), so the pages build with a bare python3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import roff


@dataclass(frozen=True)
class Key:
    """One configuration key: its path in its section, the value it takes, its default, its text."""

    path: str             # "rescan_interval", "metrics.listen", "pools.<NAME>.cpus", "match.uuid"
    value: str            # the value's form, in inline markup
    body: str
    default: str | None = None  # as the page shows it; None: no default (required, or no rule)

    def tag(self) -> str:
        """``pools.<NAME>.cpus: <CPUS>``: the path in bold, placeholders in it in italics."""
        return re.sub(r"<([A-Z]+)>", r"`<\1>`", f"`{self.path}:`").replace("``", "") + " " + self.value

    def text(self) -> str:
        return self.body + (f" Default: `{self.default}`." if self.default is not None else "")


@dataclass(frozen=True)
class Example:
    """A configuration shown in EXAMPLES; ``files``: name -> text (the first is the main file)."""

    intro: str
    files: dict[str, str]
    online: str  # the CPUs of the host it is written for; tests load it against them


DESCRIPTION = """\
vcpud(8) reads its policies from one YAML file, /etc/vcpud/vcpud.yaml unless `--config` names another, and \
the files it includes. `vcpud check` loads it against this host's CPUs and reports every mistake at once, each \
as <FILE>`:`<LINE>`:`<COL>`:` <message> (at most 50, then how many more); `vcpud run` reads it at start and \
again on SIGHUP, keeping the running configuration when the new one has errors.

Every key is optional except where said. An unknown key is an error (with a hint when it belongs one level \
away, or is misspelt), and so is a duplicate key. Top-level keys starting with `x-` are ignored: a place for \
YAML anchors that several policies merge with `<<: *`<anchor>. An empty file is a configuration without \
policies; an empty value (`key:`) is an error except for `policies:` and `pools:`, which then hold none.

Values are taken as typed. YAML 1.1 reads `on`, `off`, `yes`, `no`, `true` and `false` as booleans: vcpud \
refuses them where text or CPUs are expected (quote them), and a number is the digits written, so `010` is \
CPU 10 and `0x100` is a mask, not the number 256. Quote CPU lists that contain anything but digits."""

TOP_KEYS = [
    Key("executables", "<PATH> | [<PATH>, ...]", """\
The programs whose processes are VMs: absolute paths, globs allowed (`*` does not match `/`), one or a list. A \
process is a VM only if /proc/<PID>/exe resolves to one of them, the file is owned by root and not writable by \
group or others, and it is the very file at that path on the host (same device and inode). Main file only.""",
        default="[/usr/bin/qemu-system-*, /usr/libexec/qemu-kvm, /usr/bin/kvm]"),
    Key("include", "<GLOB> | [<GLOB>, ...]", """\
More files to read after this one: globs relative to this file's directory (or absolute). Each glob's files \
are read in name order, globs in the order given; a file matched twice, or the main file itself, is read once. \
A glob that matches no file is an error, and so are more than 256 included files. An included file may hold \
only `policies` and `x-` keys (no `include`); its policies come after the main file's, in reading order. Main \
file only."""),
    Key("rescan_interval", "<DURATION>", """\
How often `vcpud run` looks at every VM besides reacting to events, to catch what events missed and to put \
back threads someone else moved: seconds (`10`, `0.5`) or a number with a unit `ms`, `s`, `m` or `h` \
(`"500ms"`, `"2m"`), from 100ms to a day. A reload applies a new value at once. Main file only.""",
        default="10s"),
    Key("pools", "{<NAME>: {cpus: <CPUS>, exclusive: <BOOL>}, ...}", """\
Named sets of host CPUs that policies take CPUs from; see POOLS. Pool names are non-empty printable text, \
neither `leave` nor `fail`; pools must not overlap; at most 1024. Main file only, and read before the policies \
wherever it stands in the file."""),
    Key("metrics", "{listen: <ADDRESS>}", "Where `vcpud run` serves Prometheus metrics. Main file only."),
    Key("metrics.listen", "<HOST>`:`<PORT> | `[`<IPV6>`]:`<PORT> | `off`", """\
The address of the metrics server (path `/metrics`). <HOST> is an IPv4 address or a host name; an IPv6 address, \
with an optional `%`<ZONE>, goes in brackets. The host is required: `0.0.0.0:`<PORT> listens on every IPv4 \
interface, `[::]:`<PORT> on every interface, so that serving beyond loopback is always written out. Port 0 \
takes any free port. `off` (also unquoted, or `false`, `no`) serves no metrics. `vcpud run --metrics-listen` \
wins over this key. A change takes effect when vcpud restarts, not on reload.""",
        default="127.0.0.1:9474"),
    Key("state_file", "<PATH>", """\
An absolute file path where vcpud records which exclusive pool CPUs each VM holds, so that a restart keeps \
every VM on its CPUs. It is written atomically; a missing or corrupt file is rebuilt from the threads' \
current affinities, and a file whose directory is writable by group or others is neither trusted nor \
written. Main file only.""",
        default="/var/lib/vcpud/state.json"),
    Key("policies", "[<POLICY>, ...]", """\
The policies, each a mapping of the keys in POLICY KEYS, tried in order for each VM: the first whose \
`match` holds decides, see PRECEDENCE. Allowed in included files too. At most 10000 in all files together."""),
]

POLICY_KEYS = [
    Key("name", "<TEXT>", """\
Required. The policy's name, shown by `vcpud ps` and `vcpud plan`, in logs and metrics: non-empty printable \
text, unique across all files."""),
    Key("match", "{<FIELD>: <VALUE>, ...}", """\
Required. Which VMs the policy is for: every field given must hold (see MATCH KEYS); `{}` matches every VM. \
A field the VM does not have (no name, no UUID) does not hold."""),
    Key("match.name", "<GLOB>", """\
The guest name, from QEMU's `-name guest=`<NAME> (or `-name `<NAME>), against a shell-style glob (`*`, `?`, \
`[...]`), case-sensitive."""),
    Key("match.uuid", "<UUID>", """\
The VM's UUID (8-4-4-4-12 hex digits), case-insensitive: from `-uuid` or `-smbios type=1,uuid=`, the last one \
given winning, as in QEMU."""),
    Key("match.cmdline", "<REGEX>", """\
A Python regular expression searched for (not anchored) in the QEMU command line, its arguments joined with \
single spaces. Quote it with single quotes in YAML to keep backslashes."""),
    Key("match.user", "<USER> | <UID>", "The user owning the QEMU process: a user name, or a numeric uid."),
    Key("match.vcpus", "<N> | `\"`<MIN>`-`<MAX>`\"`", """\
The VM's vCPU count (`-smp`), exactly <N> or within the inclusive range."""),
    Key("vcpupin", "{<INDEX>: <CPUS>, ...}", """\
Pin vCPU <INDEX> (from 0) to those CPUs; wins over `vcpus` for the vCPUs it names. Indices the VM does not \
have are ignored. Cannot be combined with `vcpus` taking an exclusive pool."""),
    Key("vcpus", "<CPUS> | {pool: <NAME>, smt: <MODE>, numa: <MODE>, cache: <MODE>}", """\
Every vCPU not named in `vcpupin` floats over these CPUs; or, with a pool, takes CPUs from it: see POOLS."""),
    Key("vcpus.pool", "<NAME>", """\
Required in the mapping form: a pool defined under `pools`. An exclusive pool gives each vCPU one CPU of its \
own; over a non-exclusive pool the vCPUs float, as if its CPU list were written out."""),
    Key("vcpus.smt", "`any` | `mirror` | `isolate` | `full-cores`", """\
How dedicated CPUs follow the host's SMT siblings (exclusive pools only): `any` takes free CPUs core by core; \
`mirror` puts the threads of one guest core (`-smp ...,threads=`<N>) on the siblings of one host core and \
guest cores on distinct host cores; `isolate` gives each vCPU a host core of its own and keeps its siblings \
free; `full-cores` uses whole host cores only, never sharing a physical core with another VM.""",
        default="any"),
    Key("vcpus.numa", "`any` | `single` | `spread`", """\
How dedicated CPUs follow NUMA nodes (exclusive pools only): `any` keeps the VM in one node when it fits, else \
spans nodes; `single` keeps it in one node or does not place it (see `on_exhausted`); `spread` balances it \
over the pool's nodes.""",
        default="any"),
    Key("vcpus.cache", "`any` | `l3`", """\
How dedicated CPUs follow the host's caches (exclusive pools only): `any` ignores them; `l3` prefers CPUs \
that share one L3 cache, when the VM fits in one.""",
        default="any"),
    Key("emulatorpin", "<CPUS> | {pool: <NAME>} | {isolate: <BOOL>}", """\
The emulator threads: QEMU's main thread and its other threads that are not vCPUs, IO threads, vhost or \
kernel workers (`call_rcu`, worker threads, the monitor's IO thread) on these CPUs; or floating over a \
non-exclusive pool; or on a dedicated CPU of their own. `{}` and `{isolate: false}` are no rule. `pool` \
and `isolate` exclude each other."""),
    Key("emulatorpin.pool", "<NAME>", """\
A non-exclusive pool whose CPUs the emulator threads float over, leaving out isolated CPUs (`isolcpus`) when \
others remain."""),
    Key("emulatorpin.isolate", "<BOOL>", """\
`true`: one more dedicated CPU, from the exclusive pool of `vcpus`, for the emulator threads. Needs \
`vcpus: {pool: `<NAME>`}` with an exclusive pool.""",
        default="false"),
    Key("iothreadpin", "<CPUS> | {<ID>: <CPUS>, ...}", """\
The IO threads (`-object iothread,id=`<ID>): all of them on these CPUs, or each by its id. An IO thread whose \
id the mapping does not name falls back to `affinity`."""),
    Key("vhostpin", "<CPUS>", """\
The vhost worker threads serving the VM's vhost-net devices, which are threads of the QEMU process since \
Linux 6.4."""),
    Key("affinity", "<CPUS>", """\
Every thread of the VM that no more specific key above covers, as `taskset` would (vCPUs of an exclusive pool \
excepted)."""),
    Key("on_exhausted", "`leave` | `fail` | <NAME>", """\
With `vcpus` taking an exclusive pool only: what a VM does while the pool has too few free CPUs for it. \
`leave`: it waits, reported as waiting; `fail`: it waits, reported as failed (`vcpud apply` exits 1); \
<NAME> of a non-exclusive pool: its vCPUs (and an isolated emulator) float over that pool meanwhile. A \
waiting or failed VM is placed, oldest first, as soon as CPUs free up.""",
        default="leave"),
]

POOL_KEYS = [
    Key("pools.<NAME>.cpus", "<CPUS>", "Required. The pool's CPUs; no CPU may be in two pools."),
    Key("pools.<NAME>.exclusive", "<BOOL>", """\
`true`: each CPU belongs to at most one VM at a time. vcpud hands them out as VMs start, oldest first, and \
takes them back when they stop; a running VM keeps its CPUs while others come and go, across reloads that \
leave them in the pool, and across restarts (`state_file`). `false`: threads float over all of the pool's \
CPUs, shared.""",
        default="false"),
]

POOLS = """\
Fixed CPU lists make the operator do the placement; pools let vcpud do it. CPUs in no pool are left to the \
host (housekeeping). A policy takes CPUs from a pool with `vcpus: {pool: `<NAME>`}`, and its emulator threads \
with `emulatorpin: {pool: `<NAME>`}` (non-exclusive) or `emulatorpin: {isolate: true}` (one more CPU of the \
exclusive pool).

A VM that an exclusive pool cannot take yet waits (`on_exhausted`), and its vCPUs are never left on CPUs that \
other VMs hold: vcpud moves them to the online CPUs in no exclusive pool that are not isolated; if there are \
none, to the exclusive pools' CPUs that nobody holds; if every online CPU is held, to all online CPUs. When a \
pool CPU goes offline, the VMs on it are placed again."""

CPU_LISTS = """\
A CPU list (<CPUS> above) is written as the kernel and `taskset -c` print it: numbers and ranges separated by \
commas (`"0-3,8"`: CPUs 0, 1, 2, 3 and 8), ranges with a stride (`"0-15:2"`: every second CPU from 0 to 14), or \
a hexadecimal mask starting with `0x` (`"0x100"`: CPU 8). A single CPU may be written as a bare number (`1`). \
Blanks around the elements are allowed; an empty list, an empty element, a range running backwards and CPU \
numbers above 8191 are errors.

Every CPU a list names must be online on this host when the configuration is loaded, by `vcpud check`, at \
start and on reload; if a CPU goes offline later, its threads keep the online rest."""

PRECEDENCE = """\
Policies are tried in reading order (the main file's, then each included file's) and the first whose `match` \
holds decides the VM's placement; later policies are not tried, even if the first pins nothing (a policy \
without rules claims its VMs and leaves them alone). A VM that no policy matches is left alone.

Within the policy, each thread gets the CPUs of the first key that applies to it:

vCPU <N>: `vcpupin` <N>, then `vcpus` (a CPU list, or a pool; with an exclusive pool, the vCPU's dedicated CPU, \
or while it waits, what `on_exhausted` says), then `affinity`.

Emulator threads: `emulatorpin`, then `affinity`.

IO thread <ID>: `iothreadpin` <ID> in the mapping form, `iothreadpin` as a CPU list, then `affinity`.

vhost workers: `vhostpin`, then `affinity`.

A thread that no key covers keeps the affinity it has. Kernel workers in the QEMU process, and threads that \
cannot be told apart from vCPUs, are never pinned.

For the metrics address, `vcpud run --metrics-listen` wins over `metrics.listen`, which wins over the default. \
A key left out takes its default."""

EXAMPLES = [
    Example("The smallest useful configuration: every thread of the VMs named web-something on CPU 1, all other "
            "VMs left alone.", {"vcpud.yaml": """\
policies:
  - name: web
    match: {name: "web*"}
    affinity: "1"
"""}, online="0-1"),
    Example("Fixed pinning on a 2-CPU host, as `virsh vcpupin`, `emulatorpin` and `iothreadpin` would do it; a "
            "shared anchor; and a policy that keeps vcpud away from some VMs.", {"vcpud.yaml": """\
x-housekeeping: &housekeeping
  emulatorpin: "0"
  vhostpin: "0"

policies:
  - name: scratch            # claims these VMs, pins nothing
    match: {name: "scratch-*"}
  - name: core8
    match:
      name: core8
      vcpus: "2-4"
    vcpupin: {0: "0", 1: "1"}
    vcpus: "0-1"             # vCPUs 2 and up float over CPUs 0 and 1
    iothreadpin: {iothread1: "1"}
    <<: *housekeeping
  - name: realtime
    match:
      cmdline: '-overcommit\\s+cpu-pm=on'
      user: libvirt-qemu
    vcpus: "1"
    emulatorpin: "0"
"""}, online="0-1"),
    Example("Dedicated CPUs from an exclusive pool on a host with 32 CPUs (16 cores, 2 threads each, CPU <N> and "
            "<N>+16 siblings): CPUs 0-3 and 16-19 stay with the host; each guest core of the database VMs gets the "
            "two threads of one host core of its own, all in one NUMA node; their emulator threads float over a "
            "shared pool, and so do their vCPUs while the dedicated pool is full; all other VMs float over the "
            "shared pool.", {"vcpud.yaml": """\
pools:
  dedicated: {cpus: "6-15,22-31", exclusive: true}
  shared: {cpus: "4-5,20-21"}
policies:
  - name: db
    match: {name: "db-*"}
    vcpus: {pool: dedicated, smt: mirror, numa: single}
    emulatorpin: {pool: shared}
    on_exhausted: shared
  - name: other
    match: {}
    vcpus: {pool: shared}
    emulatorpin: {pool: shared}
"""}, online="0-31"),
    Example("Drop-in files, metrics on every interface, a faster rescan and another state file: the main file "
            "/etc/vcpud/vcpud.yaml and an included /etc/vcpud/policies.d/10-web.yaml.", {"vcpud.yaml": """\
include: policies.d/*.yaml
rescan_interval: 5s
metrics:
  listen: "[::]:9474"
state_file: /var/lib/vcpud/pools.json
policies:
  - name: pinned
    match: {uuid: 6f1c6ad2-6d28-4f4e-9a1b-3c2d8e0a5b71}
    affinity: "0"
""", "policies.d/10-web.yaml": """\
policies:
  - name: web
    match: {name: "web*"}
    affinity: "1"
"""}, online="0-1"),
]

FILES = [
    ("/etc/vcpud/vcpud.yaml", "The configuration; the systemd unit runs `vcpud run --config /etc/vcpud/vcpud.yaml`. "
                              "The service runs as a dynamic user: the file and the files it includes must be "
                              "world-readable."),
    ("/var/lib/vcpud/state.json", "The default `state_file`."),
]

SEE_ALSO = ["vcpud(8)", "taskset(1)", "lscpu(1)", "virsh(1)", "qemu-system-x86_64(1)", "glob(7)", "cpuset(7)"]


def render(date: str, version: str) -> str:
    out = [roff.title("vcpud.yaml", "5", date, f"vcpud {version}", "File Formats"), roff.heading("NAME"),
           "vcpud.yaml \\- configuration file of vcpud(8)", roff.heading("SYNOPSIS"), "/etc/vcpud/vcpud.yaml",
           roff.heading("DESCRIPTION"), *roff.paragraphs(DESCRIPTION)]
    for title, keys in (("TOP-LEVEL KEYS", TOP_KEYS), ("POLICY KEYS", POLICY_KEYS)):
        out.append(roff.heading(title))
        for key in keys:
            out += roff.tagged(key.tag(), key.text())
    out += [roff.heading("POOLS"), *roff.paragraphs(POOLS)]
    for key in POOL_KEYS:
        out += roff.tagged(key.tag(), key.text())
    for title, text in (("CPU LIST SYNTAX", CPU_LISTS), ("PRECEDENCE", PRECEDENCE)):
        out += [roff.heading(title), *roff.paragraphs(text)]
    out.append(roff.heading("EXAMPLES"))
    for i, ex in enumerate(EXAMPLES):
        out += ([".PP"] if i else []) + roff.paragraphs(ex.intro)
        for name, text in ex.files.items():
            if len(ex.files) > 1:
                out += roff.paragraphs(f"`{name}`:")
            out += roff.example(text.splitlines())
    out.append(roff.heading("FILES"))
    for path, body in FILES:
        out += roff.tagged(f"`{path}`", body)
    out += [roff.heading("SEE ALSO"), ",\n".join(f"\\fB{roff.escape(s.split('(')[0])}\\fR({s.split('(')[1]}"
                                                 for s in SEE_ALSO)]
    return "\n".join(out) + "\n"
