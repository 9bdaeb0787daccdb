#!/usr/bin/env bash
# Unlearnable Clusters on real photos: the rows of docs/efficacy.md's UC tables. Fashion-MNIST
# (after experiments/fashion_mnist.sh data public generate: data/fmnist, the stand-in public CLIP
# checkpoint runs/fm-public, the MEM shards for the side-by-side rows), 4,000 train / 1,000 val at 32 px;
# about 6.5 h on 2 CPU cores (augment 75 min, published 45, levers 30, captions 25, captions-more 30, captions-eps32 12,
# smooth 15, noisy 20, em 30, tint 35, positive 10), one job at a time (the steps skip runs already finished).
#   bash experiments/uc.sh [STEP ...]     steps: surrogates generate classifier families labels defences clip more classwise augment published levers captions captions-more captions-eps32 smooth noisy em tint positive
set -euo pipefail
cd "$(dirname "$0")/.."
. experiments/fmnist-common.sh
P="{00000..00007}.tar"
STEPS=${*:-surrogates generate classifier families labels defences clip more classwise augment published levers captions captions-more captions-eps32 smooth noisy em tint positive}
gen() { generate_with configs/uc-demo.yaml "$@"; }  # name overrides...  (UC: configs/uc-demo.yaml's settings)
UCCLIP="$R-uc/protected/$P"
random16() { generate_with configs/demo.yaml random16 method=random mem.trigger_len=0 mem.epsilon=16; }  # control: random noise per image at eps 16
rewrite() {  # script src dst: a copy of the UC run src rewritten by experiments/SCRIPT into dst, merged (skipped when done)
  [ -f "$3/manifest/00007_stats.json" ] || { python experiments/$1 $2 $3 && mem-dist merge $3 progress=false 'merge.keep_fields=[label, class]'; }
}
oracle() { rewrite uc_oracle.py $R-$1 $R-$1-oracle; }  # name: runs/fm-NAME's perturbations handed out by true class
for step in $STEPS; do
  case $step in
    surrogates)  # UC (not CLIP): a ResNet-18 classifier trained on the public split's labels
      evaluate $R-public-cls "{public: '$D/public/$P'}" victim.kind=classifier save_victims=true seed=7 ;;
    generate)
      gen uc                                                   # UC-CLIP, the authors' generator, eps 16
      gen uc-direct experimental.uc.perturbation=direct                     # the perturbations optimised directly
      gen uc-eps8 uc.epsilon=8
      gen uc-cluster experimental.uc.train_on=cluster                       # each image pushed only by its own cluster's
      gen uc-random experimental.uc.perturbation=random                     # control: random noise per cluster, same clusters
      gen uc-resnet surrogate.model=torchvision:resnet18 surrogate.pretrained=$R-public-cls/victims/public.pt
      random16 ;;
    classifier)  # ResNet-18 from scratch on the json labels
      evaluate $R-uc-classifier "{clean: '$SHARDS', random16: '$R-random16/protected/$P', uc-random: '$R-uc-random/protected/$P',
        uc-clip: '$UCCLIP', uc-clip-direct: '$R-uc-direct/protected/$P', uc-clip-eps8: '$R-uc-eps8/protected/$P',
        uc-clip-cluster: '$R-uc-cluster/protected/$P', uc-resnet: '$R-uc-resnet/protected/$P'}" victim.kind=classifier ;;
    families)  # a second family of classifier (vgg11_bn, the papers' usual one, carries a 100M-parameter head and
      # takes 65 s an epoch here; MobileNetV2 is the light, different family that fits this machine)
      evaluate $R-uc-mobilenet "{clean: '$SHARDS', uc-clip: '$UCCLIP', uc-resnet: '$R-uc-resnet/protected/$P'}" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05 ;;
    labels)  # the attacker's own labels: k-means on the training pixels
      evaluate $R-uc-kmeans "{clean: '$SHARDS', uc-clip: '$UCCLIP', uc-resnet: '$R-uc-resnet/protected/$P'}" victim.kind=classifier classifier.labels=kmeans ;;
    defences)
      for d in grayscale jpeg cutout mixup gaussian bits; do
        evaluate $R-uc-def-$d "{clean: '$SHARDS', uc-clip: '$UCCLIP', uc-resnet: '$R-uc-resnet/protected/$P'}" victim.kind=classifier defence.image=$d
      done ;;
    clip)  # CLIP victims: from scratch (zero-shot, retrieval) and fine-tuning the public checkpoint
      evaluate $R-uc-clip-scratch "{clean: '$SHARDS', uc-clip: '$UCCLIP', uc-resnet: '$R-uc-resnet/protected/$P'}"
      evaluate $R-uc-clip-ft "{clean: '$SHARDS', uc-clip: '$UCCLIP', uc-resnet: '$R-uc-resnet/protected/$P'}" victim.pretrained=$R-public/victims/public.pt victim.lr=1e-4 ;;
    more)  # attempts after the first table: UC-CLIP's perturbations given by true class (the oracle: would
      # better clusters help?), more clusters, a larger budget, the authors' 50 epochs (19 min)
      oracle uc
      gen uc-p40 uc.clusters=40
      gen uc-eps32 uc.epsilon=32
      gen uc-e50 uc.epochs=50
      evaluate $R-uc-more "{uc-clip-oracle: '$R-uc-oracle/protected/$P', uc-clip-p40: '$R-uc-p40/protected/$P',
        uc-clip-eps32: '$R-uc-eps32/protected/$P', uc-clip-e50: '$R-uc-e50/protected/$P'}" victim.kind=classifier ;;
    classwise)  # the oracle's control: UC's random noise per cluster handed out by true class (a random
      # class-wise code); and the class-wise codes against a victim without random crop and flip
      gen uc-random experimental.uc.perturbation=random
      random16
      noaug=(victim.kind=classifier classifier.crop_padding=0 classifier.flip=false)
      for name in uc uc-random uc-eps32; do oracle $name; done
      evaluate $R-uc-classwise "{uc-random-oracle: '$R-uc-random-oracle/protected/$P'}" victim.kind=classifier
      evaluate $R-uc-noaug "{clean: '$SHARDS', random16: '$R-random16/protected/$P', uc-random-oracle: '$R-uc-random-oracle/protected/$P',
        uc-clip: '$UCCLIP', uc-clip-oracle: '$R-uc-oracle/protected/$P'}" "${noaug[@]}"
      evaluate $R-uc-classwise-eps32 "{uc-clip-eps32-oracle: '$R-uc-eps32-oracle/protected/$P'}" victim.kind=classifier
      evaluate $R-uc-noaug-eps32 "{uc-clip-eps32-oracle: '$R-uc-eps32-oracle/protected/$P'}" "${noaug[@]}" ;;
    augment)  # UC-CLIP optimised through the victim's random crop and flip (uc.augment): the authors' loader
      # (images cropped, the perturbation added after) and the published images cropped; by cluster and by true class
      for a in images published; do gen uc-aug-$a uc.augment=$a; oracle uc-aug-$a; done
      evaluate $R-uc-augment "{uc-clip-images: '$R-uc-aug-images/protected/$P', uc-clip-published: '$R-uc-aug-published/protected/$P',
        uc-clip-images-oracle: '$R-uc-aug-images-oracle/protected/$P', uc-clip-published-oracle: '$R-uc-aug-published-oracle/protected/$P'}" victim.kind=classifier
      # the published variant (the one that moved the victim): twice the budget, the authors' 50 epochs (28 min),
      # a second victim seed, a second family
      gen uc-aug-published-eps32 uc.augment=published uc.epsilon=32
      gen uc-aug-published-e50 uc.augment=published uc.epochs=50
      evaluate $R-uc-augment-eps32 "{uc-clip-published-eps32: '$R-uc-aug-published-eps32/protected/$P'}" victim.kind=classifier
      evaluate $R-uc-augment-e50 "{uc-clip-published-e50: '$R-uc-aug-published-e50/protected/$P'}" victim.kind=classifier
      evaluate $R-uc-augment-seed1 "{clean: '$SHARDS', uc-clip-published: '$R-uc-aug-published/protected/$P'}" victim.kind=classifier seed=1
      evaluate $R-uc-augment-mobilenet "{uc-clip-published: '$R-uc-aug-published/protected/$P'}" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05
      evaluate $R-uc-augment-mobilenet-seed1 "{clean: '$SHARDS', uc-clip-published: '$R-uc-aug-published/protected/$P'}" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05 seed=1
      for d in grayscale jpeg cutout mixup gaussian bits; do  # beside the defences step's clean rows
        evaluate $R-uc-augment-def-$d "{uc-clip-published: '$R-uc-aug-published/protected/$P'}" victim.kind=classifier defence.image=$d
      done ;;
    published)  # the rest of the report's columns for uc.augment=published: the attacker's own k-means labels,
      # the CLIP victims, a victim that does not augment, one whose crop is not the one optimised through
      # (padding 8), a third victim seed, 30 epochs, two CLIP seeds (about 45 min)
      PUB="{uc-clip-published: '$R-uc-aug-published/protected/$P'}"
      evaluate $R-uc-published-kmeans "$PUB" victim.kind=classifier classifier.labels=kmeans
      evaluate $R-uc-published-noaug "$PUB" victim.kind=classifier classifier.crop_padding=0 classifier.flip=false
      evaluate $R-uc-published-pad8 "{clean: '$SHARDS', uc-clip-published: '$R-uc-aug-published/protected/$P'}" victim.kind=classifier classifier.crop_padding=8
      evaluate $R-uc-augment-seed2 "{clean: '$SHARDS', uc-clip-published: '$R-uc-aug-published/protected/$P'}" victim.kind=classifier seed=2
      evaluate $R-uc-published-e30 "{clean: '$SHARDS', uc-clip-published: '$R-uc-aug-published/protected/$P'}" victim.kind=classifier victim.epochs=30
      for seed in 0 1; do  # the CLIP victim from scratch, beside clean and the unaugmented UC-CLIP, two seeds
        evaluate $R-uc-published-clip-scratch-seed$seed "{clean: '$SHARDS', uc-clip: '$UCCLIP', uc-clip-published: '$R-uc-aug-published/protected/$P'}" seed=$seed
      done
      evaluate $R-uc-published-clip-ft "$PUB" victim.pretrained=$R-public/victims/public.pt victim.lr=1e-4 ;;
    levers)  # uc.augment=published with the perturbations optimised directly, and with the ResNet-18 surrogate
      # (after the surrogates step), against ResNet-18 and MobileNetV2 (about 30 min)
      gen uc-aug-published-direct uc.augment=published experimental.uc.perturbation=direct
      gen uc-resnet-aug-published uc.augment=published surrogate.model=torchvision:resnet18 surrogate.pretrained=$R-public-cls/victims/public.pt
      LEVERS="{uc-clip-published-direct: '$R-uc-aug-published-direct/protected/$P', uc-resnet-published: '$R-uc-resnet-aug-published/protected/$P'}"
      evaluate $R-uc-levers "$LEVERS" victim.kind=classifier
      evaluate $R-uc-levers-mobilenet "$LEVERS" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05 ;;
    captions)  # the clusters from the captions (uc.cluster_on=caption: the CLIP surrogate's text tower), through
      # the crop and flip; against ResNet-18 (two seeds), MobileNetV2 and the CLIP victim from scratch (about 25 min)
      gen uc-captions-published uc.cluster_on=caption uc.augment=published
      CAP="{uc-clip-captions-published: '$R-uc-captions-published/protected/$P'}"
      evaluate $R-uc-captions "$CAP" victim.kind=classifier
      evaluate $R-uc-captions-seed1 "$CAP" victim.kind=classifier seed=1
      evaluate $R-uc-captions-mobilenet "$CAP" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05
      evaluate $R-uc-captions-kmeans "$CAP" victim.kind=classifier classifier.labels=kmeans
      evaluate $R-uc-captions-clip-scratch "$CAP" ;;
    captions-more)  # the caption clusters: twice the budget, a victim without crop and flip, 30 epochs, the defences (about 30 min)
      gen uc-captions-published-eps32 uc.cluster_on=caption uc.augment=published uc.epsilon=32
      CAP="{uc-clip-captions-published: '$R-uc-captions-published/protected/$P'}"
      evaluate $R-uc-captions-eps32 "{uc-clip-captions-published-eps32: '$R-uc-captions-published-eps32/protected/$P'}" victim.kind=classifier
      evaluate $R-uc-captions-noaug "$CAP" victim.kind=classifier classifier.crop_padding=0 classifier.flip=false
      evaluate $R-uc-captions-e30 "$CAP" victim.kind=classifier victim.epochs=30
      for d in grayscale jpeg cutout mixup gaussian bits; do
        evaluate $R-uc-captions-def-$d "$CAP" victim.kind=classifier defence.image=$d
      done ;;
    captions-eps32)  # the caption clusters at twice the budget: a second seed, 30 epochs (where clean reaches 0.83),
      # MobileNetV2, the CLIP victim from scratch (about 12 min, after captions-more)
      CAP32="{uc-clip-captions-published-eps32: '$R-uc-captions-published-eps32/protected/$P'}"
      evaluate $R-uc-captions-eps32-seed1 "$CAP32" victim.kind=classifier seed=1
      evaluate $R-uc-captions-eps32-e30 "$CAP32" victim.kind=classifier victim.epochs=30
      evaluate $R-uc-captions-eps32-mobilenet "$CAP32" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05
      evaluate $R-uc-captions-eps32-clip-scratch "$CAP32" ;;
    smooth)  # smooth codes on the caption clusters through the crop and flip: each perturbation an 8x8 grid
      # upsampled to the canvas (experimental.uc.grid=8), against ResNet-18, two seeds (about 15 min)
      gen uc-captions-published-grid8 uc.cluster_on=caption uc.augment=published experimental.uc.grid=8
      GRID="{uc-clip-captions-published-grid8: '$R-uc-captions-published-grid8/protected/$P'}"
      evaluate $R-uc-captions-grid8 "$GRID" victim.kind=classifier
      evaluate $R-uc-captions-grid8-seed1 "$GRID" victim.kind=classifier seed=1 ;;
    noisy)  # caption clusters when a fifth (a tenth) of the captions name another class than the label, as free
      # text agrees only in part with an attacker's classes (a fifth: the clusters agree with the labels about as
      # the image clusters do; experiments/cluster_agreement.py), against ResNet-18 (about 20 min)
      for pct in 20 10; do
        [ -f data/fmnist-noisy$pct/train/00007_stats.json ] || python experiments/caption_noise.py $D/train data/fmnist-noisy$pct/train 0.$pct
        gen uc-captions-published-noisy$pct uc.cluster_on=caption uc.augment=published "data.shards=data/fmnist-noisy$pct/train/$P"
        python experiments/cluster_agreement.py $R-uc-captions-published-noisy$pct data/fmnist-noisy$pct/train
        evaluate $R-uc-captions-noisy$pct "{uc-clip-captions-noisy$pct: '$R-uc-captions-published-noisy$pct/protected/$P'}" victim.kind=classifier
      done ;;
    em)  # error-minimising noise per caption cluster (min-min with a ResNet-18 on the cluster ids, through the crop and
      # flip) in place of UC's pull, the clusters unchanged, at eps 16 and 32; against ResNet-18 (about 30 min, after
      # captions and captions-more)
      for e in "" -eps32; do
        rewrite em_clusters.py $R-uc-captions-published$e $R-uc-captions-em$e
        evaluate $R-uc-captions-em$e-cls "{uc-clip-captions-em$e: '$R-uc-captions-em$e/protected/$P'}" victim.kind=classifier
      done
      evaluate $R-uc-captions-em-cls-seed1 "{uc-clip-captions-em: '$R-uc-captions-em/protected/$P'}" victim.kind=classifier seed=1 ;;
    tint)  # a constant colour per cluster (experimental.uc.grid=1: three values per cluster, unchanged by crop and flip; the
      # photos are grey, so colour is a channel their content does not use): optimised (direct) on the caption
      # clusters, and a random one (the control, nothing optimised) on the caption and on the image clusters;
      # against ResNet-18 (two seeds), MobileNetV2, and under grayscale; then the same at eps 32 (about 35 min)
      gen uc-captions-published-tint uc.cluster_on=caption uc.augment=published experimental.uc.grid=1 experimental.uc.perturbation=direct
      gen uc-captions-tint-random uc.cluster_on=caption experimental.uc.grid=1 experimental.uc.perturbation=random
      gen uc-tint-random experimental.uc.grid=1 experimental.uc.perturbation=random
      TINT="uc-clip-captions-tint: '$R-uc-captions-published-tint/protected/$P', uc-captions-tint-random: '$R-uc-captions-tint-random/protected/$P'"
      evaluate $R-uc-tint "{clean: '$SHARDS', $TINT}" victim.kind=classifier
      evaluate $R-uc-tint-seed1 "{$TINT}" victim.kind=classifier seed=1
      evaluate $R-uc-tint-mobilenet "{$TINT}" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05
      evaluate $R-uc-tint-grayscale "{$TINT}" victim.kind=classifier defence.image=grayscale
      evaluate $R-uc-tint-image-clusters "{uc-tint-random: '$R-uc-tint-random/protected/$P'}" victim.kind=classifier
      gen uc-captions-tint-random-eps32 uc.cluster_on=caption experimental.uc.grid=1 experimental.uc.perturbation=random uc.epsilon=32
      gen uc-captions-published-tint-eps32 uc.cluster_on=caption uc.augment=published experimental.uc.grid=1 experimental.uc.perturbation=direct uc.epsilon=32
      TINT32="uc-clip-captions-tint-eps32: '$R-uc-captions-published-tint-eps32/protected/$P', uc-captions-tint-random-eps32: '$R-uc-captions-tint-random-eps32/protected/$P'"
      evaluate $R-uc-tint-eps32 "{$TINT32}" victim.kind=classifier
      evaluate $R-uc-tint-eps32-seed1 "{$TINT32}" victim.kind=classifier seed=1
      evaluate $R-uc-tint-eps32-mobilenet "{$TINT32}" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05 ;;
    positive)  # tint's random colour with every channel made non-negative (|delta|): a negative channel clips to 0
      # on the black background, so only the garment carried it; now every pixel does (needs tint first)
      rewrite uc_positive.py $R-uc-captions-tint-random $R-uc-captions-tint-positive
      POS="uc-captions-tint-positive: '$R-uc-captions-tint-positive/protected/$P'"
      evaluate $R-uc-tint-positive "{$POS}" victim.kind=classifier
      evaluate $R-uc-tint-positive-seed1 "{$POS}" victim.kind=classifier seed=1
      evaluate $R-uc-tint-positive-mobilenet "{$POS}" victim.kind=classifier classifier.model=mobilenet_v2 classifier.lr=0.05 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
