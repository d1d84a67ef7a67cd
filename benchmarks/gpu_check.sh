#!/usr/bin/env bash
# The GPU check of jaxnorm's Pallas kernels: the Pallas tests on the real Triton kernels, then
# benchmarks/gpu.py (two transformer activation shapes, and the feature-size sweep). Each step
# has its own time limit (9.5 minutes in all), so a hang in one still leaves the other's output.
#
#   bash benchmarks/gpu_check.sh            # writes to $OUT if set, else benchmarks/results
#
# Needs a Python whose jax sees the GPU (jax[cuda]) and the test extra (pytest, flax, numpy).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python - <<'PY' 2>&1 | tee "$out/gpu_env.txt"
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
assert jax.default_backend() == "gpu", "no GPU backend: install jax[cuda] first"
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
# 1. tests/test_pallas.py: on a GPU, implementation="pallas" lowers through Triton (the CPU
#    runs the same tests in interpret mode), so this checks the real kernels against XLA and
#    float64, ragged shapes, jvp/hessian, the wrappers.
timeout 180 python -m pytest -q -x -p no:cacheprovider tests/test_pallas.py 2>&1 \
  | tee "$out/gpu_tests.txt"
tests=${PIPESTATUS[0]}
# 2. The benchmark: 8192x4096 and 32768x4096 (transformer activations), float32 and bfloat16,
#    forward and forward+backward, every library; then the sweep over 1024..16384 features at
#    2**25 elements (jaxnorm xla, jaxnorm pallas, flax).
timeout 390 python benchmarks/gpu.py --out "$out" --shapes 8192x4096,32768x4096 2>&1 \
  | tee "$out/gpu_bench.txt"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
