#!/usr/bin/env bash
# Is there a setting small enough for the test suite where UC's optimisation beats its control
# (docs/efficacy.md, "UC in a reduced setting")? UC on caption clusters against the same clusters
# with a random colour each (experimental.uc.perturbation=random, grid 1: nothing optimised), judged
# by the calibrated classifier at the suite's size: CIFAR-style ResNet-18 width 8, 8 epochs, batch
# 64 (128 at 4,000 images), one torch thread; the surrogate a tiny CLIP trained 5 epochs on 1,000
# public images (12 s). Everything under runs/ucr/ (skipped when done):
#   bash experiments/uc_reduced.sh [SIZE:SEED ...]      SIZE 1k | 4k (default: 1k:0 1k:1 4k:0 4k:1)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
R=runs/ucr
SMALL=(uc.train_samples=300 uc.epochs=2)  # the cheapest generator tried: 14 s at 1,000 images
declare -A GEN=([uc-small]="${SMALL[*]}" [uc-3ep]="uc.train_samples=1000 uc.epochs=3"
  [uc-direct]="uc.train_samples=1000 uc.epochs=3 experimental.uc.perturbation=direct"
  [uc-grid8]="${SMALL[*]} experimental.uc.grid=8" [control]="experimental.uc.grid=1 experimental.uc.perturbation=random")
declare -A CONDS=([1k]="clean uc-small uc-3ep uc-direct uc-grid8 control" [4k]="clean uc-small control")
data() {  # size -> $R/fm-SIZE with a public checkpoint
  local d=$R/fm-$1 n=$([ $1 = 1k ] && echo 1000 || echo 4000)
  [ -d $d ] || mem-dist import fashion-mnist $d --train $n --public 1000 --val 300 --select 200 --per-shard 500 --size 32
  [ -f $R/public-$1/victims/public.pt ] || mem-dist evaluate --config configs/eval-fmnist.yaml output=$R/public-$1 \
    "conditions={public: '$d/public/{00000..00001}.tar'}" val_shards=$d/val/00000.tar save_victims=true seed=7 \
    victim.epochs=5 victim.batch_size=64 victim.warmup_steps=10 num_threads=1 device=cpu > /dev/null
}
train() { local n=$([ $1 = 1k ] && echo 1 || echo 7); echo "$R/fm-$1/train/{00000..0000$n}.tar"; }
gen() {  # size name
  local out=$R/$1-$2
  [ -f $out/manifest/00000_stats.json ] && return
  # shellcheck disable=SC2086
  python mem_dist/generate.py "data.shards=$(train $1)" output=$out data.image_size=32 \
    surrogate.model=configs/models/tiny-rn32.json surrogate.pretrained=$R/public-$1/victims/public.pt method=uc \
    uc.clusters=10 uc.kmeans_samples=1000 uc.train_samples=1000 uc.batch_size=64 uc.cluster_on=caption \
    uc.augment=published experimental.uc.generator_width=8 experimental.uc.generator_blocks=1 progress=false device=cpu ${GEN[$2]}
  mem-dist merge $out progress=false 'merge.keep_fields=[label, class]' > /dev/null
}
for step in ${*:-1k:0 1k:1 4k:0 4k:1}; do
  IFS=: read -r size seed <<< "$step"
  data $size
  for c in ${CONDS[$size]}; do
    src=$(train $size)
    if [ $c != clean ]; then gen $size $c; src="$R/$size-$c/protected/${src##*/}"; fi
    out=$R/ev/$size-$c-s$seed
    [ -f $out/report.md ] || mem-dist evaluate --config configs/eval-calibrate.yaml "conditions={$c: '$src'}" \
      "val_shards=$R/fm-$size/val/00000.tar" "select_shards=$R/fm-$size/select/00000.tar" "seeds=[$seed]" victim.epochs=8 \
      victim.batch_size=$([ $size = 1k ] && echo 64 || echo 128) classifier.width=8 output=$out num_threads=1 > /dev/null
    grep -E "^\| $c \|" $out/report.md | sed "s/^/$size s$seed /"
  done
done
