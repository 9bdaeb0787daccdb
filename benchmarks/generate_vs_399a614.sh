#!/usr/bin/env bash
# Generation speed side by side: this checkout against mem-dist at commit 399a614 (before
# the speed work), same data, same threads, one after the other, nothing else running.
# The work: configs/demo.yaml (tiny RN surrogate at 32 px, 6 rounds x 40 surrogate steps,
# 6 PGD steps, HotFlip in rounds 1-3) on 4,000 demo pairs at 32 px.
#   bash benchmarks/generate_vs_399a614.sh            (about 10 minutes on 2 cores)
# Prints wall time and peak RSS of each, and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-runs/worktree-399a614}  # a git worktree of the old commit (runs/ is ignored)
[ -d "$BASE" ] || git worktree add -f "$BASE" 399a614 >/dev/null
DATA=${DATA:-data/bench4k}
[ -f "$DATA/train/00007.tar" ] || mem-dist demo-data "$DATA" --train 4000 --val 10 --size 32 --per-shard 500 >/dev/null
TIMES=$(mktemp)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
run() {  # name script -> "seconds peak_rss_mb"
  local out=runs/bench-speed-$1
  rm -rf "$out"
  /usr/bin/time -f "%e %M" -o "$TIMES" python "$2" --config configs/demo.yaml \
    "data.shards=$PWD/$DATA/train/{00000..00007}.tar" output=$out progress=false >/dev/null 2>&1
  awk '{printf "%s %.0f", $1, $2 / 1024}' "$TIMES"
}
read -r base_s base_mb <<<"$(run 399a614 "$BASE/mem_dist/generate.py")"
read -r main_s main_mb <<<"$(run main mem_dist/generate.py)"
printf "%-28s %10s %14s\n" "mem-dist" "wall s" "peak RSS MB"
printf "%-28s %10s %14s\n" "399a614" "$base_s" "$base_mb"
printf "%-28s %10s %14s\n" "$(git rev-parse --short HEAD) (+ working tree)" "$main_s" "$main_mb"
python -c "print(f'speed-up: {$base_s / $main_s:.2f}x')"
