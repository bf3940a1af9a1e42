"""`mytune [torchrun flags] <recipe> [args...]`: hand the command line to torchrun with the recipe resolved.

torch's own parser (`torch.distributed.run.get_args_parser`) reads the flags, so every torchrun flag works as
documented there; torch is imported only on this path.
"""

from mytune.cli.recipes import resolve_recipe
from mytune.errors import MytuneError


def launch(argv: list[str]) -> int:
    """Parse torchrun flags from `argv`, resolve the recipe and run it under torchrun; returns the exit code."""
    import sys

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parser = torchrun.get_args_parser()
    parser.prog = "mytune"

    def one_line_error(message: str) -> None:
        raise MytuneError(f"{message} (usage: mytune [torchrun flags] <recipe> [recipe args...])")

    parser.error = one_line_error
    args = parser.parse_args(argv)
    if args.module or args.no_python:
        raise MytuneError("mytune runs a recipe by name or .py path: drop --module/--no-python")
    recipe_path = resolve_recipe(args.training_script)
    check_process_count(recipe_path.stem, args.nproc_per_node, args.nnodes)
    args.training_script = str(recipe_path)
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        rank, failure = min(err.failures.items())
        code = failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1
        print(f"mytune: error: {recipe_path.stem} failed on rank {rank} with exit code {failure.exitcode}", file=sys.stderr)
        return code
    return 0


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
