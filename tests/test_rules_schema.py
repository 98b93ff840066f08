"""Schema errors: each kind, with file, line and field, in words; several at once; never served."""

from __future__ import annotations

import textwrap

import pytest

from gateway.rules import PolicyError, load_policy, load_policy_text


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy_text(textwrap.dedent(text), "policy.yaml")
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


HEAD = """\
version: 1
default: deny
rules:
"""


def test_unknown_op_names_file_line_field_and_suggests() -> None:
    text = HEAD + """\
  - id: a
    effect: allow
    ops: [read]
  - id: b
    effect: allow
    ops: [read]
  - id: c
    effect: deny
    ops:
      - read
      - wirte
"""
    assert problems(text) == ["policy.yaml:14: rules[2].ops: unknown op 'wirte' (did you mean 'write'?)"]


def test_several_errors_are_reported_together_in_line_order() -> None:
    text = HEAD + """\
  - id: a
    effect: alow
    ops: [read]
    pathz: ["/x"]
  - id: b
    ops: [read]
    when: {uid: ["5-3"]}
"""
    got = problems(text)
    assert got == [
        "policy.yaml:5: rules[0].effect: the text 'alow' is not allowed: use allow or deny "
        "(did you mean 'allow'?)",
        "policy.yaml:7: rules[0]: unknown field 'pathz' (did you mean 'paths'?)",
        "policy.yaml:8: rules[1].effect: missing (required)",
        "policy.yaml:10: rules[1].when.uid: range 5-3 is empty (the low end comes first)",
    ]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("{id: a, effect: deny, ops: 5}", "rules[0].ops: must be text, not the number 5"),
        ("{id: a, effect: deny, ops: []}", "rules[0].ops: must not be empty"),
        ("{id: a, effect: deny, ops: [read], paths: []}",
         "rules[0].paths: must not be empty (leave the key out to match every path)"),
        ("{id: a, effect: deny, ops: [read], paths: ['/a/[b']}",
         "rules[0].paths: bad pattern '/a/[b': unclosed '[' (write '\\[' for a literal bracket)"),
        ("{id: a, effect: deny, ops: [read], paths: ['/{a,b']}",
         "rules[0].paths: bad pattern '/{a,b': unclosed '{' (write '\\{' for a literal brace)"),
        ("{id: a, effect: deny, ops: [create], when: {mode_any: [setuidd]}}",
         "rules[0].when.mode_any: unknown mode bit 'setuidd' (did you mean 'setuid'?)"),
        ("{id: a, effect: deny, ops: [create], when: {mode_any: [4000]}}",
         "rules[0].when.mode_any: write octal modes as quoted text with a leading 0 ('04000'), or by name"),
        ("{id: a, effect: deny, ops: [create], when: {mode_any: ['020000']}}",
         "rules[0].when.mode_any: '020000' has bits outside 07777 (use `type` for the file type)"),
        ("{id: a, effect: deny, ops: [open], when: {flags_any: [O_TRUNK]}}",
         "rules[0].when.flags_any: unknown flag 'O_TRUNK' (did you mean 'O_TRUNC'?)"),
        ("{id: a, effect: deny, ops: [mknod], when: {type: [char]}}",
         "rules[0].when.type: unknown file type 'char' (did you mean 'chr'?) (one of reg, dir, lnk, chr, "
         "blk, fifo, sock)"),
        ("{id: a, effect: deny, ops: [read], errno: EACCESS}",
         "rules[0].errno: unknown errno 'EACCESS' (did you mean 'EACCES'?)"),
        ("{id: a, effect: deny, ops: [read], when: {uidd: [1]}}",
         "rules[0].when: unknown field 'uidd' (did you mean 'uid'?)"),
        ("{id: a, effect: deny, ops: [read], when: {object: {ownr: [1]}}}",
         "rules[0].when.object: unknown field 'ownr' (did you mean 'owner'?)"),
        ("{id: 'a b', effect: deny, ops: [read]}",
         "rules[0].id: rule ids are letters, digits and - _ . : @ / (got 'a b')"),
        ("{id: a, effect: deny, ops: [read], enforce: sometimes}",
         "rules[0].enforce: the text 'sometimes' is not allowed: use always"),
        ("{id: a, effect: deny, ops: [truncate], when: {length_min: -1}}",
         "rules[0].when.length_min: must be at least 0"),
        ("{id: a, effect: deny, ops: [truncate], when: {length_min: 9, length_max: 3}}",
         "rules[0].when: length_min is above length_max: nothing can match"),
        ("{id: a, effect: allow, ops: [read], errno: EROFS}",
         "rules[0].errno: only for deny rules: an allow rule never refuses"),
        ("{id: a, effect: allow, ops: [read], enforce: always}",
         "rules[0].enforce: only for deny rules: it keeps denials enforced; an allow rule denies nothing"),
        ("{id: a, effect: deny, ops: [read], when: {}}", "rules[0].when: must not be empty"),
        ("{id: a, effect: deny, ops: [read], when: {uid: [x]}}",
         "rules[0].when.uid: 'x' is not an id or a range such as 1000-59999"),
    ],
)
def test_each_kind_of_rule_error(rule: str, expected: str) -> None:
    assert problems(HEAD + f"  - {rule}\n") == [f"policy.yaml:4: {expected}"]


def test_top_level_errors() -> None:
    got = problems("""\
        version: 2
        default: maybe
        enforcement: lax
        limits: {open_fds: 0}
        colour: blue
        audit: {path: ""}
        rules: []
        """)
    assert got == [
        "policy.yaml:1: version: the number 2 is not allowed: use 1",
        "policy.yaml:2: default: the text 'maybe' is not allowed: use allow or deny",
        "policy.yaml:3: enforcement: the text 'lax' is not allowed: use enforce or permissive",
        "policy.yaml:4: limits.open_fds: must be at least 1",
        "policy.yaml:5: unknown field 'colour' (known: version, tenant, default, enforcement, audit, ids, "
        "limits, rules, tests)",
        "policy.yaml:6: audit.path: must not be empty",
    ]


def test_missing_required_top_level_fields_point_at_the_document() -> None:
    assert problems("tenant: x\n") == [
        "policy.yaml:1: default: missing (required)",
        "policy.yaml:1: version: missing (required)",
    ]


def test_yaml_syntax_error_has_its_line() -> None:
    got = problems("version: 1\ndefault: deny\nrules:\n  - id: a\n    ops: [read\n")
    assert len(got) == 1 and got[0].startswith("policy.yaml:6: not valid YAML")


def test_duplicate_yaml_keys_are_an_error() -> None:
    got = problems("version: 1\ndefault: deny\ndefault: allow\n")
    assert len(got) == 1 and got[0].startswith("policy.yaml:3: not valid YAML") and "duplicate" in got[0]


def test_not_a_mapping() -> None:
    assert problems("- a\n- b\n") == ["policy.yaml:1: a policy is a mapping with version, default, rules..."]


def test_duplicate_rule_ids_name_both_places() -> None:
    text = HEAD + """\
  - {id: same, effect: allow, ops: [read]}
  - {id: other, effect: allow, ops: [read]}
  - {id: same, effect: deny, ops: [write]}
"""
    assert problems(text) == ["policy.yaml:6: rules[2].id: duplicate rule id 'same' (also rules[0], line 4)"]


def test_test_section_errors() -> None:
    text = HEAD + """\
  - {id: a, effect: allow, ops: [read]}
tests:
  - request: {op: opne, path: /x}
    expect: allow
  - request: {op: open, path: /x, flagz: [O_RDWR]}
    expect: allow
  - request: "open /x"
    expect: allow
    rule: b
  - request: "create /x mode=0644"
    expect: allowed
  - request: {op: create, path: /x, mode: 644}
    expect: deny
"""
    assert problems(text) == [
        "policy.yaml:6: tests[0].request.op: unknown op 'opne' (did you mean 'open'?)",
        "policy.yaml:8: tests[1].request.flagz: open has no field 'flagz' (did you mean 'flags'?) "
        "(fields: path, flags)",
        "policy.yaml:12: tests[2].rule: no rule has the id 'b'",
        "policy.yaml:14: tests[3].expect: the text 'allowed' is not allowed: use allow or deny or would-deny "
        "(did you mean 'allow'?)",
        "policy.yaml:15: tests[4].request.mode: write the mode as octal text with a leading 0 ('0644')",
    ]


def test_empty_rules_and_tests_keys_mean_none() -> None:
    policy = load_policy_text("version: 1\ndefault: allow\nrules:\ntests:\n")
    assert policy.rules == () and policy.tests == ()


def test_the_request_path_does_not_import_rich() -> None:
    import subprocess
    import sys

    code = ("import sys; import gateway.rules; from gateway.rules import decide, load_policy; "
            "sys.exit(any(m == 'rich' or m.startswith('rich.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_single_value_is_accepted_where_a_list_is_expected() -> None:
    policy = load_policy_text(HEAD + "  - {id: a, effect: deny, ops: write, paths: /etc/**}\n")
    assert policy.rules[0].ops == ("write",) and policy.rules[0].paths.patterns == ("/etc/**",)


def test_yaml_leading_zero_modes_are_octal() -> None:
    # YAML 1.2 reads 04000 as decimal 4000; the loader keeps the digits so the mode means setuid.
    policy = load_policy_text(HEAD + "  - {id: a, effect: deny, ops: [create], when: {mode_any: [04000]}}\n")
    assert policy.rules[0].when.mode_any == 0o4000
    policy = load_policy_text(HEAD + "  - {id: a, effect: deny, ops: [create], when: {mode_any: [0o2000]}}\n")
    assert policy.rules[0].when.mode_any == 0o2000


def test_load_policy_names_the_file_and_never_returns_an_invalid_policy(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(HEAD + "  - {id: a, effect: deny, ops: [wirte]}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}:4: rules[0].ops: unknown op 'wirte' (did you mean 'write'?)"
    assert info.value.problems[0].file == str(path) and info.value.problems[0].line == 4


def test_unreadable_file(tmp_path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "missing.yaml")
    assert "cannot read the policy" in str(info.value)


def test_valid_policy_fields_and_hash(tmp_path) -> None:
    import hashlib

    path = tmp_path / "p.yaml"
    raw = HEAD.replace("rules:", "tenant: t1\nenforcement: permissive\naudit: {path: logs/a.jsonl}\nrules:")
    raw += "  - {id: a, effect: deny, ops: [write], errno: EROFS, description: no}\n"
    path.write_text(raw)
    policy = load_policy(path)
    assert policy.hash == hashlib.sha256(raw.encode()).hexdigest()
    assert (policy.tenant, policy.enforcement, policy.default) == ("t1", "permissive", "deny")
    assert policy.audit_path == str(tmp_path.resolve() / "logs/a.jsonl")
    assert policy.rules[0].errno == 30 and policy.rules[0].line == 7 and policy.source == str(path)
