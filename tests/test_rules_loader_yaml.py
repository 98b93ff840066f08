"""The loader's YAML reader (libyaml events -> plain data and a line map): YAML 1.2 scalars as the
round-trip loader it replaced read them, the line of every key and item, and its refusals."""

from __future__ import annotations

import math

import pytest
import yaml

from gateway.rules import PolicyError, load_policy_text
from gateway.rules.loader import read_yaml


def test_libyaml_is_there() -> None:
    assert yaml.__with_libyaml__ and hasattr(yaml, "CSafeLoader")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("yes", "yes"), ("no", "no"), ("on", "on"), ("y", "y"), ("true", True), ("False", False),
        ("~", None), ("null", None), ("", None), ("'null'", "null"), ("'true'", "true"),
        ("12", 12), ("-3", -3), ("+12", 12), ("1_000", 1000), ("0", 0), ("0x1F", 31),
        ("0644", "0644"), ("-0644", -644), ("00", "00"), ("0o644", "0o644"), ("0o0644", "0o644"),
        ("0x00F", "015"), ("0b0101", "0005"), ("'0644'", "0644"), ("_", "_"), ("12:30", "12:30"),
        ("1.5", 1.5), ("1e3", 1000.0), (".5", 0.5), ("-.inf", -math.inf),
        ("2020-01-01", "2020-01-01"), ("!!str 12", "12"), ("!!int '5'", 5), ("!foo bar", "bar"),
        ("/home/*/**", "/home/*/**"), ('"a\\tb"', "a\tb"),
    ],
)  # fmt: skip
def test_scalars_read_as_yaml_1_2(text: str, value: object) -> None:
    data, _ = read_yaml(f"a: {text}\n", "p.yaml")
    assert data == {"a": value} and type(data["a"]) is type(value)


def test_the_line_of_every_key_and_item() -> None:
    data, lines = read_yaml("a:\n  - x\n  -\n    - y\n  - {c: d}\nb: [1,\n  2]\n", "p.yaml")
    assert data == {"a": ["x", ["y"], {"c": "d"}], "b": [1, 2]}
    assert lines == {(): 1, ("a",): 1, ("a", 0): 2, ("a", 1): 4, ("a", 1, 0): 4, ("a", 2): 5,
                     ("a", 2, "c"): 5, ("b",): 6, ("b", 0): 6, ("b", 1): 7}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb:\n  c: 1\n  c: 2\n", 'p.yaml:4: not valid YAML: while constructing a mapping found '
         'duplicate key "c" with value "2" (original value: "1")'),
        ("a: 1\n---\nb: 2\n", "p.yaml:2: not valid YAML: expected a single document in the stream but found "
         "another document"),
        ("a: \x01\n", "p.yaml:1: not valid YAML: control characters are not allowed"),
        ("a: [x\n", "p.yaml:2: not valid YAML: while parsing a flow sequence did not find expected ',' "
         "or ']'"),
    ],
)  # fmt: skip
def test_refusals_have_their_line(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        read_yaml(text, "p.yaml")
    assert str(err.value) == message


def test_an_empty_document_is_no_policy() -> None:
    assert read_yaml("# nothing\n", "p.yaml") == (None, {(): 1})
    with pytest.raises(PolicyError, match=r"p\.yaml:1: a policy is a mapping"):
        load_policy_text("", "p.yaml")


def test_a_merge_key_is_an_unknown_field_not_a_traceback() -> None:
    with pytest.raises(PolicyError) as err:
        load_policy_text("version: 1\ndefault: deny\n<<: {x: 1}\nrules: []\n", "p.yaml")
    assert str(err.value).startswith("p.yaml:3: unknown field '<<'")
