#!/usr/bin/env bash
# Downloads, where pip reaches a package index, the wheels benchmarks/gpu_suite.sh installs on an offline GPU machine
# (python 3.12, linux x86_64, CUDA 13 torch already there), into two folders it keeps apart:
#   .whl/peer  torchtune 0.6.1 + torchao 0.11.0 (torchtune 0.6 imports torchao.dtypes.nf4tensor, gone from newer
#              torchao): the torchtune worker's PYTHONPATH only
#   .whl/site  torchao 0.18.0 (mytune's NF4 and low-bit AdamW; the release built against torch 2.11), omegaconf 2.4.0
#              (mytune's and torchtune's configs), bitsandbytes 0.50.2 (transformers' QLoRA; it ships CUDA 13 kernels)
# torchao comes as its pure-python wheel (py3-none-any): its compiled kernels are built for one torch release and
# neither NF4 nor the optimizers need them. About 47 MB in all (the device tool carries 64 MiB with the repo).
#
#   bash benchmarks/prepare_gpu_wheels.sh [DEST]      # DEST defaults to .whl in the repository root
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$REPO/.whl}
PYTHON=${PYTHON:-python3}
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
PURE=(--platform any)
LINUX=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64)

rm -rf "$DEST/peer" "$DEST/site"
mkdir -p "$DEST/peer" "$DEST/site"
"$PYTHON" -m pip download -q "${TARGET[@]}" "${PURE[@]}" -d "$DEST/peer" torchtune==0.6.1 torchao==0.11.0
"$PYTHON" -m pip download -q "${TARGET[@]}" "${PURE[@]}" -d "$DEST/site" torchao==0.18.0 omegaconf==2.4.0
"$PYTHON" -m pip download -q "${TARGET[@]}" "${LINUX[@]}" -d "$DEST/site" bitsandbytes==0.50.2

# The folder must not be committed: ignore it in this clone (the device tool still carries it when named in `carry`).
if [[ $DEST == "$REPO/.whl" ]] && ! grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null; then
    mkdir -p "$REPO/.git/info" && echo '/.whl/' >>"$REPO/.git/info/exclude"
fi
ls -l "$DEST"/peer "$DEST"/site
echo "$(du -sm "$DEST" | cut -f1) MB in $DEST"
