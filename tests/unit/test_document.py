"""Reading a config document within limits (config/document.py), for any loader that needs it."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, Limits, parse_json, parse_yaml, parse_yaml_stream
from proxy.config.source import line_for, read_file

SMALL = Limits(max_bytes=200, max_depth=4, max_values=10)


def test_yaml_keeps_the_line_of_every_value():
    doc = parse_yaml("port: 1\nchains:\n  - name: a\n    match: {ports: [80, 443]}\n", "f.yaml")
    assert doc.data["chains"][0]["match"]["ports"] == [80, 443]
    assert line_for("chains[0].match.ports[1]", doc.lines) == 4
    assert line_for("chains[0].match.ports[7]", doc.lines) == 4  # the innermost field known
    assert line_for("True", doc.lines) is None  # a key the file spells otherwise: no line, and no endless search


@pytest.mark.parametrize("text, message", [
    ("a: [[[[1]]]]\n", "f.yaml:1: nested deeper than 4 levels"),
    ("a: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n", "f.yaml:1: more than 10 values"),
    ("a: &a [1, 2, 3]\nb: [*a, *a, *a]\n", "f.yaml:2: more than 10 values"),  # an alias is a value too
    # what the aliases expand to, told at the line of the anchor
    ("a: &a [1, 2]\nb: [*a, *a]\n", "f.yaml:1: more than 10 values once its YAML aliases are expanded"),
    ("a: &a [[1]]\nb: [[*a]]\n", "f.yaml:1: nested deeper than 4 levels once its YAML aliases are expanded"),
    ("a: &a [*a]\n", "f.yaml:1: not valid YAML: a YAML alias that refers to itself"),
    ("a: 1\na: 2\n", "f.yaml:2: a: duplicate key"),
    ("a: " + "1" * 5000 + "\n", "f.yaml:1: '11111111111111111'... (5000 characters) is too long for an integer"),
    ("a: 2001-02-30\n", "f.yaml:1: not valid YAML: cannot read '2001-02-30': day is out of range for month"),
    ("a: \0\n", "f.yaml: not valid YAML: unacceptable character #x0000"),
])
def test_yaml_beyond_the_limits_is_one_config_error(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_yaml(text, "f.yaml", SMALL)
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_limits_count_in_a_stream_per_document():
    docs = list(parse_yaml_stream("a: [1, 2, 3]\n---\nb: [1, 2, 3]\n", "s.yaml", SMALL))
    assert [d.data for d in docs] == [{"a": [1, 2, 3]}, {"b": [1, 2, 3]}]
    with pytest.raises(ConfigError, match=r"s.yaml:3: more than 10 values"):
        list(parse_yaml_stream("a: 1\n---\nb: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n", "s.yaml", SMALL))


@pytest.mark.parametrize("text, message", [
    ('{"a": [[[[1]]]]}', "j.json: nested deeper than 4 levels"),
    ("[" * 100_000 + "]" * 100_000, "j.json: nested deeper than 4 levels"),
    ('{"a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}', "j.json: more than 10 values"),
    ('{"a": 1, "a": 2}', "j.json: a: duplicate key"),
    ('{"a": ' + "1" * 5000 + "}", "j.json: an integer too long to read"),
    ('{"a": 1,\n}', "j.json:2: not valid JSON: Expecting property name enclosed in double quotes"),
])
def test_json_beyond_the_limits_is_one_config_error(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_json(text, "j.json", SMALL)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_file_is_read_within_its_size_and_as_utf8(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: 1\n" * 100)
    with pytest.raises(ConfigError, match=r"c.yaml: larger than 200 bytes"):
        read_file(str(path), SMALL)
    path.write_bytes(b"a: 1\nb: \xc3\x28\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: not UTF-8 text \(byte 0xc3 at offset 8\)"):
        read_file(str(path), SMALL)
    path.write_bytes("\ufeffa: caf\u00e9\n".encode())  # a BOM is fine
    assert read_file(str(path), SMALL) == ({"a": "caf\u00e9"}, {"": 1, "a": 1})
    with pytest.raises(ConfigError, match=r"cannot read config: No such file"):
        read_file(str(tmp_path / "none.yaml"))
