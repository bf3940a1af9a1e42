"""The `mytune` command: list, copy, validate and run recipes (in-process, or under torchrun).

    mytune ls
    mytune cp <recipe> <dest> | mytune cp <recipe>/<config> <dest>   [--force]
    mytune validate <recipe> --config NAME [--override key=value ...]
    mytune <recipe> --config NAME [--override key=value ...]
    mytune [torchrun flags] <recipe> ...
    mytune slurm [sbatch options] <recipe> ...
    mytune download <owner/name> [--output-dir DIR] [--hf-token T] [--include/--exclude PATTERNS]

<recipe> is a shipped name, a path to a .py file, or a module path `pkg.module[:function]` (in that order);
docs/launching.md describes every form.

`ls`, `cp` and `--help` only list and copy files, so they never import torch and answer at once.
"""

import runpy
import sys
from pathlib import Path

from mytune.cli import recipes
from mytune.cli.checks import check_launcher_flags, precheck
from mytune.config import configs
from mytune.errors import MytuneError

USAGE = """\
usage: mytune <command> [args...]

commands:
  mytune ls                                  list the shipped recipes and their configs
  mytune cp <recipe> <dest> [--force]        copy a recipe and its params file, to edit and run your copy
  mytune cp <recipe>/<config> <dest> [--force]
                                             copy a config YAML
  mytune validate <recipe> --config NAME|PATH [--override key=value ...]
                                             check a config (types, unknown keys, input paths) without running
  mytune <recipe> --config NAME|PATH [--override key=value ...]
                                             run a recipe: a shipped name, a path to a .py file,
                                             or a module path pkg.module[:function]
  mytune download <owner/name> [--output-dir DIR] [--hf-token T] [--include PATTERNS] [--exclude PATTERNS]
                                             fetch a model's safetensors, configs and tokenizer from the
                                             Hugging Face hub into ./models/<name> (or DIR) for checkpoint_dir
  mytune <recipe> --help                     the recipe's params, their defaults and docs, and its configs
  mytune --version                           print the mytune version
  mytune [torchrun flags] <recipe> [args...]
                                             run under torchrun, e.g.
                                             mytune --nproc_per_node 4 full_finetune_distributed --config NAME
  mytune slurm [--nodes N --gpus-per-node G --partition P --time T ...] [--submit] <recipe> [args...]
                                             write (and with --submit, sbatch) a Slurm script running
                                             the same command under srun + torchrun
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mytune` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE + "\n" + _recipes_table())
            return 0
        if argv[0] == "--version":
            from mytune import __version__

            print(f"mytune {__version__}")
            return 0
        command, rest = argv[0], argv[1:]
        if command == "ls":
            return ls(rest)
        if command == "cp":
            return cp(rest)
        if command == "validate":
            return validate(rest)
        if command == "download":
            from mytune.cli.download import main as download

            return download(rest)
        if command == "slurm":
            from mytune.cli.slurm import slurm

            return slurm(rest)
        if command.startswith("-"):
            from mytune.cli.launch import launch

            return launch(argv)
        return run_recipe(recipes.resolve_recipe(command), rest, shown_name=command)
    except MytuneError as err:
        print(f"mytune: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # e.g. `mytune cp --help`
        return _exit_code(exit_.code)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it (the first saves)
        print("mytune: stopped by Ctrl-C (nothing was saved since the last checkpoint)", file=sys.stderr)
        return 130


def _recipes_table() -> str:
    rows = [(name, configs.config_names(name)) for name in configs.shipped_recipe_names()]
    if not rows:
        return "no shipped recipes found (is the `recipes` package importable?)"
    width = max(len("RECIPE"), *(len(name) for name, _ in rows))
    lines = [f"{'RECIPE':<{width}}  CONFIGS"]
    lines += [f"{name:<{width}}  {', '.join(names) or '-'}" for name, names in rows]
    return "\n".join(lines)


def ls(argv: list[str]) -> int:
    """Print the shipped recipes and, per recipe, its config names."""
    recipes.OneLineParser(prog="mytune ls", add_help=True).parse_args(argv)
    print(_recipes_table())
    return 0


def cp(argv: list[str]) -> int:
    """Copy a recipe (+ params) or a config; print what was written."""
    from mytune.cli.copy import copy_config, copy_recipe

    parser = recipes.OneLineParser(prog="mytune cp", description="copy a recipe (with its params) or a config YAML")
    parser.add_argument("source", help="<recipe> or <recipe>/<config>")
    parser.add_argument("dest", help="a file path, or a directory")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    shipped = recipes.shipped_recipes()
    recipe, _, config = args.source.partition("/")
    if recipe in shipped and config:
        written = [copy_config(recipe, config.removesuffix(".yaml"), args.dest, force=args.force)]
    elif args.source in shipped:
        recipe_path = shipped[args.source]
        written = copy_recipe(args.source, recipe_path, recipes.params_file(recipe_path), args.dest, force=args.force)
    else:
        candidates = list(shipped) + [f"{r}/{c}" for r in shipped for c in configs.config_names(r)]
        hint = recipes.did_you_mean(args.source, candidates, "see `mytune ls`")
        raise MytuneError(f"unknown recipe or config `{args.source}`: {hint}")
    for path in written:
        print(f"wrote {path}")
    return 0


def validate(argv: list[str]) -> int:
    """Parse a recipe's config + overrides into its params dataclass; warn about missing input paths."""
    from mytune.config import TuneArgumentParser, find_missing_paths

    if not argv or argv[0].startswith("-"):
        raise MytuneError("validate needs a recipe: mytune validate <recipe> --config NAME|PATH [--override key=value ...]")
    recipe = recipes.resolve_recipe(argv[0])
    recipe_path = recipes.recipe_file(recipe)
    if recipe_path is None:
        raise MytuneError(f"module `{recipe.module}` has no file to find its params from: validate a recipe .py file")
    precheck(recipe, argv[1:], validate=False)  # a moved params file, a config of another recipe
    params_cls = recipes.load_params_class(recipe_path)
    parser = TuneArgumentParser(params_cls, recipe=recipe_path, prog=f"mytune validate {recipe.stem}")
    try:
        params = parser.parse_params(argv[1:])
    except SystemExit as exit_:
        return _exit_code(exit_.code)
    for message in find_missing_paths(params):
        print(f"warning: {message}", file=sys.stderr)
    print(f"OK: {recipe.stem} config valid")
    return 0


def recipe_help(recipe: Path | recipes.ModuleRecipe, shown_name: str) -> bool:
    """Print `mytune <recipe> --help` from the recipe's params class alone, without importing the recipe (which
    imports torch): the same text the recipe's own parser prints. False when the recipe has no params class."""
    from mytune.config import TuneArgumentParser

    path = recipes.recipe_file(recipe)
    if path is None:
        return False
    try:
        params_cls = recipes.load_params_class(path)
    except Exception:  # no params file, or one the recipe loads its own way: let the recipe answer
        return False
    TuneArgumentParser(params_cls, recipe=path, prog=f"mytune {shown_name}").print_help()
    return True


def run_recipe(recipe: Path | recipes.ModuleRecipe, args: list[str], shown_name: str | None = None) -> int:
    """Run a recipe in this process; returns its exit code.

    A file runs as `__main__` with `sys.argv = [path, *args]` and its directory first on `sys.path`, as
    `python recipe.py` would do, so a copied recipe finds its `<stem>_params.py`. A module `pkg.mod` runs as
    `python -m pkg.mod` would; `pkg.mod:fn` calls `fn(args)` (see `mytune.cli.entry`). Both see the current
    directory first on `sys.path`.
    """
    shown_name = shown_name or recipe.stem
    check_launcher_flags(recipe, shown_name, args)
    precheck(recipe, args, validate=False)
    if ("-h" in args or "--help" in args) and recipe_help(recipe, shown_name):
        return 0
    if isinstance(recipe, recipes.ModuleRecipe) and recipe.function is not None:
        from mytune.cli.entry import call_recipe_function

        try:
            return call_recipe_function(recipe.module, recipe.function, args)
        except SystemExit as exit_:
            return _exit_code(exit_.code)
    old_argv, old_path = sys.argv, list(sys.path)
    try:
        if isinstance(recipe, recipes.ModuleRecipe):
            sys.argv = [str(recipe.origin or recipe.module), *args]
            sys.path.insert(0, str(Path.cwd()))
            runpy.run_module(recipe.module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [str(recipe), *args]
            sys.path.insert(0, str(recipe.parent))
            runpy.run_path(str(recipe), run_name="__main__")
    except SystemExit as exit_:
        return _exit_code(exit_.code)
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path
    return 0


def _exit_code(code: object) -> int:
    """`sys.exit` semantics: None -> 0, an int as is, anything else is printed and becomes 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
