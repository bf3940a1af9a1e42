#!/usr/bin/env bash
# One-shot GPU check for a machine with one CUDA GPU and no internet, in under 9 minutes:
#   1. installs the wheels brought along in .whl/ (benchmarks/prepare_gpu_wheels.sh makes that folder),
#   2. runs the GPU-only tests (python -m pytest -q -m gpu tests),
#   3. benchmarks mytune against torchtune 0.6.1 (+ torchao 0.11.0) and transformers (+ peft) on full 1B (batch 4),
#      LoRA 1B (rank 64 on q,v,o + MLP, batch 4), LoRA 8B and QLoRA 8B (rank 64 on every decoder linear,
#      batch 2), bf16, 2048-token packed rows,
#   4. prints one table (benchmarks/suite_table.py) with the issue's targets checked.
#
#   bash benchmarks/gpu_suite.sh      # from anywhere; logs and JSON in $RESULTS, and packed into $OUT when it is set
#
# Settings (environment): WHEELS (default .whl), RESULTS (default /tmp/mytune_gpu_results), BUDGET_S (the whole
# run, default 530), TEST_BUDGET_S (the tests, default 120), ONLY (workloads, default
# full_1b,lora_1b,lora_8b,qlora_8b), COMPILE=1 (torch.compile in every framework: adds minutes of compilation per
# framework and workload, so give it fewer workloads), TRAIN_ON_INPUT=1 (label every token, for all), DRY_RUN=1
# (no GPU: every step on the CPU with the workloads shrunk to the small size, fp32, no tests; checks the script).
# A workload that no longer fits the time left is skipped and said so; a framework that fails is a row saying so.
set -uo pipefail

fail() { echo "gpu_suite: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || fail "cannot enter $REPO"
WHEELS=${WHEELS:-$REPO/.whl}
RESULTS=${RESULTS:-/tmp/mytune_gpu_results}
BUDGET_S=${BUDGET_S:-530}
TEST_BUDGET_S=${TEST_BUDGET_S:-120}
ONLY=${ONLY:-full_1b,lora_1b,lora_8b,qlora_8b}
SITE=${SITE:-/tmp/mytune_gpu_site}      # mytune's and transformers' extra packages (torchao, omegaconf, bitsandbytes)
PEER=${PEER:-/tmp/mytune_gpu_peer}      # torchtune 0.6.1 + torchao 0.11.0: the torchtune worker's PYTHONPATH only
CKPT=${CKPT:-/tmp/mytune_gpu_ckpt}      # random checkpoints, shared by the workloads of one size
PYTHON=${PYTHON:-python3}
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

# --- 1. Fail fast: python, CUDA, every wheel. ------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || fail "$PYTHON not found"
[[ -d $WHEELS/site && -d $WHEELS/peer ]] \
    || fail "no wheel folder $WHEELS/{site,peer}: run benchmarks/prepare_gpu_wheels.sh where pip works and bring .whl"
need_wheel() {
    compgen -G "$WHEELS/$1/$2-*.whl" >/dev/null || fail "missing wheel $2 in $WHEELS/$1 (see prepare_gpu_wheels.sh)"
}
need_wheel peer torchtune-0.6.1
need_wheel peer torchao-0.11.0
need_wheel site torchao
need_wheel site omegaconf
need_wheel site bitsandbytes
DEVICE=(--device cuda --dtype bf16)
SHRINK=()
if [[ ${DRY_RUN:-0} == 1 ]]; then
    DEVICE=(--device cpu --dtype fp32)
    SHRINK=(--size small --layers 2 --steps 3 --warmup 1 --batch-size 2)  # later options win over the workload's
else
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        || fail "no CUDA device visible to torch ($PYTHON)"
fi

mkdir -p "$RESULTS" || fail "cannot create $RESULTS"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/site/*.whl >"$RESULTS/pip_site.log" 2>&1 || fail "installing $WHEELS/site failed ($RESULTS/pip_site.log)"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PEER" \
    "$WHEELS"/peer/*.whl >"$RESULTS/pip_peer.log" 2>&1 || fail "installing $WHEELS/peer failed ($RESULTS/pip_peer.log)"
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}
PEER_PATH=$PEER:$REPO/benchmarks/peer_stubs
"$PYTHON" -c "import mytune, recipes, transformers, peft, omegaconf, torchao, bitsandbytes" 2>"$RESULTS/import.log" \
    || fail "mytune's side does not import: $(tail -n 1 "$RESULTS/import.log")"
PYTHONPATH=$PEER_PATH:$PYTHONPATH "$PYTHON" -c \
    "import torchao, torchtune.training; assert torchao.__version__.startswith('0.11'), torchao.__version__" \
    2>"$RESULTS/import_peer.log" || fail "torchtune does not import from $PEER: $(tail -n 1 "$RESULTS/import_peer.log")"
"$PYTHON" - <<'EOF'
import torch, transformers, peft
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"gpu_suite: {device}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}")
EOF
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# --- 2. The GPU-only tests. ------------------------------------------------------------------------------------------
if [[ ${DRY_RUN:-0} == 1 ]]; then
    TESTS_LINE="not run (DRY_RUN)"
    echo "gpu_suite: GPU tests $TESTS_LINE" | tee "$RESULTS/gpu_tests.log"
else
    echo "gpu_suite: GPU tests (at most ${TEST_BUDGET_S} s) at $(elapsed) s"
    timeout "$TEST_BUDGET_S" "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider >"$RESULTS/gpu_tests.log" 2>&1
    TESTS_RC=$?
    TESTS_LINE=$(grep -E "passed|failed|error|no tests ran" "$RESULTS/gpu_tests.log" | tail -n 1)
    [[ $TESTS_RC == 124 ]] && TESTS_LINE="stopped after ${TEST_BUDGET_S} s: $TESTS_LINE"
    echo "gpu_suite: GPU tests (exit $TESTS_RC): ${TESTS_LINE:-see $RESULTS/gpu_tests.log}"
    [[ $TESTS_RC != 0 ]] && grep -E "^(FAILED|ERROR)" "$RESULTS/gpu_tests.log" | head -n 20
fi

# --- 3. The benchmarks. ----------------------------------------------------------------------------------------------
LORA_1B=(--lora-rank 64 --lora-alpha 128 --lora-targets q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)
# 8B: every decoder linear, so QLoRA quantizes the same layers in all three (torchtune and bitsandbytes quantize
# every decoder linear, mytune its LoRA targets) and LoRA 8B has the same adapters to compare QLoRA with.
LORA_8B=(--lora-rank 64 --lora-alpha 128 --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)
declare -A ARGS=(
    [full_1b]="--mode full --size 1b --batch-size 4 --steps 12 --warmup 4"
    [lora_1b]="--mode lora --size 1b --batch-size 4 --steps 12 --warmup 4 ${LORA_1B[*]}"
    [lora_8b]="--mode lora --size 8b --batch-size 2 --steps 10 --warmup 4 ${LORA_8B[*]}"
    [qlora_8b]="--mode qlora --size 8b --batch-size 2 --steps 10 --warmup 4 ${LORA_8B[*]}"
)
# Seconds a workload is expected to need (three frameworks: start, load, warm-up, steps); one that no longer
# fits what is left of BUDGET_S is skipped.
declare -A NEED=([full_1b]=90 [lora_1b]=75 [lora_8b]=150 [qlora_8b]=150)
EXTRA=()
[[ ${COMPILE:-0} == 1 ]] && EXTRA+=(--compile)
[[ ${TRAIN_ON_INPUT:-0} == 1 ]] && EXTRA+=(--train-on-input)
DONE_JSON=()
SKIPPED=()
IFS=, read -r -a WORKLOADS <<<"$ONLY"
for name in "${WORKLOADS[@]}"; do
    [[ -n ${ARGS[$name]:-} ]] || fail "unknown workload $name (choose from ${!ARGS[*]})"
    left=$(( BUDGET_S - $(elapsed) ))
    if (( left < ${NEED[$name]} )); then
        SKIPPED+=("$name (${left} s left, needs ~${NEED[$name]} s)")
        echo "gpu_suite: skipping $name: ${left} s left, needs ~${NEED[$name]} s"
        continue
    fi
    echo "gpu_suite: $name at $(elapsed) s (at most ${left} s)"
    # shellcheck disable=SC2086  # ARGS holds words on purpose
    timeout "$left" "$PYTHON" benchmarks/finetune_throughput.py ${ARGS[$name]} "${EXTRA[@]}" "${SHRINK[@]}" \
        "${DEVICE[@]}" --frameworks mytune,hf,torchtune --peer-pythonpath "$PEER_PATH" \
        --keep-going --checkpoint-cache "$CKPT" --out "$RESULTS/$name.json" >"$RESULTS/$name.log" 2>&1
    rc=$?
    if [[ $rc == 0 && -f $RESULTS/$name.json ]]; then
        DONE_JSON+=("$RESULTS/$name.json")
        grep -E "^(losses|mytune /)" "$RESULTS/$name.log"
    else
        SKIPPED+=("$name (exit $rc: $(tail -n 1 "$RESULTS/$name.log"))")
        echo "gpu_suite: $name failed (exit $rc), last lines of $RESULTS/$name.log:"
        tail -n 5 "$RESULTS/$name.log"
    fi
done
rm -rf "$CKPT"

# --- 4. One table. ---------------------------------------------------------------------------------------------------
echo
echo "gpu_suite: done in $(elapsed) s; GPU tests: ${TESTS_LINE:-see $RESULTS/gpu_tests.log}"
for item in "${SKIPPED[@]}"; do echo "gpu_suite: not measured: $item"; done
if (( ${#DONE_JSON[@]} )); then
    "$PYTHON" benchmarks/suite_table.py "${DONE_JSON[@]}" | tee "$RESULTS/table.md"
fi
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then  # the device tool brings back a few files from $OUT: one archive + the table
    tar czf "$OUT/gpu_suite_results.tgz" -C "$RESULTS" . && cp -f "$RESULTS/table.md" "$OUT/" 2>/dev/null
fi
