#!/usr/bin/env bash
# The GPU checks of the fit kernel in one go, on a machine with a CUDA GPU and torch with CUDA
# (~6-8 minutes on one H100; every step has its own time limit and the next one runs whatever happens):
#   MODEL_DIR=DIR bash benchmarks/gpu_check.sh
# MODEL_DIR: an imported bossbrain 4000-5000 K emulator (`distlabels models import ...`); the tests read
# it through DISTLABELS_TEST_BOSSBRAIN_DIR, so the bossbrain package is not needed on the GPU machine.
#  1. GPU and measured ceilings;
#  2. gpu_profile.py on the LAMOST-like grid: spectra/s by batch size and curvature setting, the lines
#     where the host waits for the GPU, a torch.profiler table and the fraction of the FP32 rate reached;
#  3. the CUDA tests (CPU vs CUDA answers, per-pixel model, Cannon training, a local-cuda Dask run;
#     the last needs dask, distributed and dask-cuda importable);
#  4. fit_kernel.py on CUDA: our kernel on both grids at S/N 20/50/100, accuracy and CRB ratios;
#  5. gpu_profile.py on the model's own grid.
# Logs and JSON go to $OUT (default benchmarks/gpu_out); copy the figures into benchmarks/RESULTS.md.
# Knobs: N_STARS, MOCK_N (distinct mocks, repeated up to N_STARS), LAMOST_BATCHES, MODEL_BATCHES, N_MODEL,
# APPROX (on,off,auto), TAPS (fused,eager,legacy: Doppler taps on the aligned LAMOST grid), BENCH_STARS,
# BENCH_GRIDS, REPEATS (timed fits per setting, the fastest counts), SKIP_PROFILE (set: no profiler table),
# PROFILE_LIMIT (seconds for the profile_lamost step, default 240: every batch size fits all N_STARS
# REPEATS times), STEPS (which of: env profile_lamost tests bench profile_model; default all, in this order).
# The best H100 figure so far (20,147 spectra/s, fused taps, batches of 49,152, 46.0 GiB) came from
#   N_STARS=131072 MOCK_N=4096 LAMOST_BATCHES=49152 APPROX=auto TAPS=fused REPEATS=2 SKIP_PROFILE=1 \
#   STEPS="profile_lamost tests"
# The tests import astropy (APOGEE loader) and, for the local-cuda run, dask, distributed and dask-cuda:
# on a bare GPU image install them first (the wheels used on the H100: benchmarks/RESULTS.md, "On a GPU").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu_out}
mkdir -p "$OUT"
MODEL=${MODEL_DIR:?set MODEL_DIR to an imported bossbrain 4000-5000 model directory}
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DISTLABELS_TEST_BOSSBRAIN_DIR=$MODEL
N=${N_STARS:-${N:-8192}}
STEPS=" ${STEPS:-env profile_lamost tests bench profile_model} "
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    case "$STEPS" in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
step env 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'; \
    $PY -c 'import triton; print(\"triton\", triton.__version__)'; command -v cc gcc clang"
PROF=${SKIP_PROFILE:+--skip-profile}
step profile_lamost "${PROFILE_LIMIT:-240}" $PY benchmarks/gpu_profile.py --model-dir "$MODEL" --grids lamost --n "$N" --mock-n "${MOCK_N:-8192}" \
    --batch-sizes "${LAMOST_BATCHES:-4096,8192}" --approx "${APPROX:-on,off}" --taps "${TAPS:-fused,eager,legacy}" \
    --repeats "${REPEATS:-1}" $PROF --json "$OUT/profile_lamost.json"
grep -E "^GPU|spectra/s|profiled|aligned grid|not available|compile|^\[.*waits|^    [a-z].*py:[0-9]+: [0-9]+" \
    "$OUT/profile_lamost.log" 2>/dev/null | cut -c1-250 | head -60
step tests 150 $PY -m pytest -q -p no:cacheprovider -rs tests/fit/test_quality.py::test_cpu_and_cuda_give_the_same_answer \
    tests/fit/test_aligned.py \
    tests/fit/test_payne_perpixel_fit.py::test_per_pixel_model_on_cuda_matches_cpu tests/train/test_train_gpu.py \
    tests/pipeline/test_gpu.py
tail -n 15 "$OUT/tests.log" 2>/dev/null
step bench 150 $PY benchmarks/fit_kernel.py --device cuda --skip-reference --n-stars "${BENCH_STARS:-2048}" \
    --snr 20,50,100 --grids "${BENCH_GRIDS:-lamost,model}" --chunks 1 --model-dir "$MODEL" --json "$OUT/bench.json"
grep -E "spectra/s|TFLOP" "$OUT/bench.log" 2>/dev/null | cut -c1-220 | head -30
tail -n 3 "$OUT/bench.log" 2>/dev/null
step profile_model 100 $PY benchmarks/gpu_profile.py --model-dir "$MODEL" --grids model --n "${N_MODEL:-$N}" --mock-n "${MOCK_N:-8192}" \
    --batch-sizes "${MODEL_BATCHES:-4096}" --approx "${APPROX:-on,off}" --taps legacy --json "$OUT/profile_model.json"
grep -E "spectra/s|profiled|^\[.*waits|^    [a-z].*py:[0-9]+: [0-9]+" "$OUT/profile_model.log" 2>/dev/null | head -30
