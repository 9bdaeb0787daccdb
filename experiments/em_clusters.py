"""A diagnostic for docs/efficacy.md's UC section: cluster-wise *error-minimising* noise.

UC pulls each cluster's images toward another cluster's features in a fixed surrogate; the
victims still learn part of the content before they read that code (the peak). Unlearnable
examples (Huang et al., 2021) make the code learnable first by construction: noise that
minimises a classifier's loss, with the classifier trained on the noisy data at the same time
(min-min). Here the labels are the run's cluster ids (no labels are used), the noise is one
per cluster within +-epsilon, and it is optimised through the victim's crop and flip.

Copies a finished UC run's private side (run.json, state) to a new run directory and replaces
its perturbations (state/uc/perturbations.npy); the clusters stay. Then ``mem-dist merge DST 'merge.keep_fields=[label, class]'``.

    python experiments/em_clusters.py runs/fm-uc-captions-published runs/fm-uc-captions-em [--iterations 60]

Per iteration: ``--train-steps`` SGD steps of a ResNet-18 from scratch on (crop_flip(x +
delta[c]), c), then ``--pgd-steps`` signed-gradient steps of delta on one batch (step 1/255,
projected to epsilon). Prints the classifier's accuracy on the perturbed batch as it goes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mem_dist.methods.uc import store as uc
from mem_dist.pipeline.augment import crop_flip
from mem_dist.evaluation.classifier import create_classifier, to_input
from mem_dist.pipeline.config import seed_of
from mem_dist.pipeline.data import load_shard, shard_name
from mem_dist.evaluation.eval_config import ClassifierConfig
from shards import copy_uc_run, seal_uc_run, uc_copy_parser  # experiments/shards.py, beside this script


def main(argv: list[str] | None = None) -> None:
    ap = uc_copy_parser(__doc__)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--pgd-steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", default="resnet18")
    args = ap.parse_args(argv)
    run, cfg = copy_uc_run(args.src, args.dst)
    canvases, clusters = [], []
    for url in run["shards"]:
        shard = load_shard(url, cfg.data)
        keys, ids, _, _ = uc.read_assignments(args.dst, shard_name(url))
        if keys != shard.keys:
            raise SystemExit(f"em_clusters: {url} does not hold the keys the run assigned")
        canvases.append(shard.canvases)
        clusters.append(ids)
    x = torch.from_numpy(np.concatenate(canvases)).permute(0, 3, 1, 2).float()  # [N, C, H, W] in [0, 255]
    c = torch.from_numpy(np.concatenate(clusters)).long()
    p, eps = cfg.uc.clusters, float(cfg.uc.epsilon)
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, "em-clusters"))
    delta = (torch.rand(p, *x.shape[1:], generator=gen) * 2 - 1) * eps  # uniform start within the budget
    model = create_classifier(ClassifierConfig(model=args.model), p, torch.device("cpu"), cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def seen(rows: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        pix = (x[rows] + d[c[rows]]).clamp(0, 255)
        return to_input(crop_flip(pix, cfg.experimental.uc.crop_padding, cfg.experimental.uc.flip, gen))

    for it in range(1, args.iterations + 1):
        model.train()
        for _ in range(args.train_steps):
            rows = torch.randint(0, len(x), (args.batch,), generator=gen)
            loss = F.cross_entropy(model(seen(rows, delta)), c[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        rows = torch.randint(0, len(x), (args.batch,), generator=gen)
        for _ in range(args.pgd_steps):
            d = delta.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(seen(rows, d)), c[rows]), d)
            delta = (delta - grad.sign()).clamp(-eps, eps)
        with torch.no_grad():
            acc = (model(seen(rows, delta)).argmax(1) == c[rows]).float().mean().item()
        if it % 10 == 0 or it == args.iterations:
            print(f"em_clusters: iteration {it}/{args.iterations}: training loss {loss.item():.3f}, "
                  f"accuracy on the perturbed batch {acc:.3f}", flush=True)
    uc.write_npy(uc.perturbations_url(args.dst), delta.round().clamp(-eps, eps).to(torch.int8).permute(0, 2, 3, 1).numpy())
    seal_uc_run(run, args.dst)


if __name__ == "__main__":
    main()
