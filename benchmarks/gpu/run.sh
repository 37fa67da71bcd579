#!/usr/bin/env bash
# GPU validation in one call: kernel tests on CUDA (no interpreter), then full-size benchmarks -> $OUT/h200.json.
# Usage: benchmarks/gpu/run.sh [--dry-run]   (--dry-run: tiny sizes on CPU, Triton interpreter; checks the script)
set -euo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the checkout without installing agml
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); fi

{
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" -c 'import torch, triton, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"triton", triton.__version__, "peft", peft.__version__, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

tests_rc=0
if [[ ${#DRY[@]} -eq 0 ]]; then
    # Compiled Triton on CUDA tensors: the interpreter must be off; one GEMM config (no retuning per test shape).
    (unset TRITON_INTERPRET; AGML_KERNELS=triton AGML_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
        --junitxml="$OUT/kernel-tests.xml") 2>&1 | tee "$OUT/kernel-tests.txt" || tests_rc=$?
else
    TRITON_INTERPRET=1 AGML_KERNELS=triton "$PY" -m pytest -q -p no:cacheprovider tests/kernels \
        -k "matches_float64_formula or neuron_stats and matches_float64" \
        --junitxml="$OUT/kernel-tests.xml" 2>&1 | tee "$OUT/kernel-tests.txt" || tests_rc=$?
fi

bench_env=(AGML_KERNELS=triton)
if [[ ${#DRY[@]} -gt 0 ]]; then bench_env+=(TRITON_INTERPRET=1); fi
env "${bench_env[@]}" "$PY" benchmarks/gpu/h200.py --out "$OUT/h200.json" "${DRY[@]}" 2>&1 | tee "$OUT/bench.txt"

echo "kernel tests exit status: $tests_rc; results in $OUT"
exit "$tests_rc"
