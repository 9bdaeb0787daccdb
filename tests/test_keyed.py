"""Caption-keyed codes (``method: keyed``): exact codes, the pipeline without per-sample state,
and a reduced efficacy test that fails if the code is replaced by random noise of its budget."""

import json
import os

import numpy as np
import pytest
import torch

from mem_dist.evaluation import evaluate
from mem_dist.evaluation.eval_config import EvalConfig
from mem_dist.methods.keyed import code
from mem_dist.pipeline.config_io import ConfigError, load_config
from mem_dist.pipeline.config import RunConfig
from mem_dist.pipeline.data import load_shard
from mem_dist.pipeline.generate import main as generate
from mem_dist.methods import get_method
from mem_dist.publishing import merge, verify
from mem_dist.tools.shards import write_shards
from tests.conftest import ROOT, TINY_RN, tiny_overrides
from tests.test_uc import launch

SHARDS = "{00000..00002}.tar"
CALIBRATE = os.path.join(ROOT, "configs", "eval-calibrate.yaml")
KEY = "5a" * 32


@pytest.fixture(scope="module")
def encoder():
    cfg = load_config(RunConfig, None, ["data.shards=x/0.tar", "method=keyed", "surrogate.model=" + TINY_RN])
    return code.text_encoder(get_method("keyed").job(cfg))  # the tower merge uses: seeded random init


def test_a_caption_gets_the_same_code_wherever_it_is_computed(encoder):
    """A caption's embedding (float64, one thread, fixed batch shape) does not depend on the
    other captions of its batch, their order, or the thread count: nor then the code's bytes."""
    clip, tok = encoder
    caps = [f"a photo of a {w}" for w in ("shirt", "bag", "coat", "boot")] * 20 + ["", "a"]
    a = code.embed(clip, tok, caps)
    alone = np.concatenate([code.embed(clip, tok, [c]) for c in caps[:6]])
    reverse = code.embed(clip, tok, caps[::-1])[::-1]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = code.embed(clip, tok, caps)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(a[:6], alone) and np.array_equal(a, reverse) and np.array_equal(a, two)
    assert torch.get_num_threads() == threads


def test_the_code_is_a_bounded_block_code_keyed_on_caption_and_key(encoder):
    clip, tok = encoder
    e_q = code.quantize(code.embed(clip, tok, ["a red circle", "a red circle", "a blue square"]))
    key, other = bytes(32), bytes([1] * 32)
    d = code.delta(key, e_q, 4, 16, 32, 32)
    assert d.dtype == np.int8 and d.shape == (3, 32, 32, 3) and set(np.unique(d)) <= {-16, 16}
    assert np.array_equal(d[0], d[1]) and not np.array_equal(d[0], d[2])
    assert np.array_equal(d[0, :8, :8], np.broadcast_to(d[0, 0, 0], (8, 8, 3)))  # blocks of 32 / 4 px
    assert not np.array_equal(d, code.delta(other, e_q, 4, 16, 32, 32))  # another key, another code
    canvas = np.full((3, 32, 32, 3), 250, np.uint8)
    assert (canvas.astype(int) + code.apply(canvas, d)).max() == 255  # the stored delta keeps pixels in range
    for g in (3, 4):  # mirrored: the same code after a horizontal flip, still keyed on the caption
        m = code.delta(key, e_q, g, 16, 32, 32, mirror=True)
        assert np.array_equal(m, m[:, :, ::-1]) and np.array_equal(m[0], m[1]) and not np.array_equal(m[0], m[2])
    assert not np.array_equal(d, d[:, :, ::-1])  # unmirrored, a flip gives another code
    lum = code.delta(key, e_q, 4, 16, 32, 32, luminance=True)  # one sign for the three channels: gray keeps it
    assert np.array_equal(lum, np.repeat(lum[..., :1], 3, axis=3)) and not np.array_equal(lum[0], lum[2])
    assert not np.array_equal(d, np.repeat(d[..., :1], 3, axis=3))


def test_keyed_config_checks():
    base = ["data.shards=x/{0..1}.tar", "method=keyed", "surrogate.model=" + TINY_RN]
    for bad, key in (("keyed.grid=0", "keyed.grid"), ("keyed.key=abc", "keyed.key"), ("keyed.epsilon=200", "keyed.epsilon"),
                     ("keyed.grid=64", "keyed.grid"), ("keyed.train_batch_size=1", "keyed.train_batch_size"),
                     ("keyed.generator=trained experimental.keyed.mirror=true", "keyed.generator")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(RunConfig, None, base + ["data.image_size=32", *bad.split()])


@pytest.fixture(scope="module")
def keyed_run(demo_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("keyed") / "run")
    assert generate(tiny_overrides(f"{demo_dir}/train/{SHARDS}", out, method="keyed", **{"keyed.grid": 4})) == 0
    assert merge.main([out]) == 0
    return out


def test_generate_keeps_a_key_and_no_per_sample_state(keyed_run, demo_dir):
    files = sorted(os.path.relpath(os.path.join(d, f), keyed_run) for d, _, fs in os.walk(keyed_run) for f in fs
                   if "manifest" not in d and "protected" not in d)
    assert files == ["keyed/key.json", "run.json"], files
    key = json.loads(open(f"{keyed_run}/keyed/key.json").read())["key"]
    assert len(bytes.fromhex(key)) == 32
    assert generate(tiny_overrides(f"{demo_dir}/train/{SHARDS}", keyed_run, method="keyed", **{"keyed.grid": 4})) == 0
    assert json.loads(open(f"{keyed_run}/keyed/key.json").read())["key"] == key  # a repeated generate keeps it


def test_merge_publishes_canvas_plus_the_captions_code_and_verify_recomputes_it(keyed_run, demo_dir, encoder):
    clip, tok = encoder
    record = json.loads(open(f"{keyed_run}/keyed/key.json").read())
    key, mean = bytes.fromhex(record["key"]), np.asarray(record["centre"], np.int64)
    cfg = load_config(RunConfig, None, tiny_overrides(f"{demo_dir}/train/{SHARDS}", keyed_run, method="keyed"))
    src = load_shard(f"{demo_dir}/train/00001.tar", cfg.data)
    published = {s["__key__"]: s for s in verify.protected_samples(f"{keyed_run}/protected/00001.tar")}
    assert mean.shape == (clip.text_projection.shape[1],)  # the mean embedding of the run's 120 captions
    want = code.delta(key, code.quantize(code.embed(clip, tok, list(src.captions))) - mean, 4, 16, 32, 32)
    for i, k in enumerate(src.keys):
        pixels = merge.decode_image(published[k]["png"]).astype(int)
        assert np.array_equal(pixels, np.clip(src.canvases[i].astype(int) + want[i], 0, 255))
        assert published[k]["txt"].decode() == src.captions[i]  # the caption is not touched
    assert verify.verify(keyed_run)["mismatches"] == 0
    stats = json.loads(open(f"{keyed_run}/manifest/00001_stats.json").read())
    assert "keyed" not in open(f"{keyed_run}/protected/00001_stats.json").read()
    assert stats["published"] == len(src.keys)


def test_a_shard_whose_every_sample_is_skipped_gives_an_empty_state(keyed_run, demo_dir):
    cfg = load_config(RunConfig, None, tiny_overrides(f"{demo_dir}/train/{SHARDS}", keyed_run, method="keyed", **{"keyed.grid": 4}))
    src = load_shard(f"{demo_dir}/train/00000.tar", cfg.data)
    method = get_method("keyed")
    st = method.shard_state(method.job(cfg), 1, src.without(np.arange(len(src)), "bad_image"))
    assert st.keys == [] and st.delta.shape == (0, 32, 32, 3) and st.skipped == {"bad_image": len(src)}


def test_verify_names_a_published_byte_the_code_does_not_explain(keyed_run, tmp_path):
    import shutil

    import webdataset as wds

    copy = str(tmp_path / "run")
    shutil.copytree(keyed_run, copy)
    record = json.loads(open(f"{copy}/run.json").read())
    samples = list(verify.protected_samples(f"{copy}/protected/00000.tar"))
    px = merge.decode_image(samples[0]["png"]).copy()
    px[0, 0, 0] ^= 1
    samples[0]["png"] = merge.encode_image(px, load_config(RunConfig, None, [f"data.shards={record['shards'][0]}"]).merge)
    with wds.TarWriter(f"{copy}/protected/00000.tar") as tw:
        for s in samples:
            tw.write({k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"})
    assert verify.verify(copy)["mismatches"] >= 1


def test_two_ranks_publish_the_same_bytes_as_one(demo_dir, tmp_path):
    outs = []
    for n in (1, 2):  # one rank in this process (no second interpreter to start), two by accelerate launch
        out = str(tmp_path / f"r{n}")
        args = tiny_overrides(f"{demo_dir}/train/{SHARDS}", out, method="keyed", **{"keyed.key": KEY, "keyed.grid": 4})
        if n == 1:
            assert generate(args) == 0
        else:
            launch(args, n)
        assert merge.main([out]) == 0
        outs.append(out)
    for name in ("00000.tar", "00002.tar"):
        a, b = (list(verify.protected_samples(f"{o}/protected/{name}")) for o in outs)
        assert [(s["__key__"], s["png"], s["txt"]) for s in a] == [(s["__key__"], s["png"], s["txt"]) for s in b]


def test_a_trained_generator_is_trained_on_two_ranks_kept_with_the_key_and_published_exactly(demo_dir, tmp_path, encoder):
    """keyed.generator: trained: both ranks train one generator (averaged gradients; generate
    fails if their weights differ), key.json keeps it quantized, merge publishes sign(W_q e_q)
    and verify recomputes every byte."""
    out = str(tmp_path / "run")
    launch(tiny_overrides(f"{demo_dir}/train/{SHARDS}", out, method="keyed", **{
        "keyed.key": KEY, "keyed.grid": 4, "keyed.generator": "trained", "keyed.train_steps": 4, "keyed.train_batch_size": 16}), 2)
    record = json.loads(open(f"{out}/keyed/key.json").read())
    w_q = np.asarray(record["weights"], np.int64)
    clip, tok = encoder
    assert w_q.shape == (4 * 4 * 3, clip.text_projection.shape[1]) and record["train_ranks"] == 2
    assert np.abs(w_q).max() == 2 ** 15 and len(np.unique(np.abs(w_q))) > 100  # trained: no longer the key's ±1 matrix
    assert merge.main([out]) == 0
    cfg = load_config(RunConfig, None, tiny_overrides(f"{demo_dir}/train/{SHARDS}", out, method="keyed"))
    src = load_shard(f"{demo_dir}/train/00001.tar", cfg.data)
    e_q = code.quantize(code.embed(clip, tok, list(src.captions))) - np.asarray(record["centre"], np.int64)
    want = code.delta(bytes.fromhex(KEY), e_q, 4, 16, 32, 32, weights=w_q)
    published = {s["__key__"]: s for s in verify.protected_samples(f"{out}/protected/00001.tar")}
    for i, k in enumerate(src.keys):
        assert np.array_equal(merge.decode_image(published[k]["png"]).astype(int), np.clip(src.canvases[i].astype(int) + want[i], 0, 255))
    assert verify.verify(out)["mismatches"] == 0


@pytest.fixture(scope="module")
def coded(tmp_path_factory, encoder):
    """Fashion-MNIST photos with a random label each (the content says nothing about it), the
    label written in the caption, and the caption's keyed code (centred, grid 8) at eps 32 (or, the
    control, a random code per sample with the same budget and grid): train (1000) and val (300).
    eps 32 keeps the test short, as the block code's calibration test: at eps 16 this victim reads
    nothing from 1,000 images in 8 epochs (measured 0.113); docs/efficacy.md measures eps 16 on 4,000."""
    from mem_dist.evaluation.pairs import load_pairs
    from mem_dist.tools.importers import import_fashion_mnist

    clip, tok = encoder
    root = tmp_path_factory.mktemp("coded")
    fm = str(root / "fm")
    import_fashion_mnist(fm, train=1000, val=300, public=0, select=0, per_shard=500)
    cfg = load_config(EvalConfig, CALIBRATE, [f"val_shards={fm}/val/00000.tar"])
    words = ["amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "iris", "juniper"]
    out = {}
    mean = code.quantize(code.embed(clip, tok, [f"a photo of the {w} code" for w in words]).mean(0))  # the centre
    for split, spec, seed in (("train", f"{fm}/train/{{00000..00001}}.tar", 1), ("val", f"{fm}/val/00000.tar", 2)):
        pairs = load_pairs(spec, cfg)
        labels = np.random.default_rng(seed).integers(0, 10, len(pairs))
        captions = [f"a photo of the {words[y]} code" for y in labels]
        keyed = code.delta(bytes(32), code.quantize(code.embed(clip, tok, captions)) - mean, 8, 32, 32, 32)
        e = np.random.default_rng(seed + 10).standard_normal((len(pairs), 128))
        noise = code.delta(bytes(32), code.quantize(e / np.linalg.norm(e, axis=1, keepdims=True)), 8, 32, 32, 32)
        for kind, d in (("keyed", keyed), ("noise", noise)):
            px = (pairs.canvases.astype(np.int16) + d).clip(0, 255).astype(np.uint8)
            write_shards(str(root / f"{kind}-{split}"), ((c, t, {"label": int(y), "class": words[y]})
                                                         for c, t, y in zip(px, captions, labels)), per_shard=500)
        out[split] = "{00000..00001}.tar" if split == "train" else "00000.tar"
    return {kind: {s: str(root / f"{kind}-{s}") + "/" + out[s] for s in out} for kind in ("keyed", "noise")}


def read_labels(shards: dict, out: str) -> float:
    cfg = load_config(EvalConfig, CALIBRATE, [f"conditions={{code: '{shards['train']}'}}", f"val_shards={shards['val']}",
                                              "select_shards=null", "seeds=[0]", "victim.epochs=5", "victim.batch_size=64",
                                              f"output={out}", "num_threads=0", "classifier.width=8"])
    return evaluate.run(cfg, log=lambda line: None)["conditions"]["code"]["final"]["top1"]


def test_the_calibrated_victim_reads_the_keyed_code_and_not_noise_of_its_budget(coded, tmp_path):
    """The reduced efficacy test: labels that only the caption carries, so only a code keyed
    to the caption can teach them from the image. The calibrated classifier reads them from
    new photos that carry their caption's code; from random codes of the same budget and
    grid (what keyed delta would be if it stopped being keyed) it reads nothing (measured in 5 epochs: 1.000
    and 0.113, chance 0.1; in 8: 1.000 and 0.097)."""
    keyed = read_labels(coded["keyed"], str(tmp_path / "keyed"))
    noise = read_labels(coded["noise"], str(tmp_path / "noise"))
    print(f"top-1 on caption-only labels: keyed code {keyed:.3f}, random code {noise:.3f} (chance 0.1)")
    assert keyed > 0.8, keyed
    assert noise < 0.3, noise
