"""Fine-tuning throughput of mytune's single-device recipes against Hugging Face transformers (+ peft) on the same work.

    python benchmarks/finetune_throughput.py --mode full --size small --device cpu --dtype fp32
    python benchmarks/finetune_throughput.py --mode lora --size small --device cpu --dtype fp32
    python benchmarks/finetune_throughput.py --mode full --size 1b --device cuda --dtype bf16 --out full_1b.json

One workload (model shape, sequence length, batch size, steps, dtype, full or LoRA) is run by each framework in a fresh
process of its own, in turn (never at the same time):

- mytune: the real recipe (`full_finetune_single_device` / `lora_finetune_single_device`) through `recipe_main`,
  its params parsed by `TuneArgumentParser` from `--config tiny_demo --override ...` as a user would run it (the
  recipe's defaults stay on, e.g. the chunked loss); its per-step timings are read back from `output_dir/metrics.jsonl`.
- hf: `AutoModelForCausalLM` (sdpa attention) in a plain PyTorch loop: forward with `labels=`, backward, gradient
  clipping, `torch.optim.AdamW` (fused on CUDA, as mytune and HF Trainer's default use), and for LoRA `peft`.
- torchtune (opt-in, `--frameworks mytune,hf,torchtune --peer-pythonpath DIR`): torchtune 0.6's model builders, weight
  conversion and chunked loss in the same plain loop, imported from `DIR` (never from the project's environment).

Same work, checked: both start from the same random Hugging Face checkpoint (written once with transformers'
`from_config` + `save_pretrained`), train on the same batches of the shipped demo data (mytune's own data pipeline,
packed rows: `build_sft_dataset(packed=True)` in order, `shuffle=false`; the HF loop gets those exact token ids,
labels and position ids, which transformers turns into the same block-causal mask), with the same lr (constant),
AdamW settings and clipping. For LoRA the peers load mytune's initial adapter (written by the recipe's own setup;
`PeftModel.from_pretrained` on the HF side), so the adapters start identical too. The per-step losses are compared:
in fp32 they agree to ~1e-6 (tolerance 1e-3); that is the evidence all did the same computation.

Reported per framework: tokens/s (non-padding tokens of the timed steps / their wall-clock seconds, the first
`--warmup` steps left out), mean step time, peak memory (CUDA: `torch.cuda.max_memory_allocated`; CPU: the growth of
the process's peak RSS, `ru_maxrss`, from just after the framework's imports to the end of training), MFU on CUDA
(6 * N * tokens/s / peak FLOP/s, N = matrix-multiply parameters, the device's dense peak from PEAK_TFLOPS) and the
final loss. A step is timed the same way on both sides: from before the batch is moved to the device to after the
optimizer step (mytune's `train_step` timing; the HF loop also synchronises CUDA before stopping its clock).

Nothing is downloaded. Everything is written under `--workdir` (default: a temporary directory, removed afterwards).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "mytune" / "assets" / "demo"
DEMO_DATA = DEMO_DIR / "alpaca_demo.jsonl"
DEMO_TOKENIZER = DEMO_DIR / "tokenizer.model"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Dense (no sparsity) peak FLOP/s in TFLOP/s by device-name fragment, per dtype (fp32: TF32 tensor cores off, the
# plain FP32 peak). SXM figures; the first fragment found in torch.cuda.get_device_name() wins.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}


@dataclasses.dataclass
class Size:
    """A model shape (Llama) and the sequence length / batch size it is benchmarked with."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    seq_len: int
    batch_size: int
    steps: int
    builder: str = ""  # a mytune named builder whose ModelArgs give the shape (vocab and rope included)
    vocab_size: int | None = None  # None: the demo tokenizer's vocabulary


SIZES = {
    # ~3M parameters: both frameworks and both modes finish in a few minutes on 2 CPU cores.
    "small": Size(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, seq_len=512, batch_size=4, steps=20),
    # ~25M parameters: a bigger CPU run or a quick GPU check.
    "medium": Size(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, seq_len=1024, batch_size=4, steps=12),
    # Llama 3.2 1B's exact shape (128k vocabulary, tied embeddings, llama3 rope scaling): a GPU workload.
    "1b": Size(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, seq_len=2048, batch_size=4, steps=30, builder="llama3_2_1b"),
}


# ---------------------------------------------------------------------------------------------------------------------
# The parent: prepare once, run each framework in its own process, compare, print.
# ---------------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["full", "lora"], default="full")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the size's)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timings")
    parser.add_argument("--seq-len", type=int, default=None, help="packed row length (default: the size's)")
    parser.add_argument("--batch-size", type=int, default=None, help="packed rows per step (default: the size's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--lr", type=float, default=None, help="constant learning rate (default: 3e-4 full, 1e-3 LoRA)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--frameworks", default="mytune,hf",
                        help="comma-separated, from mytune, hf, torchtune (torchtune is opt-in: see --peer-pythonpath)")
    parser.add_argument("--peer-pythonpath", default="",
                        help="PYTHONPATH for the torchtune worker only (e.g. a `pip install --target` dir holding "
                             "torchtune 0.6 and a torchao it can import); mytune and hf never see it")
    parser.add_argument("--mytune-override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra recipe overrides for the mytune run only (e.g. compile=true chunked_loss=false)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each framework this many times, interleaved; the median run is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in each framework's process (default: torch's own choice)")
    parser.add_argument("--loss-tolerance", type=float, default=None,
                        help="max |loss difference| per step counted as a match (default: 1e-3 fp32, 5e-2 bf16)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: PEAK_TFLOPS)")
    parser.add_argument("--workdir", default=None, help="keep checkpoint, data, logs here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    args = parser.parse_args(argv)

    size = SIZES[args.size]
    spec = {
        "mode": args.mode, "size": args.size, "device": args.device, "dtype": args.dtype,
        "steps": args.steps or size.steps, "warmup": args.warmup, "seq_len": args.seq_len or size.seq_len,
        "batch_size": args.batch_size or size.batch_size, "lr": args.lr or (3e-4 if args.mode == "full" else 1e-3),
        "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "threads": args.threads,
        "lora": {"targets": LORA_TARGETS, "rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": 0.0},
        "model_shape": dataclasses.asdict(size), "mytune_overrides": args.mytune_override,
    }
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if spec["steps"] <= spec["warmup"]:
        parser.error(f"--steps ({spec['steps']}) must be more than --warmup ({spec['warmup']})")
    frameworks = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    unknown = set(frameworks) - {"mytune", "hf", "torchtune"}
    if unknown:
        parser.error(f"unknown frameworks {sorted(unknown)}; choose from mytune, hf, torchtune")
    spec["peer_pythonpath"] = args.peer_pythonpath

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="finetune_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec["workdir"] = str(workdir.resolve())
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    print(f"workload: {describe(spec)}", flush=True)
    try:
        load_before = os.getloadavg()
        prepared = run_worker("prepare", spec_path, workdir)
        print(f"prepared in {prepared['seconds']:.1f} s: {prepared['n_params'] / 1e6:.1f}M params "
              f"({prepared['matmul_params'] / 1e6:.1f}M in matmuls), {prepared['rows_available']} packed rows of "
              f"<= {spec['seq_len']} tokens available, {prepared['tokens_per_step']:.0f} tokens per step", flush=True)
        # Interleaved (mytune, hf, mytune, hf, ...): a burst of load from elsewhere hits both, not one.
        runs = {name: [] for name in frameworks}
        for repeat in range(args.repeats):
            for name in frameworks:
                result = run_worker(name, spec_path, workdir)
                runs[name].append(result)
                print(f"{name} (run {repeat + 1}/{args.repeats}): {timed_tokens_per_s(result, spec):,.0f} tokens/s, "
                      f"{result['wall_seconds']:.1f} s in all", flush=True)
        load_after = os.getloadavg()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    results = {name: results[0] for name, results in runs.items()}
    peak = args.peak_tflops or peak_tflops(results, spec["dtype"])
    rows = [summarize(name_runs, spec, prepared, peak) for name_runs in runs.values()]
    comparison = compare_losses(results, spec, args.loss_tolerance)
    report = {
        "workload": spec, "prepared": prepared, "runs": runs, "summary": rows, "loss_comparison": comparison,
        "peak_tflops": peak,
        "environment": environment(results, load_before, load_after),
    }
    print()
    print(markdown_table(rows, spec))
    print()
    print(comparison["message"])
    print(f"load average (1/5/15 min) before: {fmt_load(load_before)}, after: {fmt_load(load_after)}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def describe(spec: dict) -> str:
    shape = spec["model_shape"]
    return (f"{spec['mode']} fine-tune, size {spec['size']} ({shape['num_hidden_layers']} layers x "
            f"{shape['hidden_size']}), {spec['batch_size']} x {spec['seq_len']} tokens, {spec['steps']} steps "
            f"({spec['warmup']} warm-up), {spec['dtype']} on {spec['device']}, lr {spec['lr']}"
            + (f", mytune overrides: {' '.join(spec['mytune_overrides'])}" if spec.get("mytune_overrides") else ""))


def run_worker(kind: str, spec_path: Path, workdir: Path) -> dict:
    """Run `--worker kind` in a fresh Python process; its JSON result, or exit showing its log on failure."""
    result_path = workdir / f"{kind}.result.json"
    log_path = workdir / f"{kind}.log"
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: every file is local
    env["TRANSFORMERS_OFFLINE"] = "1"
    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    if kind == "torchtune" and spec.get("peer_pythonpath"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec["peer_pythonpath"], env.get("PYTHONPATH", "")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path),
               "--result", str(result_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        sys.stderr.write(log_path.read_text()[-6000:])
        raise SystemExit(f"the {kind} worker failed (exit {completed.returncode}); log above ({log_path})")
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def peak_tflops(results: dict, dtype: str) -> float | None:
    names = [r.get("device_name") or "" for r in results.values()]
    for fragment, peaks in PEAK_TFLOPS.items():
        if names and all(fragment in name for name in names):
            return peaks[dtype]
    return None


def timed_tokens_per_s(result: dict, spec: dict) -> float:
    timed = result["steps"][spec["warmup"]:]
    return sum(step["tokens"] for step in timed) / sum(step["seconds"] for step in timed)


def summarize(runs: list[dict], spec: dict, prepared: dict, peak: float | None) -> dict:
    """tokens/s, step time, memory, MFU and final loss of one framework over the steps after the warm-up; with
    several runs, the run with the median tokens/s (the upper median for an even count)."""
    speeds = [timed_tokens_per_s(run, spec) for run in runs]
    result = sorted(runs, key=lambda run: timed_tokens_per_s(run, spec))[len(runs) // 2]
    timed = result["steps"][spec["warmup"]:]
    seconds = sum(step["seconds"] for step in timed)
    tokens_per_s = timed_tokens_per_s(result, spec)
    mfu = None
    if spec["device"] == "cuda" and peak:
        mfu = 6 * prepared["matmul_params"] * tokens_per_s / (peak * 1e12)
    return {
        "framework": result["framework"], "tokens_per_s": tokens_per_s, "step_seconds": seconds / len(timed),
        "peak_memory_gib": result["peak_memory_gib"], "peak_memory_kind": result["peak_memory_kind"],
        "process_peak_rss_gib": result.get("process_peak_rss_gib"), "mfu": mfu,
        "first_loss": result["steps"][0]["loss"], "final_loss": result["steps"][-1]["loss"],
        "timed_steps": len(timed), "trainable_params": result.get("trainable_params"),
        "tokens_per_s_runs": speeds, "peak_memory_gib_runs": [run["peak_memory_gib"] for run in runs],
    }


def compare_losses(results: dict, spec: dict, tolerance: float | None) -> dict:
    """mytune's per-step losses against each peer's: the evidence that they trained the same thing."""
    tolerance = tolerance if tolerance is not None else (1e-3 if spec["dtype"] == "fp32" else 5e-2)
    peers = [name for name in results if name != "mytune"]
    if "mytune" not in results or not peers:
        return {"message": "losses: only one framework ran, nothing to compare", "match": None}
    ours = [step["loss"] for step in results["mytune"]["steps"]]
    comparison, messages = {"tolerance": tolerance, "mytune": ours, "match": True}, []
    for peer in peers:
        theirs = [step["loss"] for step in results[peer]["steps"]]
        diffs = [abs(a - b) for a, b in zip(ours, theirs)]
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        match = len(ours) == len(theirs) and diffs[worst] <= tolerance
        comparison[peer] = theirs
        comparison[f"{peer}_max_abs_diff"] = diffs[worst]
        comparison[f"{peer}_match"] = match
        comparison["match"] = comparison["match"] and match
        messages.append(
            f"losses {'MATCH' if match else 'DIFFER'}: max |mytune - {peer}| over {len(diffs)} steps = "
            f"{diffs[worst]:.2e} at step {worst + 1} (tolerance {tolerance:g}, {spec['dtype']}); "
            f"step 1: {ours[0]:.6f} vs {theirs[0]:.6f}, step {len(ours)}: {ours[-1]:.6f} vs {theirs[-1]:.6f}")
    comparison["message"] = "\n".join(messages)
    return comparison


def markdown_table(rows: list[dict], spec: dict) -> str:
    memory_kind = rows[0]["peak_memory_kind"] if rows else ""
    repeats = len(rows[0]["tokens_per_s_runs"]) if rows else 1
    lines = [
        f"{describe(spec)}" + (f"; median of {repeats} interleaved runs" if repeats > 1 else ""),
        "",
        f"| framework | tokens/s | step time (s) | peak memory (GiB, {memory_kind}) | MFU | final loss "
        f"| tokens/s of each run |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        each = ", ".join(f"{speed:,.0f}" for speed in row["tokens_per_s_runs"])
        lines.append(f"| {row['framework']} | {row['tokens_per_s']:,.0f} | {row['step_seconds']:.3f} | "
                     f"{row['peak_memory_gib']:.3f} | {mfu} | {row['final_loss']:.4f} | {each} |")
    if rows and rows[0]["framework"] == "mytune" and len(rows) > 1:
        lines.append("")
        for peer in rows[1:]:
            ratio = rows[0]["tokens_per_s"] / peer["tokens_per_s"]
            memory = rows[0]["peak_memory_gib"] / peer["peak_memory_gib"] if peer["peak_memory_gib"] > 0 else math.nan
            lines.append(f"mytune / {peer['framework']}: {ratio:.2f}x tokens/s, {memory:.2f}x peak memory")
    return "\n".join(lines)


def environment(results: dict, load_before, load_after) -> dict:
    any_result = next(iter(results.values()), {})
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "versions": any_result.get("versions"), "device_name": any_result.get("device_name"),
        "threads": any_result.get("threads"), "loadavg_before": load_before, "loadavg_after": load_after,
    }


def fmt_load(load) -> str:
    return " / ".join(f"{value:.2f}" for value in load)


# ---------------------------------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process (`--worker prepare|mytune|hf`).
# ---------------------------------------------------------------------------------------------------------------------

def peak_rss_gib() -> float:
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024) / 2**30


def paths(spec: dict) -> dict[str, Path]:
    workdir = Path(spec["workdir"])
    return {"checkpoint": workdir / "checkpoint", "data": workdir / "data.jsonl", "cache": workdir / "token_cache",
            "batches": workdir / "batches.pt", "adapter": workdir / "initial_adapter", "runs": workdir / "runs"}


def set_threads(spec: dict) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])


def versions() -> dict:
    import importlib.metadata

    found = {}
    for package in ("torch", "transformers", "peft", "mytune"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def recipe_overrides(spec: dict, output_dir: Path) -> list[str]:
    """The recipe's `--override`s for this workload (on top of the shipped tiny_demo config)."""
    p = paths(spec)
    overrides = [
        f"checkpoint_dir={p['checkpoint']}", f"tokenizer_path={DEMO_TOKENIZER}", f"dataset_path={p['data']}",
        f"output_dir={output_dir}", f"dataset_cache_dir={p['cache']}", "dataset_format=auto", "packed=true",
        f"max_seq_len={spec['seq_len']}", "val_fraction=0", "eval_every_n_steps=0", "shuffle=false",
        f"batch_size={spec['batch_size']}", "gradient_accumulation_steps=1", "epochs=1",
        f"max_steps_per_epoch={spec['steps']}", "optimizer=adamw", f"lr={spec['lr']}", "lr_scheduler=constant",
        "warmup_steps=0", f"weight_decay={spec['weight_decay']}", f"max_grad_norm={spec['max_grad_norm']}",
        "activation_checkpointing=false", "activation_offloading=false", "save_every_n_steps=0",
        "keep_last_n_checkpoints=null", f"dtype={spec['dtype']}",
        f"device={spec['device']}", f"seed={spec['seed']}", "log_every_n_steps=1", "metric_loggers=[jsonl]",
        "profile=false",
    ]
    if spec["mode"] == "lora":
        lora = spec["lora"]
        overrides += [f"lora_target_modules=[{','.join(lora['targets'])}]", f"lora_rank={lora['rank']}",
                      f"lora_alpha={lora['alpha']}", f"lora_dropout={lora['dropout']}", "use_dora=false",
                      "quantize_base=false"]
    return overrides + list(spec.get("mytune_overrides") or [])


def recipe_module(mode: str):
    if mode == "full":
        import recipes.full_finetune_single_device as module

        return module, module.FullFinetuneParams, module.FullFinetuneRecipeSingleDevice
    import recipes.lora_finetune_single_device as module

    return module, module.LoRAFinetuneParams, module.LoRAFinetuneRecipeSingleDevice


def parse_recipe_params(spec: dict, output_dir: Path):
    from mytune.config import TuneArgumentParser

    module, params_cls, _ = recipe_module(spec["mode"])
    parser = TuneArgumentParser(params_cls, recipe=module.__file__)
    return parser.parse_params(["--config", "tiny_demo", "--override", *recipe_overrides(spec, output_dir)])


def worker_prepare(spec: dict) -> dict:
    """The shared inputs: a random HF checkpoint, the data file, the packed batches, (LoRA) the initial adapter."""
    start = time.perf_counter()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mytune.data import ResumableDataLoader, ResumableSampler, build_sft_dataset, padded_collate
    from mytune.models import model_args
    from mytune.models.transformer import ModelArgs
    from mytune.tokenizers import load_tokenizer
    from mytune.training.profiling import matmul_params

    set_threads(spec)
    p = paths(spec)
    tokenizer = load_tokenizer(DEMO_TOKENIZER)
    shape = dict(spec["model_shape"])

    # 1. The data: the demo rows, repeated when one pass has fewer packed rows than the steps need.
    needed = spec["steps"] * spec["batch_size"]
    demo_rows = DEMO_DATA.read_text(encoding="utf-8")
    build = dict(tokenizer=tokenizer, max_seq_len=spec["seq_len"], packed=True, cache_dir=p["cache"])
    per_copy = len(build_sft_dataset(DEMO_DATA, **build))
    copies = -(-needed // max(per_copy, 1))
    p["data"].write_text(demo_rows * copies, encoding="utf-8")
    dataset = build_sft_dataset(p["data"], **build)  # what the recipe builds (and now finds in the cache)
    if len(dataset) < needed:
        raise SystemExit(f"{len(dataset)} packed rows, {needed} needed")

    # 2. The batches the recipe will see, in its order (shuffle=false), collated by its collate function.
    sampler = ResumableSampler(dataset, rank=0, world_size=1, shuffle=False, seed=spec["seed"])
    loader = ResumableDataLoader(dataset, batch_size=spec["batch_size"], sampler=sampler,
                                 collate_fn=lambda batch: padded_collate(batch, pad_id=tokenizer.pad_id))
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == spec["steps"]:
            break
    torch.save(batches, p["batches"])
    real_tokens = [int((b["document_ids"] >= 0).sum()) for b in batches]

    # 3. A random Llama checkpoint written by transformers; mytune's ModelArgs give the config.json.
    if shape["builder"]:
        args = model_args(shape["builder"])
    else:
        args = ModelArgs(model_type="llama", vocab_size=shape["vocab_size"] or tokenizer.vocab_size,
                         hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=max(2048, spec["seq_len"]), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    save_dtype = torch.float32 if spec["dtype"] == "fp32" else torch.bfloat16
    p["checkpoint"].mkdir(parents=True, exist_ok=True)
    (p["checkpoint"] / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
    torch.manual_seed(spec["seed"])
    with torch.device(spec["device"]):  # initialising a 1B model is much faster on the GPU
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(p["checkpoint"]), dtype=torch.float32)
    model.to(save_dtype).save_pretrained(p["checkpoint"])
    n_params = sum(t.numel() for t in model.parameters())
    del model

    # 4. LoRA: the recipe's own initial adapter (its setup seeds and initialises it), for the peft side to load.
    if spec["mode"] == "lora":
        from mytune.checkpoint import save_peft_adapter

        _, _, recipe_cls = recipe_module("lora")
        params = parse_recipe_params(spec, p["runs"] / "prepare")
        recipe = recipe_cls(params)
        recipe.setup()
        lora = spec["lora"]
        save_peft_adapter(recipe.model, p["adapter"], base_model_name_or_path=str(p["checkpoint"]),
                          targets=lora["targets"], rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"],
                          use_dora=False)
        recipe.cleanup()
        del recipe

    return {"seconds": time.perf_counter() - start, "n_params": n_params, "matmul_params": matmul_params(args),
            "rows_available": len(dataset), "data_copies": copies, "real_tokens_per_step": real_tokens,
            "tokens_per_step": sum(real_tokens) / len(real_tokens)}


def worker_mytune(spec: dict) -> dict:
    """The recipe through `recipe_main`; per-step seconds and losses from its metrics.jsonl."""
    import torch

    module, _, recipe_cls = recipe_module(spec["mode"])
    set_threads(spec)
    p = paths(spec)
    cuda = spec["device"] == "cuda"
    baseline_rss = peak_rss_gib()
    output_dir = p["runs"] / f"mytune_{spec['mode']}"
    shutil.rmtree(output_dir, ignore_errors=True)  # a fresh metrics.jsonl for each run
    params = parse_recipe_params(spec, output_dir)

    # Memory is read when train() returns, before the final checkpoint is written (saving is not training).
    measured = {}
    original_train = recipe_cls.train

    def train_and_measure(recipe):
        original_train(recipe)
        if cuda:
            torch.cuda.synchronize()
            measured["cuda_peak"] = torch.cuda.max_memory_allocated() / 2**30
        measured["rss_peak"] = peak_rss_gib()
        measured["trainable"] = sum(t.numel() for t in recipe.model.parameters() if t.requires_grad)

    recipe_cls.train = train_and_measure
    module.recipe_main(params)

    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if "loss" in m and "step" in m]
    shutil.rmtree(output_dir, ignore_errors=True)  # the saved checkpoint is not needed (and large for big sizes)
    if len(metrics) != spec["steps"]:
        raise SystemExit(f"metrics.jsonl has {len(metrics)} steps, expected {spec['steps']}")
    batches = torch.load(p["batches"])
    steps = []
    for m, batch in zip(metrics, batches):
        # tokens_per_s counts tokens != pad_id; seconds = num_tokens / tokens_per_s is the step's wall clock.
        steps.append({"step": m["step"], "loss": m["loss"], "seconds": m["num_tokens"] / m["tokens_per_s"],
                      "tokens": int((batch["document_ids"] >= 0).sum()), "recipe_tokens": m["num_tokens"],
                      "recipe_tokens_per_s": m["tokens_per_s"]})
    return worker_result("mytune", spec, steps, measured.get("cuda_peak"), measured["rss_peak"], baseline_rss,
                         measured["trainable"])


def worker_hf(spec: dict) -> dict:
    """transformers (+ peft) in a plain PyTorch loop over the same batches."""
    import torch
    from transformers import AutoModelForCausalLM

    if spec["mode"] == "lora":
        from peft import PeftModel
    set_threads(spec)
    p = paths(spec)
    cuda = spec["device"] == "cuda"
    baseline_rss = peak_rss_gib()
    device = torch.device(spec["device"])
    dtype = torch.float32 if spec["dtype"] == "fp32" else torch.bfloat16

    batches = torch.load(p["batches"])
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(p["checkpoint"], dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.to(device)
    if spec["mode"] == "lora":
        model = PeftModel.from_pretrained(model, p["adapter"], is_trainable=True)
        model.to(device=device, dtype=dtype)
    model.train()
    trainable = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=spec["weight_decay"], fused=cuda)

    def loss_of(batch: dict):
        # Packed rows: no attention mask, position ids restarting per sample -> transformers builds the
        # block-causal mask (masking_utils.find_packed_sequence_indices); labels are shifted inside the model.
        return model(input_ids=batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"]).loss

    return peer_training_loop("hf", spec, batches, loss_of, trainable, optimizer, baseline_rss)


def peer_training_loop(framework: str, spec: dict, batches: list[dict], loss_of, trainable: list, optimizer,
                       baseline_rss: float) -> dict:
    """The timed loop every peer runs: move the batch, `loss_of(batch)`, backward, clip, step; the same per-step
    record (loss, seconds, real tokens) and memory figures for each framework."""
    import torch

    cuda = spec["device"] == "cuda"
    device = torch.device(spec["device"])
    steps = []
    for index, batch in enumerate(batches):
        start = time.perf_counter()
        batch = {key: value.to(device) for key, value in batch.items()}
        loss_tensor = loss_of(batch)
        loss_tensor.backward()
        loss = loss_tensor.item()
        torch.nn.utils.clip_grad_norm_(trainable, spec["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        steps.append({"step": index + 1, "loss": loss, "seconds": seconds,
                      "tokens": int((batch["document_ids"] >= 0).sum())})
    cuda_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return worker_result(framework, spec, steps, cuda_peak, peak_rss_gib(), baseline_rss,
                         sum(t.numel() for t in trainable))


def worker_result(framework: str, spec: dict, steps: list[dict], cuda_peak, rss_peak: float, baseline_rss: float,
                  trainable: int) -> dict:
    import torch

    cuda = spec["device"] == "cuda"
    return {
        "framework": framework, "steps": steps, "trainable_params": trainable,
        "peak_memory_gib": cuda_peak if cuda else rss_peak - baseline_rss,
        "peak_memory_kind": "max_memory_allocated" if cuda else "peak RSS growth",
        "process_peak_rss_gib": rss_peak, "baseline_rss_gib": baseline_rss,
        "device_name": device_name(spec["device"]), "threads": torch.get_num_threads(), "versions": versions(),
    }


def worker_torchtune(spec: dict) -> dict:
    """torchtune 0.6's model builders and chunked loss in a plain loop (what its recipes do), same batches and weights.

    Optional (`--frameworks mytune,hf,torchtune`): torchtune must be importable from `--peer-pythonpath`.
    """
    import torch
    from safetensors.torch import load_file
    from torchtune.models import convert_weights
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    set_threads(spec)
    p = paths(spec)
    cuda = spec["device"] == "cuda"
    baseline_rss = peak_rss_gib()
    device = torch.device(spec["device"])
    dtype = torch.float32 if spec["dtype"] == "fp32" else torch.bfloat16
    shape = spec["model_shape"]
    config = json.loads((p["checkpoint"] / "config.json").read_text())
    lora = spec["lora"] if spec["mode"] == "lora" else None
    if shape["builder"] == "llama3_2_1b":
        from torchtune.models.llama3_2 import llama3_2_1b, lora_llama3_2_1b

        build = llama3_2_1b
        if lora:  # LORA_TARGETS in torchtune's names: every attention and MLP projection
            build = partial_call(lora_llama3_2_1b, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
                                 apply_lora_to_mlp=True, lora_rank=lora["rank"], lora_alpha=lora["alpha"],
                                 lora_dropout=0.0)
    elif not shape["builder"]:
        from torchtune.models.llama2 import llama2, lora_llama2

        common = dict(vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
                      num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
                      embed_dim=config["hidden_size"], max_seq_len=config["max_position_embeddings"],
                      intermediate_dim=config["intermediate_size"], norm_eps=config["rms_norm_eps"])
        if lora:
            build = partial_call(lora_llama2, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
                                 apply_lora_to_mlp=True, lora_rank=lora["rank"], lora_alpha=lora["alpha"],
                                 lora_dropout=0.0, **common)
        else:
            build = partial_call(llama2, **common)
    else:
        raise SystemExit(f"torchtune worker: size with builder {shape['builder']!r} is not mapped")

    batches = torch.load(p["batches"])
    hf_state = {}
    for file in sorted(p["checkpoint"].glob("*.safetensors")):
        hf_state.update(load_file(file))
    state = convert_weights.hf_to_tune(hf_state, num_heads=config["num_attention_heads"],
                                       num_kv_heads=config["num_key_value_heads"], dim=config["hidden_size"],
                                       head_dim=config.get("head_dim"))
    del hf_state
    with torch.device(device):
        model = build()
    model.to(dtype)
    if lora:
        # mytune's initial adapter (PEFT names) -> torchtune names; B is zero, so q/k need no row permutation.
        from torchtune.modules.peft import get_adapter_params, set_trainable_params

        names = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj":
                 "attn.v_proj", "self_attn.o_proj": "attn.output_proj", "mlp.gate_proj": "mlp.w1",
                 "mlp.down_proj": "mlp.w2", "mlp.up_proj": "mlp.w3"}
        for key, tensor in load_file(p["adapter"] / "adapter_model.safetensors").items():
            key = key.removeprefix("base_model.model.model.")
            for ours, theirs in names.items():
                key = key.replace(ours, theirs)
            state[key.replace("lora_A", "lora_a").replace("lora_B", "lora_b")] = tensor
        set_trainable_params(model, get_adapter_params(model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if "lora" in key or not lora]:
        raise SystemExit(f"torchtune worker: missing {missing[:3]}, unexpected {unexpected[:3]}")
    del state
    model.train()
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    trainable = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=spec["weight_decay"], fused=cuda)

    def loss_of(batch: dict):
        documents = batch["document_ids"]
        seq = documents.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
        mask = (documents[:, :, None] == documents[:, None, :]) & causal  # True = attend (torchtune's convention)
        labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # torchtune recipes shift here
        return loss_fn(model(batch["tokens"], mask=mask, input_pos=batch["position_ids"]), labels)

    return peer_training_loop("torchtune", spec, batches, loss_of, trainable, optimizer, baseline_rss)


def partial_call(fn, **kwargs):
    return lambda: fn(**kwargs)


WORKERS = {"prepare": worker_prepare, "mytune": worker_mytune, "hf": worker_hf, "torchtune": worker_torchtune}


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=sorted(WORKERS), required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    spec = json.loads(Path(args.spec).read_text())
    result = WORKERS[args.worker](spec)
    Path(args.result).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        worker_main(sys.argv[1:])
    else:
        main()
