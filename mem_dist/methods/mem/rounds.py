"""MEM's work in a round, on one rank: the surrogate phase and the sample phase.

    surrogate phase: M AdamW steps of the surrogate(s) on (canvas + delta, trigger + caption),
                     DDP across ranks, each of the run's G surrogate ranks (the first
                     launch's world size) drawing batches from the shards it owns
                     (:class:`Stream`: only the shards a round reaches are read); a launch
                     with another world size runs the same G batches per step
    sample phase:    per shard, per batch: HotFlip on the trigger (rounds <= H), then PGD on
                     delta with shuffled captions (the members' mean loss) -> the shard's state

The random / prefix controls (:mod:`mem_dist.methods.controls`) reuse :func:`setup`.
Everything random is a function of (seed, round, shard, batch) or (seed, surrogate rank, step),
so no state byte depends on the world size of the launch that computes it (but for the
order of float sums when G > 2: :func:`mem_dist.pipeline.distributed.reduce_gradients`).

Shapes: B batch, C = 3, H = W canvas side, k trigger length, L context length.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mem_dist.pipeline import distributed, rundir, state, text
from mem_dist.pipeline.config import RunConfig, seed_of
from mem_dist.pipeline.data import Shard, ShardCache, check_shards, owned
from mem_dist.methods.ensemble import Ensemble
from mem_dist.methods.pgd import minimize_delta


@dataclass
class Run:
    """Everything a round needs, built once per process by :func:`setup`."""

    cfg: RunConfig
    dist: distributed.Dist
    urls: list[str]  # every shard of the run
    ranks: int  # G: the surrogate ranks the batches are laid out for (the first launch's world size)
    streams: dict[int, list[str]]  # surrogate rank -> the shards it trains on, for those this process runs
    ensemble: Ensemble  # the surrogate(s)
    vocab: torch.Tensor  # trigger-capable token ids
    cache: ShardCache
    at_round: int = 0  # the round whose surrogate phase the members' weights come from
    batches: "dict[int, Stream] | None" = None  # the surrogate's batch streams, kept across rounds

    @property
    def stream(self) -> list[str]:
        """The shards of this process's first surrogate rank ([] if it runs none)."""
        return next(iter(self.streams.values()), [])


def setup(cfg: RunConfig, dist: distributed.Dist, urls: list[str] | None = None, ranks: int | None = None) -> Run:
    """Shards, surrogate(s) (same init on every rank), optimizers, trigger vocabulary.

    ``ranks``: G, the surrogate ranks (default: this launch's world size). Surrogate rank v
    trains on the shards i with i % G == v (or borrows shard v % len(urls)), and process p
    runs the surrogate ranks v with v % world == p: its own when world == G."""
    urls = check_shards(cfg.data) if urls is None else urls
    ranks = ranks or dist.world
    streams = {v: owned(urls, v, ranks) or [urls[v % len(urls)]] for v in owned(list(range(ranks)), dist.rank, dist.world)}
    ensemble = Ensemble.create(cfg, dist)
    vocab = torch.tensor(text.trigger_vocabulary(ensemble.tokenizer, cfg.experimental.mem.trigger_vocab, cfg.seed), device=dist.device)
    # standing in for k > 1 surrogate ranks: their k shard-blocked streams in memory at once
    cache = ShardCache(cfg.data, max(cfg.data.cache_shards, len(streams) + 1) if len(streams) > 1 else cfg.data.cache_shards)
    return Run(cfg, dist, urls, ranks, streams, ensemble, vocab, cache)


# --------------------------------------------------------------------------------------
# Batches: pixels, tokens
# --------------------------------------------------------------------------------------


def pixels(canvas_BHWC: np.ndarray, device) -> torch.Tensor:
    """uint8 canvases -> float [B, C, H, W] in [0, 255] on ``device``."""
    return torch.from_numpy(canvas_BHWC).to(device).permute(0, 3, 1, 2).float()


def caption_ids(run: Run, shard: Shard) -> list[list[int]]:
    """The BPE ids of every caption of a shard, tokenised once while the shard is cached."""
    if shard.caption_ids is None:
        shard.caption_ids = [text.caption_ids(run.ensemble.tokenizer, c) for c in shard.captions]
    return shard.caption_ids


def tokens(run: Run, bodies: list[list[int]], trigger_Bk: torch.Tensor) -> torch.Tensor:
    """SOT + trigger + caption + EOT, [B, L] on the device."""
    return text.assemble_tokens(bodies, trigger_Bk.cpu(), run.ensemble.tokenizer).to(run.dist.device)


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


class Stream:
    """A rank's endless, shard-blocked stream of surrogate batches: per epoch the shards in a
    seeded order and each shard's rows in a seeded order, cut into batches of ``batch_size``
    (a short last batch of an epoch is dropped; a rank with fewer samples than a batch takes
    them all as one). Batch s depends only on (seed, rank, s) (rank: the surrogate rank), so a round continues at step
    (round - 1) * M wherever the stream was left, and only the shards the stream reaches
    are asked their size.

    Args:
        n_shards: the rank's stream shards.
        size: shard index -> its number of usable samples (asked once per shard, lazily).
        batch_size, steps_per_round, seed, rank: mem.batch_size, mem.surrogate_steps, seed, rank.
    """

    def __init__(self, n_shards: int, size, batch_size: int, steps_per_round: int, seed: int, rank: int):
        self.n_shards, self.batch_size, self.steps_per_round, self.seed, self.rank = n_shards, batch_size, steps_per_round, seed, rank
        self._size, self.sizes = size, {}
        self.step, self._it = 0, None

    def size(self, s: int) -> int:
        if s not in self.sizes:
            self.sizes[s] = self._size(s)
        return self.sizes[s]

    def _batches(self):
        bs, first_epoch = self.batch_size, True
        for epoch in itertools.count():
            rng = np.random.default_rng(seed_of(self.seed, "stream", self.rank, epoch))
            rows, emitted = np.zeros((0, 2), np.int64), False
            for s in rng.permutation(self.n_shards):
                n = self.size(int(s))
                if not n:
                    continue
                rows = np.concatenate([rows, np.stack([np.full(n, s), rng.permutation(n)], 1)])
                while len(rows) >= bs:
                    yield rows[:bs]
                    rows, emitted = rows[bs:], True
            if first_epoch and not emitted:  # fewer samples than a batch: every epoch is one batch of all
                if len(rows) == 0:
                    raise RuntimeError(f"rank {self.rank}: its shards hold no usable samples, so it cannot train the surrogate")
                bs = len(rows)
                yield rows
            first_epoch = False

    def take(self, round_: int):
        """Round ``round_``'s (step, rows [B, 2] of (shard index, row)) pairs."""
        start = (round_ - 1) * self.steps_per_round
        if self._it is None or self.step > start:
            self._it, self.step = self._batches(), 0
        while self.step < start:  # a resumed run: skip the rounds before
            next(self._it)
            self.step += 1
        for _ in range(self.steps_per_round):
            yield self.step, next(self._it)
            self.step += 1


def stream_for(run: Run, v: int, round_: int) -> Stream:
    """Surrogate rank ``v``'s stream, built on first use. A shard's size comes from its decoded
    samples when it is cached, else from the previous round's state (its row count, one small
    read: a resumed run skipping ahead), else from decoding it."""
    def size(s: int) -> int:
        url = run.streams[v][s]
        cached = run.cache.peek(url)
        counted = state.row_count(run.cfg.output, round_ - 1, url) if cached is None else None
        return len(cached if cached is not None else run.cache.get(url)) if counted is None else counted

    if run.batches is None:
        run.batches = {}
    if v not in run.batches:
        m = run.cfg.mem
        run.batches[v] = Stream(len(run.streams[v]), size, m.batch_size, m.surrogate_steps, run.cfg.seed, v)
    return run.batches[v]


def surrogate_round(run: Run, round_: int, bar: bool) -> float:
    """Round ``round_``'s surrogate phase (or its checkpoint, when resuming its sample phase);
    returns this rank's mean training loss (NaN when loaded)."""
    cfg, dist = run.cfg, run.dist
    train_loss = float("nan")
    if rundir.latest_checkpoint(cfg.output) >= round_:  # resuming this round's sample phase
        if run.at_round != round_:
            run.ensemble.load_state_dict(rundir.load_checkpoint(cfg.output, round_))
    else:
        if round_ > 1 and run.at_round != round_ - 1:
            run.ensemble.load_state_dict(rundir.load_checkpoint(cfg.output, round_ - 1))
        train_loss = surrogate_phase(run, round_, bar)
        run.ensemble.sync_and_check(dist, round_)
        if dist.is_main:
            rundir.save_checkpoint(cfg.output, round_, run.ensemble.state_dict(), cfg.state.checkpoint_keep)
        dist.barrier()
    run.at_round = round_
    return train_loss


def surrogate_phase(run: Run, round_: int, bar: bool) -> float:
    """M DDP steps of every member on protected pairs (the same batches); returns this
    process's mean training loss over steps, surrogate ranks and members (NaN if it runs none).

    A process that runs exactly its own surrogate rank (world == G) steps through DDP. One
    that stands in for several (world < G) or none (world > G) adds its ranks' gradients on
    the bare models, and the sum over processes, divided by G, is what DDP would have
    averaged (:func:`distributed.reduce_gradients`); the BatchNorm statistics kept are
    surrogate rank 0's, as DDP keeps rank 0's."""
    cfg, dist = run.cfg, run.dist
    own = list(run.streams) == [dist.rank] and dist.world == run.ranks
    run.ensemble.train()
    takes = {v: stream_for(run, v, round_).take(round_) for v in run.streams}
    starts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    losses = []
    for _ in tqdm(range(cfg.mem.surrogate_steps), desc=f"round {round_} surrogate", disable=not bar, leave=False):
        if not own:
            for m in run.ensemble.members:
                m.optimizer.zero_grad(set_to_none=True)
        kept = None
        for v, take in takes.items():
            step, refs = next(take)
            canvas, delta, trig, bodies = [], [], [], []
            for s, i in refs:
                url = run.streams[v][s]
                shard = run.cache.get(url)
                if url not in starts:  # batches are shard-blocked: keep the last two shards' state per stream
                    if len(starts) == 2 * len(takes):
                        del starts[next(iter(starts))]
                    starts[url] = start_state(run, shard, round_)
                canvas.append(shard.canvases[i])
                delta.append(starts[url][0][i])
                trig.append(starts[url][1][i])
                bodies.append(caption_ids(run, shard)[i])
            pix = pixels(np.stack(canvas), dist.device) + torch.from_numpy(np.stack(delta)).to(dist.device).permute(0, 3, 1, 2).float()
            tok = tokens(run, bodies, torch.from_numpy(np.stack(trig)))
            gen = torch.Generator().manual_seed(seed_of(cfg.seed, "crop", v, step)) if cfg.experimental.mem.augment else None
            losses += run.ensemble.train_step(pix, tok, gen, step=own)
            if v == 0 and not own:
                kept = [distributed.buffers_of(m.bare) for m in run.ensemble.members]
        if not own:
            for i, m in enumerate(run.ensemble.members):
                if kept is not None:
                    distributed.set_buffers(m.bare, kept[i])
                distributed.reduce_gradients(m.bare, dist, run.ranks)
                m.optimizer.step()
    for take in takes.values():  # each stream's generator runs on past its last batch (its step count)
        next(take, None)
    run.ensemble.eval()
    return float(np.mean(losses)) if losses else float("nan")


# --------------------------------------------------------------------------------------
# Sample phase
# --------------------------------------------------------------------------------------


def process_batch(run: Run, round_: int, shard: Shard, rows: np.ndarray, delta_BHWC: np.ndarray, trig_Bk: np.ndarray, batch: int):
    """HotFlip (first H rounds) then PGD for one batch; returns the new (delta, trigger,
    loss, clean_loss) as numpy arrays."""
    cfg, dev, ensemble = run.cfg, run.dist.device, run.ensemble
    canvas = pixels(shard.canvases[rows], dev)
    delta = torch.from_numpy(delta_BHWC).to(dev).permute(0, 3, 1, 2).float()
    trig = torch.from_numpy(trig_Bk).to(dev)
    all_ids = caption_ids(run, shard)
    bodies = [all_ids[i] for i in rows]
    gen = torch.Generator().manual_seed(seed_of(cfg.seed, "batch", round_, shard.name, batch))
    crop = (lambda: gen) if cfg.experimental.mem.augment else (lambda: None)

    base = tokens(run, bodies, trig)  # assembled once; the loops below only write triggers into it

    def assemble(trig_Nk, order=None):
        """Tokens of r * B triggers with the batch's captions (in ``order``: PGD's shuffle)."""
        return text.with_trigger(base if order is None else base[order], trig_Nk)

    if cfg.mem.trigger_len > 0 and round_ <= cfg.mem.hotflip_rounds:
        trig = ensemble.hotflip(canvas + delta, trig, assemble, run.vocab, cfg.experimental.mem.hotflip_candidates)

    def loss_fn(pix, step):
        # Shuffled captions leave delta only the trigger to bind to; without a trigger
        # (EM) delta is optimised against the true captions, as error-minimising noise is.
        shuffle = cfg.experimental.mem.shuffle_captions and cfg.mem.trigger_len > 0
        order = torch.randperm(len(rows), generator=gen).to(dev) if shuffle else None
        return ensemble.pair_losses(pix, assemble(trig, order), crop).mean()

    delta = minimize_delta(loss_fn, delta, canvas, cfg.mem.pgd_steps, cfg.mem.epsilon, cfg.mem.step_size)
    with torch.no_grad():
        loss = ensemble.pair_losses(canvas + delta, assemble(trig))
        clean = ensemble.pair_losses(canvas, tokens(run, bodies, trig[:, :0]))
    delta_np = delta.round().clamp(-cfg.mem.epsilon, cfg.mem.epsilon).to(torch.int8).permute(0, 2, 3, 1).cpu().numpy()
    return delta_np, trig.cpu().numpy(), loss.cpu().numpy(), clean.cpu().numpy()


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
    return [text.trigger_text(run.ensemble.tokenizer, t) for t in trig_Nk] if trig_Nk.size else [""] * len(trig_Nk)
