"""One markdown table from several `finetune_throughput.py --out` JSON files, with the issue's GPU targets checked.

    python benchmarks/suite_table.py full_1b.json lora_1b.json lora_8b.json qlora_8b.json

Each file is one workload (all its frameworks); the table has a row per framework and workload, mytune's ratios
against each peer, and, for the workloads the targets name (CUDA runs only), whether mytune met them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# The targets on one H100/H200 (issue 10): per (mode, size), mytune against a peer. "speed": at least this many
# times the peer's tokens/s; "memory": at most this many times the peer's peak memory.
TARGETS = {
    ("full", "1b"): [("torchtune", "speed", 1.25), ("torchtune", "memory", 1.0)],
    ("lora", "1b"): [("torchtune", "speed", 1.3)],
    ("lora", "8b"): [("torchtune", "speed", 1.15), ("hf", "speed", 1.6), ("torchtune", "memory", 0.8)],
}
QLORA_8B_PEAK_GIB = 8.0  # QLoRA 8B: peak memory at most this ...
QLORA_8B_SPEED_OF_LORA = 0.8  # ... at this fraction of our LoRA 8B tokens/s at least


def load(paths: list[str]) -> list[dict]:
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            print(f"suite_table: {path}: {err}", file=sys.stderr)
    return reports


def rows_of(report: dict) -> dict[str, dict]:
    return {row["framework"]: row for row in report["summary"]}


def table(reports: list[dict]) -> str:
    lines = [
        "| workload | framework | tokens/s | step time (s) | peak memory (GiB) | MFU | labelled | max abs loss diff "
        "vs mytune | mytune speed / memory vs this |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for report in reports:
        rows = rows_of(report)
        ours = rows.get("mytune")
        label = report.get("label") or report["workload"]["mode"]
        for name, row in rows.items():
            if row.get("tokens_per_s") is None:
                lines.append(f"| {label} | {name} | {row.get('note')} | | | | | | |")
                continue
            mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
            diff = row.get("max_loss_diff")
            versus = ""
            if ours and ours.get("tokens_per_s") and name != "mytune":
                memory = (f"{ours['peak_memory_gib'] / row['peak_memory_gib']:.2f}x"
                          if row["peak_memory_gib"] > 0 else "n/a")
                versus = f"{ours['tokens_per_s'] / row['tokens_per_s']:.2f}x / {memory}"
            lines.append(
                f"| {label} | {name} | {row['tokens_per_s']:,.0f} | {row['step_seconds']:.3f} | "
                f"{row['peak_memory_gib']:.2f} | {mfu} | {100 * row['labelled_fraction']:.1f}% | "
                f"{'' if diff is None else f'{diff:.1e}'} | {versus} |")
    return "\n".join(lines)


def target_checks(reports: list[dict]) -> list[str]:
    """One line per target of the workloads present: the measured ratio and met / missed (CUDA runs only)."""
    lines = []
    by_key = {(r["workload"]["mode"], r["workload"]["size"]): r for r in reports if r["workload"]["device"] == "cuda"}
    for key, targets in TARGETS.items():
        report = by_key.get(key)
        if not report:
            continue
        rows = rows_of(report)
        ours = rows.get("mytune")
        for peer, kind, bound in targets:
            theirs = rows.get(peer)
            if not ours or not theirs or ours.get("tokens_per_s") is None or theirs.get("tokens_per_s") is None:
                lines.append(f"{' '.join(key)}: {kind} vs {peer}: not measured")
                continue
            if kind == "speed":
                ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
                met = ratio >= bound
                lines.append(f"{' '.join(key)}: tokens/s {ratio:.3f}x {peer}'s (target >= {bound}x): "
                             f"{'met' if met else 'MISSED'}")
            else:
                ratio = ours["peak_memory_gib"] / theirs["peak_memory_gib"]
                met = ratio <= bound
                lines.append(f"{' '.join(key)}: peak memory {ratio:.3f}x {peer}'s (target <= {bound}x): "
                             f"{'met' if met else 'MISSED'}")
    qlora, lora = by_key.get(("qlora", "8b")), by_key.get(("lora", "8b"))
    ours_q = rows_of(qlora).get("mytune") if qlora else None
    if ours_q and ours_q.get("tokens_per_s") is not None:
        peak = ours_q["peak_memory_gib"]
        lines.append(f"qlora 8b: peak memory {peak:.2f} GiB (target <= {QLORA_8B_PEAK_GIB:g} GiB): "
                     f"{'met' if peak <= QLORA_8B_PEAK_GIB else 'MISSED'}")
        ours_l = rows_of(lora).get("mytune") if lora else None
        if ours_l and ours_l.get("tokens_per_s"):
            ratio = ours_q["tokens_per_s"] / ours_l["tokens_per_s"]
            lines.append(f"qlora 8b: tokens/s {ratio:.3f}x our LoRA 8B's (target >= {QLORA_8B_SPEED_OF_LORA}x): "
                         f"{'met' if ratio >= QLORA_8B_SPEED_OF_LORA else 'MISSED'}")
    return lines


def header(reports: list[dict]) -> str:
    """Device, measured peak and versions, from the first report that has them."""
    for report in reports:
        env = report.get("environment") or {}
        by_framework = env.get("versions") or {}
        peak = report.get("peak_tflops")
        device = env.get("device_name") or report.get("prepared", {}).get("device_name")
        if not device:
            continue
        ours, tune = by_framework.get("mytune") or {}, by_framework.get("torchtune") or {}
        hf = by_framework.get("hf") or ours
        shown = [f"{name} {hf.get(name)}" for name in ("torch", "transformers", "peft", "bitsandbytes") if hf.get(name)]
        if ours.get("torchao"):
            shown.append(f"mytune with torchao {ours['torchao']}")
        if tune.get("torchtune"):
            shown.append(f"torchtune {tune['torchtune']} with torchao {tune.get('torchao')}")
        return (f"{device}" + (f", matmul peak {peak:.0f} TFLOP/s" if peak else "")
                + (f"; {', '.join(shown)}" if shown else ""))
    return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON files written by finetune_throughput.py --out")
    args = parser.parse_args(argv)
    reports = load(args.results)
    if not reports:
        raise SystemExit("suite_table: no readable results")
    print(header(reports))
    print()
    print(table(reports))
    checks = target_checks(reports)
    if checks:
        print()
        print("\n".join(checks))


if __name__ == "__main__":
    main()
