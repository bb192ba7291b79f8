#!/usr/bin/env bash
# Every CUDA path in one run, for a machine with an NVIDIA GPU (see the README's "Model coverage"):
# the gpu-marked tests (float16, int8 and nf4 on the GPU, tensor parallelism over GPUs, the
# memory-based block count, a real nf4 swarm of the built-in model), then the quantisation and
# decode benchmarks on the GPU. Run from the repository root after `make test`'s setup (.venv exists).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
pytest -q -p no:cacheprovider -m gpu -s tests
python benchmarks/bench_quant.py --variants fp32 bf16 int8 nf4
# the performance table on the GPU (float16): pass --model DIR for a larger model that fits
python benchmarks/bench_decode.py --device cuda --torch_dtype float16 "$@"
