#!/usr/bin/env bash
# N CPU processes on one machine (what the tests use). `accelerate launch --cpu` would start
# ONE process; --multi_gpu with ACCELERATE_USE_CPU=1 gives N ranks on the gloo backend.
#   launch/cpu-multiprocess.sh 2 --config configs/demo.yaml mem.rounds=2
set -euo pipefail
N=${1:?usage: $0 NUM_PROCESSES --config C [key=value ...]}; shift
export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# One process checks the configuration and the shards first: a bad one is one line and exit 2.
python mem_dist/generate.py --check "$@"
exec accelerate launch --multi_gpu --num_processes "$N" --num_machines 1 \
  --mixed_precision no --dynamo_backend no --main_process_port "${PORT:-29513}" \
  mem_dist/generate.py "$@"
