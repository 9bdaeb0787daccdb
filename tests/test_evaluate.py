"""The victim side: retrieval metrics, defences, condition config and mixes, and a tiny
end-to-end victim that learns real retrieval on clean demo data."""

import io
import json
import os
import random
import subprocess

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mem_dist.evaluation import defences, report
from mem_dist.pipeline import surrogate
from mem_dist.pipeline.config import DataConfig
from mem_dist.pipeline.config_io import ConfigError, load_config
from mem_dist.pipeline.data import load_shard
from mem_dist.evaluation.defences import DefenceConfig
from mem_dist.evaluation.clip_victim import create_victim, evaluate_retrieval
from mem_dist.evaluation.eval_config import EvalConfig, VictimConfig
from mem_dist.evaluation.evaluate import grid_samples, main, run
from mem_dist.evaluation.pairs import load_condition, load_pairs
from mem_dist.evaluation.scores import chance_metrics, retrieval_metrics
from tests.conftest import TINY_RN, TINY_VIT, python_cmd

# --------------------------------------------------------------------------------------
# The victim's init
# --------------------------------------------------------------------------------------


def test_victim_never_starts_from_the_surrogates_init():
    """Generation seeds the surrogate with torch.manual_seed(seed). A victim of the same
    architecture and seed that started from those weights would take delta's shortcut as no
    attacker's model does (this inflated our efficacy numbers once: docs/efficacy.md)."""
    torch.manual_seed(0)  # as engine.setup does for seed 0
    sur = surrogate.create_surrogate(TINY_RN)[0].state_dict()
    victim = create_victim(VictimConfig(model=TINY_RN), torch.device("cpu"), 0)[0].state_dict()
    again = create_victim(VictimConfig(model=TINY_RN), torch.device("cpu"), 0)[0].state_dict()
    weights = [k for k, v in sur.items() if v.is_floating_point() and v.numel() > 1 and v.std() > 0]
    assert weights and not any(torch.equal(sur[k], victim[k]) for k in weights)
    assert all(torch.equal(victim[k], again[k]) for k in victim)  # and it repeats for a seed


# --------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------


def test_identical_features_retrieve_perfectly():
    feats = torch.randn(50, 16)
    m = retrieval_metrics(feats, feats.clone())
    for d in ("i2t", "t2i"):
        assert m[d] == {"r1": 1.0, "r5": 1.0, "r10": 1.0, "median_rank": 1.0, "mean_rank": 1.0}


def test_known_ranks_both_directions():
    # Circulant similarities: every row and column holds 4, 3, 2, 1 and the true pair
    # scores 2, so every query ranks its partner third in both directions.
    v = torch.tensor([2.0, 4.0, 3.0, 1.0])
    image = torch.eye(4)
    text = torch.stack([v.roll(j) for j in range(4)])  # sim[i, j] = v[(i - j) % 4]
    m = retrieval_metrics(image, text)
    for d in ("i2t", "t2i"):
        assert m[d] == {"r1": 0.0, "r5": 1.0, "r10": 1.0, "median_rank": 3.0, "mean_rank": 3.0}


def test_reversed_pairs_and_ties_take_the_mean_rank():
    # Captions in reverse order: query i's best match is caption 4 - i; its own caption
    # ties with three others at 0, so its rank is 2 + 3/2 = 3.5 (the middle pair: 1).
    image = torch.eye(5)
    m = retrieval_metrics(image, image.flip(0))
    assert m["i2t"]["r1"] == pytest.approx(0.2) and m["i2t"]["r5"] == 1.0
    assert m["i2t"]["mean_rank"] == pytest.approx((4 * 3.5 + 1) / 5)
    assert m["i2t"]["median_rank"] == 3.0  # floor(3.5)
    collapsed = retrieval_metrics(torch.ones(11, 4), torch.ones(11, 4))  # no information: chance
    assert collapsed["t2i"]["r1"] == 0.0 and collapsed["t2i"]["median_rank"] == 6.0
    assert chance_metrics(11)["median_rank"] == 6.0 and chance_metrics(100)["r10"] == pytest.approx(0.1)


# --------------------------------------------------------------------------------------
# Defences
# --------------------------------------------------------------------------------------


def _pixels(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(6, 3, 32, 32, generator=g) * 255


@pytest.mark.parametrize("image", ["jpeg", "gaussian", "cutout", "mixup"])
def test_image_defences_keep_shapes_and_repeat_with_a_seed(image):
    cfg = DefenceConfig(image=image)
    pixels = _pixels()
    out, targets = defences.defend_images(pixels, cfg, torch.Generator().manual_seed(1))
    again, _ = defences.defend_images(pixels, cfg, torch.Generator().manual_seed(1))
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    assert out.min() >= 0 and out.max() <= 255
    assert torch.equal(out, again)
    assert not torch.equal(out, pixels)
    if image == "mixup":
        assert targets.shape == (6, 6)
        assert torch.allclose(targets.sum(0), torch.ones(6)) and torch.allclose(targets.sum(1), torch.ones(6))
    else:
        assert targets is None
    if image == "cutout":
        assert (out == 127.5).all(dim=1).sum() >= 6  # a grey hole in every image (at least a pixel)


def test_none_and_adv_pass_through_the_batch_transforms():
    pixels = _pixels()
    for image in ("none", "adv"):
        out, targets = defences.defend_images(pixels, DefenceConfig(image=image), torch.Generator())
        assert out is pixels and targets is None


def test_adversarial_pixels_raise_the_loss_inside_the_ball():
    pixels = _pixels()
    w = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(2))
    loss_fn = lambda px: (px * w).sum()  # noqa: E731 - the gradient sign is known: sign(w)
    cfg = DefenceConfig(image="adv", adv_epsilon=8, adv_steps=3, adv_step_size=4)
    adv = defences.adversarial_pixels(loss_fn, pixels, cfg, torch.Generator().manual_seed(3))
    again = defences.adversarial_pixels(loss_fn, pixels, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(adv, again) and adv.shape == pixels.shape
    assert (adv - pixels).abs().max() <= 8 + 1e-4 and adv.min() >= 0 and adv.max() <= 255
    assert loss_fn(adv) > loss_fn(pixels)


def test_soft_clip_loss_with_identity_targets_is_clip_loss():
    from mem_dist.pipeline.surrogate import clip_loss

    g = torch.Generator().manual_seed(0)
    image, text, scale = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.tensor(2.0)
    assert defences.soft_clip_loss(image, text, scale, torch.eye(8)).item() == pytest.approx(clip_loss(image, text, scale).mean().item(), rel=1e-5)


CAPTION = "a photo of a small red circle in the middle, striped background"


@pytest.mark.parametrize("op", ["insert", "delete", "swap", "synonym"])
def test_text_defences_change_captions_and_repeat_with_a_seed(op):
    cfg = DefenceConfig(text=op, text_rate=0.3)
    out = defences.defend_captions([CAPTION] * 20, cfg, random.Random(0))
    assert out == defences.defend_captions([CAPTION] * 20, cfg, random.Random(0))
    assert any(o != CAPTION for o in out)
    words = CAPTION.split()
    for o in out:
        new = o.split()
        if op == "insert":
            assert len(new) > len(words)
        elif op == "delete":
            assert 1 <= len(new) <= len(words)
        elif op == "swap":
            assert sorted(new) == sorted(words)
        else:  # synonym: same length, punctuation kept, replacements come from the table
            assert len(new) == len(words) and new[words.index("middle,")].endswith(",")
            assert all(a == b or b.rstrip(",") in defences.SYNONYMS[a.rstrip(",")] for a, b in zip(words, new))
    assert defences.defend_captions([CAPTION], DefenceConfig(), random.Random(0)) == [CAPTION]


def test_drop_prefix_cuts_the_trigger_words():
    cfg = DefenceConfig(text="drop_prefix", prefix_words=3)
    assert defences.defend_captions(["told boredom fdn " + CAPTION, "two words"], cfg, random.Random(0)) == [CAPTION, ""]
    assert "first 3 words" in cfg.describe()


# --------------------------------------------------------------------------------------
# Config, mixes, grid
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protected_dir(demo_dir, tmp_path_factory):
    """A stand-in for merged protected shards: the demo train shards with the same keys,
    brightened images stored as PNG and captions prefixed with a trigger word."""
    out = tmp_path_factory.mktemp("protected")
    for name in ("00000", "00001", "00002"):
        shard = load_shard(f"{demo_dir}/train/{name}.tar", DataConfig(shards="unused", image_size=32))
        with wds.TarWriter(str(out / f"{name}.tar")) as tw:
            for key, canvas, caption in zip(shard.keys, shard.canvases, shard.captions):
                buf = io.BytesIO()
                Image.fromarray(np.clip(canvas.astype(int) + 40, 0, 255).astype(np.uint8)).save(buf, format="PNG")
                tw.write({"__key__": key, "png": buf.getvalue(), "txt": "zqx " + caption})
    return str(out)


def _cfg(demo_dir, output, *extra):
    return load_config(EvalConfig, None, [
        f"conditions.clean={demo_dir}/train/{{00000..00002}}.tar", f"val_shards={demo_dir}/val/00000.tar",
        "image_size=32", f"output={output}", "device=cpu", f"victim.model={TINY_VIT}", *extra,
    ])


def test_conditions_read_as_specs_or_mixes(demo_dir, protected_dir, tmp_path):
    cfg = _cfg(demo_dir, str(tmp_path), f"conditions.half={{shards: '{protected_dir}/{{00000..00002}}.tar', clean_shards: '{demo_dir}/train/{{00000..00002}}.tar', fraction: 0.5}}")
    assert list(cfg.conditions) == ["clean", "half"] and cfg.conditions["half"].fraction == 0.5
    mix = load_condition(cfg.conditions["half"], cfg)
    assert len(mix) == 120 and mix.protected == 60
    assert [c.startswith("zqx ") for c in mix.captions] == mix.protected_mask.tolist()
    clean = load_condition(cfg.conditions["clean"], cfg)
    assert mix.keys == clean.keys and clean.protected is None
    assert mix.clean.captions == clean.captions and np.array_equal(mix.clean.canvases, clean.canvases)


def test_mixes_report_what_leaks_of_the_owners_pairs(demo_dir, protected_dir, tmp_path):
    """A mix's victim is scored on the clean versions of its own training pairs, protected
    ones against as many of the rest, and the report shows both."""
    out = str(tmp_path / "ev")
    cfg = _cfg(demo_dir, out, "victim.epochs=1", "victim.batch_size=32", "victim.warmup_steps=1",
               f"conditions.half={{shards: '{protected_dir}/{{00000..00002}}.tar', clean_shards: '{demo_dir}/train/{{00000..00002}}.tar', fraction: 0.5}}")
    metrics = run(cfg)
    assert metrics["conditions"]["clean"]["leakage"] is None
    leak = metrics["conditions"]["half"]["leakage"]
    assert leak["n"] == 60
    for side in ("owners", "others"):
        assert 0 <= leak[side]["i2t"]["r10"] <= 1 and leak[side]["i2t"]["median_rank"] >= 1
    text = open(os.path.join(out, "report.md")).read()
    assert "Per-owner leakage" in text and "| half | 60 |" in text


@pytest.mark.parametrize("override, words", [
    ("conditions.half={shards: a.tar, fraction: 0.5}", "conditions.half.clean_shards' is required"),
    ("conditions.half={shards: a.tar, clean: b.tar}", "unknown config key 'conditions.half.clean'"),
    ("conditions.half={shards: a.tar, clean_shards: b.tar, fraction: 2}", "conditions.half.fraction' must be between 0 and 1"),
    ("defence.image=blur", "config key 'defence.image' must be one of"),
    ("victim.epochs=0", "config key 'victim.epochs' must be at least 1"),
    ("conditions.ext={fraction: 1}", "conditions.ext.shards' is required"),
    ("conditions.ext={checkpoint: v.pt, clean_shards: b.tar}", "conditions.ext.checkpoint' is a victim trained elsewhere"),
])
def test_bad_configs_name_the_key(demo_dir, tmp_path, override, words):
    with pytest.raises(ConfigError, match=words.replace("'", ".")):
        _cfg(demo_dir, str(tmp_path), override)


def test_missing_shards_and_keys_exit_2(demo_dir, tmp_path, capsys):
    assert main([f"conditions.clean={demo_dir}/train/0000{{0..9}}.tar", f"val_shards={demo_dir}/val/00000.tar", f"output={tmp_path}"]) == 2
    assert "config key 'conditions.clean': shard not found" in capsys.readouterr().err
    assert main([f"conditions.clean={demo_dir}/train/00000.tar"]) == 2
    assert "config key 'val_shards' is required" in capsys.readouterr().err
    assert main([f"conditions.clean={demo_dir}/train/00000.tar", f"val_shards={demo_dir}/val/00000.tar",
                 f"output={tmp_path}", "victim.pretrained=nowhere.pt"]) == 2
    assert "config key 'victim.pretrained': checkpoint not found" in capsys.readouterr().err
    assert main([f"conditions.ext={{checkpoint: {tmp_path}/nowhere.pt}}", f"val_shards={demo_dir}/val/00000.tar", f"output={tmp_path}"]) == 2
    assert "config key 'conditions.ext.checkpoint': checkpoint not found" in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_one_clear_error(demo_dir, tmp_path, capsys):
    torch.save(surrogate.create_surrogate(TINY_RN)[0].state_dict(), tmp_path / "rn.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for path in ("rn.pt", "junk.pt"):
        assert main([f"conditions.ext={{checkpoint: {tmp_path}/{path}}}", f"val_shards={demo_dir}/val/00000.tar",
                     f"output={tmp_path}", f"victim.model={TINY_VIT}", "device=cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"config key 'conditions.ext.checkpoint': {tmp_path}/{path} does not load into model" in err


def test_grid_shows_conditions_that_share_keys(demo_dir, protected_dir, tmp_path):
    cfg = _cfg(demo_dir, str(tmp_path), f"conditions.mem={protected_dir}/00000.tar", f"conditions.other={demo_dir}/val/00000.tar")
    columns = grid_samples(cfg)
    assert [name for name, _ in columns] == ["clean", "mem"]
    (_, clean), (_, mem) = columns
    assert len(clean) == 4 and all(m[1] == "zqx " + c[1] for c, m in zip(clean, mem))
    png = report.image_grid(columns)
    assert Image.open(io.BytesIO(png)).size[0] > 100


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def test_tiny_victim_learns_clean_retrieval_and_writes_the_report(tmp_path):
    from mem_dist.tools.demo import make_demo_data

    make_demo_data(str(tmp_path / "data"), train=400, val=100, size=32, per_shard=200)
    out = str(tmp_path / "eval")
    cfg = load_config(EvalConfig, None, [
        f"conditions.clean={tmp_path}/data/train/{{00000..00001}}.tar", f"val_shards={tmp_path}/data/val/00000.tar",
        "image_size=32", f"output={out}", "device=cpu", f"victim.model={TINY_VIT}",
        "victim.epochs=2", "victim.batch_size=32", "victim.lr=1e-3", "victim.warmup_steps=5",
        "num_threads=1",  # steady on a busy CI box; run() restores torch's thread count
        "save_victims=true",
    ])
    threads = torch.get_num_threads()
    metrics = run(cfg)
    assert torch.get_num_threads() == threads
    hist = metrics["conditions"]["clean"]
    assert (hist["n_train"], hist["n_val"]) == (400, 100)
    assert [e["epoch"] for e in hist["epochs"]] == [0, 1, 2]
    assert hist["epochs"][0]["train_loss"] is None and hist["epochs"][2]["train_loss"] < hist["epochs"][1]["train_loss"]
    assert hist["final"]["i2t"]["r10"] > 2 * 10 / 100  # well above random guessing
    for name in ("metrics.json", "loss.png", "median_rank.png", "report.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["config"]["victim"]["epochs"] == 2 and saved["chance"]["r10"] == pytest.approx(0.1)
    row = next(line for line in open(os.path.join(out, "report.md")) if line.startswith("| clean | 400 |"))
    best = max(hist["epochs"], key=lambda e: e["i2t"]["r10"])  # the last column: the peak epoch
    assert row.rstrip().endswith(f"| {best['i2t']['r10']:.3f} ({best['epoch']}) |")
    # the saved victim loads as a checkpoint (to fine-tune, or as a surrogate) and scores as it did
    model, tokenizer, spec = create_victim(VictimConfig(model=TINY_VIT, pretrained=os.path.join(out, "victims", "clean.pt")),
                                           torch.device("cpu"), seed=123)
    val = load_pairs(f"{tmp_path}/data/val/00000.tar", cfg)
    again = evaluate_retrieval(model, spec, torch.from_numpy(val.canvases), tokenizer(val.captions), 32)
    assert again["i2t"] == pytest.approx(hist["final"]["i2t"]) and again["t2i"] == pytest.approx(hist["final"]["t2i"])


def test_a_victim_trained_by_open_clip_train_is_evaluated_as_it_is(demo_dir, tmp_path):
    """conditions.X.checkpoint: a victim from another training pipeline (here open_clip's own
    trainer, one epoch on the demo shards) is scored on the clean val shards, untrained further."""
    shards = f"{demo_dir}/train/{{00000..00002}}.tar"
    register_and_train = ("import open_clip, sys; open_clip.add_model_config(sys.argv[1]); "
                          "from open_clip_train.main import main; main(sys.argv[2:])")
    subprocess.run(python_cmd("-c", register_and_train, TINY_VIT, "--model", "tiny-vit", "--train-data", shards,
                              "--dataset-type", "webdataset", "--train-num-samples", "120", "--batch-size", "32",
                              "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--workers", "1", "--precision", "fp32",
                              "--logs", str(tmp_path / "logs"), "--name", "victim", "--report-to", "", "--seed", "0"),
                   check=True, timeout=600, capture_output=True)
    checkpoint = tmp_path / "logs" / "victim" / "checkpoints" / "epoch_1.pt"
    out = str(tmp_path / "eval")
    metrics = run(_cfg(demo_dir, out, f"conditions={{openclip: {{checkpoint: '{checkpoint}', shards: '{shards}'}}}}"))
    hist = metrics["conditions"]["openclip"]
    assert hist["n_train"] is None and [e["epoch"] for e in hist["epochs"]] == [0] and hist["final"]["train_loss"] is None
    # the scores are those of open_clip_train's weights ("state_dict" with DDP's "module." prefixes stripped or not)
    model, tokenizer, spec = create_victim(VictimConfig(model=TINY_VIT), torch.device("cpu"), seed=0)
    state = torch.load(checkpoint, map_location="cpu")["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    val = load_pairs(f"{demo_dir}/val/00000.tar", _cfg(demo_dir, out))
    direct = evaluate_retrieval(model, spec, torch.from_numpy(val.canvases), tokenizer(val.captions), 32)
    assert direct["i2t"] == pytest.approx(hist["final"]["i2t"]) and direct["t2i"] == pytest.approx(hist["final"]["t2i"])
    assert "| openclip | - | - |" in open(os.path.join(out, "report.md")).read()
