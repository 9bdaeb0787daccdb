"""The trained keyed generator (``keyed.generator: trained``): the projection W of
:mod:`mem_dist.methods.keyed.code`, trained so that a CLIP learns the code fast.

    start   W = the key's ±1 projection, scaled so that W e starts at unit spread
    step    each rank: a batch of its own shards' (canvas, caption) pairs; the soft code
            epsilon * tanh(W e / tau) (e: the caption's centred embedding, as merge computes it)
            upsampled onto the canvas, through random resized crops; a CLIP's contrastive loss:
              minmin     a fresh CLIP of the surrogate's architecture, trained jointly
              surrogate  the frozen surrogate (surrogate.pretrained)
            gradients (W's and the fresh CLIP's) averaged across ranks, one Adam step
    end     W quantized to integers (|w| <= 2^15): the code merge publishes is sign(W_q e_q),
            integer arithmetic as for the projection, so merge and verify stay exact.

Every rank starts from the same W and the same CLIP and applies the same averaged gradients, so
every rank ends with the same W_q (checked: the ranks' checksums are compared). Rank 0 keeps it
in key.json; nothing is stored per sample. An interrupted training leaves no key.json and is
redone whole by the next generate (it is short: ``keyed.train_steps`` steps).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from mem_dist.methods.keyed import code
from mem_dist.pipeline import augment, distributed, surrogate
from mem_dist.pipeline.config import seed_of
from mem_dist.pipeline.data import generation_view, load_shard, owned

WEIGHT_BITS = 15  # |W_q| <= 2^15: W_q @ e_q stays exact in int64 for embeddings of up to 2^27 values


class _Trained(torch.nn.Module):
    """W and (minmin) the fresh CLIP: what the ranks average gradients over."""

    def __init__(self, w0: torch.Tensor, model: torch.nn.Module | None):
        super().__init__()
        self.w = torch.nn.Parameter(w0)
        self.model = model


def _pairs(job, urls: list[str], clip, tokenizer, centre: np.ndarray, batch: int, gen: torch.Generator):
    """Endless batches (canvases uint8 [B, H, W, 3], centred embeddings float32 [B, E], tokens)
    from ``urls`` in a new seeded order each pass (none when they hold no sample to protect); the
    embeddings are computed once per shard."""
    cache: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
    held: list[tuple[np.ndarray, np.ndarray, torch.Tensor]] = []
    while True:
        found = False
        for i in torch.randperm(len(urls), generator=gen).tolist():
            view = generation_view(load_shard(urls[i], job.data), job.data)
            if not len(view.keys):
                continue
            found = True
            if urls[i] not in cache:
                e_q = code.quantize(code.embed(clip, tokenizer, list(view.captions))) - centre
                cache[urls[i]] = ((e_q / (1 << code.QUANTUM_BITS)).astype(np.float32), tokenizer(list(view.captions)))
            e, tokens = cache[urls[i]]
            order = torch.randperm(len(view.keys), generator=gen)
            held.append((view.canvases[order.numpy()], e[order.numpy()], tokens[order]))
            while sum(len(h[0]) for h in held) >= batch:
                canvases, es, toks = (np.concatenate([h[0] for h in held]), np.concatenate([h[1] for h in held]),
                                      torch.cat([h[2] for h in held]))
                yield canvases[:batch], es[:batch], toks[:batch]
                held = [(canvases[batch:], es[batch:], toks[batch:])]
        if not found:
            return


def weights(job, dist, urls: list[str], key: bytes, centre: list[int], log=print) -> np.ndarray:
    """Train W on this rank's shards with every other rank; W_q [g*g*3, E] (int64), the same on
    every rank."""
    s, x = job.section, job.experimental
    device = dist.device
    clip, tokenizer = code.text_encoder(job)
    dim = clip.text_projection.shape[1]
    mean = np.asarray(centre, np.int64) if centre else np.zeros(dim, np.int64)
    cells = s.grid * s.grid * 3
    mine = owned(urls, dist.rank, dist.world)
    gen = torch.Generator().manual_seed(seed_of(job.seed, f"keyed train rank {dist.rank}"))
    stream = _pairs(job, mine, clip, tokenizer, mean, s.train_batch_size, gen)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(job.seed, "keyed train model"))  # one init on every rank
        if s.train_objective == "minmin":
            model, _, spec = surrogate.create_surrogate(job.surrogate.model, None, device)
        else:
            model, _, spec = surrogate.create_surrogate(job.surrogate.model, job.surrogate.pretrained, device)
            model.requires_grad_(False)
    model = model.float().train(s.train_objective == "minmin")  # the frozen surrogate keeps its statistics

    first = next(stream, None)
    if first is None:
        stream = None  # this rank holds no sample to protect: it adds no gradient
    sq, n = ((float((first[1] ** 2).sum()), len(first[1])) if first else (0.0, 0))
    sq, n = dist.sum([sq, n])
    w0 = torch.from_numpy(code.projection(key, cells, dim)).float() / max(np.sqrt(sq / max(n, 1)), 1e-12)
    trained = _Trained(w0.to(device), model if s.train_objective == "minmin" else None)
    groups = [{"params": [trained.w], "lr": x.train_lr}]
    if trained.model is not None:
        groups.append({"params": list(trained.model.parameters()), "lr": x.train_model_lr})
    optimizer = torch.optim.Adam(groups)
    ranks = int(dist.sum([1.0 if stream else 0.0])[0])  # a rank without shards adds no gradient
    log(f"mem-dist: keyed: training the generator ({s.train_objective}, {s.train_steps} steps, "
        f"{s.train_batch_size} pairs on each of {ranks} ranks)")
    size = job.data.image_size
    for step in range(s.train_steps):
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        if stream:
            canvases, e, tokens = first if step == 0 else next(stream)
            soft = torch.tanh(torch.from_numpy(e).to(device) @ trained.w.T / x.train_tau)
            soft = soft.view(-1, s.grid, s.grid, 3).permute(0, 3, 1, 2)
            pixels = torch.from_numpy(canvases).to(device).permute(0, 3, 1, 2).float()
            pixels = (pixels + s.epsilon * torch.nn.functional.interpolate(soft, size=(size, size), mode="nearest")).clamp(0, 255)
            pixels = augment.random_resized_crop(pixels, gen, tuple(x.train_crop_scale))
            loss = surrogate.clip_loss(model.encode_image(surrogate.to_model_input(pixels, spec)),
                                       model.encode_text(tokens.to(device)), model.logit_scale).mean()
            loss.backward()
            loss_value = loss.item()
        distributed.reduce_gradients(trained, dist, max(ranks, 1))
        optimizer.step()
        if step % 50 == 0 or step == s.train_steps - 1:
            total = dist.sum([loss_value])[0] / max(ranks, 1)
            log(f"mem-dist: keyed: generator step {step + 1}/{s.train_steps}: loss {total:.4f}")

    w = trained.w.detach().double().cpu()
    w_q = torch.round(w / w.abs().max().clamp_min(1e-30) * (1 << WEIGHT_BITS)).long().numpy()
    digests = dist.gather(hashlib.sha256(w_q.tobytes()).hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks trained different keyed generators (checksums {digests}); "
                           "every rank must apply the same averaged gradients")
    return w_q

