"""Every field type `convert_value` supports, from command-line strings and from YAML-loaded values, and its errors."""

import enum
from pathlib import Path
from typing import Literal, Optional

import pytest

from mytune.config.convert import convert_value, type_name
from mytune.errors import ConfigError


class Color(enum.Enum):
    RED = "red"
    GREEN = 2


def convert(value, tp):
    return convert_value(value, tp, field="f", source="command line")


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("True", True), ("YES", True), ("1", True), ("false", False), ("No", False), ("0", False),
     (True, True), (False, False), (1, True), (0, False)],
)
def test_bool(raw, expected):
    assert convert(raw, bool) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", 2, 0.5, None])
def test_bool_rejects(raw):
    with pytest.raises(ConfigError, match=r"^f: invalid value .* expected bool"):
        convert(raw, bool)


@pytest.mark.parametrize("raw, expected", [("3", 3), (" -7 ", -7), (5, 5), (4.0, 4)])
def test_int(raw, expected):
    result = convert(raw, int)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("raw", ["2.5", 2.5, "abc", True, "", None, [1]])
def test_int_rejects(raw):
    with pytest.raises(ConfigError) as err:
        convert(raw, int)
    message = str(err.value)
    assert message.startswith(f"f: invalid value {raw!r} (command line), expected int")
    assert "\n" not in message


@pytest.mark.parametrize(
    "raw, expected", [("2e-5", 2e-5), ("1.5", 1.5), ("3", 3.0), (3, 3.0), (2e-5, 2e-5), ("-1E3", -1000.0)]
)
def test_float_including_yaml11_exponent_strings(raw, expected):
    result = convert(raw, float)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("raw", ["abc", "1e", True, None])
def test_float_rejects(raw):
    with pytest.raises(ConfigError, match="expected float"):
        convert(raw, float)


def test_str_keeps_raw_text_and_stringifies_yaml_numbers():
    assert convert("/tmp/a=b", str) == "/tmp/a=b"
    assert convert("  spaced ", str) == "  spaced "
    assert convert(123, str) == "123"
    with pytest.raises(ConfigError, match="read it as a bool; quote it"):
        convert(False, str)  # YAML 1.1 `no`
    with pytest.raises(ConfigError, match="expected str"):
        convert(["a"], str)


@pytest.mark.parametrize("null", ["null", "None", "~", "NULL", None])
def test_optional_null(null):
    assert convert(null, Optional[int]) is None
    assert convert(null, float | None) is None


def test_optional_value_and_error():
    assert convert("4", int | None) == 4
    with pytest.raises(ConfigError, match=r"expected int \| None"):
        convert("four", int | None)


def test_union_tries_members_in_order():
    assert convert("2", int | list[int] | None) == 2
    assert convert("[1, 2]", int | list[int] | None) == [1, 2]
    assert convert([1, 2], int | list[int] | None) == [1, 2]
    assert convert("5", int | str) == 5
    assert convert("five", int | str) == "five"
    assert convert(5, str | int) == 5  # a YAML int keeps its type when it is a member


@pytest.mark.parametrize("raw", ["[a,b]", "a,b", "[a, b]", "['a', \"b\"]", ["a", "b"]])
def test_list_of_str(raw):
    assert convert(raw, list[str]) == ["a", "b"]


@pytest.mark.parametrize("raw", ["", "[]", []])
def test_empty_list(raw):
    assert convert(raw, list[int]) == []


def test_list_of_int_and_error_names_item():
    assert convert("[1,2,3]", list[int]) == [1, 2, 3]
    assert convert("4, 5", list[int]) == [4, 5]
    assert convert([6, "7"], list[int]) == [6, 7]
    with pytest.raises(ConfigError, match=r"expected list\[int\]: item 1 \('x'\) is not int"):
        convert("[1,x]", list[int])
    with pytest.raises(ConfigError, match=r"expected list\[int\]"):
        convert(3, list[int])


def test_tuple():
    assert convert("1,2", tuple[int, ...]) == (1, 2)
    assert convert("a,2", tuple[str, int]) == ("a", 2)
    with pytest.raises(ConfigError, match="needs 2 items"):
        convert("a", tuple[str, int])


def test_dict_from_yaml_and_command_line():
    assert convert({"factor": 8}, dict) == {"factor": 8}
    assert convert("{factor: 8.0, rope_type: llama3}", dict | None) == {"factor": 8.0, "rope_type": "llama3"}
    assert convert({"a": "1"}, dict[str, int]) == {"a": 1}
    with pytest.raises(ConfigError, match="expected dict"):
        convert("[1, 2]", dict)


def test_literal():
    modes = Literal["constant", "linear", "cosine"]
    assert convert("cosine", modes) == "cosine"
    assert convert("2", Literal[1, 2]) == 2
    with pytest.raises(ConfigError, match=r"f: invalid value 'cosin' \(command line\), expected one of 'constant', 'linear', 'cosine'"):
        convert("cosin", modes)


def test_enum_by_name_or_value():
    assert convert("RED", Color) is Color.RED
    assert convert("red", Color) is Color.RED
    assert convert("2", Color) is Color.GREEN
    assert convert(2, Color) is Color.GREEN
    assert convert(Color.GREEN, Color) is Color.GREEN
    with pytest.raises(ConfigError, match="expected one of RED, GREEN"):
        convert("blue", Color)


def test_path():
    assert convert("/a/b", Path) == Path("/a/b")


def test_type_names():
    assert type_name(int | None) == "int | None"
    assert type_name(list[str]) == "list[str]"
    assert type_name(Literal["a", "b"]) == "one of 'a', 'b'"


def test_source_in_message_is_optional():
    with pytest.raises(ConfigError) as err:
        convert_value("x", int, field="epochs")
    assert str(err.value) == "epochs: invalid value 'x', expected int"
