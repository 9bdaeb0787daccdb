"""Experiment, not a package option: adversarial poisons from a surrogate trained on clean data.

The error-maximising family of availability attacks (Fowl et al. 2021, "Adversarial examples
make strong poisons"; the cyclic cluster shift of Unlearnable Clusters), tried against
from-scratch and fine-tuned victims because it is the family known to transfer to victims
that share nothing with the surrogate. delta_i (|delta| <= eps, integer 1/255 steps, on the
canvas) moves image i's embedding toward a *target* text embedding: the centroid of the next
cluster of captions (k-means on the surrogate's text embeddings, cluster c -> c + 1), or
another sample's caption (--mode perm), or away from its own caption (--mode untargeted).
The caption is left as it is (no trigger). Writes PNG shards with the source keys and
captions, for `mem-dist evaluate`. Numbers: docs/efficacy.md, "Adversarial poisons".

    python experiments/adversarial_poison.py --shards "data/demo/train/{00000..00003}.tar" \
        --pretrained runs/clean-col/victims/clean.pt --out runs/adv-cluster/protected

--pretrained is a state dict of --model (a victim saved by `mem-dist evaluate ...
save_victims=true`). Evaluate with a victim seed other than the one that trained it.
"""
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from mem_dist.pipeline import augment, surrogate
from mem_dist.methods.pgd import minimize_delta

from mem_dist.evaluation.baselines import write_perturbed
from shards import read_shards  # experiments/shards.py, beside this script

p = argparse.ArgumentParser()
p.add_argument("--shards", required=True)
p.add_argument("--model", default="configs/models/tiny-rn32.json")
p.add_argument("--pretrained", required=True)
p.add_argument("--out", required=True)
p.add_argument("--size", type=int, default=32, help="canvas side (data.image_size)")
p.add_argument("--eps", type=float, default=8)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--mode", default="cluster", choices=["cluster", "untargeted", "perm"])
p.add_argument("--k", type=int, default=10)
p.add_argument("--augment", action="store_true")
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
torch.manual_seed(a.seed)
model, tok, spec = surrogate.create_surrogate(a.model, a.pretrained)
model.eval()
for q in model.parameters():
    q.requires_grad_(False)
shards = read_shards(a.shards, a.size)
caps = [c for s in shards for c in s.captions]
canv = np.concatenate([s.canvases for s in shards])
with torch.no_grad():
    T = F.normalize(torch.cat([model.encode_text(tok(caps[i:i + 256])) for i in range(0, len(caps), 256)]), dim=-1)
N = len(caps)
rng = np.random.default_rng(a.seed)
if a.mode == "cluster":  # k-means on the text embeddings, target = next cluster's centroid
    C = T[torch.from_numpy(rng.choice(N, a.k, replace=False))].clone()
    for _ in range(30):
        lab = (T @ C.t()).argmax(1)
        C = F.normalize(torch.stack([T[lab == j].mean(0) if (lab == j).any() else C[j] for j in range(a.k)]), dim=-1)
    target = C[(lab + 1) % a.k]
    print("cluster sizes", torch.bincount(lab, minlength=a.k).tolist())
elif a.mode == "perm":  # another sample's caption
    target = T[torch.from_numpy(rng.permutation(N))]
else:
    target = T
gen = torch.Generator().manual_seed(a.seed)
deltas = np.zeros_like(canv, dtype=np.int8)
sign = -1.0 if a.mode == "untargeted" else 1.0  # untargeted: lower the cosine to the own caption
before, after = [], []


def cosine(px, tgt):
    return (F.normalize(model.encode_image(surrogate.to_model_input(px, spec)), dim=-1) * tgt).sum(1)


for s in range(0, N, 128):
    x = torch.from_numpy(canv[s:s + 128]).permute(0, 3, 1, 2).float()
    tgt = target[s:s + 128]
    crop = (lambda px: augment.random_resized_crop(px, gen, (0.9, 1.0))) if a.augment else (lambda px: px)
    d = minimize_delta(lambda px, step: -(sign * cosine(crop(px), tgt)).sum(), torch.zeros_like(x), x, a.steps, a.eps, 1.0)
    with torch.no_grad():
        before.append(cosine(x, tgt))
        after.append(cosine(x + d, tgt))
    deltas[s:s + 128] = d.round().to(torch.int8).permute(0, 2, 3, 1).numpy()
print(f"cos to target: before {torch.cat(before).mean():.3f} after {torch.cat(after).mean():.3f}")
print("wrote", a.out, write_perturbed(shards, deltas, a.out, caps))
