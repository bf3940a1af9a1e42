"""`mytune [torchrun flags] <recipe> [args...]`: hand the command line to torchrun with the recipe resolved.

torch's own parser (`torch.distributed.run.get_args_parser`) reads the flags, so every torchrun flag works as
documented there (`--nnodes`, `--nproc_per_node`, `--node_rank`, `--rdzv_backend`, `--rdzv_endpoint`, `--rdzv_id`,
`--max_restarts`, `--master_addr/--master_port`, `--local_addr`, ...); torch is imported only on this path.

What mytune adds:
- the recipe is a shipped name, a .py path or a module path (`pkg.mod` runs as `python -m pkg.mod`;
  `pkg.mod:fn` runs `python -m mytune.cli.entry pkg.mod:fn`, which calls `fn(argv)`);
- one node and no rendezvous given (no `--rdzv_endpoint`, no `--master_port`): a free port, as `--standalone`,
  so several jobs share a node without colliding on torchrun's default port 29500 (on every torch version);
- the config is parsed once here first, so a bad key is one line, not one traceback per process.
"""

import sys
from pathlib import Path

from mytune.cli import recipes
from mytune.cli.checks import precheck
from mytune.errors import MytuneError

USAGE_HINT = "(usage: mytune [torchrun flags] <recipe> [recipe args...])"


def launch(argv: list[str]) -> int:
    """Parse torchrun flags from `argv`, resolve the recipe and run it under torchrun; returns the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = parse_torchrun_args(argv)
    if args.module or args.no_python:
        raise MytuneError("mytune runs a recipe by name, .py path or module path: drop --module/--no-python")
    recipe = recipes.resolve_recipe(args.training_script)
    check_process_count(recipe.stem, args.nproc_per_node, args.nnodes)
    precheck(recipe, list(args.training_script_args), validate=True)
    use_free_port_on_one_node(args)
    point_at_recipe(args, recipe)
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        rank, failure = min(err.failures.items())
        code = failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1
        print(f"mytune: error: {recipe.stem} failed on rank {rank} with exit code {failure.exitcode}", file=sys.stderr)
        return code
    return 0


def parse_torchrun_args(argv: list[str]):
    """torchrun's own parser; errors become one MytuneError line. `master_port` defaults to None so that an
    explicit `--master_port 29500` can be told apart from no port at all (torch < 2.8 defaults to 29500)."""
    from torch.distributed import run as torchrun

    parser = torchrun.get_args_parser()
    parser.prog = "mytune"

    def one_line_error(message: str) -> None:
        raise MytuneError(f"{message} {USAGE_HINT}")

    parser.error = one_line_error
    parser.set_defaults(master_port=None)
    return parser.parse_args(argv)


def use_free_port_on_one_node(args) -> None:
    """One node, static rendezvous, no endpoint or port given: switch to torchrun's `--standalone` (c10d rendezvous
    on localhost:0, i.e. a free port, and a fresh run id) so concurrent jobs on a node do not collide."""
    from torch.distributed import run as torchrun

    if (
        not args.standalone
        and args.rdzv_backend == "static"
        and not args.rdzv_endpoint
        and args.master_port is None
        and torchrun.parse_min_max_nnodes(args.nnodes)[1] == 1
    ):
        args.standalone = True
    if args.master_port is None:
        args.master_port = 29500


def point_at_recipe(args, recipe: Path | recipes.ModuleRecipe) -> None:
    """Set what torchrun starts in each process: the recipe file, `-m module`, or `-m mytune.cli.entry mod:fn`."""
    if isinstance(recipe, recipes.ModuleRecipe):
        args.module = True
        if recipe.function is None:
            args.training_script = recipe.module
        else:
            args.training_script = "mytune.cli.entry"
            args.training_script_args = [recipe.name, *args.training_script_args]
    else:
        args.training_script = str(recipe)


def check_process_count(recipe: str, nproc_per_node: str, nnodes: str) -> None:
    """A single-device recipe refuses more than one process (nproc_per_node x max nnodes)."""
    if "single_device" not in recipe:
        return
    from torch.distributed import run as torchrun

    try:
        processes = torchrun.determine_local_world_size(nproc_per_node) * torchrun.parse_min_max_nnodes(nnodes)[1]
    except (ValueError, RuntimeError) as err:
        raise MytuneError(f"bad --nproc_per_node {nproc_per_node!r} / --nnodes {nnodes!r}: {err}") from None
    if processes > 1:
        raise MytuneError(
            f"{recipe} runs on one device; use {recipe.replace('single_device', 'distributed')} for N processes"
        )
