#!/usr/bin/env bash
# The real-photo efficacy table of docs/efficacy.md: Fashion-MNIST (Debian's dataset-fashion-mnist),
# 4,000 train / 1,000 val pairs at 32 px, the demo's generation settings (configs/demo.yaml).
#   (a) a CLIP victim from scratch (its own init), zero-shot top-1 and retrieval
#   (b) a CLIP victim fine-tuning a stand-in public checkpoint (trained here on the disjoint public
#       split), with MEM's surrogate started from that checkpoint (lr 1e-5)
#   (c) a ResNet-18 classifier from scratch on the json labels
# each condition also with the trigger cut (defence.text=drop_prefix, as many words as the trigger;
# 3 for conditions without one). About 80 minutes on 2 CPU cores; one job at a time.
#   bash experiments/fashion_mnist.sh [STEP ...]     steps: data public generate scratch finetune classifier
set -euo pipefail
cd "$(dirname "$0")/.."
. experiments/fmnist-common.sh
STEPS=${*:-data public generate scratch finetune classifier}
gen() { generate_with configs/demo.yaml "$@"; }  # name overrides...  (MEM: the demo's settings)
conditions() {  # suffix (""|-ft) -> the conditions mapping of the seven rows
  local ft=$1
  echo "{clean: '$SHARDS', random: '$R-random/protected/{00000..00007}.tar', random3: '$R-random3/protected/{00000..00007}.tar',"\
       "prefix3: '$R-prefix3/protected/{00000..00007}.tar', em: '$R-em$ft/protected/{00000..00007}.tar',"\
       "mem3: '$R-mem3$ft/protected/{00000..00007}.tar', mem5: '$R-mem5$ft/protected/{00000..00007}.tar'}"
}
CKPT=$R-public/victims/public.pt
for step in $STEPS; do
  case $step in
    data) [ -f $D/val/00001.tar ] || mem-dist import fashion-mnist $D --train 4000 --public 4000 --val 1000 --size 32 ;;
    public)  # the stand-in public checkpoint: a CLIP trained from scratch on the public split (another seed)
      evaluate $R-public "{public: '$D/public/{00000..00007}.tar'}" save_victims=true seed=7 ;;
    generate)
      gen random method=random mem.trigger_len=0
      gen random3 method=random
      gen prefix3 method=prefix
      gen em mem.trigger_len=0
      gen mem3
      gen mem5 mem.trigger_len=5
      for k in em:0 mem3:3 mem5:5; do
        gen ${k%:*}-ft mem.trigger_len=${k#*:} surrogate.pretrained=$CKPT mem.lr=1e-5
      done ;;
    scratch)
      evaluate $R-eval-scratch "$(conditions '')"
      evaluate $R-eval-scratch-cut "$(conditions '')" defence.text=drop_prefix defence.prefix_words=3
      evaluate $R-eval-scratch-cut5 "{mem5: '$R-mem5/protected/{00000..00007}.tar'}" defence.text=drop_prefix defence.prefix_words=5 ;;
    finetune)
      ft=(victim.pretrained=$CKPT victim.lr=1e-4)
      evaluate $R-eval-ft "$(conditions -ft)" "${ft[@]}"
      evaluate $R-eval-ft-cut "$(conditions -ft)" defence.text=drop_prefix defence.prefix_words=3 "${ft[@]}"
      evaluate $R-eval-ft-cut5 "{mem5: '$R-mem5-ft/protected/{00000..00007}.tar'}" defence.text=drop_prefix defence.prefix_words=5 "${ft[@]}" ;;
    classifier)  # random3 and prefix3 carry the same images as random: one row
      evaluate $R-eval-classifier "{clean: '$SHARDS', random: '$R-random/protected/{00000..00007}.tar', em: '$R-em/protected/{00000..00007}.tar', mem3: '$R-mem3/protected/{00000..00007}.tar', mem5: '$R-mem5/protected/{00000..00007}.tar'}" victim.kind=classifier ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
