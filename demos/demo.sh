#!/usr/bin/env bash
# The whole pipeline on demo data, about 15 minutes on 2 CPU cores:
# demo shards -> generate (random noise, random noise + random trigger, the same random
# trigger on every caption, EM, MEM-3) -> merge
# -> verify -> evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
mem-dist demo-data data/demo --train 2000 --val 500 --size 32 --per-shard 500
for run in "demo-random method=random mem.trigger_len=0" "demo-random3 method=random" "demo-prefix3 method=prefix" "demo-em mem.trigger_len=0" "demo-mem3"; do
  set -- $run
  name=$1; shift
  echo "== generate + merge: $name"
  python mem_dist/generate.py --config configs/demo.yaml output=runs/$name "$@"
  mem-dist merge runs/$name
done
mem-dist verify runs/demo-mem3
echo "== evaluate: victims trained on each condition, retrieval on clean validation data"
python -m mem_dist.evaluate --config configs/eval-demo.yaml
echo "== evaluate: clean and MEM-3 images re-encoded as JPEG 75 before the victim sees them"
python -m mem_dist.evaluate --config configs/eval-demo.yaml output=runs/eval-demo-jpeg75 reencode_jpeg=75 \
  'conditions={clean: "data/demo/train/{00000..00003}.tar", mem3: "runs/demo-mem3/protected/{00000..00003}.tar"}'
