#!/usr/bin/env bash
# The GPU check of issue 12 (details: benchmarks/gpu_check.py). On a machine with one CUDA GPU,
# from a fresh checkout (peft comes with ".[test]"; step_time.py compares against it):
#
#   pip install torch==2.13.0 && pip install -e ".[test]" && bash benchmarks/gpu_check.sh
#
# (torch: a CUDA build, e.g. PyPI's Linux wheel, not the CPU one .ci/run installs.)
# One PASS/FAIL line per check, at most 8 minutes, exit 1 on any failure. Results, logs and a
# JSON-lines summary go to $OUT (default ./gpu_check_out). Arguments go to gpu_check.py
# (--only NAMES, --dry-run, --budget S, --cpu, --keep).
set -uo pipefail
export OUT="${OUT:-$PWD/gpu_check_out}"  # before the cd: relative to where it was started
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
# As .ci/run: DeepSpeed's JIT ops (CPU Adam for offload) and PEFT's fbd_cuda kernel are built
# once and kept between runs; the model and data are installed packages, never the hub.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
