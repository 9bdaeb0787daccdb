# Sourced by experiments/fashion_mnist.sh and experiments/uc.sh (from the repository root): the
# Fashion-MNIST paths, and generate + merge / evaluate steps that skip runs already finished.
export PYTHONWARNINGS=ignore
D=data/fmnist
R=runs/fm
SHARDS="$D/train/{00000..00007}.tar"
generate_with() {  # config name overrides...  -> runs/fm-NAME, generated on the train split and merged
  local config=$1 name=$2; shift 2
  [ -f "$R-$name/manifest/00007_stats.json" ] && return
  python mem_dist/generate.py --config "$config" "data.shards=$SHARDS" output=$R-$name progress=false "$@"
  mem-dist merge $R-$name progress=false 'merge.keep_fields=[label, class]'  # the classifier victim reads the labels
}
evaluate() {  # output conditions overrides...
  local out=$1 conds=$2; shift 2
  [ -f "$out/report.md" ] && return
  mem-dist evaluate --config configs/eval-fmnist.yaml output=$out "conditions=$conds" "$@"
}
