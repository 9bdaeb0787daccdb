"""The MEM rounds: surrogate phase, then sample phase, shard by shard, on every rank.

    for r in rounds:
        surrogate phase: M AdamW steps of the surrogate on (canvas + delta, trigger + caption),
                         DDP across ranks, each rank drawing from the shards it owns
                         (every member of an ensemble, surrogate.ensemble, on the same batches)
                         -> parameter checksum compared across ranks -> checkpoint r
        sample phase:    for each shard this rank owns and whose round-r state is missing:
                         per batch, HotFlip on the trigger (r <= H), PGD on delta with
                         shuffled captions (the members' mean loss)
                         -> state/round-r/{shard}.parquet (atomic)
        rank 0:          metrics.jsonl line, run.json progress, prune old rounds

Everything random is a function of (seed, round, shard, batch) or (seed, rank, step), and
the surrogate is checkpointed after every surrogate phase, so a resumed run computes
exactly what an uninterrupted one would have.

Shapes: B batch, C = 3, H = W canvas side, k trigger length, L context length.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mem_dist import __version__, distributed, hotflip, state, storage, surrogate, text
from mem_dist.config import ConfigError, RunConfig, seed_of, to_dict
from mem_dist.data import Shard, ShardCache, check_shards, owned, shard_name
from mem_dist.pgd import minimize_delta


class ResumeError(RuntimeError):
    """The output folder holds a run that this command may not continue."""


@dataclass
class Member:
    """One surrogate: the first is surrogate.model / pretrained, the rest surrogate.ensemble."""

    model: torch.nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    spec: surrogate.PixelSpec

    @property
    def bare(self) -> torch.nn.Module:
        return surrogate.unwrap(self.model)


@dataclass
class Run:
    """Everything a round needs, built once per process by :func:`setup`."""

    cfg: RunConfig
    dist: distributed.Dist
    urls: list[str]  # every shard of the run
    mine: list[str]  # the shards this rank owns (sample phase)
    stream: list[str]  # the shards this rank trains on (its own, or a borrowed one)
    members: list[Member]  # the surrogate(s)
    tokenizer: object  # the first member's; every member's must match it
    vocab: torch.Tensor  # trigger-capable token ids
    cache: ShardCache
    at_round: int = 0  # the round whose surrogate phase the members' weights come from


# --------------------------------------------------------------------------------------
# Set-up and resume
# --------------------------------------------------------------------------------------


def setup(cfg: RunConfig, dist: distributed.Dist) -> Run:
    """Shards, surrogate(s) (same init on every rank), optimizers, trigger vocabulary."""
    urls = check_shards(cfg.data)
    mine = owned(urls, dist.rank, dist.world)
    wanted = [(cfg.surrogate.model, cfg.surrogate.pretrained)]
    wanted += [(m.model or cfg.surrogate.model, m.pretrained) for m in cfg.surrogate.ensemble]
    members, tokenizer = [], None
    for i, (name, weights) in enumerate(wanted):
        key = "surrogate" if i == 0 else f"surrogate.ensemble[{i - 1}]"
        torch.manual_seed(cfg.seed if i == 0 else seed_of(cfg.seed, "member", i))  # identical init on every rank
        model, tok, spec = surrogate.create_surrogate(name, weights, device=dist.device, key=key)
        if tokenizer is None:
            tokenizer = tok
        elif not surrogate.same_tokenizer(tok, tokenizer):
            raise ConfigError(f"config key '{key}.model': {name} tokenizes differently from surrogate.model "
                              f"({cfg.surrogate.model}); every member must share one tokenizer (the trigger is one text)")
        optimizer = torch.optim.AdamW(surrogate.param_groups(model, cfg.mem.weight_decay), lr=cfg.mem.lr, betas=(0.9, 0.999), eps=1e-8)
        if dist.world > 1:
            model, optimizer = dist.accelerator.prepare(model, optimizer)
        model.eval()  # train mode only inside the surrogate phase (BatchNorm in RN surrogates)
        members.append(Member(model, optimizer, spec))
    vocab = torch.tensor(text.trigger_vocabulary(tokenizer, cfg.mem.trigger_vocab, cfg.seed), device=dist.device)
    return Run(cfg, dist, urls, mine, mine or [urls[dist.rank % len(urls)]], members, tokenizer, vocab,
               ShardCache(cfg.data, cfg.data.cache_shards))


def check_resume(cfg: RunConfig, world: int) -> dict | None:
    """The existing run.json if this command may continue it; raises ResumeError if not."""
    url = storage.join(cfg.output, "run.json")
    if not storage.exists(url):
        return None
    old = storage.read_json(url)
    if old.get("config_hash") != cfg.config_hash():
        raise ResumeError(
            f"{cfg.output} holds a run with a different configuration (config hash {old.get('config_hash')} there, "
            f"{cfg.config_hash()} now); use a new output, or the same config to resume (only mem.rounds and "
            f"surrogate.precision may change)")
    if old.get("world_size") != world:
        raise ResumeError(
            f"{cfg.output} was started with {old.get('world_size')} processes and this launch has {world}; "
            f"resume with the same number (shard ownership and the surrogate's batches depend on it)")
    return old


def run_record(run: Run, old: dict | None, rounds_done: int, skipped: dict[str, int]) -> dict:
    """The content of run.json."""
    import accelerate, open_clip, pyarrow, webdataset

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "config": to_dict(run.cfg),
        "config_hash": run.cfg.config_hash(),
        "shards": run.urls,
        "world_size": run.dist.world,
        "rounds": total_rounds(run.cfg),
        "rounds_done": rounds_done,
        "skipped": skipped,
        "versions": {"mem_dist": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "webdataset": webdataset.__version__, "accelerate": accelerate.__version__,
                     "pyarrow": pyarrow.__version__, "python": sys.version.split()[0]},
        "created": (old or {}).get("created", now),
        "updated": now,
    }


def total_rounds(cfg: RunConfig) -> int:
    """mem.rounds for MEM; the random baselines are one pass, nothing to iterate."""
    return cfg.mem.rounds if cfg.mem.method == "mem" else 1


def checkpoint_url(output: str, round_: int) -> str:
    return storage.join(output, "checkpoints", f"round-{round_:03d}.pt")


def latest_checkpoint(output: str) -> int:
    names = storage.listdir(storage.join(output, "checkpoints"))
    return max((int(n[6:9]) for n in names if n.startswith("round-") and n.endswith(".pt")), default=0)


def save_checkpoint(run: Run, round_: int) -> None:
    """The first member as "model" / "optimizer" (the layout from before ensembles, so older
    runs still resume), the ensemble's other members under "ensemble"."""
    first, rest = run.members[0], run.members[1:]
    surrogate.save({"round": round_, "model": first.bare.state_dict(), "optimizer": first.optimizer.state_dict(),
                    "ensemble": [{"model": m.bare.state_dict(), "optimizer": m.optimizer.state_dict()} for m in rest]},
                   checkpoint_url(run.cfg.output, round_))
    for r in range(1, round_ - run.cfg.state.checkpoint_keep + 1):
        storage.remove(checkpoint_url(run.cfg.output, r))


def load_checkpoint(run: Run, round_: int) -> None:
    with storage.open_file(checkpoint_url(run.cfg.output, round_), "rb") as f:
        ck = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    for member, saved in zip(run.members, [ck] + ck.get("ensemble", []), strict=True):
        member.bare.load_state_dict(saved["model"])
        member.optimizer.load_state_dict(saved["optimizer"])


# --------------------------------------------------------------------------------------
# Batches: pixels, tokens, losses
# --------------------------------------------------------------------------------------


def autocast(run: Run):
    p = run.cfg.surrogate.precision
    if run.dist.device.type != "cuda" or p == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if p == "bf16" else torch.float16)


def pixels(canvas_BHWC: np.ndarray, device) -> torch.Tensor:
    """uint8 canvases -> float [B, C, H, W] in [0, 255] on ``device``."""
    return torch.from_numpy(canvas_BHWC).to(device).permute(0, 3, 1, 2).float()


def tokens(run: Run, captions: list[str], trigger_Bk: torch.Tensor) -> torch.Tensor:
    """SOT + trigger + caption + EOT, [B, L] on the device."""
    bodies = [text.caption_ids(run.tokenizer, c) for c in captions]
    return text.assemble_tokens(bodies, trigger_Bk.cpu(), run.tokenizer).to(run.dist.device)


def features(run: Run, member: Member, pix_BCHW: torch.Tensor, tok_BL: torch.Tensor, crop_gen: torch.Generator | None = None,
             wrapped: bool = False):
    """A member's image and text features through the differentiable pixel path (optionally
    a random resized crop first, ``mem.augment``); through its DDP wrapper if ``wrapped``."""
    if crop_gen is not None:
        pix_BCHW = surrogate.random_resized_crop(pix_BCHW, crop_gen)
    with autocast(run):
        out = (member.model if wrapped else member.bare)(surrogate.to_model_input(pix_BCHW, member.spec), tok_BL)
    out = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    return out[0].float(), out[1].float()


def pair_losses(run: Run, member: Member, pix_BCHW, tok_BL, crop_gen=None, wrapped: bool = False) -> torch.Tensor:
    image, txt = features(run, member, pix_BCHW, tok_BL, crop_gen, wrapped)
    return surrogate.clip_loss(image, txt, member.bare.logit_scale)


def mean_pair_losses(run: Run, pix_BCHW, tok_BL, crop=lambda: None) -> torch.Tensor:
    """Per-pair losses averaged over the members (what PGD and the round metrics use);
    ``crop()`` gives each member's crop generator (or None)."""
    return torch.stack([pair_losses(run, m, pix_BCHW, tok_BL, crop()) for m in run.members]).mean(0)


# --------------------------------------------------------------------------------------
# The state a round starts from
# --------------------------------------------------------------------------------------


def start_state(run: Run, shard: Shard, round_: int) -> tuple[np.ndarray, np.ndarray]:
    """(delta int8 [N,H,W,C], trigger int64 [N,k]) of a shard before ``round_``: the
    previous round's state, or zero delta and seeded random triggers before round 1."""
    cfg = run.cfg
    if round_ == 1 or len(shard) == 0:
        delta = np.zeros_like(shard.canvases, dtype=np.int8)
        trig = text.initial_triggers(shard.keys, run.vocab.cpu().numpy(), cfg.mem.trigger_len, cfg.seed)
        return delta, trig
    prev = state.read_state(state.state_url(cfg.output, round_ - 1, shard.name))
    if prev.keys != shard.keys:
        raise RuntimeError(f"state of round {round_ - 1} for shard {shard.name} does not match the source shard's keys; "
                           f"was the source changed during the run?")
    return prev.delta, prev.trigger_ids


# --------------------------------------------------------------------------------------
# Surrogate phase
# --------------------------------------------------------------------------------------


def stream_batches(run: Run, round_: int):
    """This round's M batches of (shard, rows): an endless shard-blocked stream per rank
    (shards shuffled per epoch, rows shuffled per shard), continued across rounds at step
    (round - 1) * M, so batch order depends only on (seed, rank, step)."""
    cfg = run.cfg
    sizes = [len(run.cache.get(u)) for u in run.stream]
    total = sum(sizes)
    if total == 0:
        raise RuntimeError(f"rank {run.dist.rank}: its shards hold no usable samples, so it cannot train the surrogate")
    bs = min(cfg.mem.batch_size, total)
    per_epoch = total // bs
    order_epoch, order = -1, None
    start = (round_ - 1) * cfg.mem.surrogate_steps
    for step in range(start, start + cfg.mem.surrogate_steps):
        epoch, j = divmod(step, per_epoch)
        if epoch != order_epoch:
            rng = np.random.default_rng(seed_of(cfg.seed, "stream", run.dist.rank, epoch))
            order = np.concatenate([np.stack([np.full(sizes[s], s), rng.permutation(sizes[s])], 1)
                                    for s in rng.permutation(len(sizes)) if sizes[s]])
            order_epoch = epoch
        yield step, order[j * bs:(j + 1) * bs]


def surrogate_phase(run: Run, round_: int, bar: bool) -> float:
    """M DDP steps of every member on protected pairs (the same batches); returns this
    rank's mean training loss over steps and members."""
    cfg = run.cfg
    for m in run.members:
        m.model.train()
    starts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    losses = []
    for step, refs in tqdm(stream_batches(run, round_), total=cfg.mem.surrogate_steps, desc=f"round {round_} surrogate",
                           disable=not bar, leave=False):
        canvas, delta, trig, caps = [], [], [], []
        for s, i in refs:
            url = run.stream[s]
            shard = run.cache.get(url)
            if url not in starts:  # batches are shard-blocked: keep the last two shards' state
                if len(starts) == 2:
                    del starts[next(iter(starts))]
                starts[url] = start_state(run, shard, round_)
            canvas.append(shard.canvases[i])
            delta.append(starts[url][0][i])
            trig.append(starts[url][1][i])
            caps.append(shard.captions[i])
        pix = pixels(np.stack(canvas), run.dist.device) + torch.from_numpy(np.stack(delta)).to(run.dist.device).permute(0, 3, 1, 2).float()
        tok = tokens(run, caps, torch.from_numpy(np.stack(trig)))
        gen = torch.Generator().manual_seed(seed_of(cfg.seed, "crop", run.dist.rank, step)) if cfg.mem.augment else None
        for m in run.members:
            loss = pair_losses(run, m, pix, tok, gen, wrapped=True).mean()
            m.optimizer.zero_grad(set_to_none=True)  # the original never zeroed them (bug 4)
            loss.backward()
            m.optimizer.step()
            losses.append(loss.item())
    for m in run.members:
        m.model.eval()
    return float(np.mean(losses)) if losses else float("nan")


# --------------------------------------------------------------------------------------
# Sample phase
# --------------------------------------------------------------------------------------


def process_batch(run: Run, round_: int, shard: Shard, rows: np.ndarray, delta_BHWC: np.ndarray, trig_Bk: np.ndarray, batch: int):
    """HotFlip (first H rounds) then PGD for one batch; returns the new (delta, trigger,
    loss, clean_loss) as numpy arrays."""
    cfg, dev = run.cfg, run.dist.device
    canvas = pixels(shard.canvases[rows], dev)
    delta = torch.from_numpy(delta_BHWC).to(dev).permute(0, 3, 1, 2).float()
    trig = torch.from_numpy(trig_Bk).to(dev)
    caps = [shard.captions[i] for i in rows]
    bodies = [text.caption_ids(run.tokenizer, c) for c in caps]
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, "batch", round_, shard.name, batch))
    crop = (lambda: gen) if cfg.mem.augment else (lambda: None)

    def assemble(trig_Bk_, order=None):
        b = bodies if order is None else [bodies[i] for i in order]
        return text.assemble_tokens(b, trig_Bk_.cpu(), run.tokenizer).to(dev)

    if cfg.mem.trigger_len > 0 and round_ <= cfg.mem.hotflip_rounds:
        trig = hotflip_batch(run, canvas + delta, trig, assemble)

    def loss_fn(pix, step):
        # Shuffled captions leave delta only the trigger to bind to; without a trigger
        # (EM) delta is optimised against the true captions, as error-minimising noise is.
        shuffle = cfg.mem.shuffle_captions and cfg.mem.trigger_len > 0
        order = torch.randperm(len(rows), generator=gen).tolist() if shuffle else None
        return mean_pair_losses(run, pix, assemble(trig, order), crop).mean()

    delta = minimize_delta(loss_fn, delta, canvas, cfg.mem.pgd_steps, cfg.mem.epsilon, cfg.mem.step_size)
    with torch.no_grad():
        loss = mean_pair_losses(run, canvas + delta, assemble(trig))
        clean = mean_pair_losses(run, canvas, assemble(trig[:, :0]))
    delta_np = delta.round().clamp(-cfg.mem.epsilon, cfg.mem.epsilon).to(torch.int8).permute(0, 2, 3, 1).cpu().numpy()
    return delta_np, trig.cpu().numpy(), loss.cpu().numpy(), clean.cpu().numpy()


def hotflip_batch(run: Run, pix_BCHW: torch.Tensor, trig_Bk: torch.Tensor, assemble) -> torch.Tensor:
    """One HotFlip update of the batch's triggers against its true captions (the members'
    mean loss)."""
    k = trig_Bk.shape[1]
    ids = assemble(trig_Bk)
    images, grads, embeds, scales = [], [], [], []
    for member in run.members:
        model = member.bare
        with torch.no_grad(), autocast(run):
            image = F.normalize(model.encode_image(surrogate.to_model_input(pix_BCHW, member.spec)).float(), dim=-1)
        emb = surrogate.text_tower(model).token_embedding(ids).detach().requires_grad_(True)
        with autocast(run):
            txt = surrogate.encode_text_from_embeds(model, emb, ids)
        loss = surrogate.clip_loss(image, txt.float(), model.logit_scale).mean()
        (grad,) = torch.autograd.grad(loss, emb)
        images.append(image)
        grads.append(grad[:, 1:1 + k])
        embeds.append(surrogate.token_embedding_weight(model).detach())
        scales.append(model.logit_scale)
    cands = hotflip.candidate_tokens(grads, embeds, run.vocab, run.cfg.mem.hotflip_candidates)

    def text_features(t_Bk):
        tok = assemble(t_Bk)
        with autocast(run):
            return [F.normalize(m.bare.encode_text(tok).float(), dim=-1) for m in run.members]

    new_trig, _ = hotflip.select_triggers(text_features, images, trig_Bk, cands, scales)
    return new_trig


def process_shard(run: Run, round_: int, url: str) -> state.ShardState:
    """A shard's round: every sample, in near-equal batches of at most mem.batch_size."""
    shard = run.cache.get(url)
    delta, trig = start_state(run, shard, round_)
    n = len(shard)
    k = run.cfg.mem.trigger_len
    out_delta, out_trig = delta.copy(), trig.copy()
    loss, clean = np.zeros(n, np.float32), np.zeros(n, np.float32)
    n_batches = -(-n // run.cfg.mem.batch_size)
    for b, rows in enumerate(np.array_split(np.arange(n), n_batches) if n else []):
        out_delta[rows], out_trig[rows], loss[rows], clean[rows] = process_batch(run, round_, shard, rows, delta[rows], trig[rows], b)
    return state.ShardState(shard.keys, out_delta, out_trig.reshape(n, k), trigger_texts(run, out_trig), loss, clean,
                            dict(shard.skipped))


def trigger_texts(run: Run, trig_Nk: np.ndarray) -> list[str]:
    """Each sample's trigger as words ("" for every sample when k = 0)."""
    return [text.trigger_text(run.tokenizer, t) for t in trig_Nk] if trig_Nk.size else [""] * len(trig_Nk)


def random_noise_shard(run: Run, url: str) -> state.ShardState:
    """The random baselines: uniform integer delta in [-eps, eps] and, when trigger_len > 0,
    the seeded random start triggers MEM would begin from (nothing is optimised). With
    trigger_len = 0 this is the random-noise baseline; with k > 0 it is the control that
    tells what MEM's optimisation adds to a unique (noise, trigger) pair per sample. With
    method "prefix" every sample gets the same trigger: what a fixed prefix alone does."""
    shard = run.cache.get(url)
    eps, k = run.cfg.mem.epsilon, run.cfg.mem.trigger_len
    rng = np.random.default_rng(seed_of(run.cfg.seed, "random", shard.name))
    noise = rng.integers(-eps, eps + 1, size=shard.canvases.shape)
    delta = (np.clip(shard.canvases.astype(np.int16) + noise, 0, 255) - shard.canvases).astype(np.int8)
    n = len(shard)
    vocab = run.vocab.cpu().numpy()
    if run.cfg.mem.method == "prefix":
        trig = np.repeat(text.initial_triggers(["prefix"], vocab, k, run.cfg.seed), n, axis=0)
    else:
        trig = text.initial_triggers(shard.keys, vocab, k, run.cfg.seed)
    nan = np.full(n, np.nan, np.float32)
    return state.ShardState(shard.keys, delta, trig.reshape(n, k), trigger_texts(run, trig), nan, nan, dict(shard.skipped))


# --------------------------------------------------------------------------------------
# The rounds
# --------------------------------------------------------------------------------------


def generate(cfg: RunConfig, dist: distributed.Dist, log=print) -> dict:
    """Run (or resume) generation; returns the final run record."""
    old = check_resume(cfg, dist.world)
    run = setup(cfg, dist)
    dist.barrier()  # every rank has checked run.json before rank 0 rewrites it
    done = old.get("rounds_done", 0) if old else 0
    if dist.is_main:
        storage.write_json(storage.join(cfg.output, "run.json"), run_record(run, old, done, (old or {}).get("skipped", {})))
    dist.barrier()
    last = total_rounds(cfg)
    first = resume_point(run)
    if old is not None and first <= last and dist.is_main:
        n = len(state.completed(cfg.output, first))
        log(f"mem-dist: resuming {cfg.output} at round {first} ({done} rounds done, {n} shards of round {first} committed)")
    record = None
    for round_ in range(first, last + 1):
        record = one_round(run, round_, bar=cfg.progress and dist.is_main, log=log)
    if record is None:
        record = storage.read_json(storage.join(cfg.output, "run.json"))
        log(f"mem-dist: {cfg.output} already has {record['rounds_done']} rounds; nothing to do")
    return record


def resume_point(run: Run) -> int:
    """The round to continue with: the newest checkpointed round if its state is not
    complete yet (its sample phase resumes), else the one after it."""
    all_shards = {shard_name(u) for u in run.urls}
    ck = latest_checkpoint(run.cfg.output) if run.cfg.mem.method == "mem" else 1
    if ck and state.completed(run.cfg.output, ck) != all_shards:
        return ck
    return ck + 1


def one_round(run: Run, round_: int, bar: bool, log) -> dict:
    cfg, dist = run.cfg, run.dist
    t0 = time.time()
    train_loss = float("nan")
    if cfg.mem.method == "mem":
        if latest_checkpoint(cfg.output) >= round_:  # resuming this round's sample phase
            if run.at_round != round_:
                load_checkpoint(run, round_)
        else:
            if round_ > 1 and run.at_round != round_ - 1:
                load_checkpoint(run, round_ - 1)
            train_loss = surrogate_phase(run, round_, bar)
            for m in run.members:
                distributed.broadcast_buffers(m.bare, dist)
            sums = dist.gather(tuple(distributed.checksum(m.bare) for m in run.members))
            if len(set(sums)) != 1:
                raise RuntimeError(f"round {round_}: the surrogate differs across ranks (parameter checksums {sums}); "
                                   f"DDP did not keep the ranks in step")
            if dist.is_main:
                save_checkpoint(run, round_)
            dist.barrier()
        run.at_round = round_
    t1 = time.time()
    done = state.completed(cfg.output, round_)
    todo = [u for u in run.mine if shard_name(u) not in done]
    n_samples = 0
    for url in tqdm(todo, desc=f"round {round_} samples", disable=not bar, leave=False):
        st = process_shard(run, round_, url) if cfg.mem.method == "mem" else random_noise_shard(run, url)
        state.write_state(state.state_url(cfg.output, round_, shard_name(url)), st)
        n_samples += len(st.keys)
    t2 = time.time()
    counts = dist.sum([n_samples, 0.0 if train_loss != train_loss else train_loss])
    dist.barrier()  # every shard of the round is committed
    record = None
    if dist.is_main:
        record = finish_round(run, round_, surrogate_s=t1 - t0, sample_s=t2 - t1, samples_here=int(counts[0]),
                              train_loss=counts[1] / dist.world, log=log)
    dist.barrier()
    return record or storage.read_json(storage.join(cfg.output, "run.json"))


def finish_round(run: Run, round_: int, surrogate_s: float, sample_s: float, samples_here: int, train_loss: float, log) -> dict:
    """Rank 0: round metrics from the committed state (so resumed rounds count every
    shard), metrics.jsonl, run.json, pruning."""
    cfg = run.cfg
    losses, clean, skipped, n = [], [], {}, 0
    for url in run.urls:  # only the loss columns: rank 0 reads every shard's summary
        loss_, clean_, skips = state.read_summary(state.state_url(cfg.output, round_, shard_name(url)))
        losses.append(loss_)
        clean.append(clean_)
        n += len(loss_)
        for reason, c in skips.items():
            skipped[reason] = skipped.get(reason, 0) + c
    mem = n and cfg.mem.method == "mem"
    loss = float(np.mean(np.concatenate(losses))) if mem else float("nan")
    clean_loss = float(np.mean(np.concatenate(clean))) if mem else float("nan")
    m = {
        "round": round_, "loss": loss, "clean_loss": clean_loss, "surrogate_train_loss": train_loss, "samples": n, "skipped": skipped,
        "surrogate_s": round(surrogate_s, 3), "sample_s": round(sample_s, 3),
        "surrogate_samples_per_s": round(cfg.mem.surrogate_steps * cfg.mem.batch_size * run.dist.world / surrogate_s, 1) if surrogate_s > 0 and cfg.mem.method == "mem" else None,
        "sample_samples_per_s": round(samples_here / sample_s, 1) if sample_s > 0 else None,
        "hotflip": cfg.mem.trigger_len > 0 and round_ <= cfg.mem.hotflip_rounds,
    }
    url = storage.join(cfg.output, "metrics.jsonl")
    lines = storage.read_bytes(url).decode().splitlines() if storage.exists(url) else []
    lines = [ln for ln in lines if ln.strip() and json.loads(ln)["round"] < round_] + [json.dumps(m)]
    storage.write_bytes_atomic(url, ("\n".join(lines) + "\n").encode())
    old = storage.read_json(storage.join(cfg.output, "run.json"))
    record = run_record(run, old, round_, skipped)
    storage.write_json(storage.join(cfg.output, "run.json"), record)
    state.prune(cfg.output, cfg.state.keep_rounds, round_)
    log(f"round {round_}/{record['rounds']}: loss {loss:.4f} (clean pairs {clean_loss:.4f}) | surrogate {surrogate_s:.1f}s "
        f"({m['surrogate_samples_per_s']} samples/s) | samples {sample_s:.1f}s ({m['sample_samples_per_s']} samples/s) "
        f"| {n} samples, skipped {skipped or 0}")
    return record
