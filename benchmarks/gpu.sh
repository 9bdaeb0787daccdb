#!/usr/bin/env bash
# The GPU measurement, one short script (under 5 minutes on an H100/H200), run on the device
# machine from the repository root, after benchmarks/gpu-wheels.sh was run where PyPI is reachable:
#   run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=480)
# 1. CUDA correctness: the length-aware text tower, and RN50's one-query attention pool and
#    BatchNorm-folded image tower (mem_dist/pipeline/towers.py), against open_clip's in fp32 and bf16; a
#    short bf16 ViT-B-32 generation at 256 px -> merge -> verify (state shapes, |delta| <= eps,
#    exact pixels, trigger tokens), the same checks as on the CPU.
# 2. mem-dist bench generate for configs/paper.yaml (RN50, 224 px, fp32, batch 128) and
#    configs/laion.yaml (ViT-B-32, 256 px, bf16, batch 128): seconds, samples/s, peak memory,
#    FLOP/s against the device's peak, estimates for 1M / 400M samples on 1 / 8 / 64 GPUs.
# Everything it prints also goes to $OUT/gpu.log (the device tool brings $OUT back).
set -euo pipefail
TMP=$(mktemp -d)  # scratch: the wheels' site, demo data, runs
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $TMP/site .whl/*.whl
  export PYTHONPATH=$TMP/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore NO_ALBUMENTATIONS_UPDATE=1
DEVICE=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"
D=$TMP/data
python3 -m mem_dist.cli demo-data $D --train 512 --val 8 --size 256 --per-shard 256 >/dev/null

echo "== 1. CUDA correctness"
python3 - "$DEVICE" <<'PY'
import sys, torch, open_clip
from mem_dist.pipeline import surrogate, towers
dev = sys.argv[1]
for name in ("ViT-B-32", "RN50"):
    torch.manual_seed(0)
    fast, tok, _ = surrogate.create_surrogate(name, device=dev)
    ref = open_clip.create_model(name, device=dev)
    ref.load_state_dict(fast.state_dict())
    ids = tok(["a photo of a cat", "a red circle in the top left corner on a striped background " * 3, ""]).to(dev)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            a, b = fast.encode_text(ids).float(), ref.encode_text(ids).float()
        print(f"length-aware text tower {name} {dtype}: max |diff| {(a - b).abs().max().item():.2e} "
              f"(features up to {b.abs().max().item():.1f})")
    if name == "RN50":
        fast.eval(), ref.eval()
        folded = towers.fold_batchnorm(fast.visual)
        x = torch.rand(4, 3, 224, 224, device=dev)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                a, f, b = fast.encode_image(x).float(), folded(x).float(), ref.encode_image(x).float()
            print(f"image tower RN50 {dtype}: one-query pool max |diff| {(a - b).abs().max().item():.2e}, "
                  f"folded BatchNorm {(f - b).abs().max().item():.2e} (features up to {b.abs().max().item():.1f})")
PY
R=$TMP/run
rm -rf $R
python3 mem_dist/generate.py --config configs/laion.yaml "data.shards=$D/train/{00000..00001}.tar" output=$R device=$DEVICE \
  data.on_missing=error mem.rounds=2 mem.surrogate_steps=5 mem.pgd_steps=2 mem.hotflip_rounds=1 progress=false
python3 -m mem_dist.publishing.merge $R progress=false
python3 -m mem_dist.cli verify $R
python3 - $R <<'PY'
import sys, numpy as np
from mem_dist.pipeline import state
st = state.read_state(state.state_url(sys.argv[1], 2, "00000"))
print("state round 2, shard 00000:", len(st.keys), "rows; delta", st.delta.shape, st.delta.dtype,
      "max |delta|", int(np.abs(st.delta.astype(int)).max()), "; trigger", st.trigger_ids.shape, "; loss mean", float(st.loss.mean()))
assert st.delta.shape == (256, 256, 256, 3) and np.abs(st.delta.astype(int)).max() <= 8 and st.trigger_ids.shape == (256, 3)
PY
cp $R/metrics.jsonl "$OUT/laion-short-metrics.jsonl"

echo "== 2. bench generate"
python3 -m mem_dist.tools.bench generate --config configs/paper.yaml "data.shards=$D/train/{00000..00001}.tar" device=$DEVICE --steps 5
python3 -m mem_dist.tools.bench generate --config configs/laion.yaml "data.shards=$D/train/{00000..00001}.tar" device=$DEVICE \
  data.on_missing=error output=$TMP/bench --steps 5
