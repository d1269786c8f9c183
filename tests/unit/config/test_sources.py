"""Config files and includes (vcpud.config sources and loader): reading, encodings, include
globs and their order, errors inside included files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vcpud.config import ConfigError, Position, load_config

from tests.unit.config.helpers import TWO_CPUS, assert_issue, one_issue, parse, write


# --- reading the main file ---------------------------------------------------------------


def test_missing_main_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    (issue,) = ei.value.issues
    assert issue.pos == Position(str(path), 1, 1)
    assert "cannot read config file: No such file or directory" in issue.message


def test_main_file_is_a_directory(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path)
    assert str(ei.value).startswith(f"{tmp_path}:1:1: cannot read config file")


def test_main_file_not_utf8(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_bytes(b"\xef\xbb\xbfpolicies: []\nx: ab\xffc\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    (issue,) = ei.value.issues
    assert str(issue).startswith(f"{path}:2:6: not valid UTF-8")


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_bytes(b"\xef\xbb\xbfpolicies:\n  - {name: a, match: {}, affinity: z}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(ei.value.issues[0].pos) == f"{path}:2:36"


# --- includes ----------------------------------------------------------------------------


def test_includes_in_name_order_relative_to_the_including_file(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    main = write(
        etc / "vcpud.yaml",
        """\
        include: [policies.d/*.yaml, extra.yaml]
        policies:
          - {name: main, match: {name: main}}
        """,
    )
    write(etc / "policies.d" / "20-b.yaml", "policies:\n  - {name: b, match: {}}\n")
    write(etc / "policies.d" / "10-a.yaml", "policies:\n  - {name: a, match: {}}\n")
    write(etc / "policies.d" / "30-c.yaml", "")  # empty drop-in: no policies
    write(etc / "policies.d" / "ignored.txt", "not: yaml: at all")
    write(etc / "policies.d" / ".hidden.yaml", "junk: 1\n")
    write(etc / "extra.yaml", "policies:\n  - {name: extra, match: {}}\n")
    monkeypatch.chdir(tmp_path)  # relative to the file, not to the working directory
    cfg = load_config(Path("etc/vcpud.yaml"))
    assert [p.name for p in cfg.policies] == ["main", "a", "b", "extra"]
    assert cfg.files == (
        "etc/vcpud.yaml",
        "etc/policies.d/10-a.yaml",
        "etc/policies.d/20-b.yaml",
        "etc/policies.d/30-c.yaml",
        "etc/extra.yaml",
    )
    assert cfg.policies[1].pos == Position("etc/policies.d/10-a.yaml", 2, 5)
    assert load_config(main).files[1] == str(etc / "policies.d" / "10-a.yaml")


def test_include_string_absolute_and_read_once(tmp_path):
    inc = write(tmp_path / "d" / "p.yaml", "policies:\n  - {name: a, match: {}}\n")
    main = write(tmp_path / "main.yaml", f"include: [{inc}, d/*.yaml, '*.yaml']\n")
    cfg = load_config(main)
    # Matched three times (the last glob also matches main.yaml itself), read once.
    assert cfg.files == (str(main), str(inc))
    assert [p.name for p in cfg.policies] == ["a"]


def test_include_glob_matching_the_main_file_by_relative_path(tmp_path, monkeypatch):
    write(tmp_path / "etc" / "vcpud.yaml", "include: '*.yaml'\n")
    write(tmp_path / "etc" / "more.yaml", "policies:\n  - {name: more, match: {}}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/vcpud.yaml"))
    assert cfg.files == ("etc/vcpud.yaml", "etc/more.yaml")


def test_include_matching_nothing(tmp_path):
    main = write(tmp_path / "vcpud.yaml", "policies: []\ninclude: policies.d/*.yaml\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    (issue,) = ei.value.issues
    assert str(issue) == f"{main}:2:10: include 'policies.d/*.yaml' matches no file"
    assert issue.key == "include"


def test_include_unreadable_files(tmp_path):
    main = write(tmp_path / "vcpud.yaml", "include:\n  - d/*\n  - bin.yaml\n")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "bin.yaml").write_bytes(b"policies: []\n# caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    found = ei.value.issues
    assert [str(i.pos) for i in found] == [f"{main}:2:5", f"{main}:3:5"]
    assert f"cannot read included file '{tmp_path}/d/sub': Is a directory" in found[0].message
    assert "not valid UTF-8 (line 2, column 6)" in found[1].message


def test_include_permission_denied(tmp_path, monkeypatch):
    main = write(tmp_path / "vcpud.yaml", "include: p.yaml\n")
    p = write(tmp_path / "p.yaml", "policies: []\n")
    if os.geteuid() == 0:  # root reads files whatever their mode
        import vcpud.bounded

        real_read = vcpud.bounded.read_bytes

        def read_bytes(path: Path, limit: int) -> bytes:
            if Path(path) == p:
                raise PermissionError(13, "Permission denied", str(path))
            return real_read(path, limit)

        monkeypatch.setattr(vcpud.bounded, "read_bytes", read_bytes)
    else:
        p.chmod(0)
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    assert str(ei.value) == f"{main}:1:10: cannot read included file '{p}': Permission denied"


def test_nul_in_paths_is_a_config_error(tmp_path):
    main = write(tmp_path / "vcpud.yaml", 'include: "a\\0*.yaml"\nexecutables: ["/usr/bin/q\\0"]\n')
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    assert [(str(i.pos), i.key) for i in ei.value.issues] == [
        (f"{main}:1:10", "include"), (f"{main}:2:15", "executables")
    ]
    assert "NUL character" in ei.value.issues[0].message
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "x\0.yaml")
    assert ei.value.issues[0].pos.line == 1


def test_errors_inside_included_files(tmp_path):
    main = write(
        tmp_path / "vcpud.yaml",
        """\
        include: policies.d/*.yaml
        policies:
          - {name: web, match: {}}
        """,
    )
    write(tmp_path / "policies.d" / "a.yaml", "policies:\n  - name: web\n    match: {}\n")
    write(tmp_path / "policies.d" / "b.yaml", "include: x.yaml\nrescan_interval: 5\npolicies:\n\t- x\n")
    write(tmp_path / "policies.d" / "c.yaml", "policies:\n  - name: c\n    match: {}\n    affinity: 5\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main, online=TWO_CPUS)
    found = [str(i) for i in ei.value.issues]
    d = tmp_path / "policies.d"
    assert found[0] == f"{d}/a.yaml:2:11: duplicate policy name 'web' (first at {main}:3)"
    # b.yaml: a syntax error stops that file only.
    assert found[1].startswith(f"{d}/b.yaml:4:1: invalid YAML")
    assert found[2].startswith(f"{d}/c.yaml:4:15: 'affinity' in policy 'c': CPU 5 is not online")
    assert len(found) == 3


def test_included_files_hold_only_policies(tmp_path):
    main = write(tmp_path / "vcpud.yaml", "include: p.yaml\n")
    write(tmp_path / "p.yaml", "include: q.yaml\nexecutables: [/x]\nx-ok: 1\npolicies: []\n")
    with pytest.raises(ConfigError) as ei:
        load_config(main)
    found = ei.value.issues
    assert [(str(i.pos), i.key) for i in found] == [
        (f"{tmp_path}/p.yaml:1:1", "include"),
        (f"{tmp_path}/p.yaml:2:1", "executables"),
    ]
    assert "'include' is only allowed in the main config file" in found[0].message


def test_parse_config_text_include_needs_base_dir(tmp_path):
    write(tmp_path / "p.yaml", "policies:\n  - {name: a, match: {}}\n")
    issue = one_issue("include: p.yaml\n")
    assert_issue(issue, "t.yaml:1:10", "no base directory", key="include")
    cfg = parse("include: p.yaml\n", base_dir=tmp_path)
    assert [p.name for p in cfg.policies] == ["a"]
    assert cfg.files == ("t.yaml", str(tmp_path / "p.yaml"))
