#!/bin/bash
# The GPU suite (benchmarks/gpu_suite.py) on a lent GPU machine: figures appended to a dated results file, the
# whole run capped at 8 minutes. Extra arguments go to the script (e.g. --parts forward compile).
set -u
cd "$(dirname "$0")/.."
out="benchmarks/results_gpu_$(date +%F).jsonl"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
timeout 480 python benchmarks/gpu_suite.py --out "$out" "$@"
echo "exit $? - lines in $out"
