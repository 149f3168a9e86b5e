#!/usr/bin/env bash
# The GPU checks, as one prepared run on a CUDA machine (results under $OUT when set, else ./gpu-out):
# CUDA tests (bf16 training, QLoRA), the planner vs measured memory/time, and train throughput vs HF Trainer.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
timeout 150 python3 bench/plan_gpu.py 2>&1 | tee "$OUT/plan_gpu.log" | tail -25
timeout 200 python3 bench/train_throughput.py --samples 3000 --threads 8 ${TOKENIZER:+--tokenizer $TOKENIZER} 2>&1 | tee "$OUT/train_throughput.log" | tail -8
