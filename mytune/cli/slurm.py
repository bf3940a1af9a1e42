"""`mytune slurm [sbatch options] <recipe> [recipe args...]`: write an sbatch script that runs the recipe on every
node of the allocation under `srun` + torchrun, print it, and submit it with `--submit`.

The script runs one `mytune` launcher per node (`srun --ntasks-per-node=1`), each with the torchrun flags
`--nnodes $SLURM_JOB_NUM_NODES --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint <first node>:<port>
--rdzv_id $SLURM_JOB_ID`: the rendezvous comes from the Slurm environment at run time, the port from the job id
(two jobs sharing a first node do not collide). The command is the same `mytune` command you would type on one
node, with the interpreter of this installation, run from the current directory.
"""

import argparse
import datetime
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from mytune.cli import recipes
from mytune.cli.checks import precheck
from mytune.errors import MytuneError


def build_parser() -> argparse.ArgumentParser:
    parser = recipes.OneLineParser(
        prog="mytune slurm",
        description="Write an sbatch script that runs a recipe under srun + torchrun on N nodes (and submit it).",
        epilog="Everything from <recipe> on is passed to the recipe, e.g. --config NAME --override key=value.",
        allow_abbrev=False,
    )
    add = parser.add_argument
    add("--nodes", type=int, default=1, help="number of nodes (default 1)")
    add("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 for a CPU job (default 0)")
    add("--nproc-per-node", type=int, default=None, help="processes per node (default: --gpus-per-node, or 1)")
    add("--cpus-per-task", type=int, default=None, help="CPUs of the one task per node (it runs all the processes)")
    add("--partition", help="Slurm partition")
    add("--time", help="time limit, e.g. 04:00:00")
    add("--account", help="Slurm account to charge")
    add("--qos", help="quality of service")
    add("--mem", help="memory per node, e.g. 500G (0: all of it)")
    add("--job-name", help="job name (default mytune-<recipe>)")
    add("--output", default="%x-%j.out", help="stdout/stderr file pattern (default %%x-%%j.out)")
    add("--sbatch-option", action="append", default=[], metavar="OPTION",
        help="an extra #SBATCH line, e.g. --sbatch-option=--exclusive (repeatable)")
    add("--setup", action="append", default=[], metavar="COMMAND",
        help="a shell command run before the job, e.g. 'module load cuda' (repeatable)")
    add("--torchrun", default="", metavar="FLAGS", help="extra torchrun flags, e.g. '--max_restarts 3'")
    add("--python", default=sys.executable, help="the Python on the nodes (default: this one)")
    add("--script", type=Path, default=None, help="where to write the script (default ./mytune-<recipe>.sbatch)")
    add("--submit", action="store_true", help="submit the script with sbatch")
    add("--wait", action="store_true", help="with --submit: wait for the job to end; exit 0 only if it COMPLETED")
    add("recipe", help="a shipped recipe name, a .py path or a module path pkg.module[:function]")
    add("recipe_args", nargs=argparse.REMAINDER, help="arguments of the recipe (--config NAME ...)")
    return parser


def slurm(argv: list[str]) -> int:
    """`mytune slurm ...`: write the script, print it, and submit it when asked; returns the exit code."""
    args = build_parser().parse_args(argv)
    for name in ("nodes", "gpus_per_node", "nproc_per_node", "cpus_per_task"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus_per_node" else 1):
            raise MytuneError(f"--{name.replace('_', '-')} must be >= {0 if name == 'gpus_per_node' else 1}, got {value}")
    if args.wait and not args.submit:
        raise MytuneError("--wait waits for a submitted job: add --submit")
    if "single_device" in args.recipe and (args.nodes > 1 or (args.nproc_per_node or max(args.gpus_per_node, 1)) > 1):
        raise MytuneError(f"{args.recipe} runs on one device; use a distributed recipe for several nodes or processes")
    recipe = recipes.resolve_recipe(args.recipe)
    precheck(recipe, args.recipe_args, validate=False)
    # The recipe as typed, except that a file is named by its absolute path (the job may start elsewhere).
    recipe_arg = str(recipe) if isinstance(recipe, Path) and args.recipe not in recipes.shipped_recipes() else args.recipe

    script_text = sbatch_script(args, recipe_arg, recipe.stem, workdir=Path.cwd(), command=["mytune", "slurm", *argv])
    script = args.script or Path(f"mytune-{recipe.stem}.sbatch")
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(script_text)
    script.chmod(0o755)
    print(script_text, end="")
    print(f"# wrote {script}", flush=True)
    if not args.submit:
        print(f"# submit it with: sbatch {shlex.quote(str(script))}")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise MytuneError(f"--submit needs `sbatch` on PATH, which this machine lacks: copy {script} to a Slurm login node")
    result = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise MytuneError(f"sbatch {script} failed: {message}")
    job_id = result.stdout.strip().split(";")[0]
    print(f"Submitted batch job {job_id}", flush=True)
    if not args.wait:
        return 0
    state, exit_code = wait_for_job(job_id)
    print(f"Job {job_id} ended: {state} (exit code {exit_code})", flush=True)
    return 0 if state == "COMPLETED" else (exit_code or 1)


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE"}


def wait_for_job(job_id: str, poll_seconds: float = 1.0) -> tuple[str, int]:
    """Poll `scontrol show job` until the job ends; returns its state and exit code.

    Polled here rather than with `sbatch --wait`, whose polling interval grows to tens of seconds.
    """
    import time

    while True:
        result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise MytuneError(f"scontrol show job {job_id} failed: {' '.join(result.stderr.split())}")
        fields = dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)
        state = fields.get("JobState", "UNKNOWN")
        if state in TERMINAL_STATES:
            exit_code = int(fields.get("ExitCode", "1:0").split(":")[0] or 1)
            return state, exit_code
        time.sleep(poll_seconds)


def sbatch_script(args: argparse.Namespace, recipe_arg: str, recipe_stem: str, *, workdir: Path,
                  command: list[str] | None = None) -> str:
    """The sbatch script text for the parsed `mytune slurm` arguments (`command`, the typed one, goes in a comment)."""
    nproc = args.nproc_per_node or args.gpus_per_node or 1
    directives = [
        f"--job-name={args.job_name or f'mytune-{recipe_stem}'}",
        f"--nodes={args.nodes}",
        "--ntasks-per-node=1",
    ]
    if args.gpus_per_node:
        directives.append(f"--gpus-per-node={args.gpus_per_node}")
    optional = {"cpus-per-task": args.cpus_per_task, "partition": args.partition, "time": args.time,
                "account": args.account, "qos": args.qos, "mem": args.mem}
    directives += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    directives += [f"--output={args.output}", f"--chdir={workdir}", *args.sbatch_option]

    launcher = [
        args.python, "-m", "mytune.cli.main",
        "--nnodes", '"$SLURM_JOB_NUM_NODES"', "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", '"$head_node:$rdzv_port"', "--rdzv_id", '"$SLURM_JOB_ID"',
    ]
    quoted = [word if word.startswith('"$') else shlex.quote(word) for word in launcher]
    quoted += [shlex.quote(flag) for flag in shlex.split(args.torchrun)]
    quoted += [shlex.quote(recipe_arg), *(shlex.quote(a) for a in args.recipe_args)]
    lines = ["#!/bin/bash", f"# Written by `mytune slurm` on {datetime.datetime.now().isoformat(timespec='seconds')}."]
    if command:
        lines.append("# " + " ".join(shlex.quote(a) for a in command))
    lines += [f"#SBATCH {d}" for d in directives]
    lines += ["", "set -euo pipefail", *args.setup, ""]
    lines += [
        "# torchrun's c10d rendezvous is hosted on the first node of the allocation; the port comes from the job id",
        "# so that two jobs whose first node is the same do not collide.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "rdzv_port=$((20000 + SLURM_JOB_ID % 20000))",
        'echo "mytune: $SLURM_JOB_NUM_NODES node(s) x ' + str(nproc) + ' process(es), rendezvous $head_node:$rdzv_port"',
        "",
        "# One mytune launcher (torchrun) per node; it starts the processes of its node.",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        "  " + " \\\n  ".join(_wrap(quoted)),
        "",
    ]
    return "\n".join(lines)


def _wrap(words: list[str], width: int = 100) -> list[str]:
    """Group shell words into lines of about `width` characters (joined with line continuations)."""
    lines, current = [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines
