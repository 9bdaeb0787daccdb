#!/usr/bin/env bash
# Calibration of the victims against published results (docs/efficacy.md, "Calibrated victims"):
# the literature's class-keyed availability attacks (mem-dist baseline: block, lsp, ar, em) on
# Fashion-MNIST at 32 px (4,000 train images, 1,000 val, 1,000 select), each against a victim that
# keeps the resolution (CIFAR-style ResNet-18, width 16) and against torchvision's ImageNet-stem
# ResNet-18, two victim seeds, 15 epochs. Every (victim, condition, seed) is its own evaluate
# (about 10-20 minutes each on 2 busy cores) into runs/calib/VICTIM/COND-sSEED, skipped when done;
# then experiments/combine_reports.py joins them into runs/calib/VICTIM/report.md.
#   bash experiments/calibrate.sh [JOB ...]     a job is VICTIM:COND:SEED (default: all, in order);
#   CALIB_DATA=bg bash experiments/calibrate.sh ...   the same on harder content: the garments tinted
#     over random backgrounds (experiments/fmnist_backgrounds.py -> data/fmnist-bg, runs/calib/VICTIM-bg)
#   CALIB_DATA=16k bash experiments/calibrate.sh ...  four times the training images (16,000; the same
#     val and select images) -> data/fmnist-16k, runs/calib/VICTIM-16k
# COND is clean or KIND[EPS] (block, lsp, ar, em; lsp16 = lsp at eps 16/255, default 8)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore
D=data/fmnist TAG= LAST=00007
[ -f $D/select/00001.tar ] || mem-dist import fashion-mnist $D --train 4000 --public 4000 --val 1000 --select 1000 --size 32
if [ "${CALIB_DATA:-}" = bg ]; then
  [ -f data/fmnist-bg/select/00001.tar ] || python experiments/fmnist_backgrounds.py $D data/fmnist-bg
  D=data/fmnist-bg TAG=-bg
elif [ "${CALIB_DATA:-}" = 16k ]; then
  D=data/fmnist-16k TAG=-16k LAST=00031
  [ -f $D/select/00001.tar ] || mem-dist import fashion-mnist $D --train 16000 --public 0 --val 1000 --select 1000 --size 32
fi
baseline() {  # cond -> data/fm-COND, made once
  local kind=${1%%[0-9]*} eps=${1#"${1%%[0-9]*}"}
  local extra=()
  [ $kind = em ] && extra=(--em-width 8 --em-rounds 8)  # against a width-8 victim: 7 rounds of 100 s to 99.9%
  [ -f data/fm$TAG-$1/$LAST.tar ] || mem-dist baseline $kind "$D/train/{00000..$LAST}.tar" data/fm$TAG-$1 --epsilon ${eps:-8} "${extra[@]}"
}
victim_args() {  # victim name -> overrides
  case $1 in
    cifar16) echo "classifier.model=cifar_resnet18 classifier.width=16" ;;
    vgg16) echo "classifier.model=cifar_vgg11 classifier.width=16" ;;
    rn18) echo "classifier.model=resnet18" ;;
  esac
}
shards() { [ "$1" = clean ] && echo "$D/train/{00000..$LAST}.tar" || echo "data/fm$TAG-$1/{00000..$LAST}.tar"; }
JOBS=${*:-cifar16:clean:0 cifar16:block:0 cifar16:lsp:0 cifar16:ar:0 rn18:clean:0 rn18:block:0 rn18:lsp:0 rn18:ar:0
  cifar16:em:0 cifar16:clean:1 cifar16:block:1 cifar16:lsp:1 cifar16:ar:1 cifar16:em:1 rn18:em:0 vgg16:clean:0 vgg16:block:0 vgg16:lsp:0 vgg16:ar:0
  cifar16:block16:0 cifar16:lsp16:0 cifar16:ar16:0 cifar16:block16:1 cifar16:lsp16:1 cifar16:ar16:1 rn18:lsp16:0 rn18:ar16:0}
for job in $JOBS; do
  IFS=: read -r victim cond seed <<< "$job"
  out=runs/calib/$victim$TAG/$cond-s$seed
  [ -f $out/report.md ] && continue
  [ "$cond" = clean ] || baseline $cond
  # shellcheck disable=SC2046
  mem-dist evaluate --config configs/eval-calibrate.yaml "conditions={$cond: '$(shards $cond)'}" "seeds=[$seed]" \
    output=$out $(victim_args $victim) val_shards="$D/val/{00000..00001}.tar" select_shards="$D/select/{00000..00001}.tar"
  python experiments/combine_reports.py runs/calib/$victim$TAG runs/calib/$victim$TAG/*-s* > /dev/null
done
