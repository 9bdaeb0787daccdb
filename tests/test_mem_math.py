"""The MEM building blocks on tiny models: CLIP loss, PGD, HotFlip, trigger round trip."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mem_dist.methods import hotflip, pgd
from mem_dist.pipeline import surrogate, text, towers
from mem_dist.methods.ensemble import Ensemble, Member
from tests.conftest import TINY_RN, TINY_VIT


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok, spec = surrogate.create_surrogate(TINY_VIT)
    return model.eval(), tok, spec


def batch(tok, n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    canvas = torch.randint(0, 256, (n, 3, size, size), generator=g).float()
    caps = [f"a {c} {s} on the left" for c, s in zip(["red", "blue", "green", "pink"] * 4, ["circle", "square"] * 8)][:n]
    return canvas, caps


def test_clip_loss_matches_direct_computation():
    torch.manual_seed(1)
    img, txt = torch.randn(6, 16), torch.randn(6, 16)
    scale = torch.tensor(2.3)
    got = surrogate.clip_loss(img, txt, scale).mean()
    i, t = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale.exp() * i @ t.T
    direct = 0
    for b in range(6):  # the textbook formula, one pair at a time
        direct += -torch.log_softmax(logits[b], 0)[b] / 2 - torch.log_softmax(logits[:, b], 0)[b] / 2
    assert torch.allclose(got, direct / 6, atol=1e-5)
    # and open_clip's own ClipLoss agrees
    import open_clip

    ref = open_clip.ClipLoss()(i, t, scale.exp())
    assert torch.allclose(got, ref, atol=1e-5)


def test_encode_text_from_embeds_matches_open_clip(tiny):
    """Same features as encode_text(ids), and the embeddings' gradient (HotFlip's) is the
    gradient that reaches the token-embedding table through encode_text."""
    model, tok, _ = tiny
    ids = tok(["a red circle", "two blue squares at the top"])
    table = surrogate.token_embedding_weight(model)
    emb = table[ids].detach().requires_grad_(True)
    got = surrogate.encode_text_from_embeds(model, emb, ids)
    assert torch.allclose(got, model.encode_text(ids), atol=1e-5)
    (grad,) = torch.autograd.grad(got.square().sum(), emb)
    model.zero_grad()
    model.encode_text(ids).square().sum().backward()
    expected = torch.zeros_like(table).index_add_(0, ids.flatten(), grad.flatten(0, 1))
    assert grad[:, 1].abs().sum() > 0 and torch.allclose(table.grad, expected, atol=1e-5)
    model.zero_grad()


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RN])
def test_length_aware_text_is_open_clips_encode_text(config):
    """Running each caption only up to its end token gives open_clip's features and
    gradients (parameters and token embeddings), captions longer than the context included."""
    import open_clip

    torch.manual_seed(0)
    fast, tok, _ = surrogate.create_surrogate(config)  # length-aware wherever that is exact
    torch.manual_seed(0)
    ref = open_clip.create_model(surrogate.resolve_model_name(config))
    assert fast._length_aware and not hasattr(ref, "_length_aware")
    ids = tok(["a", "a red circle at the top left", "an orange star " * 30, "two blue squares, far left", ""])
    assert torch.allclose(fast.encode_text(ids), ref.encode_text(ids), atol=1e-5)
    for m in (fast, ref):
        m.zero_grad()
        m.encode_text(ids).square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max() + 1e-6, name  # float rounding
    emb = surrogate.token_embedding_weight(fast)[ids].detach().requires_grad_(True)
    assert torch.allclose(surrogate.encode_text_from_embeds(fast, emb, ids), ref.encode_text(ids), atol=1e-5)
    coca, _, _ = surrogate.create_surrogate("coca_ViT-B-32")  # no length-aware path: left as open_clip built it
    assert not towers.use_length_aware_text(coca)


def test_rn_image_shortcuts_are_open_clips_encode_image():
    """The attention pool computing only the row it returns, the weights channels-last, and the
    sample phase's copy with BatchNorm folded into the convolutions, give open_clip's image
    features and gradients (every parameter's in training; the pixels' in eval mode, as PGD
    takes them)."""
    import open_clip
    from open_clip.modified_resnet import AttentionPool2d

    torch.manual_seed(0)
    fast, _, spec = surrogate.create_surrogate(TINY_RN)  # 64 px: a 2 x 2 map, 5 rows in the pool
    torch.manual_seed(0)
    ref = open_clip.create_model(surrogate.resolve_model_name(TINY_RN))
    assert type(fast.visual.attnpool) is towers.FirstQueryAttentionPool2d and type(ref.visual.attnpool) is AttentionPool2d
    x = torch.rand(6, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # training forwards also move the BatchNorm statistics away from their init
        got, want = fast.encode_image(x), ref.encode_image(x)
        assert torch.allclose(got, want, atol=1e-5)
        for m, out in ((fast, got), (ref, want)):
            m.zero_grad()
            out.square().sum().backward()
    for (name, p), q in zip(fast.visual.named_parameters(), ref.visual.parameters(), strict=True):
        # channels-last sums BatchNorm's reductions in another order: up to 3e-5 of the largest entry
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max() + 1e-6, name
    fast.eval(), ref.eval()
    folded = towers.fold_batchnorm(fast.visual)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    for tower in (fast.visual, folded):  # weights channels-last (use_channels_last), as the comparisons above ran
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in tower.parameters() if p.dim() == 4)
    grads = []
    for tower in (folded, ref.visual):
        pix = x.clone().requires_grad_(True)
        out = tower(pix)
        (g,) = torch.autograd.grad(out.square().sum(), pix)
        grads.append((out, g))
    (got, got_g), (want, want_g) = grads
    assert torch.allclose(got, want, atol=1e-5) and (got_g - want_g).abs().max() <= 1e-5 * want_g.abs().max()
    vit, _, _ = surrogate.create_surrogate(TINY_VIT)  # no BatchNorm, no attention pool: left as built
    assert towers.fold_batchnorm(vit.visual) is None and not towers.use_first_query_pool(vit) and not towers.use_channels_last(vit)


def test_the_sample_phase_image_tower_follows_the_weights():
    """The folded tower is a copy: after training or a loaded checkpoint it is made anew,
    never left stale."""
    torch.manual_seed(0)
    model, tok, spec = surrogate.create_surrogate(TINY_RN)
    ensemble = Ensemble([Member(model.eval(), surrogate.adamw(model, 1e-2, 0.1), spec)], tok, torch.device("cpu"), "fp32")
    member = ensemble.members[0]
    pix, caps = batch(tok, n=8, size=64)
    x = surrogate.to_model_input(pix, spec)

    def check() -> torch.Tensor:
        with torch.no_grad():
            got = member.encode_image(x)
            assert member.folded is not None and member.folded is not model.visual
            assert torch.allclose(got, model.encode_image(x), atol=1e-5)  # the unfolded tower, eval mode
        return got

    before, saved = check(), copy.deepcopy(ensemble.state_dict())  # a checkpoint, not the live tensors
    ensemble.train()
    ensemble.train_step(pix, tok(caps), None)
    ensemble.eval()
    assert not torch.allclose(check(), before, atol=1e-3)
    ensemble.load_state_dict(saved)
    assert torch.allclose(check(), before, atol=1e-6)


def test_pgd_step_lowers_loss_and_keeps_bounds(tiny):
    model, tok, spec = tiny
    canvas, caps = batch(tok)
    canvas[0] = 255  # saturated pixels: canvas + delta must stay in [0, 255]
    ids = tok(caps)

    def loss_fn(pix, step=0):
        img = model.encode_image(surrogate.to_model_input(pix, spec))
        return surrogate.clip_loss(img, model.encode_text(ids), model.logit_scale).mean()

    delta0 = torch.zeros_like(canvas)
    with torch.no_grad():
        before = loss_fn(canvas).item()
    delta = pgd.minimize_delta(loss_fn, delta0, canvas, steps=3, epsilon=8, step_size=1)
    with torch.no_grad():
        after = loss_fn(canvas + delta).item()
    assert after < before
    assert delta.abs().max() <= 8 and torch.equal(delta, delta.round())  # integer 1/255 steps: int8 exactly
    assert ((canvas + delta) >= 0).all() and ((canvas + delta) <= 255).all()
    assert (delta[0] <= 0).all()


def test_hotflip_never_raises_the_loss_of_changed_samples(tiny):
    model, tok, spec = tiny
    canvas, caps = batch(tok, n=8)
    vocab = torch.tensor(text.trigger_vocabulary(tok, 500, seed=0))
    bodies = [text.caption_ids(tok, c) for c in caps]
    trig = torch.tensor(text.initial_triggers([str(i) for i in range(8)], vocab.numpy(), 3, seed=0))
    with torch.no_grad():
        image = F.normalize(model.encode_image(surrogate.to_model_input(canvas, spec)), dim=-1)

    def text_features(t):
        return [F.normalize(model.encode_text(text.assemble_tokens(bodies, t, tok)), dim=-1)]

    ids = text.assemble_tokens(bodies, trig, tok)
    emb = surrogate.token_embedding_weight(model)[ids].detach().requires_grad_(True)
    loss = surrogate.clip_loss(image, surrogate.encode_text_from_embeds(model, emb, ids), model.logit_scale).mean()
    (grad,) = torch.autograd.grad(loss, emb)
    cands = hotflip.candidate_tokens([grad[:, 1:4]], [surrogate.token_embedding_weight(model).detach()], vocab, 6)
    assert set(cands.flatten().tolist()) <= set(vocab.tolist())
    with torch.no_grad():
        before = hotflip.pair_losses(image, text_features(trig)[0], model.logit_scale)
        new, after_reported = hotflip.select_triggers(text_features, [image], trig, cands, [model.logit_scale])
        after = hotflip.pair_losses(image, text_features(new)[0], model.logit_scale)
    assert torch.allclose(after, after_reported, atol=1e-5)
    changed = (new != trig).any(1)
    assert changed.any(), "HotFlip changed nothing: the test would not test anything"
    # Each sample's choice holds the rest fixed, so judge each changed sample alone.
    for b in torch.nonzero(changed).flatten().tolist():
        alone = trig.clone()
        alone[b] = new[b]
        with torch.no_grad():
            loss_b = hotflip.pair_losses(image, text_features(alone)[0], model.logit_scale)[b]
        assert loss_b <= before[b] + 1e-5


def test_swapped_pair_losses_match_recomputation():
    torch.manual_seed(2)
    img, txt, new = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(1.0)
    got = hotflip.swapped_pair_losses(img, txt, new, scale)
    for b in range(5):
        t = txt.clone()
        t[b] = new[b]
        assert torch.allclose(got[b], hotflip.pair_losses(img, t, scale)[b], atol=1e-5)


def test_every_trigger_token_round_trips(tokenizer):
    vocab = text.trigger_vocabulary(tokenizer)
    assert len(vocab) > 30000
    assert tuple(vocab.tolist()) == text.compute_round_trip_ids(tokenizer)  # the shipped list is the computed one
    specials = {0, tokenizer.sot_token_id, tokenizer.eot_token_id}
    assert not specials & set(vocab.tolist())
    for token_id in vocab.tolist():  # every candidate, alone, as the words a caption starts with
        assert tokenizer.encode(text.trigger_text(tokenizer, [token_id]) + " a red circle")[0] == token_id


def test_assembled_tokens_are_the_tokenizers(tokenizer):
    """text.assemble_tokens builds what open_clip's tokenizer makes of trigger + caption, long captions cut."""
    vocab = text.trigger_vocabulary(tokenizer)
    rng = np.random.default_rng(1)
    caps = ["", "a red circle", "an orange star " * 30, "Two BLUE squares, far left!"]
    bodies = [text.caption_ids(tokenizer, c) for c in caps]
    for k in (0, 1, 3, 20):
        trig = torch.from_numpy(rng.choice(vocab, (len(caps), k)))
        got = text.assemble_tokens(bodies, trig, tokenizer)
        want = tokenizer([text.protected_caption(text.trigger_text(tokenizer, t), c) for t, c in zip(trig.tolist(), caps)])
        assert torch.equal(got, want), k
        # the batch's tokens assembled once, r = 3 blocks of triggers written in (HotFlip's, PGD's)
        base = text.assemble_tokens(bodies, torch.zeros_like(trig), tokenizer)
        many = torch.from_numpy(rng.choice(vocab, (3 * len(caps), k)))
        assert torch.equal(text.with_trigger(base, many), text.assemble_tokens(bodies * 3, many, tokenizer)), k


def test_protected_caption_tokenises_to_trigger_ids(tokenizer):
    vocab = text.trigger_vocabulary(tokenizer)
    rng = np.random.default_rng(0)
    caps = ["a red circle at the top", "Two BLUE squares, far left!", "an orange star " * 30]
    for k in (1, 3, 5):
        trig = torch.tensor(vocab[rng.integers(0, len(vocab), (len(caps), k))])
        got = text.assemble_tokens([text.caption_ids(tokenizer, c) for c in caps], trig, tokenizer)
        for b, cap in enumerate(caps):
            words = text.protected_caption(text.trigger_text(tokenizer, trig[b]), cap)
            ref = tokenizer([words])[0]
            assert torch.equal(got[b], ref)
            assert ref[1:1 + k].tolist() == trig[b].tolist()


def test_tiny_rn_surrogate_builds():
    model, tok, spec = surrogate.create_surrogate(TINY_RN)
    assert spec.size == 64 and hasattr(tok, "encode")


def reference_stream(sizes: list[int], batch_size: int, seed: int, rank: int, steps: int) -> list[np.ndarray]:
    """The surrogate's batch stream as mem-dist computed it up to 399a614: every shard's size
    first, then each epoch's whole order (the definition the lazy Stream must keep)."""
    from mem_dist.pipeline.config import seed_of

    total = sum(sizes)
    bs = min(batch_size, total)
    per_epoch = total // bs
    out, order_epoch = [], -1
    for step in range(steps):
        epoch, j = divmod(step, per_epoch)
        if epoch != order_epoch:
            rng = np.random.default_rng(seed_of(seed, "stream", rank, epoch))
            order = np.concatenate([np.stack([np.full(sizes[s], s), rng.permutation(sizes[s])], 1)
                                    for s in rng.permutation(len(sizes)) if sizes[s]])
            order_epoch = epoch
        out.append(order[j * bs:(j + 1) * bs])
    return out


@pytest.mark.parametrize("sizes,batch_size", [([40, 40, 40], 32), ([500, 0, 37, 250], 128), ([3, 4], 32), ([0, 9], 4),
                                              ([100] * 40, 128)])
def test_the_lazy_stream_is_the_eager_one(sizes, batch_size):
    """Same batches as computing every shard's size up front, across rounds and when a
    resumed run starts at a later round; only the shards reached are asked their size."""
    from mem_dist.methods.mem.rounds import Stream

    steps, rounds = 5, 4
    want = reference_stream(sizes, batch_size, 7, 1, steps * rounds)
    asked = []
    stream = Stream(len(sizes), lambda s: asked.append(s) or sizes[s], batch_size, steps, seed=7, rank=1)
    got = [rows for r in range(1, rounds + 1) for _, rows in stream.take(r)]
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    resumed = Stream(len(sizes), lambda s: sizes[s], batch_size, steps, seed=7, rank=1)
    assert all(np.array_equal(a, b) for (_, a), b in zip(resumed.take(3), want[2 * steps:3 * steps], strict=True))
    if len(sizes) == 40:  # 20 batches of 128 reach 26 of the 40 shards of 100
        assert len(set(asked)) < 40
    with pytest.raises(RuntimeError, match="no usable samples"):
        next(Stream(2, lambda s: 0, 4, 1, 0, 0).take(1))
