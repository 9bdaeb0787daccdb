"""Unlearnable Clusters (UC / UC-CLIP, CVPR 2023): ``method: uc``.

Label-agnostic unlearnable examples: images are clustered on a surrogate's features, and
one perturbation per cluster is optimised to pull images toward the *next* cluster's
centroid ("aggregate, then spin"), so a model trained on the data learns the cluster-wise
perturbations instead of the content, whatever labels it is given. With an open_clip
model as the surrogate this is UC-CLIP (its image tower's embedding); with a torchvision
classifier (``surrogate.model: torchvision:resnet18`` and a local checkpoint) it is UC
(the classifier's penultimate features). The method follows the authors' description
(reference section 8); no code of theirs is used.

    1. k-means sample: every rank embeds a seeded share of each shard it owns; rank 0 fits
       scikit-learn's KMeans (p clusters) on all of them -> state/uc/centroids.npy. What is
       clustered (``uc.cluster_on``): the images' features (UC's), or the captions' embedding
       by the CLIP surrogate's text tower (what the owner of an image-caption collection also
       holds); each cluster's target is then the mean image feature of its sampled members
       -> state/uc/targets.npy (with image clusters the targets are the centroids)
    2. assignment: every rank embeds all its shards' images (or captions); each goes to its
       nearest centroid -> state/round-001/{shard}.parquet (key, cluster, distance), atomic per shard
    3. perturbations: p of them (a ResNet generator each from one fixed noise input, or the
       perturbations directly), Adam on a seeded share of every shard held in memory (seen
       through the victim's crop and flip with ``uc.augment``, seeded per epoch, step, shard); each
       step every shard contributes a few images, each rank the gradient of its own shards,
       summed across ranks in fixed point (exact, so any number of ranks gives the same
       bytes) -> state/uc/perturbations.npy (int8 [p, H, W, C], 1/255 units, |delta| <= eps),
       written last: the run's completion marker; checkpoints/uc-epoch-{e:03d}.pt on the way

Why scikit-learn for k-means: the authors used it; it is exact and seeded (the same
centroids on every run of the same sample), and a sample of 10^5-10^6 embeddings
clusters in seconds to minutes on one CPU; every other image only needs its nearest
centroid, computed on the ranks. (faiss would cluster 10^8 points on a GPU, at the price
of a binary dependency and centroids that depend on the device.)

Merge publishes clip(canvas + delta[cluster], 0, 255) and the caption unchanged.
Shapes: N images, B batch, p clusters, E feature dim, H/W canvas side, C = 3.

Here the stages on every rank (:func:`generate`); the features are in
:mod:`mem_dist.methods.uc.features`, what is stored in :mod:`mem_dist.methods.uc.store`.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from mem_dist.methods.uc.features import FeatureNet, cluster_features, embed
from mem_dist.methods.uc.perturbations import Perturbations, pull_loss
from mem_dist.methods.uc.store import (perturbations_url, quota, read_assignments, read_npy, share, uc_dir, write_assignments,
                                       write_npy)
from mem_dist.pipeline import distributed, rundir, state, storage
from mem_dist.pipeline.augment import crop_flip
from mem_dist.pipeline.config import RunConfig, seed_of
from mem_dist.pipeline.config_io import ConfigError
from mem_dist.pipeline.data import ShardCache, check_shards, generation_view, load_shard, owned, shard_name
from mem_dist.pipeline.schedule import cosine_lr

FIXED_POINT = 2.0**40  # gradients summed across ranks as int64 multiples of 2^-40: exact and order-free



def generate(cfg: RunConfig, dist: distributed.Dist, log=print) -> dict:
    """Run (or resume) UC; returns the final run record."""
    old = rundir.check_resume(cfg, dist.world)
    urls = check_shards(cfg.data)
    net = FeatureNet(cfg, dist.device)  # before anything is written: a surrogate that cannot serve is a config error
    dist.barrier()
    if dist.is_main:
        storage.write_json(storage.join(cfg.output, "run.json"), rundir.run_record(
            cfg, urls, dist.world, old, (old or {}).get("rounds_done", 0), (old or {}).get("skipped", {}), launch=True))
    dist.barrier()
    if storage.exists(perturbations_url(cfg.output)):
        record = storage.read_json(storage.join(cfg.output, "run.json"))
        log(f"mem-dist: {cfg.output} already holds the UC perturbations; nothing to do")
        return record
    t0 = time.time()
    mine = owned(urls, dist.rank, dist.world)
    cache = ShardCache(cfg.data, cfg.data.cache_shards)
    centroids, targets = fit_centroids(cfg, dist, net, urls, mine, cache, log)
    t1 = time.time()
    skipped = assign(cfg, dist, net, mine, cache, centroids)
    t2 = time.time()
    losses = optimise(cfg, dist, net, urls, mine, targets, log)
    t3 = time.time()
    skips = dist.gather(skipped)
    record = None
    if dist.is_main:
        total: dict[str, int] = {}
        for rank_skips in skips:
            for reason, c in rank_skips.items():
                total[reason] = total.get(reason, 0) + c
        m = {"round": 1, "loss": losses[-1] if losses else float("nan"), "epoch_losses": losses, "kmeans_s": round(t1 - t0, 3),
             "assign_s": round(t2 - t1, 3), "optimise_s": round(t3 - t2, 3), "skipped": total, "start": t0, "end": time.time()}
        storage.write_bytes_atomic(storage.join(cfg.output, "metrics.jsonl"), (json.dumps(m) + "\n").encode())
        record = rundir.run_record(cfg, urls, dist.world, storage.read_json(storage.join(cfg.output, "run.json")), 1, total)
        storage.write_json(storage.join(cfg.output, "run.json"), record)
        log(f"mem-dist: uc: {cfg.uc.clusters} clusters, {cfg.uc.epochs} epochs, loss {m['loss']:.4g} | k-means {m['kmeans_s']:.1f}s, "
            f"assignment {m['assign_s']:.1f}s, perturbations {m['optimise_s']:.1f}s | skipped {total or 0}")
    dist.barrier()
    return record or storage.read_json(storage.join(cfg.output, "run.json"))



def fit_centroids(cfg: RunConfig, dist, net: FeatureNet, urls, mine, cache: ShardCache, log) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-means centroids [p, E] (in the space of :func:`cluster_features`) and each
    cluster's target in image-feature space [p, E']: from state/uc/ if a run got that far,
    else fitted (rank 0) on every rank's seeded share of its shards, in shard order."""
    url, targets_url = (storage.join(uc_dir(cfg.output), f) for f in ("centroids.npy", "targets.npy"))
    by_caption = cfg.uc.cluster_on == "caption"
    if not storage.exists(url):
        q = quota(cfg.uc.kmeans_samples, len(urls))
        mine_feats = []
        for u in mine:
            shard = cache.get(u)
            rows = share(shard.name, len(shard), q, cfg.seed, "kmeans")
            images = embed(net, shard.canvases[rows], dist.device).cpu().numpy() if by_caption else None
            mine_feats.append((urls.index(u), cluster_features(cfg, net, shard, rows).cpu().numpy(), images))
        gathered = sorted((item for rank in dist.gather(mine_feats) for item in rank), key=lambda t: t[0])
        if dist.is_main:
            x = np.concatenate([f for _, f, _ in gathered if len(f)]).astype(np.float64)
            if len(x) < cfg.uc.clusters:
                raise ConfigError(f"config key 'uc.clusters': {cfg.uc.clusters} clusters from {len(x)} samples")
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=cfg.uc.clusters, n_init=4, random_state=seed_of(cfg.seed, "uc", "kmeans") % 2**31).fit(x)
            sizes = np.bincount(km.labels_, minlength=cfg.uc.clusters)
            if by_caption:  # written first: the centroids mark this step done
                images = np.concatenate([im for _, f, im in gathered if len(f)]).astype(np.float64)
                means = np.stack([images[km.labels_ == k].mean(0) if sizes[k] else np.zeros(images.shape[1]) for k in range(len(sizes))])
                write_npy(targets_url, means.astype(np.float32))
            write_npy(url, km.cluster_centers_.astype(np.float32))
            log(f"mem-dist: uc: k-means on {len(x)} {'captions' if by_caption else 'images'} ({q} per shard): "
                f"cluster sizes {sizes.tolist()}")
        dist.barrier()
    centroids = torch.from_numpy(read_npy(url)).to(dist.device)
    return centroids, (torch.from_numpy(read_npy(targets_url)).to(dist.device) if by_caption else centroids)



def assign(cfg: RunConfig, dist, net: FeatureNet, mine, cache: ShardCache, centroids: torch.Tensor) -> dict[str, int]:
    """Every sample of this rank's shards to its nearest centroid, by :func:`cluster_features`
    (shards already assigned are skipped); returns this rank's skip counts."""
    done = state.completed(cfg.output, 1)
    skipped: dict[str, int] = {}
    for u in mine:
        name = shard_name(u)
        if name in done:
            _, _, _, skips = read_assignments(cfg.output, name)
        else:
            shard = cache.get(u)
            feats = cluster_features(cfg, net, shard)
            if len(feats):
                dist_NP = torch.cdist(feats.double(), centroids.double())
                d, c = dist_NP.min(1)
                clusters, distances = c.cpu().numpy(), d.float().cpu().numpy()
            else:
                clusters, distances = np.zeros(0, np.int64), np.zeros(0, np.float32)
            skips = dict(shard.skipped)
            write_assignments(cfg.output, name, shard.keys, clusters, distances, skips)
        for reason, c in skips.items():
            skipped[reason] = skipped.get(reason, 0) + c
    dist.barrier()
    return skipped



def exact_sum(q: torch.Tensor, dist) -> torch.Tensor:
    """The sum over ranks of int64 fixed-point parts (multiples of 2^-40), as float64: the same
    bits whatever the number of ranks or the order of the parts."""
    if dist.world > 1:
        torch.distributed.all_reduce(q)
    return q.double() / FIXED_POINT



def optimise(cfg: RunConfig, dist, net: FeatureNet, urls, mine, targets: torch.Tensor, log) -> list[float]:
    """Adam on the p perturbations, pulling cluster k toward ``targets`` k + 1 (the clusters'
    targets in image-feature space, :func:`fit_centroids`); writes state/uc/perturbations.npy
    (rank 0) and returns the mean loss per epoch."""
    u, x, dev = cfg.uc, cfg.experimental.uc, dist.device
    if x.perturbation == "random":  # the control: nothing to optimise
        write_perturbations(cfg, dist, Perturbations(cfg, cfg.data.image_size))
        return []
    q = quota(u.train_samples, len(urls))
    data = []  # (canvases uint8 [n, H, W, C], clusters [n]) of this rank's shards' training shares, in shard order
    for url in mine:
        shard = generation_view(load_shard(url, cfg.data), cfg.data)
        rows = share(shard.name, len(shard), q, cfg.seed, "train")
        _, clusters, _, _ = read_assignments(cfg.output, shard.name)
        data.append((shard.name, shard.canvases[rows], clusters[rows]))
    per_shard = max(1, u.batch_size // len(urls))
    longest = max([len(c) for _, c, _ in data], default=0)
    steps = max(1, -(-int(max(dist.gather(longest))) // per_shard))
    pull_to = targets.roll(-1, dims=0)  # cluster k is pulled toward target k + 1
    pert = Perturbations(cfg, cfg.data.image_size).to(dev)
    opt = torch.optim.Adam(pert.parameters(), lr=x.lr, weight_decay=x.weight_decay)
    total_steps = u.epochs * steps
    first = resume_epoch(cfg, pert, opt)
    losses = []
    for epoch in range(first, u.epochs + 1):
        loss_sum, count = 0.0, 0.0
        orders = [np.random.default_rng(seed_of(cfg.seed, "uc", "order", epoch, name)).permutation(len(c)) for name, c, _ in data]
        for step in range(steps):
            lr = cosine_lr((epoch - 1) * steps + step, x.lr, 0, total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            delta = pert()
            leaf = delta.detach().requires_grad_(True)
            grad = torch.zeros_like(leaf, dtype=torch.int64)  # fixed point: each part rounded alone, summed exactly
            n_here, loss_here = 0, 0.0
            for (name, canvases, clusters), order in zip(data, orders):
                rows = order[step * per_shard:(step + 1) * per_shard]
                if not len(rows):
                    continue
                canvas = torch.from_numpy(canvases[rows]).to(dev).permute(0, 3, 1, 2).float()
                own = torch.from_numpy(clusters[rows]).to(dev) if x.train_on == "cluster" else None
                loss = pull_loss(net, canvas, leaf, own, pull_to, u.augment, seeded_crop(cfg, epoch, step, name))
                (g,) = torch.autograd.grad(loss, leaf)
                grad += (g.double() * FIXED_POINT).round().long()
                n_here += len(rows) * (1 if own is not None else len(delta))
                loss_here += float(loss.detach())
            grad = exact_sum(grad, dist)
            n, loss_total = dist.sum([float(n_here), loss_here])
            opt.zero_grad(set_to_none=True)
            delta.backward((grad / max(n, 1)).to(delta.dtype))
            opt.step()
            pert.project()
            loss_sum, count = loss_sum + loss_total, count + n
        losses.append(loss_sum / max(count, 1))
        if dist.is_main:
            log(f"mem-dist: uc: epoch {epoch}/{u.epochs}: mean KL to the next centroid {losses[-1]:.4g}")
            rundir.save_checkpoint(cfg.output, epoch, {"perturbations": pert.state_dict(), "optimizer": opt.state_dict()},
                                   cfg.state.checkpoint_keep, prefix="uc-epoch")
        dist.barrier()
    write_perturbations(cfg, dist, pert)
    return losses



def seeded_crop(cfg: RunConfig, epoch: int, step: int, name: str):
    """uc.augment's crop and flip for one shard's images of one step, seeded by (epoch, step,
    shard): the same on any rank and after a resume; None when uc.augment is none."""
    if cfg.uc.augment == "none":
        return None
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, "uc", "augment", epoch, step, name))
    return lambda px: crop_flip(px, cfg.experimental.uc.crop_padding, cfg.experimental.uc.flip, gen)



def write_perturbations(cfg: RunConfig, dist, pert: Perturbations) -> None:
    """state/uc/perturbations.npy (rank 0), written last: the run is complete."""
    final = pert.as_int8()
    if dist.is_main and pert.kind != "random" and not final.any():
        # direct perturbations that never left +-0.5/255 round to nothing: say so, do not publish clean data silently
        print(f"mem-dist: uc: warning: the optimised perturbations round to 0 (|delta| < 0.5/255 everywhere): the "
              f"published images will equal the source; raise experimental.uc.lr (now {cfg.experimental.uc.lr:g}) or use experimental.uc.perturbation=generator",
              file=sys.stderr)
    if dist.is_main:
        write_npy(perturbations_url(cfg.output), final)
    dist.barrier()



def resume_epoch(cfg: RunConfig, pert: Perturbations, opt) -> int:
    """The first epoch to run: after the newest checkpoint, whose weights are loaded."""
    last = rundir.latest_checkpoint(cfg.output, prefix="uc-epoch")
    if last:
        ck = rundir.load_checkpoint(cfg.output, last, prefix="uc-epoch")
        pert.load_state_dict(ck["perturbations"])
        opt.load_state_dict(ck["optimizer"])
    return last + 1

