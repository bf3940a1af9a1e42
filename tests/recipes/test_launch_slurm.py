"""`mytune slurm`: the generated sbatch script, and a real one-node Slurm (munge + slurmctld + slurmd on localhost)
running it for a 2-process CPU fine-tune. The real run skips, with the reason, where Slurm is not installed or its
daemons cannot start (`.ci/run` installs Debian's slurm-wlm and munge when it runs as root with apt-get)."""

import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mytune.cli.main import main

REPO = Path(__file__).resolve().parents[2]
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")


def generate(capsys, tmp_path, *argv: str) -> tuple[str, Path]:
    script = tmp_path / "job.sbatch"
    assert main(["slurm", "--script", str(script), *argv]) == 0
    out = capsys.readouterr().out
    text = script.read_text()
    assert text in out  # printed as written
    return text, script


def srun_words(text: str) -> list[str]:
    """The srun command of the script as shell words (line continuations joined)."""
    command = text[text.index("srun "):].replace("\\\n", " ")
    return shlex.split(command.splitlines()[0])


def test_script_runs_the_same_command_under_srun_and_torchrun(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, script = generate(
        capsys, tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "04:00:00",
        "--account", "proj", "--sbatch-option=--exclusive", "--setup", "module load cuda", "--torchrun",
        "--max_restarts 2", "full_finetune_distributed", "--config=llama3_1_8b", "--override", "output_dir=/ckpt/a b",
    )
    sbatch = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert sbatch == ["--job-name=mytune-full_finetune_distributed", "--nodes=4", "--ntasks-per-node=1",
                      "--gpus-per-node=8", "--partition=gpu", "--time=04:00:00", "--account=proj",
                      "--output=%x-%j.out", f"--chdir={tmp_path}", "--exclusive"]
    assert text.startswith("#!/bin/bash\n") and os.access(script, os.X_OK)
    assert "\nmodule load cuda\n" in text
    # The rendezvous is read from the Slurm environment when the job runs, not fixed now.
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert "rdzv_port=$((20000 + SLURM_JOB_ID % 20000))" in text
    words = srun_words(text)
    assert words[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert words[3:6] == [sys.executable, "-m", "mytune.cli.main"]
    assert words[6:] == [
        "--nnodes", "$SLURM_JOB_NUM_NODES", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "$head_node:$rdzv_port", "--rdzv_id", "$SLURM_JOB_ID", "--max_restarts", "2",
        "full_finetune_distributed", "--config=llama3_1_8b", "--override", "output_dir=/ckpt/a b",
    ]
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_script_names_file_recipes_by_absolute_path_and_keeps_module_paths(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "full_finetune_distributed", "my_ft.py"]) == 0
    capsys.readouterr()
    text, _ = generate(capsys, tmp_path, "--nproc-per-node", "2", "./my_ft.py", "--config", "my.yaml")
    words = srun_words(text)
    assert words[-3:] == [str(tmp_path / "my_ft.py"), "--config", "my.yaml"]
    assert "--gpus-per-node" not in text and words[words.index("--nproc_per_node") + 1] == "2"
    text, _ = generate(capsys, tmp_path, "recipes.full_finetune_distributed:main", "--config", "tiny_demo")
    assert srun_words(text)[-3:] == ["recipes.full_finetune_distributed:main", "--config", "tiny_demo"]


def test_slurm_errors_are_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--nodes", "2", "full_finetune_single_device"], "full_finetune_single_device runs on one device"),
        (["--nodes", "0", "full_finetune_distributed"], "--nodes must be >= 1, got 0"),
        (["--wait", "full_finetune_distributed"], "--wait waits for a submitted job: add --submit"),
        (["full_finetune_distribute"], "unknown recipe `full_finetune_distribute`: did you mean `full_finetune_distributed`"),
        ([], "the following arguments are required: recipe"),
    ]
    for argv, expected in cases:
        assert main(["slurm", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["slurm", "--submit", "full_finetune_distributed", "--config", "tiny_demo"]) == 2
    assert "--submit needs `sbatch` on PATH" in capsys.readouterr().err


# --- a real one-node Slurm on localhost ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd on this machine, configured in a temp dir; yields the env that talks to it."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing; `apt-get install slurm-wlm munge`, as .ci/run does)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    socket_path = root / "munge" / "munge.socket"
    user = getpass.getuser()
    cpus = 2
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=mytunetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf), "PYTHONPATH": str(REPO)}
    sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
    log = (root / "log" / "daemons.out").open("w")
    processes = []
    try:
        processes.append(subprocess.Popen(
            [sbin("munged"), "--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}",
             f"--log-file={root}/log/munged.log", f"--pid-file={root}/munge/munged.pid",
             f"--seed-file={root}/munge/munged.seed"], stdout=log, stderr=log, env=env))
        if not wait_for(socket_path.exists, 10):
            pytest.skip(f"munged did not start: {(root / 'log' / 'munged.log').read_text()[-500:]}")
        processes.append(subprocess.Popen([sbin("slurmctld"), "-D", "-f", str(conf)], stdout=log, stderr=log, env=env))
        processes.append(subprocess.Popen([sbin("slurmd"), "-D", "-N", "localhost", "-f", str(conf)],
                                          stdout=log, stderr=log, env=env))

        def node_idle() -> bool:
            result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
            return result.returncode == 0 and result.stdout.strip() == "idle"

        if not wait_for(node_idle, 30):
            logs = " | ".join(p.read_text()[-300:] for p in (root / "log").glob("*") if p.is_file())
            pytest.skip(f"slurmctld/slurmd did not bring the node up in this sandbox: {logs}")
        yield env
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


@pytest.mark.slow
def test_sbatch_runs_the_generated_script_on_a_real_slurm(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "job.sbatch"
    result = subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "slurm", "--nodes", "1", "--nproc-per-node", "2",
         "--cpus-per-task", "2", "--time", "00:05:00", "--script", str(script), "--submit", "--wait",
         "full_finetune_distributed", "--config", "tiny_demo",
         "--override", f"output_dir={out}", "max_steps_per_epoch=2", "epochs=1"],
        capture_output=True, text=True, env=slurm_cluster, cwd=tmp_path, timeout=300,
    )
    job_logs = "\n".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + job_logs[-3000:]
    assert "Submitted batch job" in result.stdout
    assert (out / "step_2" / "model.safetensors").is_file()
    assert "rendezvous localhost:" in job_logs
    assert "sharded over 2 process(es)" in job_logs and job_logs.count("saved checkpoint to") == 1


@pytest.mark.slow
def test_a_failing_job_fails_the_wait(slurm_cluster, tmp_path):
    """`mytune slurm` checks the config's shape only (a login node may lack the GPUs); the job's launcher rejects the
    bad value before starting any process, and --wait reports the failed job."""
    result = subprocess.run(
        [sys.executable, "-m", "mytune.cli.main", "slurm", "--script", str(tmp_path / "bad.sbatch"), "--submit",
         "--wait", "full_finetune_distributed", "--config", "tiny_demo", "--override", "epochs=many"],
        capture_output=True, text=True, env=slurm_cluster, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ended: FAILED (exit code 2)" in result.stdout
    job_log = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert "full_finetune_distributed: error: epochs: invalid value 'many' (command line), expected int" in job_log
