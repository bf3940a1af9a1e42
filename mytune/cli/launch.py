"""`mytune [torchrun flags] <recipe> [args...]`: hand the command line to torchrun with the recipe resolved.

torch's own parser (`torch.distributed.run.get_args_parser`) reads the flags, so every torchrun flag works as
documented there (`--nnodes`, `--nproc_per_node`, `--node_rank`, `--rdzv_backend`, `--rdzv_endpoint`, `--rdzv_id`,
`--max_restarts`, `--master_addr/--master_port`, `--local_addr`, ...); torch is imported only on this path.

What mytune adds:
- the recipe is a shipped name, a .py path or a module path (`pkg.mod` runs as `python -m pkg.mod`;
  `pkg.mod:fn` runs `python -m mytune.cli.entry pkg.mod:fn`, which calls `fn(argv)`);
- one node and no rendezvous given (no `--rdzv_endpoint`, no `--master_port`): a free port, as `--standalone`,
  so several jobs share a node without colliding on torchrun's default port 29500 (on every torch version);
- the config is parsed once here first, so a bad key is one line, not one traceback per process;
- SIGTERM and Ctrl-C (SIGINT) reach the workers as SIGTERM: each saves a checkpoint at the end of its step and
  exits 0, and so does the launcher; a second Ctrl-C kills them at once (exit 130). Workers stop (saving) when the
  launcher dies, even by kill -9 (`mytune.training.lifetime.exit_with_launcher`, told the launcher's pid here).
"""

import os
import signal
import sys
from pathlib import Path

from mytune.cli import recipes
from mytune.cli.checks import check_launcher_flags, precheck
from mytune.errors import MytuneError

USAGE_HINT = "(usage: mytune [torchrun flags] <recipe> [recipe args...])"


def launch(argv: list[str]) -> int:
    """Parse torchrun flags from `argv`, resolve the recipe and run it under torchrun; returns the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = parse_torchrun_args(argv)
    if args.module or args.no_python:
        raise MytuneError("mytune runs a recipe by name, .py path or module path: drop --module/--no-python")
    recipe = recipes.resolve_recipe(args.training_script)
    after = list(args.training_script_args)
    check_launcher_flags(recipe, args.training_script, after, before=argv[:len(argv) - len(after) - 1])
    check_process_count(recipe.stem, args.nproc_per_node, args.nnodes)
    precheck(recipe, list(args.training_script_args), validate=True)
    use_free_port_on_one_node(args)
    point_at_recipe(args, recipe)
    os.environ["MYTUNE_LAUNCHER_PID"] = str(os.getpid())  # the workers' exit_with_launcher checks their parent
    set_threads_per_process(args.nproc_per_node)
    stopper = WorkerStopper(args)
    try:
        torchrun.run(args)
    except ChildFailedError as err:
        rank, failure = min(err.failures.items())
        stopped = (-signal.SIGTERM, -signal.SIGKILL)  # by the signal we sent, not a failure of their own
        if stopper.received is not None and all(f.exitcode in stopped for f in err.failures.values()):
            how = "killed at once (second Ctrl-C)" if stopper.forced else "stopped before they could save a checkpoint"
            print(f"mytune: {stopper.received.name}: the {recipe.stem} processes were {how}", file=sys.stderr)
            return 128 + (signal.SIGINT if stopper.forced else stopper.received)
        code = failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1
        print(f"mytune: error: {recipe.stem} failed on rank {rank} with exit code {failure.exitcode}", file=sys.stderr)
        return code
    except SignalException as err:  # torch without --signals_to_handle: its agent forwarded the signal itself
        if err.sigval not in (signal.SIGTERM, signal.SIGINT):
            raise
        print(f"mytune: {err.sigval.name}: the processes were asked to save a checkpoint and stop", file=sys.stderr)
        return 0
    finally:
        stopper.uninstall()
        os.environ.pop("MYTUNE_LAUNCHER_PID", None)
    return 0


class WorkerStopper:
    """The launcher's SIGTERM / SIGINT handler: forwards SIGTERM to the workers (each saves a checkpoint after its
    step and exits 0, so torchrun sees them succeed); a second SIGINT SIGKILLs them. Before any worker exists the
    launcher just exits (128 + the signal).

    torchrun's agent would otherwise catch both itself, send them on, SIGKILL workers still saving after
    `--shutdown_timeout` (30 s) and re-raise as a SignalException traceback, exit 1. So it is told to leave them
    alone (`--signals_to_handle` without them); torch without that flag handles them as before. The workers
    are found as this process's children that lead their own session (torchrun starts each with
    `start_new_session`), from /proc: Linux only, elsewhere torchrun handles the signals.
    """

    def __init__(self, args):
        self.received: signal.Signals | None = None
        self.forced = False
        self._previous = {}
        if not hasattr(args, "signals_to_handle") or not os.path.isdir("/proc/self"):
            return
        handled = [name.strip() for name in args.signals_to_handle.split(",") if name.strip()]
        args.signals_to_handle = ",".join(n for n in handled if n not in ("SIGTERM", "SIGINT")) or "SIGHUP"
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        workers = worker_process_groups()
        if not workers:
            raise SystemExit(128 + signum)
        if self.received is None or sig != signal.SIGINT:
            self.received = self.received or sig
            print(f"mytune: {sig.name}: asking the {len(workers)} processes to save a checkpoint at the end of this "
                  f"step and stop (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            _signal_groups(workers, signal.SIGTERM)
        else:
            self.forced = True
            print("mytune: SIGINT again: killing the processes now; the current step is not saved", file=sys.stderr,
                  flush=True)
            _signal_groups(workers, signal.SIGKILL)


def worker_process_groups() -> list[int]:
    """The pids of this process's children that lead their own session (torchrun's workers), from /proc."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and int(fields[3]) == int(entry):  # ppid, session
            found.append(int(entry))
    return found


def _signal_groups(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass


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


def set_threads_per_process(nproc_per_node: str) -> None:
    """OMP_NUM_THREADS for the workers, unless the user set it: this node's CPUs shared by its processes, said in one
    line (torchrun would otherwise set 1 and print a four-line banner on every multi-process run)."""
    from torch.distributed import run as torchrun

    if "OMP_NUM_THREADS" in os.environ:
        return
    try:
        processes = torchrun.determine_local_world_size(nproc_per_node)
    except (ValueError, RuntimeError):
        return  # torchrun reports the bad value itself
    if processes <= 1:
        return
    threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    print(f"mytune: OMP_NUM_THREADS={threads} for each of the {processes} processes on this node "
          f"(this node's CPUs shared; set OMP_NUM_THREADS to choose)", file=sys.stderr, flush=True)


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
