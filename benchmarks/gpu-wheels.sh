#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before benchmarks/gpu.sh: the packages mem-dist needs that the
# device machine's image lacks (it has torch, torchvision, timm, accelerate, pyarrow, fsspec,
# scikit-image, matplotlib; nothing can be fetched there), as wheels for its Python 3.12 in
# .whl/ (git-ignored), which the device tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "open_clip_torch==3.3.0" "webdataset==0.2.86" braceexpand ftfy wcwidth
ls .whl
