#!/usr/bin/env bash
# Another training pipeline as the victim: open_clip's own trainer (open_clip_train.main)
# fine-tunes the public checkpoint on clean and protected shards, and `mem-dist evaluate`
# scores the checkpoints it writes (conditions.NAME.checkpoint), training nothing itself.
# About 3 minutes on 2 CPU cores after demos/finetune.sh (which it needs: data/demo,
# runs/public, runs/demo-random3, runs/demo-prefix3, runs/demo-ft-mem3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
# open_clip_train takes registered model names (RN50, ViT-B-32, ...); the demo's model is a
# config JSON, so it is registered first (with a registered name: python -m open_clip_train.main).
open_clip_train() {
  python -c "import open_clip, sys; open_clip.add_model_config(sys.argv[1]); from open_clip_train.main import main; main(sys.argv[2:])" \
    configs/models/tiny-rn32.json --model tiny-rn32 "$@"
}
conditions=""
for run in "clean data/demo/train/{00000..00003}.tar" "random3 runs/demo-random3/protected/{00000..00003}.tar" \
           "prefix3 runs/demo-prefix3/protected/{00000..00003}.tar" "mem3 runs/demo-ft-mem3/protected/{00000..00003}.tar"; do
  set -- $run
  echo "== open_clip_train: fine-tune the public checkpoint on $1"
  rm -rf runs/open-clip-train/$1  # open_clip_train refuses an existing experiment name
  open_clip_train --pretrained runs/public/victims/public.pt --train-data "$2" --dataset-type webdataset \
    --train-num-samples 2000 --batch-size 128 --epochs 10 --lr 1e-4 --wd 0.2 --warmup 50 --workers 1 \
    --precision fp32 --seed 0 --logs runs/open-clip-train --name $1 --report-to '' --save-frequency 10 --log-every-n-steps 100
  conditions="$conditions$1: {checkpoint: runs/open-clip-train/$1/checkpoints/epoch_10.pt, shards: '$2'}, "
done
echo "== evaluate: the open_clip_train victims, as they are, on the clean val pairs"
python -m mem_dist.evaluate --config configs/eval-demo-finetune.yaml output=runs/eval-open-clip-train "conditions={${conditions%, }}"
