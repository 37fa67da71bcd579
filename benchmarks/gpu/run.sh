#!/usr/bin/env bash
# GPU validation in one call, in priority order, each section under its own timeout, results flushed into $OUT as
# they are measured (a section that runs out of time keeps what it wrote; later sections still run):
#   1 correctness   kernel tests on CUDA (no interpreter), then every full-size shape, bf16 and fp16, output and every
#                   gradient, each GEMM path with its production (autotuned) configs, against float64
#   2 masked        masked/base fwd, fwd+bwd, PEFT/base, LoRA overhead share, Triton GEMM alone vs cuBLAS, chosen path
#   3 neuron_stats  in-place accumulation vs the measured device-to-device copy bandwidth
#   4 scoring       scoring pass vs plain forward+backward on the Qwen2.5-3B shape
# Time on one H200, estimated (not measured): tests ~75 s, correctness ~90 s (24 Triton compilations ~40 s, float64
# references ~10 s), masked ~80 s, neuron_stats ~15 s, scoring ~60 s, env and merge ~10 s: about 5.5 minutes; the
# timeouts below (20 + 90 + 110 + 110 + 40 + 90 + 20 = 480 s) cap the whole run at 8 minutes whatever happens.
# Usage: benchmarks/gpu/run.sh [--dry-run]   (--dry-run: tiny sizes on CPU, Triton interpreter; checks the script)
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
export AGML_KERNELS=triton
LOG="$OUT/run.log"
: > "$LOG"
failed=()

section() {  # section NAME SECONDS COMMAND...: run under its own timeout, log it, remember a failure
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${seconds}s)" | tee -a "$LOG"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    if [[ $rc -ne 0 ]]; then failed+=("$name:$rc"); fi
}

section env 20 bash -c "nvidia-smi || echo 'nvidia-smi: not available';
    \"$PY\" -c 'import importlib.metadata as m, torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
\"triton\", m.version(\"triton\"), \"peft\", m.version(\"peft\"), \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())'"

H200=("$PY" benchmarks/gpu/h200.py --out-dir "$OUT" "${DRY[@]}")
if [[ ${#DRY[@]} -eq 0 ]]; then
    # One small GEMM config for the many test shapes (no autotuning per test); full sizes below use the production set.
    section kernel-tests 90 env AGML_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -x tests/kernels \
        -k "not run_without_hypothesis and not dry_run" -o junit_family=xunit2 --junitxml="$OUT/kernel-tests.xml"
    section correctness 110 "${H200[@]}" correctness
    section masked 110 "${H200[@]}" masked
    section neuron_stats 40 "${H200[@]}" neuron_stats
    section scoring 90 "${H200[@]}" scoring
    section merge 20 "${H200[@]}" merge
else
    # Every section at tiny sizes in one process (each Python start costs seconds on a CPU); CI runs the kernel tests.
    section all-sections 240 "${H200[@]}" correctness masked neuron_stats scoring merge
fi

echo "failed sections: ${failed[*]:-none}; results in $OUT" | tee -a "$LOG"
[[ ${#failed[@]} -eq 0 ]]
