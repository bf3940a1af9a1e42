"""Build a params dataclass from its defaults, a YAML file and `key=value` overrides (highest precedence last).

The YAML and the overrides are merged as raw values into one OmegaConf config *before* interpolations are
resolved, so `${output_dir}/logs` in a YAML sees an `output_dir=` override, and a YAML may interpolate a field it
does not set (the dataclass default is in the merge too). `${asset:demo/tokenizer.model}` resolves to the absolute
path of a file shipped in `mytune/assets`, from any working directory and from a config copied anywhere.
"""

import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any, Sequence

from mytune.config.convert import convert_value
from mytune.errors import ConfigError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
COMMAND_LINE = "command line"


def asset_path(relative: str) -> str:
    """Absolute path of `mytune/assets/<relative>` (the `${asset:...}` resolver); existence is checked later."""
    return str(ASSETS_DIR / relative)


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """`["lr=1e-4", "output_dir=/tmp/a=b"]` -> `{"lr": "1e-4", "output_dir": "/tmp/a=b"}` (split on the first `=`)."""
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. --override lr=1e-4)")
        overrides[key.strip()] = value
    return overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file, interpolations left unresolved; errors name the file."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          f"save the config as UTF-8") from None
    except OSError as err:  # a directory, no permission, an I/O error
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or _one_line(str(err))
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {_one_line(str(err))}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping of field: value, got a {type(loaded).__name__}")
    return OmegaConf.to_container(loaded, resolve=False)


def load_params(params_cls: type, *, config: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """An instance of `params_cls` from its defaults < the YAML `config` < `overrides` ("key=value" strings).

    A dotted override sets one entry of a dict or list field, as OmegaConf dotlists do: `column_map.output=answer`,
    `metric_loggers.0=stdout` (merged into the YAML's or the default value). Unknown keys, values of the wrong type,
    unresolvable interpolations and the `ConfigError`s raised by the dataclass's `__post_init__` all raise
    `ConfigError` with a one-line message.
    """
    fields = {f.name: f for f in dataclasses.fields(params_cls) if f.init}
    hints = typing.get_type_hints(params_cls)

    sources: dict[str, str] = {}
    yaml_values = read_yaml(config) if config is not None else {}
    _check_known_keys(yaml_values, fields, source=str(config))
    sources.update({key: str(config) for key in yaml_values})
    override_values = parse_overrides(overrides)
    _check_known_keys(override_values, fields, source=COMMAND_LINE)
    sources.update({key.partition(".")[0]: COMMAND_LINE for key in override_values})

    merged = {**_interpolation_defaults(fields), **yaml_values}
    for key, value in override_values.items():
        if "." in key:
            _set_dotted(merged, key, value, hint=hints.get(key.partition(".")[0], Any))
        else:
            merged[key] = value
    resolved = _resolve(merged, keys=list(sources), sources=sources)

    values = {name: convert_value(resolved[name], hints.get(name, Any), field=name, source=sources[name]) for name in sources}
    for name, field in fields.items():
        if name not in values and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{name} has no default: set it in the config or with --override {name}=...")
    return params_cls(**values)


def _set_dotted(merged: dict[str, Any], key: str, value: str, *, hint: Any) -> None:
    """Set `merged[a][b]...[z] = value` for `key` "a.b...z": a dict gains missing keys, a list index must exist."""
    top, *path = key.split(".")
    if any(not part for part in path):
        raise ConfigError(f"override key `{key}` has an empty part: write e.g. column_map.output=answer")
    container = merged.get(top)
    if isinstance(container, str) and "${" not in container:  # set whole on the command line before: parse it
        container = convert_value(container, hint, field=top, source=COMMAND_LINE)
        container = _plain(container)
    if container is None and _admits_dict(hint):
        container = {}
    if not isinstance(container, (dict, list)):
        raise ConfigError(f"`{key}`: {top} is not a mapping or list, so it has no entry `{'.'.join(path)}`: "
                          f"set it whole, e.g. --override {top}=...")
    merged[top] = container = _copy_containers(container)
    where = top
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(container, dict):
            if last:
                container[part] = value
            else:
                container = container.setdefault(part, {})
        elif isinstance(container, list):
            if not part.isdigit():
                raise ConfigError(f"`{key}`: {where} is a list, so `{part}` must be an index 0..{len(container) - 1}")
            index = int(part)
            if index >= len(container):
                items = ", ".join(str(item) for item in container) or "none"
                raise ConfigError(f"`{key}`: index {index} is out of range: {where} has {len(container)} item(s) "
                                  f"({items}); set the whole list instead, e.g. --override {top}=[a,b]")
            if last:
                container[index] = value
            else:
                container = container[index]
        else:
            raise ConfigError(f"`{key}`: {where} is a {type(container).__name__}, not a mapping or list")
        where = f"{where}.{part}"


def _admits_dict(hint: Any) -> bool:
    """Whether a field type is a dict (or a union holding one), so a dotted override may start from None."""
    if typing.get_origin(hint) is dict or hint is dict:
        return True
    return any(_admits_dict(arg) for arg in typing.get_args(hint) if arg is not type(None))


def _copy_containers(value: Any) -> Any:
    """A deep copy of nested dicts and lists (a default's or the YAML's value is not changed in place)."""
    if isinstance(value, dict):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    return value


def _check_known_keys(values: dict, fields: dict, *, source: str) -> None:
    from mytune.config.hints import unknown_key_hint

    for key in values:
        # On the command line `column_map.output` names the field `column_map` (a dotted override).
        name = str(key).partition(".")[0] if source == COMMAND_LINE else key
        if name in fields:
            continue
        where = "on the command line" if source == COMMAND_LINE else f"in {source}"
        raise ConfigError(f"unknown key `{key}` {where}{unknown_key_hint(str(name), list(fields))}")


def _interpolation_defaults(fields: dict) -> dict[str, Any]:
    """Field defaults as plain YAML values, so a config may interpolate a field it does not set."""
    defaults = {}
    for name, field in fields.items():
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            continue
        plain = _plain(value)
        if plain is not _UNREPRESENTABLE:
            defaults[name] = plain
    return defaults


_UNREPRESENTABLE = object()


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value.replace("${", "\\${")  # a default is a literal, never an interpolation
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _UNREPRESENTABLE if any(i is _UNREPRESENTABLE for i in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return _UNREPRESENTABLE if any(i is _UNREPRESENTABLE for i in items.values()) else items
    return _UNREPRESENTABLE


def _resolve(merged: dict[str, Any], *, keys: list[str], sources: dict[str, str]) -> dict[str, Any]:
    """Resolve the interpolations of `keys` against the whole merged config."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # OmegaConf 2.4 renamed register_new_resolver (and warns on the old name); 2.3 has only the old one.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("asset", asset_path, replace=True)
    try:
        cfg = OmegaConf.create(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot build the config: {_one_line(str(err))}") from None
    resolved = {}
    for key in keys:
        try:
            value = cfg[key]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(
                f"{key}: cannot resolve {merged[key]!r} ({sources[key]}): {_one_line(str(err))}"
            ) from None
        resolved[key] = value
    return resolved


def _one_line(text: str) -> str:
    """OmegaConf and YAML messages span lines (with a full_key/object_type trailer); keep the first."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text
