"""`TuneArgumentParser`: `--config NAME|PATH` and `--override key=value` -> a typed params dataclass.

Precedence: override > YAML > dataclass defaults. Every user error (unknown key, bad value, missing config,
a `ConfigError` from the dataclass's `__post_init__`) is printed as one line `<prog>: error: <message>` and
exits with code 2. `--help` lists every params field with its type, default and doc comment.
"""

import argparse
import dataclasses
import difflib
import enum
import typing
from pathlib import Path
from typing import Any, Sequence

from mytune.config import configs
from mytune.errors import ConfigError


class TuneArgumentParser(argparse.ArgumentParser):
    """Parse `--config` and `--override` into an instance of `params_cls` (see `parse_params`)."""

    def __init__(self, params_cls: type, *, recipe: str | Path, **kwargs: Any):
        if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
            raise TypeError(f"params_cls must be a dataclass type, got {params_cls!r}")
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        doc = params_cls.__doc__ or ""
        if not doc.startswith(f"{params_cls.__name__}("):  # dataclass writes the signature when there is no docstring
            kwargs.setdefault("description", doc)  # `--help` opens with what the params class says it is for
        super().__init__(**kwargs)
        self.params_cls = params_cls
        self.recipe = Path(str(recipe)).stem  # a recipe file or a recipe name: its configs are configs/<stem>/
        # A `mytune cp` copy (`my_ft.py`) keeps its source's shipped configs, named by its marker line.
        source = configs.copied_from(recipe) if str(recipe).endswith(".py") else None
        if source and not configs.config_names(self.recipe):
            self.recipe = source
        self.add_argument(
            "--config",
            metavar="NAME|PATH",
            help=f"YAML config: a name from recipes/configs/{self.recipe}/ (listed below) or a path to a YAML file",
        )
        self.add_argument(
            "--override",
            nargs="+",
            action="extend",
            default=[],
            metavar="KEY=VALUE",
            help="set params fields (listed below); beats the config; repeatable",
        )

    def parse_params(self, argv: Sequence[str] | None = None) -> Any:
        """Parse `argv` (default `sys.argv[1:]`) into a `params_cls` instance; user errors exit with code 2."""
        from mytune.config.load import load_params

        args = self.parse_args(argv)
        try:
            config = self.resolve_config(args.config) if args.config else None
            return load_params(self.params_cls, config=config, overrides=args.override)
        except ConfigError as err:
            self.error(str(err))

    def resolve_config(self, name_or_path: str) -> Path:
        """A shipped config name of this recipe (`configs/<recipe>/<name>.yaml`, nested `experiments/<name>` too),
        else an existing file path. A name with a slash that is also a file here is that file."""
        looks_like_path = "/" in name_or_path or "\\" in name_or_path
        path = Path(name_or_path)
        if looks_like_path and path.is_file():
            return path
        shipped = configs.shipped_config(self.recipe, name_or_path)
        if shipped is not None:
            return shipped
        if path.is_file():
            return path
        available = configs.config_names(self.recipe)
        listed = ", ".join(available) if available else "none shipped"
        close = difflib.get_close_matches(name_or_path, available, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ConfigError(
            f"config `{name_or_path}` not found: not a config of {self.recipe} (available: {listed}) "
            f"and no such file{hint}"
        )

    def error(self, message: str) -> typing.NoReturn:
        """One line on stderr, exit code 2 (argparse's own errors included; no usage dump)."""
        message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        if message.startswith("unrecognized arguments"):
            from mytune.config.hints import misplaced_launcher_flags

            extra = message.partition(":")[2].split()
            hint = misplaced_launcher_flags(self.recipe, extra)
            message += f" ({hint} ...)" if hint else " (set params with --override key=value)"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        return super().format_help().rstrip("\n") + "\n\n" + self._params_help() + "\n\n" + self._configs_help() + "\n"

    def _params_help(self) -> str:
        from mytune.config.convert import type_name
        from mytune.config.docs import field_docs

        hints = typing.get_type_hints(self.params_cls)
        docs = field_docs(self.params_cls)
        rows = []
        for field in dataclasses.fields(self.params_cls):
            if field.init:
                rows.append((field.name, type_name(hints.get(field.name, Any)), _default_text(field), docs.get(field.name, "")))
        lines = ["params (set in the config or with --override key=value):"]
        for name, type_text, default, doc in rows:
            lines.append(f"  {name} ({type_text}) {default}")
            if doc:
                lines.append(f"      {doc}")
        return "\n".join(lines)

    def _configs_help(self) -> str:
        names = configs.config_names(self.recipe)
        if not names:
            return f"configs: none shipped for {self.recipe} (pass --config path/to/config.yaml)"
        return f"configs for {self.recipe} (--config NAME): " + ", ".join(names)


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, enum.Enum):
        text = value.name
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(value)
    return "= " + text
