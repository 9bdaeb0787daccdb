#!/usr/bin/env bash
# The fine-tuning threat on demo data, about 7 minutes on 2 CPU cores after demos/demo.sh (which it
# needs: data/demo, runs/demo-random3, runs/demo-prefix3, runs/demo-mem3):
# a "public checkpoint" (a tiny CLIP trained on other, colour-free scenes) -> MEM-3 with the
# surrogate started from it -> victims fine-tuned from it -> retrieval on clean val data.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
echo "== the public checkpoint: a victim trained on other scenes, weights saved"
mem-dist demo-data data/public --train 2000 --val 500 --size 32 --per-shard 500 --no-colours --seed 7
python -m mem_dist.evaluate --config configs/eval-demo.yaml output=runs/public seed=7 save_victims=true \
  'conditions={public: "data/public/train/{00000..00003}.tar"}' val_shards=data/public/val/00000.tar
echo "== generate + merge: MEM-3, surrogate started from the public checkpoint (lr 1e-5 keeps it near it)"
python mem_dist/generate.py --config configs/demo.yaml output=runs/demo-ft-mem3 progress=false surrogate.pretrained=runs/public/victims/public.pt mem.lr=1e-5
mem-dist merge runs/demo-ft-mem3
echo "== evaluate: victims fine-tuned from the public checkpoint"
python -m mem_dist.evaluate --config configs/eval-demo-finetune.yaml
