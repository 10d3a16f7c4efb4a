#!/usr/bin/env bash
# bench/scale.py on a CUDA host, as one prepared command for the device tool: the
# fleet's own packages come along as wheels in .whl (the host's image has torch,
# transformers, sentence-transformers, pyarrow, psutil, rich and matplotlib), and the
# bench's tiny dense model in bench/.cache. Each GPU run is one dense worker on the GPU
# and 4 aggregate+prepare workers on the host's cores; 100x is run once with the fleet
# preparing and once with the producer preparing alone (the serial way), so the two
# can be compared where the encoder is fast.
#
#   device run: bash bench/gpu_scale.sh   (carry .whl and bench/.cache/bert-tiny-mean)
set -euo pipefail
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$OUT/cpu.txt"
common=(--prepare-workers "" --no-formats --no-demo)
python3 bench/scale.py --sizes 10,100 --aggregate-workers 4 "${common[@]}" \
    --out "$OUT/scale_gpu_fleet.json" 2>&1 | tee "$OUT/fleet.log"
python3 bench/scale.py --sizes 100 --aggregate-workers 4 --prepare-on producer "${common[@]}" \
    --out "$OUT/scale_gpu_producer.json" 2>&1 | tee "$OUT/producer.log"
