#!/usr/bin/env bash
# GPU check of the fit kernel, in one go, on a machine with a CUDA GPU and torch with CUDA:
#   bash benchmarks/gpu_check.sh            # ~5-10 minutes on one H100
# 1. the CPU-vs-CUDA test (same answer within its stated tolerance, TF32 off);
# 2. the kernel benchmark on CUDA: 16,384 LAMOST-like and model-grid mocks at S/N 50, our kernel only,
#    spectra/s and the fraction of the GPU's FP32 peak reached (pass PEAK_TFLOPS; H100 SXM ~67, PCIe ~51).
# Results go to benchmarks/gpu_check.json; copy the printed lines into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
PEAK_TFLOPS=${PEAK_TFLOPS:-67}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
$PY -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
$PY -m pytest -q tests/fit/test_quality.py -k cuda -p no:cacheprovider
$PY benchmarks/fit_kernel.py --device cuda --skip-reference --n-stars "${N_STARS:-16384}" --snr "${SNR:-50}" \
    --grids lamost,model --ours-modes prenorm,full --batch-size "${BATCH:-4096}" --chunks 1 \
    --peak-tflops "$PEAK_TFLOPS" --json benchmarks/gpu_check.json
