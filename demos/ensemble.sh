#!/usr/bin/env bash
# Several public checkpoints, one ensemble (surrogate.ensemble), about 12 minutes on 2 CPU cores
# after demos/finetune.sh (which it needs: data/demo, runs/public, runs/demo-prefix3, runs/demo-ft-mem3).
# Protection against fine-tuning holds for the checkpoints the surrogates start from: this
# trains two more "public checkpoints" (B, C: the same tiny RN from other inits, on other
# colour-free scenes), protects the demo data with an ensemble started from A (runs/public) and B,
# and fine-tunes victims from A, B and C. C is in no surrogate: the control.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
for seed in 8 10; do
  echo "== public checkpoint from seed $seed"
  mem-dist demo-data data/public$seed --train 2000 --val 500 --size 32 --per-shard 500 --no-colours --seed $seed
  python -m mem_dist.evaluate --config configs/eval-demo.yaml output=runs/public$seed seed=$seed save_victims=true \
    "conditions={public$seed: \"data/public$seed/train/{00000..00003}.tar\"}" val_shards=data/public$seed/val/00000.tar
done
echo "== generate + merge: MEM-3, an ensemble of surrogates started from A and from B"
ens=(output=runs/demo-ens-mem3 progress=false surrogate.pretrained=runs/public/victims/public.pt mem.lr=1e-5
     "surrogate.ensemble=[{pretrained: runs/public8/victims/public8.pt}]")
python mem_dist/generate.py --config configs/demo.yaml "${ens[@]}"
mem-dist merge runs/demo-ens-mem3
for start in public public8 public10; do
  echo "== evaluate: victims fine-tuned from $start"
  python -m mem_dist.evaluate --config configs/eval-demo-finetune.yaml output=runs/eval-ensemble-$start \
    victim.pretrained=runs/$start/victims/$start.pt \
    'conditions={clean: "data/demo/train/{00000..00003}.tar", prefix3: "runs/demo-prefix3/protected/{00000..00003}.tar", mem3-A: "runs/demo-ft-mem3/protected/{00000..00003}.tar", mem3-AB: "runs/demo-ens-mem3/protected/{00000..00003}.tar"}'
done
