#!/usr/bin/env bash
# GPU readiness on one CUDA GPU, in under 8 minutes: the GPU-marked tests, the CUDA exact top-k against the CPU's,
# faiss-gpu IVF recall against the CPU's, and read throughput of the demo at 256k and 1M tokens (rows in
# experiments/results/results.csv: experiments device_check and bench_read). Without a GPU it says so and exits 0.
#
#   experiments/device_check.sh                 # from anywhere; RUN=label to name the run
#
# faiss-gpu: see README, "Install" (pip extra `gpu`). Without it the Faiss indexes stay on the CPU: the checks still
# run, the IVF reads are skipped and only the exact (torch) memory is timed on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check: no CUDA GPU visible to torch; skipped"
    exit 0
fi
RUN="${RUN:-device_check_$(date +%Y-%m-%dT%H:%M:%S)}"
python -c "import faiss; print('faiss', faiss.__version__, 'GPUs seen by Faiss:', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 150 python -m pytest -q -m gpu tests
timeout 330 python -m experiments.device_check --device cuda --run "$RUN"
