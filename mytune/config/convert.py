"""Convert a YAML or command-line value to the type a params dataclass field declares.

Command-line values arrive as raw strings and YAML values as whatever the YAML loader produced (YAML 1.1 reads
`2e-5` as a string, `yes` as a bool), so every converter accepts both. A value that does not fit raises
`ConfigError` naming the field, the value and the expected type.
"""

import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from mytune.errors import ConfigError

NULL_STRINGS = frozenset({"null", "none", "~"})
TRUE_STRINGS = frozenset({"true", "1", "yes", "y", "on"})
FALSE_STRINGS = frozenset({"false", "0", "no", "n", "off"})


class _Mismatch(Exception):
    """The value does not fit one type; turned into a `ConfigError` (or the next Union member is tried)."""


def convert_value(value: Any, tp: Any, *, field: str, source: str = "") -> Any:
    """Return `value` converted to type `tp`; `ConfigError` naming `field` (and `source`) if it does not fit."""
    try:
        return _convert(value, tp)
    except _Mismatch as err:
        where = f" ({source})" if source else ""
        detail = f": {err}" if str(err) else ""
        raise ConfigError(f"{field}: invalid value {value!r}{where}, expected {type_name(tp)}{detail}") from None


def type_name(tp: Any) -> str:
    """A short readable name for a field type: `int | None`, `list[str]`, `one of 'a', 'b'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(m.name for m in tp)
    return getattr(tp, "__name__", str(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _convert(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is typing.ClassVar:
        return value
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in NULL_STRINGS):
            return None
        raise _Mismatch()
    if _is_union(tp):
        return _convert_union(value, args)
    if origin is Literal:
        return _convert_literal(value, args)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        return _convert_sequence(value, origin or tp, args)
    if origin is dict or tp is dict:
        return _convert_dict(value, args)
    if tp is bool:
        return _convert_bool(value)
    if tp is int:
        return _convert_int(value)
    if tp is float:
        return _convert_float(value)
    if tp is str:
        return _convert_str(value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(value, tp)
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, Path)):
            return tp(value)
        raise _Mismatch()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch(f"unsupported field type {tp!r}")


def _convert_union(value: Any, args: tuple) -> Any:
    if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in NULL_STRINGS)):
        return None
    if value is None:
        raise _Mismatch()
    # A non-string value that already has a member's exact type keeps it (`str | int` keeps the YAML int 5);
    # otherwise, and for raw strings, the members are tried in declared order (`int | str` makes "5" the int 5).
    members = [a for a in args if a is not type(None)]
    for member in members:
        if isinstance(member, type) and member is not str and type(value) is member:
            return value
    for member in members:
        try:
            return _convert(value, member)
        except _Mismatch:
            continue
    raise _Mismatch()


def _convert_literal(value: Any, choices: tuple) -> Any:
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
    if isinstance(value, str):
        for choice in choices:
            if str(choice) == value or (isinstance(choice, bool) and value.strip().lower() == str(choice).lower()):
                return choice
    for choice in choices:  # e.g. YAML int 1 for Literal["1", "2"]
        if not isinstance(value, bool) and str(value) == str(choice):
            return choice
    raise _Mismatch()


def _split_list_string(text: str) -> list[str]:
    """`"[a, b]"` or `"a,b"` -> `["a", "b"]`; `""` and `"[]"` -> `[]`; items may be quoted."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    if not text:
        return []
    items = []
    for item in text.split(","):
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1]
        items.append(item)
    return items


def _convert_sequence(value: Any, container: type, args: tuple) -> Any:
    if isinstance(value, str):
        items = _split_list_string(value)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Mismatch()
    if container is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(items)
    elif container is tuple and args:
        if len(args) != len(items):
            raise _Mismatch(f"needs {len(args)} items, got {len(items)}")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(items)
    converted = []
    for index, (item, item_type) in enumerate(zip(items, item_types)):
        try:
            converted.append(_convert(item, item_type))
        except _Mismatch:
            raise _Mismatch(f"item {index} ({item!r}) is not {type_name(item_type)}") from None
    return container(converted)


def _convert_dict(value: Any, args: tuple) -> dict:
    if isinstance(value, str):
        import yaml  # only for dict fields set on the command line, e.g. rope_scaling="{factor: 8}"

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _Mismatch("not a YAML mapping") from None
    if not isinstance(value, dict):
        raise _Mismatch()
    if len(args) != 2:
        return dict(value)
    return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}


def _convert_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in TRUE_STRINGS:
            return True
        if lowered in FALSE_STRINGS:
            return False
    raise _Mismatch("use true or false")


def _convert_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise _Mismatch()
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _Mismatch() from None
    raise _Mismatch()


def _convert_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Mismatch()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())  # also "2e-5", which YAML 1.1 leaves as a string
        except ValueError:
            raise _Mismatch() from None
    raise _Mismatch()


def _convert_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        # YAML 1.1 turns `no`/`yes`/`on`/`off` into bools; a silent "False" string would surprise.
        raise _Mismatch("YAML read it as a bool; quote it")
    if isinstance(value, (int, float, Path)):
        return str(value)
    raise _Mismatch()


def _convert_enum(value: Any, enum_cls: type[enum.Enum]) -> enum.Enum:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str) and value in enum_cls.__members__:
        return enum_cls[value]
    for member in enum_cls:
        if value == member.value or (isinstance(value, str) and value == str(member.value)):
            return member
    raise _Mismatch()
