#!/usr/bin/env bash
# Caption-keyed codes on the demo scenes (docs/efficacy.md, "Caption-keyed codes"): colour photos
# whose captions name shape, colour, size, position and background, where Fashion-MNIST's are
# gray photos named by class. 4,000 training pairs at 32 px (data/demo32), 500 val, 500 select
# (another draw: the attacker's epoch), the text tower a stand-in public CLIP trained on a third
# draw (data/demo32-public); the CLIP victim of experiments/keyed.sh (tiny-vit32, its own init),
# image->text R@10 on the clean val pairs. Runs into runs/calm-demo/COND-sSEED.
#   bash experiments/keyed_demo.sh [SEED:COND,...]    COND: clean, keyed (g 2, ε 16), random (a random
#     code per sample: the same budget and grid), trained (keyed.generator=trained, min-min)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
D=data/demo32 P="{00000..00007}.tar" OUT=runs/calm-demo
KEY=6b65796564206d656d2d646973742065787065726d656e7473206b6579202031  # experiments only: a published key protects nothing
[ -f $D/val/00000.tar ] || mem-dist demo-data $D --train 4000 --val 500 --size 32 --seed 0
[ -f $D-select/val/00000.tar ] || mem-dist demo-data $D-select --train 500 --val 500 --size 32 --seed 1
[ -f $D-public/train/00007.tar ] || mem-dist demo-data $D-public --train 4000 --val 500 --size 32 --seed 2
CLIP_ARGS="victim.kind=clip victim.model=configs/models/tiny-vit32.json victim.epochs=15 victim.batch_size=128 victim.lr=5e-4 victim.weight_decay=0.2 victim.warmup_steps=50 victim.crop=true"
EVAL=(--config configs/eval-calibrate.yaml "val_shards=$D/val/00000.tar" "select_shards=$D-select/val/00000.tar")
PUB=$OUT/public/victims/public.pt
# shellcheck disable=SC2086
[ -f $PUB ] || mem-dist evaluate "${EVAL[@]}" "conditions={public: '$D-public/train/$P'}" "seeds=[7]" output=$OUT/public \
  save_victims=true $CLIP_ARGS victim.model=configs/models/tiny-rn32.json
if [ ! -f runs/demo32-keyed/manifest/00007_stats.json ]; then
  python mem_dist/generate.py --config configs/keyed.yaml "data.shards=$D/train/$P" output=runs/demo32-keyed progress=false \
    data.image_size=32 "keyed.key=$KEY" "surrogate.pretrained=$PUB"
  mem-dist merge runs/demo32-keyed progress=false
fi
[ -f data/demo32-random/00007.tar ] || python experiments/keyed_probe.py "$D/train/$P" data/demo32-random --control random \
  --grid 2 --epsilon 16 --model configs/models/tiny-rn32.json
if [ ! -f runs/demo32-keyed-trained/manifest/00007_stats.json ]; then
  python mem_dist/generate.py --config configs/keyed.yaml "data.shards=$D/train/$P" output=runs/demo32-keyed-trained progress=false \
    data.image_size=32 "keyed.key=$KEY" "surrogate.pretrained=$PUB" keyed.generator=trained
  mem-dist merge runs/demo32-keyed-trained progress=false
fi
declare -A SRC=([clean]="$D/train/$P" [keyed]="runs/demo32-keyed/protected/$P" [random]="data/demo32-random/$P"
  [trained]="runs/demo32-keyed-trained/protected/$P")
for job in ${*:-0:clean,keyed,random}; do
  IFS=: read -r seed conds <<< "$job"
  for c in ${conds//,/ }; do
    [ -f $OUT/$c-s$seed/report.md ] && continue
    # shellcheck disable=SC2086
    mem-dist evaluate "${EVAL[@]}" "conditions={$c: '${SRC[$c]}'}" "seeds=[$seed]" output=$OUT/$c-s$seed $CLIP_ARGS ${EVAL_EXTRA:-}
  done
done
