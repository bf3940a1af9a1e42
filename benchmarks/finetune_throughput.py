"""Fine-tuning throughput of mytune's single-device recipes against Hugging Face transformers (+ peft) and torchtune.

    python benchmarks/finetune_throughput.py --mode full --size small --device cpu --dtype fp32
    python benchmarks/finetune_throughput.py --mode lora --size small --device cpu --dtype fp32 \
        --frameworks mytune,hf,torchtune --peer-pythonpath /tmp/peer:benchmarks/peer_stubs
    python benchmarks/finetune_throughput.py --mode full --size 1b --device cuda --dtype bf16 --out full_1b.json

One workload (model shape, sequence length, batch size, steps, dtype, full / LoRA / QLoRA, compile or not, labels on
the outputs only or on every token) is run by each framework in a fresh process of its own, one after the other:

- mytune: the recipe class (`FullFinetuneRecipeSingleDevice` / `LoRAFinetuneRecipeSingleDevice`), its params parsed
  by `TuneArgumentParser` from `--config tiny_demo --override ...` as a user would run it, `setup()`, then its own
  `train_step([batch])` on the batches of its own data loader.
- hf: `AutoModelForCausalLM` (SDPA attention; packed rows through `position_ids`, from which transformers builds its
  block-causal mask) in a plain PyTorch loop; LoRA through `peft`, QLoRA through bitsandbytes' NF4 (CUDA only).
- torchtune (`--peer-pythonpath DIR`): torchtune 0.6's model builders, weight conversion, chunked loss and packed
  attention (on CUDA the compiled flex BlockMask of `packed_block_causal_mask`, as its recipes build it; on the CPU
  the dense `create_block_causal_mask`), imported from `DIR`, never from the project's environment.

Fair by construction:
- One timer, outside every framework: a step is the same call sequence everywhere (move the batch to the device,
  forward, loss, backward, one `.item()` of the loss, clip, optimizer step, zero the gradients) and is timed by the
  benchmark with CUDA events around it (on the CPU, `time.perf_counter`); none of the frameworks' own timings is used.
- Same work: every framework starts from the same random Hugging Face checkpoint, trains on the same packed batches
  of the shipped demo data (mytune's data pipeline, `shuffle=false`; mytune's loader is checked against them), with
  the same lr (constant), AdamW (fused on CUDA) and clipping; LoRA adapters start from one adapter file. The
  per-step losses are compared: in fp32 they agree to ~1e-6; that is the evidence all did the same computation.
- Each on its best supported path, and `--compile` compiles all or none: mytune's `compile=true`, torchtune's
  `compile_model` + `compile_loss` (what its recipes do with `compile=True`), `torch.compile` of the HF model.
- The labelled fraction of the tokens is reported (instruct data is mostly prompt, and mytune runs the output head
  on labelled positions only); `--train-on-input` labels every token for all frameworks.
- MFU's peak is a large bf16 (or fp32) matmul measured on the device (`--peak-tflops` overrides it).

Reported per framework: tokens/s (non-padding tokens of the timed steps / the sum of their step times, the first
`--warmup` steps left out), mean step time, peak memory (CUDA: `torch.cuda.max_memory_allocated` over the timed
steps; CPU: the growth of the process's peak RSS, `ru_maxrss`, from just after the imports to the end of training),
MFU on CUDA (6 * N * tokens/s / measured peak, N = matrix-multiply parameters), the final loss and its largest
per-step difference from mytune's.

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
MLP_TARGETS = {"gate_proj", "up_proj", "down_proj"}
TORCHTUNE_ATTENTION_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
IGNORE_INDEX = -100
PEAK_MATMUL_SIZE = 8192  # n of the n x n x n matmul that measures the device's peak FLOP/s
SKIPPED_EXIT_CODE = 3  # a worker that cannot run this workload (e.g. HF QLoRA without CUDA) exits with it


@dataclasses.dataclass
class Size:
    """A model shape (Llama) and the sequence length / batch size / steps it is benchmarked with."""

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
    # ~3M parameters: every framework and mode finishes in a few minutes on 2 CPU cores.
    "small": Size(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, seq_len=512, batch_size=4, steps=20),
    # ~25M parameters: a bigger CPU run or a quick GPU check.
    "medium": Size(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, seq_len=1024, batch_size=4, steps=12),
    # Llama 3.2 1B's exact shape (128k vocabulary, tied embeddings, llama3 rope scaling): a GPU workload.
    "1b": Size(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, seq_len=2048, batch_size=4, steps=30, builder="llama3_2_1b"),
    # Llama 3.1 8B's exact shape (128k vocabulary, untied head, llama3 rope scaling x8): a GPU workload.
    "8b": Size(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, seq_len=2048, batch_size=2, steps=12, builder="llama3_1_8b"),
}


# ---------------------------------------------------------------------------------------------------------------------
# The parent: prepare once, run each framework in its own process, compare, print.
# ---------------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["full", "lora", "qlora"], default="full",
                        help="qlora: LoRA on a base whose targeted (torchtune, bitsandbytes: all) linears are NF4")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers instead of the size's (a shorter model of the same shape: dry runs)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the size's)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timings")
    parser.add_argument("--seq-len", type=int, default=None, help="packed row length (default: the size's)")
    parser.add_argument("--batch-size", type=int, default=None, help="packed rows per step (default: the size's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--lr", type=float, default=None, help="constant learning rate (default: 3e-4 full, 1e-3 LoRA)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                        help="comma-separated from " + ", ".join(LORA_TARGETS) + " (torchtune: all MLP ones or none)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile in every framework (mytune compile=true; torchtune compile_model + "
                             "compile_loss; torch.compile of the HF model)")
    parser.add_argument("--train-on-input", action="store_true",
                        help="label every token (train_on_input=true) instead of the outputs only, for all frameworks")
    parser.add_argument("--frameworks", default="mytune,hf",
                        help="comma-separated, from mytune, hf, torchtune (torchtune needs --peer-pythonpath)")
    parser.add_argument("--peer-pythonpath", default="",
                        help="PYTHONPATH for the torchtune worker only (a `pip install --target` dir holding "
                             "torchtune 0.6.1 and torchao 0.11.0, and benchmarks/peer_stubs); mytune and hf never "
                             "see it")
    parser.add_argument("--hf-attention", default="sdpa", help="attn_implementation of the HF model (default: sdpa)")
    parser.add_argument("--mytune-override", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra recipe overrides for the mytune run only (e.g. to turn a fast path off); they "
                             "must not change the work")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each framework this many times, interleaved; the median run is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in each framework's process (default: torch's own choice)")
    parser.add_argument("--loss-tolerance", type=float, default=None,
                        help="max |loss difference| per step counted as a match "
                             "(default: 1e-3 fp32, 5e-2 bf16 or QLoRA)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: a large matmul in the dtype, measured on the device)")
    parser.add_argument("--checkpoint-cache", default=None,
                        help="keep the random checkpoint here and reuse it across runs of the same size, layers, "
                             "dtype and seed (e.g. LoRA and QLoRA 8B share one)")
    parser.add_argument("--keep-going", action="store_true",
                        help="a framework that fails or cannot run this workload becomes a row saying so")
    parser.add_argument("--workdir", default=None, help="keep checkpoint, data, logs here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    return parser


def build_spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The workload as plain data: what every worker reads (spec.json)."""
    size = dataclasses.replace(SIZES[args.size])
    if args.layers is not None:
        if args.layers < 1:
            parser.error("--layers must be >= 1")
        size.num_hidden_layers = args.layers
    targets = [name.strip() for name in args.lora_targets.split(",") if name.strip()]
    if set(targets) - set(LORA_TARGETS) or not targets:
        parser.error(f"--lora-targets: choose from {', '.join(LORA_TARGETS)}")
    lora_mode = args.mode in ("lora", "qlora")
    spec = {
        "mode": args.mode, "size": args.size, "device": args.device, "dtype": args.dtype,
        "steps": args.steps or size.steps, "warmup": args.warmup, "seq_len": args.seq_len or size.seq_len,
        "batch_size": args.batch_size or size.batch_size, "lr": args.lr or (1e-3 if lora_mode else 3e-4),
        "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "threads": args.threads,
        "compile": args.compile, "train_on_input": args.train_on_input, "hf_attention": args.hf_attention,
        "lora": {"targets": [t for t in LORA_TARGETS if t in targets], "rank": args.lora_rank,
                 "alpha": args.lora_alpha, "dropout": 0.0} if lora_mode else None,
        "model_shape": dataclasses.asdict(size), "mytune_overrides": args.mytune_override,
        "peer_pythonpath": args.peer_pythonpath, "checkpoint_cache": args.checkpoint_cache,
        "peak_tflops_override": args.peak_tflops,
    }
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if spec["steps"] <= spec["warmup"]:
        parser.error(f"--steps ({spec['steps']}) must be more than --warmup ({spec['warmup']})")
    return spec


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = build_spec(args, parser)
    frameworks = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    unknown = set(frameworks) - {"mytune", "hf", "torchtune"}
    if unknown:
        parser.error(f"unknown frameworks {sorted(unknown)}; choose from mytune, hf, torchtune")
    if spec["mode"] == "qlora" and set(spec["lora"]["targets"]) != set(LORA_TARGETS):
        print("note: torchtune and bitsandbytes quantize every decoder linear, mytune only the LoRA targets: give "
              "all seven targets for a like-for-like QLoRA (and comparable losses)", flush=True)
    if "torchtune" in frameworks and not args.peer_pythonpath:
        parser.error("torchtune runs from --peer-pythonpath DIR (see benchmarks/README.md), never from this venv")

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="finetune_throughput_"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec["workdir"] = str(workdir.resolve())
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    print(f"workload: {describe(spec)}", flush=True)
    try:
        load_before = os.getloadavg()
        prepared = run_worker("prepare", spec_path, workdir, keep_going=False)
        print(f"prepared in {prepared['seconds']:.1f} s: {prepared['n_params'] / 1e6:.1f}M params "
              f"({prepared['matmul_params'] / 1e6:.1f}M in matmuls), {prepared['rows_available']} packed rows of "
              f"<= {spec['seq_len']} tokens available, {prepared['tokens_per_step']:.0f} tokens per step, "
              f"{100 * prepared['labelled_fraction']:.1f}% of them labelled"
              + (f", measured peak {prepared['measured_peak_tflops']:.0f} TFLOP/s"
                 if prepared.get("measured_peak_tflops") else ""), flush=True)
        if len(prepared["batch_widths"]) > 1:  # compiled code may recompile on a new width inside the timed steps
            print(f"note: the batches are {prepared['batch_widths']} tokens wide (rows padded to the longest in "
                  f"each batch)", flush=True)
        # Interleaved (mytune, hf, torchtune, mytune, ...): a burst of load from elsewhere hits all, not one.
        runs = {name: [] for name in frameworks}
        for repeat in range(args.repeats):
            for name in frameworks:
                if runs[name] and not runs[name][-1].get("steps"):
                    continue  # skipped or failed once: it will not run the next time either
                result = run_worker(name, spec_path, workdir, keep_going=args.keep_going)
                runs[name].append(result)
                status = (f"{timed_tokens_per_s(result, spec):,.0f} tokens/s" if result.get("steps")
                          else result.get("skipped") or result.get("failed"))
                print(f"{name} (run {repeat + 1}/{args.repeats}): {status}, {result['wall_seconds']:.1f} s in all",
                      flush=True)
        load_after = os.getloadavg()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    peak = args.peak_tflops or prepared.get("measured_peak_tflops")
    rows = [summarize(name_runs, spec, prepared, peak) for name_runs in runs.values()]
    results = {name: name_runs[0] for name, name_runs in runs.items() if name_runs[0].get("steps")}
    comparison = compare_losses(results, spec, args.loss_tolerance)
    for row in rows:
        row["max_loss_diff"] = comparison.get(f"{row['framework']}_max_abs_diff")
    report = {
        "workload": spec, "label": workload_label(spec), "prepared": prepared, "runs": runs, "summary": rows,
        "loss_comparison": comparison, "peak_tflops": peak,
        "environment": environment(list(results.values()), load_before, load_after),
    }
    print()
    print(markdown_table(rows, spec, prepared, peak))
    print()
    print(comparison["message"])
    print(f"load average (1/5/15 min) before: {fmt_load(load_before)}, after: {fmt_load(load_after)}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


def workload_label(spec: dict) -> str:
    """A short name of the workload for tables: e.g. `lora 1b r64 (q,v,o,mlp) bf16 b4x2048`."""
    label = f"{spec['mode']} {spec['size']}"
    if spec["model_shape"]["num_hidden_layers"] != SIZES[spec["size"]].num_hidden_layers:
        label += f" ({spec['model_shape']['num_hidden_layers']} layers)"
    if spec["lora"]:
        targets = spec["lora"]["targets"]
        short = [t.removesuffix("_proj") for t in targets if t not in MLP_TARGETS]
        if MLP_TARGETS <= set(targets):
            short.append("mlp")
        else:
            short += [t.removesuffix("_proj") for t in targets if t in MLP_TARGETS]
        label += f" r{spec['lora']['rank']} ({','.join(short)})"
    label += f" {spec['dtype']} b{spec['batch_size']}x{spec['seq_len']}"
    if spec["train_on_input"]:
        label += " all-labels"
    if spec["compile"]:
        label += " compiled"
    return label


def describe(spec: dict) -> str:
    shape = spec["model_shape"]
    return (f"{spec['mode']} fine-tune, size {spec['size']} ({shape['num_hidden_layers']} layers x "
            f"{shape['hidden_size']}), {spec['batch_size']} x {spec['seq_len']} tokens, {spec['steps']} steps "
            f"({spec['warmup']} warm-up), {spec['dtype']} on {spec['device']}, lr {spec['lr']}"
            + (f", LoRA rank {spec['lora']['rank']} alpha {spec['lora']['alpha']:g} on "
               f"{','.join(spec['lora']['targets'])}" if spec["lora"] else "")
            + (", compiled (all)" if spec["compile"] else ", not compiled (all)")
            + (", train_on_input (every token labelled)" if spec["train_on_input"] else ", outputs labelled only")
            + (f", mytune overrides: {' '.join(spec['mytune_overrides'])}" if spec.get("mytune_overrides") else ""))


def run_worker(kind: str, spec_path: Path, workdir: Path, keep_going: bool) -> dict:
    """Run `--worker kind` in a fresh Python process and return its JSON result. A worker that cannot run this
    workload returns {"skipped": why}; one that fails exits the benchmark showing its log, or with `keep_going`
    returns {"failed": its last line}."""
    result_path = workdir / f"{kind}.result.json"
    log_path = workdir / f"{kind}.log"
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: every file is local
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    if kind == "torchtune" and spec.get("peer_pythonpath"):
        peer = os.pathsep.join(str(Path(part).resolve()) for part in spec["peer_pythonpath"].split(os.pathsep) if part)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [peer, env.get("PYTHONPATH", "")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path),
               "--result", str(result_path)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if completed.returncode == SKIPPED_EXIT_CODE and result_path.is_file():
        return {**json.loads(result_path.read_text()), "wall_seconds": wall}
    if completed.returncode != 0:
        text = log_path.read_text()
        if not keep_going:
            sys.stderr.write(text[-6000:])
            raise SystemExit(f"the {kind} worker failed (exit {completed.returncode}); log above ({log_path})")
        last = [line for line in text.splitlines() if line.strip()][-1:] or [f"exit {completed.returncode}"]
        print(f"the {kind} worker failed (exit {completed.returncode}): {last[0][:300]}", file=sys.stderr)
        return {"framework": kind, "failed": f"failed: {last[0][:300]}", "wall_seconds": wall}
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = wall
    return result


def timed_tokens_per_s(result: dict, spec: dict) -> float:
    timed = result["steps"][spec["warmup"]:]
    return sum(step["tokens"] for step in timed) / sum(step["seconds"] for step in timed)


def summarize(runs: list[dict], spec: dict, prepared: dict, peak: float | None) -> dict:
    """tokens/s, step time, memory, MFU and final loss of one framework over the steps after the warm-up; with
    several runs, the run with the median tokens/s (the upper median for an even count). A skipped or failed
    framework gives a row with `note` only."""
    done = [run for run in runs if run.get("steps")]
    if not done:
        return {"framework": runs[0]["framework"], "note": runs[0].get("skipped") or runs[0].get("failed"),
                "tokens_per_s": None}
    speeds = [timed_tokens_per_s(run, spec) for run in done]
    result = sorted(done, key=lambda run: timed_tokens_per_s(run, spec))[len(done) // 2]
    timed = result["steps"][spec["warmup"]:]
    tokens_per_s = timed_tokens_per_s(result, spec)
    mfu = None
    if spec["device"] == "cuda" and peak:
        mfu = 6 * prepared["matmul_params"] * tokens_per_s / (peak * 1e12)
    return {
        "framework": result["framework"], "tokens_per_s": tokens_per_s,
        "step_seconds": sum(step["seconds"] for step in timed) / len(timed),
        "peak_memory_gib": result["peak_memory_gib"], "peak_memory_kind": result["peak_memory_kind"],
        "process_peak_rss_gib": result.get("process_peak_rss_gib"), "mfu": mfu,
        "first_loss": result["steps"][0]["loss"], "final_loss": result["steps"][-1]["loss"],
        "timed_steps": len(timed), "trainable_params": result.get("trainable_params"),
        "tokens_per_s_runs": speeds, "peak_memory_gib_runs": [run["peak_memory_gib"] for run in done],
        "labelled_fraction": prepared["labelled_fraction"], "note": result.get("note"),
    }


def compare_losses(results: dict, spec: dict, tolerance: float | None) -> dict:
    """mytune's per-step losses against each peer's: the evidence that they trained the same thing."""
    if tolerance is None:  # NF4 rounding differs a little between torchao versions and bitsandbytes
        tolerance = 1e-3 if spec["dtype"] == "fp32" and spec["mode"] != "qlora" else 5e-2
    peers = [name for name in results if name != "mytune"]
    if "mytune" not in results or not peers:
        return {"message": "losses: fewer than two frameworks ran with mytune among them, nothing to compare",
                "match": None}
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


def markdown_table(rows: list[dict], spec: dict, prepared: dict, peak: float | None) -> str:
    done = [row for row in rows if row["tokens_per_s"] is not None]
    memory_kind = done[0]["peak_memory_kind"] if done else ""
    repeats = len(done[0]["tokens_per_s_runs"]) if done else 1
    lines = [
        f"{describe(spec)}" + (f"; median of {repeats} interleaved runs" if repeats > 1 else ""),
        f"labelled tokens: {100 * prepared['labelled_fraction']:.1f}% of {prepared['tokens_per_step']:.0f} per step"
        + (f"; MFU peak: {peak:.0f} TFLOP/s" + (" (measured)" if peak == prepared.get("measured_peak_tflops")
                                                  else " (--peak-tflops)") if peak else ""),
        "",
        f"| framework | tokens/s | step time (s) | peak memory (GiB, {memory_kind}) | MFU | final loss "
        f"| max abs loss diff vs mytune | tokens/s of each run |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["tokens_per_s"] is None:
            lines.append(f"| {row['framework']} | {row['note']} | | | | | | |")
            continue
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        each = ", ".join(f"{speed:,.0f}" for speed in row["tokens_per_s_runs"])
        diff = row.get("max_loss_diff")
        lines.append(f"| {row['framework']} | {row['tokens_per_s']:,.0f} | {row['step_seconds']:.3f} | "
                     f"{row['peak_memory_gib']:.3f} | {mfu} | {row['final_loss']:.4f} | "
                     f"{'' if diff is None else f'{diff:.1e}'} | {each} |")
    notes = [f"{row['framework']}: {row['note']}" for row in done if row.get("note")]
    if notes:
        lines += ["", *notes]
    ours = next((row for row in done if row["framework"] == "mytune"), None)
    if ours and len(done) > 1:
        lines.append("")
        for peer in done:
            if peer is ours:
                continue
            ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
            memory = ours["peak_memory_gib"] / peer["peak_memory_gib"] if peer["peak_memory_gib"] > 0 else math.nan
            lines.append(f"mytune / {peer['framework']}: {ratio:.2f}x tokens/s, {memory:.2f}x peak memory")
    return "\n".join(lines)


def environment(results: list[dict], load_before, load_after) -> dict:
    any_result = results[0] if results else {}
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "versions": {r["framework"]: r.get("versions") for r in results}, "device_name": any_result.get("device_name"),
        "threads": any_result.get("threads"), "loadavg_before": load_before, "loadavg_after": load_after,
    }


def fmt_load(load) -> str:
    return " / ".join(f"{value:.2f}" for value in load)


# ---------------------------------------------------------------------------------------------------------------------
# Workers: each runs in a fresh process (`--worker prepare|mytune|hf|torchtune`).
# ---------------------------------------------------------------------------------------------------------------------

class Skip(Exception):
    """This framework cannot run this workload here (the reason goes into the table)."""


def peak_rss_gib() -> float:
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024) / 2**30


def paths(spec: dict) -> dict[str, Path]:
    workdir = Path(spec["workdir"])
    return {"checkpoint": checkpoint_dir(spec), "data": workdir / "data.jsonl", "cache": workdir / "token_cache",
            "batches": workdir / "batches.pt", "adapter": workdir / "initial_adapter", "runs": workdir / "runs"}


def checkpoint_dir(spec: dict) -> Path:
    """Where the random checkpoint lives: in the workdir, or shared in `--checkpoint-cache` (keyed by what makes
    the weights: size, layers, dtype, seed)."""
    if not spec.get("checkpoint_cache"):
        return Path(spec["workdir"]) / "checkpoint"
    key = f"{spec['size']}-{spec['model_shape']['num_hidden_layers']}layers-{spec['dtype']}-seed{spec['seed']}"
    return Path(spec["checkpoint_cache"]).resolve() / key


def set_threads(spec: dict) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])


def torch_dtype(spec: dict):
    import torch

    return torch.float32 if spec["dtype"] == "fp32" else torch.bfloat16


def versions() -> dict:
    import importlib.metadata

    found = {}
    for package in ("torch", "transformers", "peft", "torchtune", "torchao", "bitsandbytes", "mytune"):
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


def measure_peak_tflops(dtype, n: int = PEAK_MATMUL_SIZE, warmup: int = 3, iters: int = 10) -> float:
    """Dense matmul FLOP/s the device reaches in `dtype` (n x n x n products of random data, CUDA events): the
    MFU denominator, measured rather than looked up (a name table cannot tell an H100 SXM from a PCIe card)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(warmup):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / seconds / 1e12


def recipe_overrides(spec: dict, output_dir: Path) -> list[str]:
    """The recipe's `--override`s for this workload (on top of the shipped tiny_demo config)."""
    p = paths(spec)
    overrides = [
        f"checkpoint_dir={p['checkpoint']}", f"tokenizer_path={DEMO_TOKENIZER}", f"dataset_path={p['data']}",
        f"output_dir={output_dir}", f"dataset_cache_dir={p['cache']}", "dataset_format=auto", "packed=true",
        f"train_on_input={str(spec['train_on_input']).lower()}",
        f"max_seq_len={spec['seq_len']}", "val_fraction=0", "eval_every_n_steps=0", "shuffle=false",
        f"batch_size={spec['batch_size']}", "gradient_accumulation_steps=1", "epochs=1",
        f"max_steps_per_epoch={spec['steps']}", "optimizer=adamw", f"lr={spec['lr']}", "lr_scheduler=constant",
        "warmup_steps=0", f"weight_decay={spec['weight_decay']}", f"max_grad_norm={spec['max_grad_norm']}",
        "activation_checkpointing=false", "activation_offloading=false", "save_every_n_steps=0",
        "keep_last_n_checkpoints=null", f"dtype={spec['dtype']}", f"compile={str(spec['compile']).lower()}",
        f"device={spec['device']}", f"seed={spec['seed']}", "log_every_n_steps=1", "metric_loggers=[jsonl]",
        "profile=false",
    ]
    if spec["lora"]:
        lora = spec["lora"]
        overrides += [f"lora_target_modules=[{','.join(lora['targets'])}]", f"lora_rank={lora['rank']}",
                      f"lora_alpha={lora['alpha']}", f"lora_dropout={lora['dropout']}", "use_dora=false",
                      f"quantize_base={str(spec['mode'] == 'qlora').lower()}"]
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


def labelled_positions(batch: dict) -> int:
    """Positions the loss counts once the labels are shifted left by one (the same count in every framework)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def worker_prepare(spec: dict) -> dict:
    """The shared inputs: a random HF checkpoint, the data file, the packed batches, (LoRA) the initial adapter,
    and on CUDA the measured peak FLOP/s."""
    start = time.perf_counter()
    import torch

    from mytune.data import ResumableDataLoader, ResumableSampler, build_sft_dataset, padded_collate
    from mytune.tokenizers import load_tokenizer
    from mytune.training.profiling import matmul_params

    set_threads(spec)
    p = paths(spec)
    tokenizer = load_tokenizer(DEMO_TOKENIZER)

    # 1. The data: the demo rows, repeated when one pass has fewer packed rows than the steps need.
    needed = spec["steps"] * spec["batch_size"]
    demo_rows = DEMO_DATA.read_text(encoding="utf-8")
    build = dict(tokenizer=tokenizer, max_seq_len=spec["seq_len"], packed=True, cache_dir=p["cache"],
                 train_on_input=spec["train_on_input"])
    per_copy = len(build_sft_dataset(DEMO_DATA, **build))
    copies = -(-needed // max(per_copy, 1))
    p["data"].write_text(demo_rows * copies, encoding="utf-8")
    dataset = build_sft_dataset(p["data"], **build)  # what the recipe builds (and then finds in the cache)
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
    labelled = [labelled_positions(b) for b in batches]
    widths = sorted({int(b["tokens"].shape[1]) for b in batches})

    # 3. A random Llama checkpoint written by transformers (or reused from --checkpoint-cache).
    args = model_args_of(spec, tokenizer)
    n_params = write_random_checkpoint(spec, args, p["checkpoint"])

    # 4. LoRA: one initial adapter (PEFT format) that every framework, mytune included, starts from.
    if spec["lora"]:
        write_initial_adapter(spec, args, p["adapter"])

    measured_peak = None
    if spec["device"] == "cuda" and not spec.get("peak_tflops_override"):
        measured_peak = measure_peak_tflops(torch_dtype(spec))

    return {"seconds": time.perf_counter() - start, "n_params": n_params, "matmul_params": matmul_params(args),
            "rows_available": len(dataset), "data_copies": copies, "real_tokens_per_step": real_tokens,
            "tokens_per_step": sum(real_tokens) / len(real_tokens), "labelled_per_step": labelled,
            "labelled_fraction": sum(labelled) / sum(real_tokens), "batch_widths": widths,
            "measured_peak_tflops": measured_peak, "device_name": device_name(spec["device"])}


def model_args_of(spec: dict, tokenizer):
    """mytune's ModelArgs of the workload's shape: a named builder's (1b, 8b), or a small Llama sized to the demo
    tokenizer; `--layers` changes the layer count only."""
    from mytune.models import model_args
    from mytune.models.transformer import ModelArgs

    shape = spec["model_shape"]
    if shape["builder"]:
        args = model_args(shape["builder"])
    else:
        args = ModelArgs(model_type="llama", vocab_size=shape["vocab_size"] or tokenizer.vocab_size,
                         hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=max(2048, spec["seq_len"]), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    args.num_hidden_layers = shape["num_hidden_layers"]
    return args


def write_random_checkpoint(spec: dict, args, out_dir: Path) -> int:
    """A seeded random model written by transformers (`from_config` + `save_pretrained`; mytune's ModelArgs give the
    config.json); kept when `out_dir` already holds a complete one (`--checkpoint-cache`). Returns its parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    done = out_dir / ".complete"
    if done.is_file():
        return int(done.read_text())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
    torch.manual_seed(spec["seed"])
    with torch.device(spec["device"]):  # initialising a 1B or 8B model is much faster on the GPU
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp), dtype=torch_dtype(spec))
    model.save_pretrained(tmp)
    n_params = sum(t.numel() for t in model.parameters())
    del model
    (tmp / ".complete").write_text(str(n_params))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return n_params


def write_initial_adapter(spec: dict, args, out_dir: Path) -> None:
    """A PEFT LoRA adapter for the workload's targets: A seeded uniform(+-1/sqrt(fan_in)) as PEFT's kaiming init,
    B zero (so the first loss is the base model's), fp32. Every framework loads it, so all start identical."""
    import torch
    from safetensors.torch import save_file

    lora = spec["lora"]
    hidden, inter = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.attn_head_dim, args.kv_heads * args.attn_head_dim
    shapes = {"q_proj": ("self_attn", q, hidden), "k_proj": ("self_attn", kv, hidden),
              "v_proj": ("self_attn", kv, hidden), "o_proj": ("self_attn", hidden, q),
              "gate_proj": ("mlp", inter, hidden), "up_proj": ("mlp", inter, hidden),
              "down_proj": ("mlp", hidden, inter)}
    generator = torch.Generator().manual_seed(spec["seed"])
    tensors = {}
    for layer in range(args.num_hidden_layers):
        for target in lora["targets"]:
            block, fan_out, fan_in = shapes[target]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            bound = 1 / math.sqrt(fan_in)
            tensors[f"{prefix}.lora_A.weight"] = (torch.rand(lora["rank"], fan_in, generator=generator) * 2 - 1) * bound
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(fan_out, lora["rank"])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(checkpoint_dir(spec)),
              "target_modules": lora["targets"], "r": lora["rank"], "lora_alpha": lora["alpha"],
              "lora_dropout": lora["dropout"], "use_dora": False, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": False, "modules_to_save": None}
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def timed_training(framework: str, spec: dict, batches: list[dict], step, baseline_rss: float, trainable: int,
                   note: str | None = None) -> dict:
    """The one timer every framework is measured with: `step(batch) -> loss` per batch, timed from outside with
    CUDA events recorded before and after the call (on the CPU, perf_counter). Each step reads its loss on the host
    (`.item()`), so the device has finished it when the call returns; CUDA peak memory is reset after the
    warm-up steps, so it is the timed steps' peak (weights, gradients, optimizer state, activations)."""
    import torch

    cuda = spec["device"] == "cuda"
    steps = []
    setup_peak = None
    for index, batch in enumerate(batches):
        if cuda and index == spec["warmup"]:
            torch.cuda.synchronize()
            setup_peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(batch)
            end.record()
            steps.append({"start": start, "end": end})
        else:
            began = time.perf_counter()
            loss = step(batch)
            steps.append({"seconds": time.perf_counter() - began})
        steps[-1].update(step=index + 1, loss=float(loss), tokens=int((batch["document_ids"] >= 0).sum()))
    if cuda:
        torch.cuda.synchronize()
        for record in steps:
            record["seconds"] = record.pop("start").elapsed_time(record.pop("end")) / 1000
    rss = peak_rss_gib()
    return {
        "framework": framework, "steps": steps, "trainable_params": trainable, "note": note,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else rss - baseline_rss,
        "peak_memory_kind": "max_memory_allocated, timed steps" if cuda else "peak RSS growth",
        "peak_memory_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "setup_and_warmup_peak_gib": setup_peak,
        "process_peak_rss_gib": rss, "baseline_rss_gib": baseline_rss,
        "device_name": device_name(spec["device"]), "threads": torch.get_num_threads(), "versions": versions(),
    }


def worker_mytune(spec: dict) -> dict:
    """The recipe object: its params parsed as a user's command line, `setup()`, then its own `train_step` on the
    batches of its own data loader (checked equal to the prepared ones), timed by `timed_training`."""
    import torch

    _, _, recipe_cls = recipe_module(spec["mode"])
    set_threads(spec)
    p = paths(spec)
    baseline_rss = peak_rss_gib()
    output_dir = p["runs"] / f"mytune_{spec['mode']}"
    shutil.rmtree(output_dir, ignore_errors=True)
    recipe = recipe_cls(parse_recipe_params(spec, output_dir))
    recipe.setup()
    if spec["lora"]:
        from mytune.checkpoint import load_peft_adapter

        load_peft_adapter(recipe.model, p["adapter"])  # the peers' starting adapter (the recipe's init differs)
    recipe.dataloader.set_epoch(0)
    loader = iter(recipe.dataloader)
    batches = [next(loader) for _ in range(spec["steps"])]
    for index, (ours, prepared) in enumerate(zip(batches, torch.load(p["batches"]))):
        for key in ("tokens", "labels", "document_ids"):
            if not torch.equal(ours[key], prepared[key]):
                raise SystemExit(f"mytune's loader gave a different batch {index + 1} ({key}) than the prepared one")
    trainable = sum(t.numel() for t in recipe.model.parameters() if t.requires_grad)
    note = "torchao NF4 on the LoRA targets" if spec["mode"] == "qlora" else None
    result = timed_training("mytune", spec, batches, lambda batch: recipe.train_step([batch])["loss"],
                            baseline_rss, trainable, note)
    recipe.cleanup()
    shutil.rmtree(output_dir, ignore_errors=True)
    return result


def peer_step(spec: dict, loss_of, trainable: list, optimizer, keys: tuple[str, ...]):
    """One optimizer step of a peer, the same sequence as mytune's `train_step`: move the batch, loss, backward,
    read the loss on the host, clip, step, zero the gradients."""
    import torch

    device = torch.device(spec["device"])

    def step(batch: dict) -> float:
        moved = {key: batch[key].to(device) for key in keys}
        loss_tensor = loss_of(moved, batch)
        loss_tensor.backward()
        loss = loss_tensor.item()
        torch.nn.utils.clip_grad_norm_(trainable, spec["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def worker_hf(spec: dict) -> dict:
    """transformers (+ peft) in a plain PyTorch loop over the same batches; QLoRA through bitsandbytes' NF4."""
    import torch
    from transformers import AutoModelForCausalLM

    set_threads(spec)
    p = paths(spec)
    cuda = spec["device"] == "cuda"
    baseline_rss = peak_rss_gib()
    device = torch.device(spec["device"])
    dtype = torch_dtype(spec)
    load = dict(dtype=dtype, attn_implementation=spec["hf_attention"])
    note = None
    if spec["mode"] == "qlora":
        if not cuda:
            raise Skip("skipped: bitsandbytes' NF4 training needs CUDA")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise Skip("skipped: bitsandbytes is not installed (QLoRA for transformers + peft)") from None
        from transformers import BitsAndBytesConfig

        # NF4 with double-quantised scales, as torchao's NF4 (torchtune, mytune); compute in the run's dtype.
        load["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        note = "bitsandbytes NF4 on every decoder linear"
    if cuda:
        load["device_map"] = {"": torch.cuda.current_device()}

    batches = torch.load(p["batches"])
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_pretrained(p["checkpoint"], **load)
    model.config.use_cache = False
    if spec["lora"]:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, p["adapter"], is_trainable=True)
    trainable = [t for t in model.parameters() if t.requires_grad]
    for tensor in trainable:  # adapters in the run's dtype, as torchtune's (peft's own default upcasts them)
        tensor.data = tensor.data.to(device=device, dtype=dtype)
    if spec["mode"] != "qlora":
        model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=spec["weight_decay"], fused=cuda)
    forward = torch.compile(model) if spec["compile"] else model

    def loss_of(batch: dict, _cpu_batch: dict):
        # Packed rows: no attention mask, position ids restarting per sample -> transformers builds the
        # block-causal mask itself; labels are shifted inside the model.
        return forward(input_ids=batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"]).loss

    step = peer_step(spec, loss_of, trainable, optimizer, ("tokens", "position_ids", "labels"))
    return timed_training("hf", spec, batches, step, baseline_rss, sum(t.numel() for t in trainable), note)


def torchtune_builder(spec: dict, config: dict):
    """torchtune's component builder of this shape (`llama3_2` with rope scale 32 for 1b, `llama3_1` for 8b,
    `llama2` for the small sizes; their lora_* twins), with the arguments its named builders pass."""
    lora = spec["lora"]
    common = dict(vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
                  num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
                  embed_dim=config["hidden_size"], max_seq_len=config["max_position_embeddings"],
                  intermediate_dim=config["intermediate_size"], norm_eps=config["rms_norm_eps"])
    # transformers 5 writes `rope_parameters` (theta inside), older versions `rope_scaling` + `rope_theta`.
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":
        theta = rope.get("rope_theta", config.get("rope_theta"))
        common.update(rope_base=int(theta), scale_factor=int(rope["factor"]))
        if config.get("tie_word_embeddings"):
            from torchtune.models.llama3_2 import llama3_2 as base, lora_llama3_2 as with_lora

            common["tie_word_embeddings"] = True
        else:
            from torchtune.models.llama3_1 import llama3_1 as base, lora_llama3_1 as with_lora
    else:
        from torchtune.models.llama2 import llama2 as base, lora_llama2 as with_lora
    if not lora:
        return lambda: base(**common)
    mlp = MLP_TARGETS & set(lora["targets"])
    if mlp and mlp != MLP_TARGETS:
        raise Skip("skipped: torchtune puts LoRA on all of the MLP or none of it")
    extra = {"quantize_base": True} if spec["mode"] == "qlora" else {}
    return lambda: with_lora(
        lora_attn_modules=[TORCHTUNE_ATTENTION_NAMES[t] for t in lora["targets"] if t in TORCHTUNE_ATTENTION_NAMES],
        apply_lora_to_mlp=bool(mlp), apply_lora_to_output=False, lora_rank=lora["rank"], lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"], **extra, **common)


def torchtune_adapter_state(path: Path) -> dict:
    """The initial adapter (PEFT names) in torchtune's names; B is zero, so q/k need no row permutation."""
    from safetensors.torch import load_file

    names = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
             "self_attn.o_proj": "attn.output_proj", "mlp.gate_proj": "mlp.w1", "mlp.down_proj": "mlp.w2",
             "mlp.up_proj": "mlp.w3"}
    state = {}
    for key, tensor in load_file(path / "adapter_model.safetensors").items():
        key = key.removeprefix("base_model.model.model.")
        for ours, theirs in names.items():
            key = key.replace(ours, theirs)
        state[key.replace("lora_A", "lora_a").replace("lora_B", "lora_b")] = tensor
    return state


def document_seq_lens(document_ids) -> list:
    """Each row's run lengths of document ids, the final padding block included (torchtune's packs count their
    padding as one more sequence, so the lengths sum to the row length)."""
    import torch

    return [torch.unique_consecutive(row, return_counts=True)[1] for row in document_ids]


def worker_torchtune(spec: dict) -> dict:
    """torchtune 0.6's model, weight conversion, chunked loss, packed mask and compile in the same plain loop (what
    its single-device recipes do), imported from `--peer-pythonpath`."""
    import torch
    from safetensors.torch import load_file
    from torchtune import training
    from torchtune.models import convert_weights
    from torchtune.modules.attention_utils import create_block_causal_mask, packed_block_causal_mask
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    set_threads(spec)
    p = paths(spec)
    cuda = spec["device"] == "cuda"
    baseline_rss = peak_rss_gib()
    device = torch.device(spec["device"])
    dtype = torch_dtype(spec)
    config = json.loads((p["checkpoint"] / "config.json").read_text())
    build = torchtune_builder(spec, config)

    batches = torch.load(p["batches"])
    with training.set_default_dtype(dtype), torch.device(device):  # as its recipes build the model
        model = build()
    hf_state = {}
    for file in sorted(p["checkpoint"].glob("*.safetensors")):
        hf_state.update(load_file(file, device=spec["device"]))  # on the device: NF4 then quantises there
    state = convert_weights.hf_to_tune(hf_state, num_heads=config["num_attention_heads"],
                                       num_kv_heads=config["num_key_value_heads"], dim=config["hidden_size"],
                                       head_dim=config.get("head_dim"))
    del hf_state
    if spec["lora"]:
        from torchtune.modules.peft import get_adapter_params, set_trainable_params

        state.update({key: value.to(device=device, dtype=dtype)
                      for key, value in torchtune_adapter_state(p["adapter"]).items()})
        set_trainable_params(model, get_adapter_params(model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # e.g. an untied head left random: the losses would not be comparable
        raise SystemExit(f"torchtune worker: missing {missing[:3]}, unexpected {unexpected[:3]}")
    del state
    if cuda:
        torch.cuda.empty_cache()
    model.train()
    loss_fn = CEWithChunkedOutputLoss()
    if spec["compile"]:
        training.compile_model(model, verbose=False)
        loss_fn = training.compile_loss(loss_fn, verbose=False) or loss_fn
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    trainable = [t for t in model.parameters() if t.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=spec["weight_decay"], fused=cuda)

    def loss_of(batch: dict, cpu_batch: dict):
        # Its packed collate's mask, built per batch as there: a flex BlockMask on CUDA (its flex attention is
        # compiled), the dense block-causal bool mask on the CPU. The labels are shifted here, as its recipes do.
        seq_lens = document_seq_lens(cpu_batch["document_ids"])
        mask = packed_block_causal_mask(seq_lens) if cuda else create_block_causal_mask(seq_lens).to(device)
        labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        return loss_fn(model(batch["tokens"], mask=mask, input_pos=batch["position_ids"]), labels)

    step = peer_step(spec, loss_of, trainable, optimizer, ("tokens", "position_ids", "labels"))
    note = "torchao NF4 on every decoder linear" if spec["mode"] == "qlora" else None
    return timed_training("torchtune", spec, batches, step, baseline_rss, sum(t.numel() for t in trainable), note)


WORKERS = {"prepare": worker_prepare, "mytune": worker_mytune, "hf": worker_hf, "torchtune": worker_torchtune}


def worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=sorted(WORKERS), required=True)
    parser.add_argument("--spec", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    spec = json.loads(Path(args.spec).read_text())
    try:
        result = WORKERS[args.worker](spec)
    except Skip as skip:
        Path(args.result).write_text(json.dumps({"framework": args.worker, "skipped": str(skip)}))
        print(skip, flush=True)
        raise SystemExit(SKIPPED_EXIT_CODE) from None
    Path(args.result).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        worker_main(sys.argv[1:])
    else:
        main()
