#!/usr/bin/env bash
# Caption-keyed codes (method: keyed) judged by the calibrated victims (docs/efficacy.md,
# "Caption-keyed codes"): Fashion-MNIST (4,000 train, 1,000 val, 1,000 select at 32 px),
# generated and merged by the pipeline (runs/fm-keyed-*), the text tower of the stand-in public
# checkpoint (runs/fm-public, experiments/calibrated_methods.sh's `public` step) as the encoder.
#   bash experiments/keyed.sh [STEP ...]    steps:
#     gen:NAME              generate + merge runs/fm-NAME (keyed-g8e16, keyed-g2e16, keyed-g4e16m: mirrored,
#                           keyed-g4e16l: one sign for the three channels, keyed-g2e16t: keyed.generator=trained)
#     clip:SEED:COND,...    the CLIP from scratch (tiny-vit32), into runs/calm/clip/COND-sSEED
#     cls:SEED:COND,...     the CIFAR-style ResNet-18, into runs/calm/cls/COND-sSEED
#     vgg:SEED:COND,...     the second CIFAR-style family (cifar_vgg11, width 16), into runs/calm/vgg/COND-sSEED
#     ft:SEED:COND,...      a CLIP fine-tuning an independent checkpoint (tiny-vit32, its own seed,
#                           trained on the public split: runs/calm/public-vit, made first), into
#                           runs/calm/ft/COND-sSEED
#     ftd:SEED:COND,...     the same from a checkpoint of ANOTHER domain: tiny-vit32 trained on the demo scenes
#                           (colour shapes, descriptive captions; data/demo32-public, seed 17: runs/calm/demo-vit),
#                           into runs/calm/ftd/COND-sSEED
#   COND: a generated NAME, clean, random-gGRIDeEPS[m] (a random code per sample: the same budget and
#   grid, keyed to nothing; written by experiments/keyed_probe.py --control random), or
#   NAME+ATTACK with ATTACK one of removal (ridge from the attacker's own text encoder: the
#   random-init tiny RN, their own), removal-pub (the same with the public checkpoint's), recaption,
#   or an image defence: jpeg, grayscale, bits, mixup, rrc (random resized crop 0.35-1).
set -euo pipefail
cd "$(dirname "$0")/.."
. experiments/fmnist-common.sh
P="{00000..00007}.tar"
PUB=runs/fm-public/victims/public.pt
KEY=6b65796564206d656d2d646973742065787065726d656e7473206b6579202031  # experiments only: a published key protects nothing
KEY2=6b65796564206d656d2d646973742065787065726d656e7473206b6579202032
src() {
  case $1 in
    clean) echo "$D/train/$P" ;;
    random-g*) local g=${1#random-g} m=(); [[ $g == *m ]] && { m=(--mirror); g=${g%m}; }
               [ -f data/fm-$1/00007.tar ] || python experiments/keyed_probe.py "$D/train/$P" data/fm-$1 \
                 --control random --grid ${g%e*} --epsilon ${g#*e} "${m[@]}" --model configs/models/tiny-rn32.json >&2
               echo "data/fm-$1/$P" ;;
    *) echo "$R-$1/protected/$P" ;;
  esac
}
gen() {  # keyed-gGRIDeEPS, + m: mirrored (experimental.keyed.mirror=true), + l: one sign for 3 channels (experimental.keyed.luminance=true),
        # + t: the trained generator (keyed.generator=trained), + ts: trained against the public checkpoint (train_objective=surrogate);
        # -k2 at the end: a second key (KEY2), to see how much the key's draw moves the result
  local g=${1#keyed-g} m=false l=false t=projection o=minmin k=$KEY
  [[ $g == *-k2 ]] && { k=$KEY2; g=${g%-k2}; }
  [[ $g == *ts ]] && { t=trained; o=surrogate; g=${g%ts}; }; [[ $g == *t ]] && { t=trained; g=${g%t}; }
  [[ $g == *l ]] && { l=true; g=${g%l}; }; [[ $g == *m ]] && { m=true; g=${g%m}; }
  local e=${g#*e}; g=${g%e*}
  generate_with configs/keyed.yaml "$1" "keyed.grid=$g" "keyed.epsilon=$e" "experimental.keyed.mirror=$m" "experimental.keyed.luminance=$l" \
    "keyed.generator=$t" "keyed.train_objective=$o" "keyed.key=$k" "surrogate.pretrained=$PUB"
}
CLIP_ARGS="victim.kind=clip victim.model=configs/models/tiny-vit32.json victim.epochs=15 victim.batch_size=128 victim.lr=5e-4 victim.weight_decay=0.2 victim.warmup_steps=50 victim.crop=true"
one() {  # victim cond seed overrides...
  local victim=$1 cond=$2 seed=$3; shift 3
  local base=${cond%+*} attack=() out=runs/calm/$victim/$cond-s$seed
  case $cond in
    *+removal) attack=(defence.removal=ridge defence.removal_model=configs/models/tiny-rn32.json) ;;
    *+removal-pub) attack=(defence.removal=ridge defence.removal_model=configs/models/tiny-rn32.json "defence.removal_pretrained=$PUB") ;;
    *+recaption) attack=(defence.recaption=templates) ;;
    *+jpeg|*+grayscale|*+bits|*+mixup) attack=(defence.image=${cond##*+}) ;;  # JPEG 75, 3 bits: the defaults
    *+rrc) attack=("victim.crop_scale=[0.35, 1.0]") ;;  # a harder random resized crop than open_clip's 0.9-1
  esac
  [ -f $out/report.md ] && return
  # shellcheck disable=SC2086
  mem-dist evaluate --config configs/eval-calibrate.yaml "conditions={$cond: '$(src $base)'}" "seeds=[$seed]" output=$out \
    "$@" "${attack[@]}" ${EVAL_EXTRA:-}
}
VIT_PUB=runs/calm/public-vit/victims/public.pt  # independent of the text tower: another architecture, seed and run
FT_ARGS="victim.pretrained=$VIT_PUB victim.lr=1e-4 victim.epochs=8 victim.warmup_steps=20"
VIT_DEMO=runs/calm/demo-vit/victims/public.pt  # another domain: the demo scenes
for step in "$@"; do
  case $step in
    gen:*) gen ${step#gen:} ;;
    clip:*|cls:*|vgg:*|ft:*|ftd:*)
      IFS=: read -r victim seed only <<< "$step"
      for c in ${only//,/ }; do
        # shellcheck disable=SC2086
        case $victim in
          clip) one clip $c $seed $CLIP_ARGS ;;
          ft) [ -f $VIT_PUB ] || mem-dist evaluate --config configs/eval-calibrate.yaml "conditions={public: '$D/public/$P'}" \
                "seeds=[17]" output=runs/calm/public-vit save_victims=true $CLIP_ARGS ${EVAL_EXTRA:-}
              one ft $c $seed $CLIP_ARGS $FT_ARGS ;;
          ftd) [ -f data/demo32-public/train/00007.tar ] || mem-dist demo-data data/demo32-public --train 4000 --val 500 --size 32 --seed 2
               [ -f $VIT_DEMO ] || mem-dist evaluate --config configs/eval-calibrate.yaml "conditions={public: 'data/demo32-public/train/$P'}" \
                 "seeds=[17]" output=runs/calm/demo-vit save_victims=true $CLIP_ARGS ${EVAL_EXTRA:-}
               one ftd $c $seed $CLIP_ARGS $FT_ARGS "victim.pretrained=$VIT_DEMO" ;;
          vgg) one vgg $c $seed classifier.model=cifar_vgg11 ;;
          *) one cls $c $seed ;;
        esac
      done ;;
  esac
done
