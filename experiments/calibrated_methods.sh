#!/usr/bin/env bash
# The project's methods re-measured with the calibrated victims (docs/efficacy.md, "Calibrated
# victims"): Fashion-MNIST (4,000 train, 1,000 val, 1,000 select at 32 px), every condition of the
# real-photo table (clean, random noise, random trigger, fixed prefix, EM, MEM-3, MEM-5 with the
# trigger kept and cut, UC on image and on caption clusters, their random controls), judged by
#   cls   the CIFAR-style ResNet-18 (width 16, 15 epochs; configs/eval-calibrate.yaml)
#   clip  a CLIP from scratch whose image tower keeps 32 px (configs/models/tiny-vit32.json, 4-px
#         patches), zero-shot top-1; first on two of the class-keyed calibration points (block, lsp)
# two victim seeds each, the attacker's epoch chosen on the select split. Every (victim,
# condition, seed) is its own evaluate into runs/calm/VICTIM/COND-sSEED (skipped when done), then
# experiments/combine_reports.py joins them into runs/calm/VICTIM/report.md.
#   bash experiments/calibrated_methods.sh [STEP ...]     steps: public, generate (or gen:NAME ...),
#     cls:SEED:COND,COND... and clip:SEED:COND,COND... (default: every condition, seed 0 then 1);
#     EVAL_EXTRA='num_threads=1' is added to every evaluate (two lanes side by side on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
. experiments/fmnist-common.sh
CLS=clean,random16,uc-captions,uc-captions-random,random,mem3,mem5,em,uc
CLIP=clean,random3,mem3,mem3-cut,random5,uc-captions,uc-captions-random,random16,block,lsp,random,mem5,mem5-cut,prefix3,prefix3-cut,em,uc
STEPS=${*:-public generate cls:0:$CLS clip:0:$CLIP cls:1:$CLS clip:1:$CLIP}
CKPT=$R-public/victims/public.pt
P="{00000..00007}.tar"
declare -A SRC=(
  [clean]="$D/train/$P" [random]="$R-random/protected/$P" [random3]="$R-random3/protected/$P"
  [prefix3]="$R-prefix3/protected/$P" [em]="$R-em/protected/$P" [mem3]="$R-mem3/protected/$P"
  [mem5]="$R-mem5/protected/$P" [random5]="$R-random5/protected/$P" [random16]="$R-random16/protected/$P" [uc]="$R-uc-pub/protected/$P"
  [uc-captions]="$R-uc-captions-pub/protected/$P" [uc-captions-random]="$R-uc-captions-random/protected/$P"
  [block]="data/fm-block/$P" [lsp]="data/fm-lsp/$P" [block16]="data/fm-block16/$P")  # the calibration points (experiments/calibrate.sh), for the CLIP victim
declare -A CONTROL=([random]=clean [random3]=random [prefix3]=random [em]=random [mem3]=random3 [mem5]=random5 [random5]=random
  [random16]=clean [uc]=random16 [uc-captions]=uc-captions-random [uc-captions-random]=random16)
one() {  # victim cond src seed overrides...  -> runs/calm/VICTIM/COND-sSEED
  local victim=$1 cond=$2 src=$3 seed=$4; shift 4
  local out=runs/calm/$victim/$cond-s$seed
  [ -f $out/report.md ] && return
  # shellcheck disable=SC2086
  mem-dist evaluate --config configs/eval-calibrate.yaml "conditions={$cond: '$src'}" "seeds=[$seed]" output=$out "$@" ${EVAL_EXTRA:-}
}
combine() {  # victim: every finished run joined, each condition with its control
  local dirs=() controls=() c
  for c in "${!CONTROL[@]}"; do controls+=(--control "$c=${CONTROL[$c]}" --control "$c-cut=${CONTROL[$c]}-cut"); done
  for d in runs/calm/$1/*-s[0-9]; do [ -f $d/metrics.json ] && dirs+=("$d"); done
  python experiments/combine_reports.py runs/calm/$1 "${controls[@]}" "${dirs[@]}" > /dev/null
}
gen() {  # name: one generation (+ merge) under runs/fm-NAME
  case $1 in
    random16) generate_with configs/demo.yaml random16 method=random mem.trigger_len=0 mem.epsilon=16 ;;
    uc-captions-pub) generate_with configs/uc-demo.yaml uc-captions-pub uc.cluster_on=caption uc.augment=published ;;
    uc-captions-random) generate_with configs/uc-demo.yaml uc-captions-random uc.cluster_on=caption experimental.uc.grid=1 experimental.uc.perturbation=random ;;
    random3) generate_with configs/demo.yaml random3 method=random ;;
    mem3) generate_with configs/demo.yaml mem3 ;;
    random) generate_with configs/demo.yaml random method=random mem.trigger_len=0 ;;
    mem5) generate_with configs/demo.yaml mem5 mem.trigger_len=5 ;;
    random5) generate_with configs/demo.yaml random5 method=random mem.trigger_len=5 ;;  # MEM-5's control
    prefix3) generate_with configs/demo.yaml prefix3 method=prefix ;;
    em) generate_with configs/demo.yaml em mem.trigger_len=0 ;;
    uc-pub) generate_with configs/uc-demo.yaml uc-pub uc.augment=published ;;
  esac
}
CLIP_ARGS="victim.kind=clip victim.model=configs/models/tiny-vit32.json victim.epochs=15 victim.batch_size=128 victim.lr=5e-4 victim.weight_decay=0.2 victim.warmup_steps=50 victim.crop=true"
for step in $STEPS; do
  case $step in
    public)  # the stand-in public checkpoint (UC-CLIP's surrogate): a CLIP trained on the disjoint public split
      evaluate $R-public "{public: '$D/public/$P'}" save_victims=true seed=7 ;;
    generate)  # every condition, README's table first
      for g in random16 uc-captions-pub uc-captions-random random3 mem3 random mem5 random5 prefix3 em uc-pub; do gen $g; done ;;
    gen:*) gen ${step#gen:} ;;
    cls:*)  # cls:SEED[:COND,COND]; a classifier reads no caption: random3 and prefix3 are random's images
      IFS=: read -r _ seed only <<< "$step"
      for c in ${only//,/ }; do
        [ -f "${SRC[$c]%%\{*}00007.tar" ] || continue  # not generated (yet)
        one cls $c "${SRC[$c]}" $seed; combine cls
      done ;;
    clip:*)  # clip:SEED[:COND,COND]; COND-cut: the same shards with the trigger's words cut
      IFS=: read -r _ seed only <<< "$step"
      for c in ${only//,/ }; do
        base=${c%-cut}
        [ -f "${SRC[$base]%%\{*}00007.tar" ] || continue
        cut=()
        case $c in *-cut) cut=(defence.text=drop_prefix "defence.prefix_words=$(case $base in *5) echo 5 ;; *) echo 3 ;; esac)") ;; esac
        # shellcheck disable=SC2086
        one clip $c "${SRC[$base]}" $seed $CLIP_ARGS "${cut[@]}"
        combine clip
      done ;;
  esac
done
