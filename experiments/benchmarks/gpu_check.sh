#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for the day a machine with one is available:
#   bash experiments/benchmarks/gpu_check.sh            (WIKIANN_DIR or ../shared/data/wikiann must hold the data)
# 1. the GPU tests (pytest -m gpu): the three stages end to end on CUDA, the meta-gradient on CUDA
#    equal to the CPU one, torchrun with NCCL (2+ GPUs);
# 2. bench_maml on GPU 0: meta-step vs two full fine-tuning steps, meta-steps/s, peak GPU memory,
#    fp32 and bf16, for e5-small and for a randomly initialised XLM-R-base-sized model (hub weights
#    are unreachable on the lent machines).
# Figures go to experiments/results/gpu/ (bench-*.json and .txt); the README's GPU section quotes them.
set -euo pipefail
cd "$(dirname "$0")/../.."
export WIKIANN_DIR="${WIKIANN_DIR:-$(cd .. && pwd)/shared/data/wikiann}"
out=experiments/results/gpu
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
for model in e5-small random-xlmr-base; do
  for precision in fp32 bf16; do
    python experiments/benchmarks/bench_maml.py --gpu 0 --model "$model" --precision "$precision" --no-higher \
      --repeats 10 --warmup 2 --inner-steps 3 --json "$out/bench-$model-$precision.json" \
      2>&1 | tee "$out/bench-$model-$precision.txt"
  done
done
echo "GPU check done: $out"
