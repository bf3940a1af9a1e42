"""Custom row transforms: a user function, named by import path, that turns each raw row into a built-in format.

    row_transform=my_pkg.rows:to_chat      # def to_chat(row: dict) -> dict: returns an instruct, chat or text row

The function runs on every raw row before format detection and validation, so data that no built-in format reads
(nested fields, several turns in odd columns) still goes through the usual checks, templates and cache. Its identity
(module:function and a hash of its source code) is part of the tokenization cache key: editing the function
re-tokenizes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from mytune.errors import ConfigError, one_line


@dataclass(frozen=True)
class RowTransform:
    """A loaded transform: the function, the path it was named by, and a fingerprint for the cache key."""

    function: Callable[[dict], object]
    name: str
    fingerprint: str


def load_row_transform(spec: str | Callable | None, field: str = "row_transform") -> RowTransform | None:
    """`module.path:function` (or a callable) -> RowTransform; None or "" -> None. Errors: one ConfigError line."""
    if spec is None or spec == "":
        return None
    if callable(spec):
        name = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"
        return RowTransform(spec, name, _fingerprint(spec, name))
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(part.strip() for part in spec.split(":")):
        raise ConfigError(f"{field} must be an import path module:function (e.g. my_pkg.rows:to_chat), got {spec!r}")
    module_name, attribute = (part.strip() for part in spec.split(":"))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or an error raised while the module runs
        raise ConfigError(f"{field}={spec}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {one_line(err)}); is it on PYTHONPATH?") from None
    function = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
        if function is None:
            raise ConfigError(f"{field}={spec}: module {module_name!r} has no {attribute!r}")
    if not callable(function):
        raise ConfigError(f"{field}={spec}: {attribute!r} is a {type(function).__name__}, not a function")
    return RowTransform(function, spec, _fingerprint(function, spec))


def _fingerprint(function: Callable, name: str) -> str:
    """The path plus a hash of the function's source (when inspect can read it), so an edited function misses."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):  # built-ins, functions defined in a REPL
        source = repr(getattr(function, "__code__", None) and function.__code__.co_code)
    return f"{name}:{hashlib.sha256(source.encode()).hexdigest()[:16]}"

