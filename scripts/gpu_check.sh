#!/usr/bin/env bash
# GPU check, for a machine with CUDA (not CI): the open_clip equality tests on the GPU, and the caption
# benchmark there (ours vs open_clip, fp32 and bf16). Results go to $OUT (or ./gpu-check).
# Usage: scripts/gpu_check.sh   (python3 must hold torch with CUDA; open_clip 3.3 + transformers 4.56 importable)
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, open_clip, transformers; print(torch.__version__, open_clip.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
COCA_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_model_equality.py -k "not checkpoint" 2>&1 | tee "$out/tests.log" | tail -20
for batch in 1 8; do
  timeout 120 python3 -m bench caption --device cuda --batch "$batch" --max-tokens 20 --dtype bfloat16 2>&1 | grep -v WARNING | tee -a "$out/bench.log"
done
