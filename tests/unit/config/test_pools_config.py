"""CPU pools in vcpud.config (pooldefs): the top-level `pools`, and the policy keys that take
CPUs from them (vcpus: {pool: ...}, emulatorpin: {pool/isolate}, on_exhausted)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vcpud.config import DEFAULT_METRICS_LISTEN, DEFAULT_STATE_FILE, Config, ConfigError, FrozenMap, Policy, load_config
from vcpud.discovery import Role
from vcpud.pools import CACHE_MODES, NUMA_MODES, SMT_MODES, PlacementRule, PoolSpec

from tests.unit.config.helpers import TWO_CPUS, assert_issue, cpus, cpus_for, issues, one_issue, parse, policy, write


POOLS = 'pools:\n  dedicated: {cpus: "4-31", exclusive: true}\n  shared: {cpus: "2-3"}\n'


def pooled(body: str) -> str:
    """POOLS plus a one-policy config 'p' whose extra lines start on line 7."""
    return POOLS + policy(body)


# --- good pools --------------------------------------------------------------------------


def test_pools_and_pool_rules_parse():
    cfg = parse(
        """\
        policies:
          - name: db
            match: {name: "db-*"}
            vcpus: {pool: dedicated, smt: mirror, numa: single, cache: l3}
            emulatorpin: {pool: shared}
            on_exhausted: shared
          - name: web
            match: {name: "web*"}
            vcpus: {pool: dedicated}
            emulatorpin: {isolate: true}
            on_exhausted: fail
        pools:                      # after the policies naming them: fine
          dedicated: {cpus: "4-31", exclusive: true}
          shared:    {cpus: "2-3"}
          spare:     {cpus: 32, exclusive: false}
        metrics:
          listen: "[::1]:9474"
        state_file: /run/vcpud/state.json
        """
    )
    assert list(cfg.pools) == ["dedicated", "shared", "spare"]  # file order
    assert cfg.pools["dedicated"] == PoolSpec("dedicated", cpus("4-31"), exclusive=True)
    assert cfg.pools["shared"] == PoolSpec("shared", cpus("2-3"), exclusive=False)
    assert cfg.pools["spare"].exclusive is False
    assert isinstance(cfg.pools, FrozenMap)
    assert cfg.metrics_listen == "[::1]:9474"
    assert cfg.state_file == Path("/run/vcpud/state.json")
    db, web = cfg.policies
    assert db.vcpus is None
    assert db.vcpus_rule == PlacementRule("dedicated", smt="mirror", numa="single", cache="l3")
    assert db.emulatorpin == cpus("2-3") and db.emulator_pool == "shared" and db.emulator_isolate is False
    assert db.on_exhausted == "shared"
    assert web.vcpus_rule == PlacementRule("dedicated", smt="any", numa="any", cache="any")
    assert web.emulator_isolate is True and web.emulatorpin is None and web.emulator_pool is None
    assert web.on_exhausted == "fail"
    # The planner's view: pooled vCPUs have no fixed CPUs; a pool's emulator CPUs do.
    assert cpus_for(db, Role.VCPU, vcpu=0) is None
    assert cpus_for(db, Role.EMULATOR) == cpus("2-3")
    assert cpus_for(web, Role.EMULATOR) is None
    hash(cfg)


def test_pool_defaults():
    cfg = parse("")
    assert cfg.pools == {} and isinstance(cfg.pools, FrozenMap)
    assert cfg.metrics_listen == DEFAULT_METRICS_LISTEN == "127.0.0.1:9474"
    assert cfg.state_file == DEFAULT_STATE_FILE == Path("/var/lib/vcpud/state.json")
    assert parse("pools:\n").pools == {} and parse("pools: {}\n").pools == {}
    assert parse("metrics: {}\n").metrics_listen == "127.0.0.1:9474"
    (p,) = parse(pooled("vcpus: {pool: dedicated}\n")).policies
    assert p.vcpus_rule == PlacementRule("dedicated")
    assert (p.on_exhausted, p.emulator_isolate, p.emulator_pool, p.emulatorpin) == ("leave", False, None, None)
    plain = Policy(name="x")
    assert (plain.vcpus_rule, plain.on_exhausted, plain.emulator_isolate, plain.emulator_pool) == (
        None, "leave", False, None)
    # Hand-built configs take plain dicts and stay hashable.
    assert hash(Config(pools={"a": PoolSpec("a", cpus("1"))})) == hash(Config(pools={"a": PoolSpec("a", cpus("1"))}))


@pytest.mark.parametrize("smt", SMT_MODES)
@pytest.mark.parametrize("numa", NUMA_MODES)
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_every_placement_mode(smt, numa, cache):
    (p,) = parse(pooled(f"vcpus: {{pool: dedicated, smt: {smt}, numa: {numa}, cache: {cache}}}\n")).policies
    assert p.vcpus_rule == PlacementRule("dedicated", smt, numa, cache)


def test_non_exclusive_vcpus_pool_floats_like_a_cpu_list():
    (p,) = parse(pooled('vcpus: {pool: shared}\nvcpupin: {0: "1"}\nemulatorpin: {isolate: false}\n')).policies
    assert p.vcpus == cpus("2-3") and p.vcpus_rule is None
    assert p.emulatorpin is None and not p.emulator_isolate
    # vcpupin wins for its indexes, as with a CPU list.
    assert cpus_for(p, Role.VCPU, vcpu=0) == cpus("1")
    assert cpus_for(p, Role.VCPU, vcpu=1) == cpus("2-3")
    assert p.all_cpus() == cpus("1-3")


def test_pools_shared_between_policies_and_empty_emulatorpin():
    cfg = parse(
        POOLS + "policies:\n"
        "  - {name: a, match: {name: a}, vcpus: {pool: dedicated}, on_exhausted: shared}\n"
        "  - {name: b, match: {name: b}, vcpus: {pool: dedicated}, emulatorpin: {}}\n"
        "  - {name: c, match: {name: c}, emulatorpin: {pool: shared}, affinity: 1}\n"
    )
    a, b, c = cfg.policies
    assert a.vcpus_rule == b.vcpus_rule == PlacementRule("dedicated")
    assert b.emulatorpin is None and not b.emulator_isolate
    assert c.emulatorpin == cpus("2-3") and c.emulator_pool == "shared"


def test_pool_cpus_outside_online_and_cpus_in_no_pool():
    # CPUs 0-1 are in no pool: fine. Pools must be online when that is known.
    cfg = parse('pools: {a: {cpus: "1"}}\n', online=TWO_CPUS)
    assert cfg.pools["a"].cpus == cpus("1")
    issue = one_issue(POOLS, online=cpus("0-3"))
    assert_issue(issue, "t.yaml:2:21", "'pools[dedicated].cpus': CPUs 4-31 are not online on this host (online: 0-3)",
                 key="pools[dedicated].cpus")


# --- bad pools and pool rules ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, key, message",
    [
        ('pools:\n  a: {cpus: "0-5"}\n  b: {cpus: "4-7"}\n', "t.yaml:3:13", "pools[b].cpus",
         "pools 'a' and 'b' overlap on CPUs 4-5"),
        ('pools:\n  a: {cpus: "0-5", exclusive: true}\n  b: {cpus: "5", exclusive: true}\n', "t.yaml:3:13",
         "pools[b].cpus", "pools 'a' and 'b' overlap on CPU 5"),
        ('pools:\n  a: {cpus: "3-x"}\n', "t.yaml:2:13", "pools[a].cpus",
         "bad CPU list '3-x' for 'pools[a].cpus': bad range '3-x'"),
        ('pools:\n  a: {cpus: "1", exclusiv: true}\n', "t.yaml:2:18", "pools[a].exclusiv",
         "unknown key 'exclusiv' in pool 'a' (did you mean 'exclusive'?)"),
        ('pools:\n  a: {cpus: "1", exclusive: "yes"}\n', "t.yaml:2:29", "pools[a].exclusive",
         "'pools[a].exclusive' must be true or false, got a string ('yes')"),
        ('pools:\n  a: {cpus: "1", exclusive: 1}\n', "t.yaml:2:29", "pools[a].exclusive",
         "'pools[a].exclusive' must be true or false, got an integer ('1')"),
        ('pools:\n  a: {exclusive: true}\n', "t.yaml:2:6", "pools[a].cpus", "missing required key 'cpus' in pool 'a'"),
        ('pools:\n  "": {cpus: "1"}\n', "t.yaml:2:3", "pools",
         "pool name '' in 'pools' must be non-empty printable text"),
        ('pools:\n  " ": {cpus: "1"}\n', "t.yaml:2:3", "pools", "pool name ' ' in 'pools' must be non-empty"),
        ('pools:\n  yes: {cpus: "1"}\n', "t.yaml:2:3", "pools", "pool names in 'pools' must be text, got a boolean"),
        ('pools:\n  leave: {cpus: "1"}\n', "t.yaml:2:3", "pools", "'leave' cannot be a pool name"),
        ('pools:\n  fail: {cpus: "1"}\n', "t.yaml:2:3", "pools", "'fail' cannot be a pool name"),
        ('pools:\n  1: {cpus: "1"}\n  "1": {cpus: "2"}\n', "t.yaml:3:3", "pools",
         "duplicate pool '1' (first at line 2)"),
        ('pools:\n  a: "4-7"\n', "t.yaml:2:6", "pools[a]",
         "pool 'a' must be a mapping like {cpus: \"4-31\", exclusive: true}, got a string ('4-7')"),
        ("pools: [a, b]\n", "t.yaml:1:8", "pools",
         "'pools' must be a mapping of pool name to {cpus: LIST, exclusive: BOOL}"),
    ],
)
def test_bad_pools(text, where, key, message):
    assert_issue(one_issue(text), where, message, key=key)


def test_every_overlap_is_reported_even_in_otherwise_bad_pools():
    found = issues('pools:\n  a: {cpus: "4-7"}\n  b: {cpus: "6-8", exclusiv: true}\n  c: {cpus: 6}\n')
    assert [(str(i.pos), i.message) for i in found] == [
        ("t.yaml:3:13", "pools 'a' and 'b' overlap on CPUs 6-7"),
        ("t.yaml:3:20", "unknown key 'exclusiv' in pool 'b' (did you mean 'exclusive'?)"),
        ("t.yaml:4:13", "pools 'a' and 'c' overlap on CPU 6"),
        ("t.yaml:4:13", "pools 'b' and 'c' overlap on CPU 6"),
    ]


@pytest.mark.parametrize(
    "body, where, key, message",
    [
        # unknown pools, with the nearest name
        ("vcpus: {pool: dedicatd}\n", "t.yaml:7:19", "vcpus.pool",
         "unknown pool 'dedicatd' for 'vcpus.pool' in policy 'p' (did you mean 'dedicated'?)"),
        ("emulatorpin: {pool: shard}\n", "t.yaml:7:25", "emulatorpin.pool",
         "unknown pool 'shard' for 'emulatorpin.pool' in policy 'p' (did you mean 'shared'?)"),
        ("vcpus: {pool: dedicated}\non_exhausted: sharde\n", "t.yaml:8:19", "on_exhausted",
         "unknown pool 'sharde' for 'on_exhausted' in policy 'p': expected 'leave', 'fail' or a non-exclusive pool "
         "(did you mean 'shared'?)"),
        ("vcpus: {pool: dedicated}\non_exhausted: lave\n", "t.yaml:8:19", "on_exhausted",
         "(did you mean 'leave'?)"),
        # emulatorpin
        ("vcpus: {pool: dedicated}\nemulatorpin: {pool: dedicated}\n", "t.yaml:8:25", "emulatorpin.pool",
         "pool 'dedicated' for 'emulatorpin.pool' in policy 'p' is exclusive: its CPUs are for vCPUs only; "
         "use 'emulatorpin: {isolate: true}' for a dedicated emulator CPU from the vcpus pool"),
        ("emulatorpin: {isolate: true}\n", "t.yaml:7:19", "emulatorpin.isolate",
         "'emulatorpin: {isolate: true}' in policy 'p' needs 'vcpus: {pool: ...}' with an exclusive pool"),
        ('vcpus: "1"\nemulatorpin: {isolate: true}\n', "t.yaml:8:19", "emulatorpin.isolate",
         "needs 'vcpus: {pool: ...}' with an exclusive pool"),
        ("vcpus: {pool: shared}\nemulatorpin: {isolate: yes}\n", "t.yaml:8:19", "emulatorpin.isolate",
         "needs 'vcpus: {pool: ...}' with an exclusive pool"),
        ("vcpus: {pool: dedicated}\nemulatorpin: {pool: shared, isolate: false}\n", "t.yaml:8:18", "emulatorpin",
         "'emulatorpin' in policy 'p' takes either 'pool' or 'isolate', not both"),
        ("vcpus: {pool: dedicated}\nemulatorpin: {isolate: 1}\n", "t.yaml:8:28", "emulatorpin.isolate",
         "'emulatorpin.isolate' in policy 'p' must be true or false, got an integer ('1')"),
        ("emulatorpin: {pool: shared, cpus: 1}\n", "t.yaml:7:33", "emulatorpin.cpus",
         "unknown key 'cpus' in 'emulatorpin' of policy 'p'"),
        ("emulatorpin: [1]\n", "t.yaml:7:18", "emulatorpin",
         "'emulatorpin' in policy 'p' must be a CPU list like \"0-3,8\", a pool like {pool: NAME} or {isolate: true}"),
        # on_exhausted
        ("vcpus: {pool: dedicated}\non_exhausted: dedicated\n", "t.yaml:8:19", "on_exhausted",
         "'on_exhausted' in policy 'p' names exclusive pool 'dedicated': a VM waiting for dedicated CPUs can only "
         "float over a non-exclusive pool"),
        ("on_exhausted: shared\n", "t.yaml:7:5", "on_exhausted",
         "'on_exhausted' in policy 'p': on_exhausted only applies to vcpus: {pool: ...} with an exclusive pool"),
        ("vcpus: {pool: shared}\non_exhausted: leave\n", "t.yaml:8:5", "on_exhausted",
         "on_exhausted only applies to vcpus: {pool: ...}"),
        ("vcpus: {pool: dedicated}\non_exhausted: [leave]\n", "t.yaml:8:19", "on_exhausted",
         "'on_exhausted' in policy 'p' must be 'leave', 'fail' or the name of a non-exclusive pool, got a list"),
        # vcpus mapping
        ("vcpus: {smt: mirror}\n", "t.yaml:7:12", "vcpus.pool", "missing required key 'pool' in 'vcpus' of policy 'p'"),
        ("vcpus: {pool: dedicated, smt: mirorr}\n", "t.yaml:7:35", "vcpus.smt",
         "bad value 'mirorr' for 'vcpus.smt' in policy 'p': expected one of any, mirror, isolate, full-cores "
         "(did you mean 'mirror'?)"),
        ("vcpus: {pool: dedicated, numa: one}\n", "t.yaml:7:36", "vcpus.numa",
         "bad value 'one' for 'vcpus.numa' in policy 'p': expected one of any, single, spread"),
        ("vcpus: {pool: dedicated, cache: L3}\n", "t.yaml:7:37", "vcpus.cache", "expected one of any, l3"),
        ("vcpus: {pool: dedicated, smt: off}\n", "t.yaml:7:35", "vcpus.smt",
         "'vcpus.smt' in policy 'p' must be one of any, mirror, isolate, full-cores, got a boolean ('off'"),
        ("vcpus: {pool: dedicated, nuam: single}\n", "t.yaml:7:30", "vcpus.nuam",
         "unknown key 'nuam' in 'vcpus' of policy 'p' (did you mean 'numa'?)"),
        ("vcpus: {pool: shared, smt: mirror}\n", "t.yaml:7:27", "vcpus.smt",
         "'vcpus.smt' in policy 'p': smt/numa/cache only apply to an exclusive pool; pool 'shared' is not exclusive"),
        ("vcpus: {pool: shared, cache: any}\n", "t.yaml:7:27", "vcpus.cache",
         "smt/numa/cache only apply to an exclusive pool"),
        ("vcpus: {pool: dedicated}\nvcpupin: {0: 1}\n", "t.yaml:8:5", "vcpupin",
         "'vcpupin' in policy 'p' cannot be combined with 'vcpus: {pool: dedicated}'"),
        # pool keys written straight into the policy
        ("smt: mirror\n", "t.yaml:7:5", "smt",
         "unknown key 'smt' in policy 'p' (it belongs under 'vcpus: {pool: ...}')"),
        ("isolate: true\n", "t.yaml:7:5", "isolate", "(write 'emulatorpin: {isolate: true}')"),
    ],
)
def test_bad_pool_rules(body, where, key, message):
    assert_issue(one_issue(pooled(body)), where, message, key=key)


def test_vcpupin_with_an_exclusive_pool_says_why():
    issue = one_issue(pooled("vcpus: {pool: dedicated}\nvcpupin: {0: 1}\n"))
    assert "ambiguous" in issue.message


def test_unknown_pool_without_any_pools():
    issue = one_issue(policy("vcpus: {pool: dedicated}\n"))
    assert_issue(issue, "t.yaml:4:19", "unknown pool 'dedicated' for 'vcpus.pool' in policy 'p' "
                 "(no pools are defined: add them under the top-level 'pools')", key="vcpus.pool")


def test_broken_pools_and_rules_do_not_cascade():
    # A pool with an error is known: naming it is not "unknown", and nothing more is said.
    text = 'pools:\n  d: {cpus: "x", exclusive: true}\n' + policy(
        "vcpus: {pool: d}\nemulatorpin: {isolate: true}\non_exhausted: d\n")
    (issue,) = issues(text)
    assert_issue(issue, "t.yaml:2:13", "bad CPU list 'x'", key="pools[d].cpus")
    # A broken vcpus hides what it would have allowed: no isolate/on_exhausted errors.
    found = issues(pooled("vcpus: {pool: nope}\nemulatorpin: {isolate: true}\non_exhausted: shared\n"))
    assert [i.key for i in found] == ["vcpus.pool"]


def test_pool_rule_errors_are_all_reported():
    found = issues(
        POOLS + "policies:\n"
        "  - {name: a, match: {}, vcpus: {pool: dedicated}, vcpupin: {0: 1}, on_exhausted: dedicated}\n"
        "  - {name: b, match: {}, emulatorpin: {isolate: true}, on_exhausted: fail}\n"
    )
    assert [(str(i.pos), i.key) for i in found] == [
        ("t.yaml:5:52", "vcpupin"),
        ("t.yaml:5:83", "on_exhausted"),
        ("t.yaml:6:40", "emulatorpin.isolate"),
        ("t.yaml:6:56", "on_exhausted"),
    ]
    assert "policy 'a'" in found[0].message and "policy 'b'" in found[3].message


def test_pools_metrics_state_file_only_in_the_main_file(tmp_path):
    main = write(tmp_path / "vcpud.yaml", POOLS + "include: p.yaml\n")
    write(
        tmp_path / "p.yaml",
        'pools: {x: {cpus: "1"}}\nmetrics: {listen: off}\nstate_file: /x\n'
        "policies:\n  - {name: inc, match: {}, vcpus: {pool: dedicated}, on_exhausted: shared}\n",
    )
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    found = ei.value.issues
    assert [(str(i.pos), i.key) for i in found] == [
        (f"{tmp_path}/p.yaml:1:1", "pools"),
        (f"{tmp_path}/p.yaml:2:1", "metrics"),
        (f"{tmp_path}/p.yaml:3:1", "state_file"),
    ]
    assert found[0].message == "'pools' is only allowed in the main config file, not in an included one"
    # Included policies name the main file's pools.
    write(
        tmp_path / "p.yaml", "policies:\n  - {name: inc, match: {}, vcpus: {pool: dedicated}, on_exhausted: shared}\n"
    )
    (inc,) = load_config(main).policies
    assert inc.vcpus_rule == PlacementRule("dedicated") and inc.on_exhausted == "shared"
